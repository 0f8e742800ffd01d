//! One fixture for "a node with a fake kubelet, a fake apiserver and the agent": the gpu-sim node, the fakes of
//! this crate, and the real agent binary (its path is the caller's: `env!("CARGO_BIN_EXE_vgpu-device-plugin")`
//! exists only in the plugin's own tests, and sim-node picks its binary at run time).
//!
//! Three layers, each usable alone:
//! - [`agent_command`] and [`Agent`]: the agent as a child process on a gpu-sim node, its stderr collected line
//!   by line (tests that need no apiserver, or that start and stop the agent themselves);
//! - [`ControlPlane`]: a fake kubelet in `<dir>/device-plugins` and a fake apiserver holding the node, reached
//!   through `<dir>/kubeconfig`;
//! - [`Cluster`], built by [`ClusterBuilder`]: both, plus the agent bound to the node, started and waited for,
//!   with the helpers the tests share (bind a pod the way Volcano does, admit a container, wait for a
//!   condition, read the log).

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpu_sim::{NodeSpec, SimNode};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kubelet_api::v1beta1::ContainerAllocateResponse;
use serde_json::{Value, json};

use crate::apiserver::FakeApiServer;
use crate::kubelet::{AuthorityForm, FakeKubelet};

/// The three resources the agent serves.
pub const NUMBER: &str = "volcano.sh/vgpu-number";
/// See [`NUMBER`].
pub const MEMORY: &str = "volcano.sh/vgpu-memory";
/// See [`NUMBER`].
pub const CORES: &str = "volcano.sh/vgpu-cores";
/// [`NUMBER`], [`MEMORY`], [`CORES`].
pub const ALL: [&str; 3] = [NUMBER, MEMORY, CORES];

/// Generous bound for things that take milliseconds; tests assert behaviour, the benchmarks measure time.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// The node a [`Cluster`] binds the agent to unless told otherwise.
pub const NODE: &str = "node-a";
/// The namespace of the pods the helpers create.
pub const NS: &str = "default";

// ---- the agent process ----

/// The agent binary `binary` as a child process on `sim`, registering with the kubelet at `kubelet_socket`,
/// its lock directory beside the socket, metrics on an ephemeral loopback port, stderr piped (for [`Agent`]).
pub fn agent_command(binary: &Path, sim: &SimNode, kubelet_socket: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.envs(sim.env())
        .env("NVML_LIB", gpu_sim::nvml_library())
        .env("KUBELET_SOCKET", kubelet_socket)
        // The host-PID broker's socket goes under the lock directory: keep it in the test's own directory.
        .env(
            "VGPU_LOCK_DIR",
            kubelet_socket
                .parent()
                .unwrap_or(Path::new("/tmp"))
                .join("vgpulock"),
        )
        .env("RUST_LOG", "info")
        .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
        .env_remove("DP_DISABLE_HEALTHCHECKS")
        .env_remove("DP_ENABLE_HEALTHCHECKS")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// A running agent whose stderr is collected line by line; killed on drop.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Spawns `cmd` (whose stderr must be piped, as [`agent_command`] sets it).
    ///
    /// # Panics
    /// When the binary does not start.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("agent binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        Self { child, log }
    }

    /// The lines logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The log so far as one text.
    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (by number) to the agent.
    ///
    /// # Panics
    /// When `kill` fails.
    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    /// The exit status if the agent has exited, without waiting.
    ///
    /// # Panics
    /// When the status cannot be read.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("the agent's status")
    }

    /// Waits for the exit.
    ///
    /// # Panics
    /// When the agent is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Agent {
    /// SIGKILL, and waits for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the agent to completion (for refusals) and returns its exit status and stderr lines.
pub fn run_to_exit(mut cmd: Command) -> (ExitStatus, Vec<String>) {
    cmd.stdin(Stdio::null());
    let mut agent = Agent::spawn(cmd);
    let status = agent.wait_exit(PATIENCE);
    // Let the reader thread drain the pipe.
    std::thread::sleep(Duration::from_millis(50));
    (status, agent.log())
}

