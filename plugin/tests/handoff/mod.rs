//! A simulated GPU node for the device-list-strategy and CDI tests: the gpu-sim, a fake `--dev-root` tree
//! (`dev/nvidiactl`, `dev/nvidia-uvm` and `dev/nvidia<minor>` per GPU, character devices 1:3 when root, else links to `/dev/null`; no `nvidia-uvm-tools` nor
//! `nvidia-modeset`, as on many nodes), a fake driver directory, a fake kubelet, a fake apiserver, and the real
//! agent bound to them; plus a Volcano master-style bind and the kubelet's Allocate.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use gpu_sim::{NodeSpec, SimNode};
use harness::FakeKubelet;
use harness::apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use kubelet_api::v1beta1::ContainerAllocateResponse;
use serde_json::{Value, json};

use crate::common::*;

pub const NODE: &str = "node-a";
pub const NS: &str = "default";

pub struct SimCluster {
    pub sim: SimNode,
    pub dir: tempfile::TempDir,
    pub kubelet: FakeKubelet,
    pub api: FakeApiServer,
    pub client: Client,
    pub agent: Agent,
}

impl SimCluster {
    /// Starts the agent with `args`; `{root}` in an argument is replaced by the temporary directory.
    pub async fn start(spec: NodeSpec, args: &[&str]) -> Self {
        let sim = SimNode::new(spec).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("devroot/dev");
        std::fs::create_dir_all(&dev).unwrap();
        for name in ["nvidiactl".to_owned(), "nvidia-uvm".to_owned()]
            .into_iter()
            .chain(sim.spec().gpus.iter().map(|g| format!("nvidia{}", g.minor)))
        {
            fake_device_node(&dev.join(name));
        }
        for sub in ["lib64", "bin"] {
            std::fs::create_dir_all(dir.path().join("driver").join(sub)).unwrap();
        }
        let plane = ControlPlane::start(dir.path(), NODE).await;
        let client = plane.client().await;
        let root = dir.path().display().to_string();
        let mut cmd = plane.agent_command(&sim, dir.path(), NODE);
        cmd.args(args.iter().map(|a| a.replace("{root}", &root)));
        let agent = Agent::spawn(cmd);
        let ControlPlane { kubelet, api, .. } = plane;
        kubelet
            .wait_for_resources(&ALL, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        let cluster = Self {
            sim,
            dir,
            kubelet,
            api,
            client,
            agent,
        };
        cluster.wait_until_watched().await;
        cluster
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn uuid(&self, i: usize) -> String {
        self.sim.spec().gpus[i].uuid.clone()
    }

    pub fn minor(&self, uuid: &str) -> u32 {
        self.sim
            .spec()
            .gpus
            .iter()
            .find(|g| g.uuid == uuid)
            .unwrap()
            .minor
    }

    async fn wait_until_watched(&self) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while self.api.active_watches() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never watched"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    /// Binds a pod the way Volcano master does (annotations inside the Binding). `containers` are
    /// (name, GPU UUIDs); each device gets 1000 MiB and 30 % of the cores.
    pub async fn bind(&self, name: &str, containers: &[(&str, Vec<String>)]) {
        let specs: Vec<Value> = containers
            .iter()
            .map(|(n, uuids)| {
                json!({"name": n, "image": "cuda", "resources": {"limits": {
                    "volcano.sh/vgpu-number": uuids.len().to_string(),
                    "volcano.sh/vgpu-memory": "1000",
                }}})
            })
            .collect();
        let queue: String = containers
            .iter()
            .map(|(_, uuids)| {
                uuids
                    .iter()
                    .map(|u| format!("{u},NVIDIA,1000,30:"))
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(";");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"schedulerName": "volcano", "containers": specs},
            "status": {"phase": "Pending"}
        });
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(pod).unwrap(),
        )
        .await
        .unwrap();
        let time = "1787220000";
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "annotations": {
                "volcano.sh/vgpu-node": NODE,
                "volcano.sh/vgpu-time": time,
                "volcano.sh/bind-time": time,
                "volcano.sh/bind-phase": "allocating",
                "volcano.sh/vgpu-ids-new": queue,
                "volcano.sh/devices-to-allocate": queue,
            }},
            "target": {"kind": "Node", "name": NODE}
        });
        pods.create_subresource::<Value, Value>("binding", name, &PostParams::default(), &binding)
            .await
            .unwrap();
    }

    /// The kubelet admits the next container, of `size` vGPUs.
    pub async fn admit(&self, size: usize) -> ContainerAllocateResponse {
        let response = self
            .kubelet
            .admit(NUMBER, size)
            .await
            .unwrap()
            .unwrap_or_else(|s| {
                panic!(
                    "Allocate failed: {}\n{}",
                    s.message(),
                    self.agent.log_text()
                )
            });
        assert_eq!(response.container_responses.len(), 1);
        response.container_responses.into_iter().next().unwrap()
    }
}

/// A character device with `/dev/null`'s numbers (1:3, harmless) when the tests run as root, as CI does: the
/// CDI reference library, like runc, accepts only real device nodes. Otherwise a link to `/dev/null`, which
/// the agent's own presence checks accept.
fn fake_device_node(path: &std::path::Path) {
    let made = std::process::Command::new("mknod")
        .args(["-m", "666"])
        .arg(path)
        .args(["c", "1", "3"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        std::os::unix::fs::symlink("/dev/null", path).unwrap();
    }
}

/// Whether [`fake_device_node`] could make real device nodes (root).
pub fn real_device_nodes(root: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(root.join("devroot/dev/nvidiactl"))
        .is_ok_and(|m| m.file_type().is_char_device())
}

/// The mounts of a response as (container path, host path, read-only).
pub fn mounts(r: &ContainerAllocateResponse) -> Vec<(String, String, bool)> {
    r.mounts
        .iter()
        .map(|m| (m.container_path.clone(), m.host_path.clone(), m.read_only))
        .collect()
}