/// A fake kubelet in a fresh directory.
///
/// # Panics
/// When it cannot start.
pub async fn kubelet() -> (tempfile::TempDir, FakeKubelet) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubelet = FakeKubelet::start(dir.path())
        .await
        .expect("the fake kubelet starts");
    (dir, kubelet)
}

/// The `*.sock` files in `dir`, sorted.
///
/// # Panics
/// When `dir` cannot be read.
pub fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the socket directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .collect();
    v.sort();
    v
}

/// A free loopback port for an agent's metrics listener.
///
/// # Panics
/// When no port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `GET path` on a loopback port, returning the status line and body.
///
/// # Panics
/// When the port does not answer.
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

// ---- the control plane ----

/// What an agent bound to a node talks to: a fake kubelet in `<dir>/device-plugins` and a fake apiserver
/// that holds the node, reached through `<dir>/kubeconfig`.
#[derive(Debug)]
pub struct ControlPlane {
    /// The fake kubelet.
    pub kubelet: FakeKubelet,
    /// The fake apiserver.
    pub api: FakeApiServer,
    /// Its kubeconfig.
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts both under `dir`, the node `node` created, the kubelet sending `localhost`.
    ///
    /// # Panics
    /// When a fake cannot start.
    pub async fn start(dir: &Path, node: &str) -> Self {
        Self::start_with_authority(dir, node, AuthorityForm::Localhost).await
    }

    /// As [`ControlPlane::start`], the kubelet's dial-back sending `:authority` in `form`.
    ///
    /// # Panics
    /// When a fake cannot start.
    pub async fn start_with_authority(dir: &Path, node: &str, form: AuthorityForm) -> Self {
        let kubelet_dir = dir.join("device-plugins");
        std::fs::create_dir_all(&kubelet_dir).expect("the kubelet directory");
        let kubelet = FakeKubelet::start_with_authority(&kubelet_dir, form)
            .await
            .expect("the fake kubelet starts");
        let api = FakeApiServer::start()
            .await
            .expect("the fake apiserver starts");
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, None)
            .expect("the kubeconfig is written");
        api.create("/api/v1/nodes", json!({"metadata": {"name": node}}))
            .expect("the node is created");
        Self {
            kubelet,
            api,
            kubeconfig,
        }
    }

    /// A kube-rs client of the fake apiserver, as the tests' side of the cluster.
    pub async fn client(&self) -> Client {
        kube_client(&self.kubeconfig).await
    }

    /// The agent binary `binary` as a node runs it (`NODE_NAME`, the kubeconfig), with its hook path, lock
    /// directory and node config under `dir`.
    pub fn command(&self, binary: &Path, sim: &SimNode, dir: &Path, node: &str) -> Command {
        node_command(binary, sim, &self.kubelet, &self.kubeconfig, dir, node)
    }
}

fn node_command(
    binary: &Path,
    sim: &SimNode,
    kubelet: &FakeKubelet,
    kubeconfig: &Path,
    dir: &Path,
    node: &str,
) -> Command {
    let mut cmd = agent_command(binary, sim, kubelet.socket());
    cmd.env("KUBECONFIG", kubeconfig)
        .env("NODE_NAME", node)
        .arg("--hook-path")
        .arg(dir.join("hook"))
        .arg("--lock-dir")
        .arg(dir.join("vgpulock"))
        .arg("--node-config")
        .arg(dir.join("node-config.json"));
    cmd
}

/// A kube-rs client through a kubeconfig.
///
/// # Panics
/// When the kubeconfig cannot be read or used.
pub async fn kube_client(kubeconfig: &Path) -> Client {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).expect("a readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .expect("a usable kubeconfig");
    Client::try_from(config).expect("a kube client")
}

// ---- the cluster ----

/// How far [`ClusterBuilder::start`] waits before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ready {
    /// Not at all: the agent has been spawned (for tests of start-up itself).
    Spawned,
    /// The kubelet has seen all three resources registered and listed.
    #[default]
    Registered,
    /// Registered, and the agent holds at least one watch on the apiserver.
    Watching,
}

/// Builds a [`Cluster`]: the gpu-sim node, the agent's arguments and environment, the kubelet's authority
/// form, what the apiserver holds before the agent starts, and how far to wait.
pub struct ClusterBuilder {
    binary: PathBuf,
    spec: NodeSpec,
    node: String,
    args: Vec<String>,
    envs: Vec<(OsString, OsString)>,
    authority: AuthorityForm,
    ready: Ready,
    device_tree: bool,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("binary", &self.binary)
            .field("node", &self.node)
            .field("args", &self.args)
            .field("authority", &self.authority)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl ClusterBuilder {
    /// The agent `binary` on a node of `spec`.
    pub fn new(binary: impl Into<PathBuf>, spec: NodeSpec) -> Self {
        Self {
            binary: binary.into(),
            spec,
            node: NODE.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            authority: AuthorityForm::Localhost,
            ready: Ready::Registered,
            device_tree: false,
        }
    }

    /// Adds agent arguments; `{root}` in one is replaced by the cluster's temporary directory.
    #[must_use]
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable of the agent (after the defaults of [`agent_command`]).
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// The `:authority` form of the kubelet's dial-back calls.
    #[must_use]
    pub fn authority(mut self, form: AuthorityForm) -> Self {
        self.authority = form;
        self
    }

    /// How far [`ClusterBuilder::start`] waits.
    #[must_use]
    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = ready;
        self
    }

    /// A fake `--dev-root` tree under `<root>/devroot` (`dev/nvidiactl`, `dev/nvidia-uvm`, `dev/nvidia<minor>`
    /// per GPU: character devices 1:3 when root, else links to `/dev/null`) and an empty driver directory
    /// `<root>/driver/{lib64,bin}`, for the device-list-strategy and CDI tests.
    #[must_use]
    pub fn device_tree(mut self) -> Self {
        self.device_tree = true;
        self
    }

    /// Starts the fakes and the agent, and waits as [`ClusterBuilder::ready`] says.
    ///
    /// # Panics
    /// When something does not start, or the agent is not ready within [`PATIENCE`] (with its log).
    pub async fn start(self) -> Cluster {
        self.start_with(|_, _| {}).await
    }

    /// As [`ClusterBuilder::start`], with `setup` preparing the apiserver (faults, objects) and the directory
    /// before the agent starts.
    ///
    /// # Panics
    /// As [`ClusterBuilder::start`].
    pub async fn start_with(self, setup: impl FnOnce(&FakeApiServer, &Path)) -> Cluster {
        let sim = SimNode::new(self.spec).expect("the gpu-sim node");
        let dir = tempfile::tempdir().expect("a temporary directory");
        if self.device_tree {
            make_device_tree(dir.path(), &sim);
        }
        let plane =
            ControlPlane::start_with_authority(dir.path(), &self.node, self.authority).await;
        setup(&plane.api, dir.path());
        let client = plane.client().await;
        let root = dir.path().display().to_string();
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.replace("{root}", &root))
            .collect();
        let mut cmd = plane.command(&self.binary, &sim, dir.path(), &self.node);
        cmd.args(&args).envs(self.envs.iter().map(|(k, v)| (k, v)));
        let agent = Agent::spawn(cmd);
        let ControlPlane {
            kubelet,
            api,
            kubeconfig,
        } = plane;
        let cluster = Cluster {
            sim,
            dir,
            kubelet,
            api,
            client,
            agent,
            kubeconfig,
            node: self.node,
            binary: self.binary,
            args,
            envs: self.envs,
        };
        if self.ready != Ready::Spawned {
            cluster.wait_registered(PATIENCE).await;
        }
        if self.ready == Ready::Watching {
            cluster.wait_watching().await;
        }
        cluster
    }
}

/// A gpu-sim node with a fake kubelet, a fake apiserver and the real agent bound to the node.
pub struct Cluster {
    /// The simulated GPUs.
    pub sim: SimNode,
    /// The temporary directory everything lives in (see [`Cluster::root`]).
    pub dir: tempfile::TempDir,
    /// The fake kubelet, in `<root>/device-plugins`.
    pub kubelet: FakeKubelet,
    /// The fake apiserver.
    pub api: FakeApiServer,
    /// A client of it, as the tests' side of the cluster (Volcano, kubectl).
    pub client: Client,
    /// The agent.
    pub agent: Agent,
    /// `<root>/kubeconfig`.
    pub kubeconfig: PathBuf,
    node: String,
    binary: PathBuf,
    args: Vec<String>,
    envs: Vec<(OsString, OsString)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("root", &self.dir.path())
            .field("node", &self.node)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A builder for the agent `binary` on a node of `spec`.
    pub fn builder(binary: impl Into<PathBuf>, spec: NodeSpec) -> ClusterBuilder {
        ClusterBuilder::new(binary, spec)
    }

    /// The temporary directory: `device-plugins/`, `kubeconfig`, `hook/`, `vgpulock/`, `node-config.json`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The UUID of GPU `i`.
    pub fn uuid(&self, i: usize) -> String {
        self.sim.spec().gpus[i].uuid.clone()
    }

    /// The minor number of the GPU `uuid`.
    ///
    /// # Panics
    /// When there is no such GPU.
    pub fn minor(&self, uuid: &str) -> u32 {
        self.sim
            .spec()
            .gpus
            .iter()
            .find(|g| g.uuid == uuid)
            .expect("a GPU of the node")
            .minor
    }

    /// The agent's command line as the cluster started it.
    pub fn agent_command(&self) -> Command {
        let mut cmd = node_command(
            &self.binary,
            &self.sim,
            &self.kubelet,
            &self.kubeconfig,
            self.dir.path(),
            &self.node,
        );
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Stops the agent (SIGKILL) and starts it again as it was started; does not wait.
    pub fn restart_agent(&mut self) {
        self.agent.kill();
        self.agent = Agent::spawn(self.agent_command());
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        self.agent.log_text()
    }

    /// Waits until the kubelet has all three resources.
    ///
    /// # Panics
    /// When it has not within `within` (with the agent's log).
    pub async fn wait_registered(&self, within: Duration) {
        self.kubelet
            .wait_for_resources(&ALL, within)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.agent.log_text()));
    }

    /// Waits until the agent holds a watch on the apiserver.
    ///
    /// # Panics
    /// When it does not within [`PATIENCE`].
    pub async fn wait_watching(&self) {
        let deadline = Instant::now() + PATIENCE;
        while self.api.active_watches() == 0 {
            assert!(
                Instant::now() < deadline,
                "the agent never watched\n{}",
                self.agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the agent's watches are up and have had time (300 ms) to deliver what exists now.
    pub async fn wait_until_watched(&self) {
        self.wait_watching().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Polls `cond` every 50 ms.
    ///
    /// # Panics
    /// When it does not hold within `within`, naming `what`, with the agent's log.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&Self) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "not within {within:?}: {what}\n{}",
                self.agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pods of [`NS`].
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// A pod of [`NS`], read through the apiserver.
    ///
    /// # Panics
    /// When it cannot be read.
    pub async fn pod(&self, name: &str) -> Pod {
        self.pods().get(name).await.expect("the pod")
    }

    /// An annotation of a pod, read through the apiserver.
    pub async fn annotation(&self, name: &str, key: &str) -> Option<String> {
        self.pod(name)
            .await
            .metadata
            .annotations
            .unwrap_or_default()
            .get(key)
            .cloned()
    }

    /// Creates a pod (JSON, e.g. from [`pod_json`]) in [`NS`].
    ///
    /// # Panics
    /// When the apiserver refuses it.
    pub async fn create_pod(&self, pod: Value) -> Pod {
        self.pods()
            .create(
                &PostParams::default(),
                &serde_json::from_value(pod).expect("a pod"),
            )
            .await
            .expect("the pod is created")
    }

    /// Binds an existing pod to this node the way `style` does, with the scheduler's `annotations` (see
    /// [`bind_annotations`]).
    ///
    /// # Panics
    /// When the apiserver refuses a step.
    pub async fn bind_pod(&self, name: &str, style: BindStyle, annotations: Value) {
        let mut metadata = json!({"name": name});
        match style {
            BindStyle::PatchThenBind => {
                let patch = json!({"metadata": {"annotations": annotations}});
                self.pods()
                    .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
                    .await
                    .expect("the annotations are patched");
            }
            BindStyle::InBinding => metadata["annotations"] = annotations,
        }
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": metadata,
            "target": {"kind": "Node", "name": self.node}
        });
        self.pods()
            .create_subresource::<Value, Value>("binding", name, &PostParams::default(), &binding)
            .await
            .expect("the pod is bound");
    }

    /// Creates a pod of `containers` and binds it as `style` does with `queue` (written verbatim) at `time`;
    /// returns the pod as created.
    pub async fn bind(
        &self,
        name: &str,
        style: BindStyle,
        containers: &[Ctr<'_>],
        queue: &str,
        time: &str,
    ) -> Pod {
        let pod = self.create_pod(pod_json(name, containers)).await;
        self.bind_pod(name, style, bind_annotations(&self.node, queue, time))
            .await;
        pod
    }

    /// The kubelet admits the next container, of `size` vGPUs: its response.
    ///
    /// # Panics
    /// When the call or the Allocate fails (with the agent's log), or the response is not for one container.
    pub async fn admit(&self, size: usize) -> ContainerAllocateResponse {
        let response = self
            .kubelet
            .admit(NUMBER, size)
            .await
            .expect("the kubelet reaches the agent")
            .unwrap_or_else(|s| {
                panic!(
                    "Allocate failed: {}\n{}",
                    s.message(),
                    self.agent.log_text()
                )
            });
        assert_eq!(response.container_responses.len(), 1);
        response
            .container_responses
            .into_iter()
            .next()
            .expect("one container response")
    }
}

/// How a Volcano scheduler writes its bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindStyle {
    /// Volcano up to v1.15: PATCH the annotations onto the pod, then create the Binding.
    PatchThenBind,
    /// Volcano master: the annotations travel inside the Binding.
    InBinding,
}

/// A container of a test pod: name, and the vgpu-number, vgpu-memory and vgpu-cores limits (`None`: absent).
pub type Ctr<'a> = (&'a str, Option<u64>, Option<u64>, Option<u64>);

/// A pending pod of [`NS`] scheduled by Volcano, with `containers`.
pub fn pod_json(name: &str, containers: &[Ctr<'_>]) -> Value {
    let containers: Vec<Value> = containers
        .iter()
        .map(|(n, count, mem, cores)| {
            let mut limits = serde_json::Map::new();
            for (key, value) in [(NUMBER, count), (MEMORY, mem), (CORES, cores)] {
                if let Some(v) = value {
                    limits.insert(key.into(), json!(v.to_string()));
                }
            }
            json!({"name": n, "image": "cuda", "resources": {"limits": limits}})
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"schedulerName": "volcano", "containers": containers},
        "status": {"phase": "Pending"}
    })
}

/// The six annotations the scheduler writes at bind (Volcano docs/volcano-contract.md §3.1).
pub fn bind_annotations(node: &str, queue: &str, time: &str) -> Value {
    json!({
        "volcano.sh/vgpu-node": node,
        "volcano.sh/vgpu-time": time,
        "volcano.sh/bind-time": time,
        "volcano.sh/bind-phase": "allocating",
        "volcano.sh/vgpu-ids-new": queue,
        "volcano.sh/devices-to-allocate": queue,
    })
}

fn make_device_tree(root: &Path, sim: &SimNode) {
    let dev = root.join("devroot/dev");
    std::fs::create_dir_all(&dev).expect("the fake /dev");
    for name in ["nvidiactl".to_owned(), "nvidia-uvm".to_owned()]
        .into_iter()
        .chain(sim.spec().gpus.iter().map(|g| format!("nvidia{}", g.minor)))
    {
        fake_device_node(&dev.join(name));
    }
    for sub in ["lib64", "bin"] {
        std::fs::create_dir_all(root.join("driver").join(sub)).expect("the fake driver directory");
    }
}

/// A character device with `/dev/null`'s numbers (1:3, harmless) when the tests run as root, as CI does: the
/// CDI reference library, like runc, accepts only real device nodes. Otherwise a link to `/dev/null`, which
/// the agent's own presence checks accept.
fn fake_device_node(path: &Path) {
    let made = Command::new("mknod")
        .args(["-m", "666"])
        .arg(path)
        .args(["c", "1", "3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        std::os::unix::fs::symlink("/dev/null", path).expect("a link to /dev/null");
    }
}

/// Whether [`ClusterBuilder::device_tree`] could make real device nodes (root).
pub fn real_device_nodes(root: &Path) -> bool {
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
