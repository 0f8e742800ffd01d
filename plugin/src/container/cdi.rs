//! The node's CDI spec (Container Device Interface) for the `cdi-annotations` and `cdi-cri` device list
//! strategies: what it holds, its device names, and keeping the file current.
//!
//! One file, `<cdi-spec-dir>/volcano.sh-vgpu.json`, kind `volcano.sh/vgpu` (our own kind, so it never clashes
//! with the `nvidia.com/gpu` specs `nvidia-ctk` or the GPU operator write in the same directory):
//! - one device per **healthy** GPU, named by its UUID, whose edits add `/dev/nvidia<minor>`; a GPU that
//!   turns unhealthy or is lost is taken out of the file (a container cannot be started on it: the runtime
//!   says the CDI device is unresolvable) and put back when it recovers;
//! - a device `hami-core-preload` that mounts `ld.so.preload`, requested by Allocate unless the container
//!   sets `CUDA_DISABLE_CONTROL` (the per-container opt-out must survive CDI);
//! - spec-wide edits, applied whenever any of our devices is injected: the control device nodes present under
//!   `--dev-root`, `libvgpu.so` (read-only), the HAMi-core lock directory, and the driver directory with its
//!   `LD_LIBRARY_PATH` (and `PATH`) when `--driver-host-path` is set.
//!
//! The spec declares `cdiVersion` 0.5.0, the oldest version with every field used (`hostPath` on device
//! nodes came in 0.5.0), so that runtimes with older CDI libraries accept it. It is written atomically (a
//! hidden temporary file in the same directory, then `rename`), rebuilt on health changes and every
//! [`REFRESH`] (control nodes appear when their modules load), written only when its content changes, and
//! left in place at shutdown: containers the kubelet restarts while the agent is being upgraded still resolve
//! their devices (`/var/run` is cleared at reboot; remove the file by hand when uninstalling).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::DeliverySettings;
use crate::container::device_nodes::{DeviceNode, control_nodes, gpu_node};
use crate::container::paths::{CONTAINER_LD_SO_PRELOAD, CONTAINER_LIBVGPU, CONTAINER_LOCK_DIR};
use crate::gpu::inventory::Inventory;

/// The CDI specification version the spec follows.
pub const CDI_VERSION: &str = "0.5.0";
/// `vendor/class` of our devices.
pub const KIND: &str = "volcano.sh/vgpu";
/// The spec's file name in the CDI directory (`<vendor>-<class>.json`, the usual convention).
pub const SPEC_FILE: &str = "volcano.sh-vgpu.json";
/// The device that preloads `libvgpu.so` through `/etc/ld.so.preload`.
pub const PRELOAD_DEVICE: &str = "hami-core-preload";
/// The plugin name in the CDI annotation key (`cdi.k8s.io/<plugin>_<id>`).
pub const ANNOTATION_PLUGIN: &str = "vgpu-device-plugin";

/// `volcano.sh/vgpu=<name>`, a fully qualified CDI device name.
pub fn qualified(name: &str) -> String {
    format!("{KIND}={name}")
}

/// A fresh annotation key, `<prefix>vgpu-device-plugin_<uuid4>` (the CDI annotation convention; the name part
/// is 55 characters, under Kubernetes' 63).
pub fn annotation_key(prefix: &str) -> String {
    format!("{prefix}{ANNOTATION_PLUGIN}_{}", uuid::Uuid::new_v4())
}

/// Why the spec could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the CDI spec {path} (--cdi-spec-dir): {source}")]
pub struct CdiError {
    /// The file or directory that failed.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// What goes into the spec besides the GPUs.
#[derive(Debug, Clone)]
pub struct SpecInputs {
    /// Strategies, dev root, driver paths, spec directory.
    pub delivery: DeliverySettings,
    /// Host directory of `libvgpu.so` and `ld.so.preload`.
    pub hook_path: PathBuf,
    /// Host lock directory.
    pub lock_dir: PathBuf,
}

fn node_json(node: &DeviceNode) -> Value {
    json!({
        "path": node.container_path,
        "hostPath": node.host_path.to_string_lossy(),
        "permissions": "rw",
    })
}

fn mount_json(host: &Path, container: &str, read_only: bool) -> Value {
    let options = if read_only {
        json!(["ro", "nosuid", "nodev", "bind"])
    } else {
        json!(["rw", "nosuid", "nodev", "bind"])
    };
    json!({ "hostPath": host.to_string_lossy(), "containerPath": container, "options": options })
}

/// The spec for these GPUs; `healthy[i]` is the health of `inventory.gpus[i]`.
pub fn build_spec(inputs: &SpecInputs, inventory: &Inventory, healthy: &[bool]) -> Value {
    let dev_root = &inputs.delivery.dev_root;
    let mut devices: Vec<Value> = inventory
        .gpus
        .iter()
        .zip(healthy.iter().chain(std::iter::repeat(&true)))
        .filter(|(_, ok)| **ok)
        .map(|(gpu, _)| {
            json!({
                "name": gpu.uuid,
                "containerEdits": { "deviceNodes": [node_json(&gpu_node(dev_root, gpu.minor))] },
            })
        })
        .collect();
    devices.push(json!({
        "name": PRELOAD_DEVICE,
        "containerEdits": {
            "mounts": [mount_json(&inputs.hook_path.join("ld.so.preload"), CONTAINER_LD_SO_PRELOAD, true)],
        },
    }));

    let mut mounts = vec![
        mount_json(
            &inputs.hook_path.join("libvgpu.so"),
            CONTAINER_LIBVGPU,
            true,
        ),
        mount_json(&inputs.lock_dir, CONTAINER_LOCK_DIR, false),
    ];
    let mut env = Vec::new();
    if let Some(driver) = &inputs.delivery.driver {
        mounts.push(mount_json(
            &driver.host,
            &driver.container.to_string_lossy(),
            true,
        ));
        env.push(format!("LD_LIBRARY_PATH={}", driver.ld_library_path()));
        if driver.set_path {
            env.push(format!("PATH={}", driver.path()));
        }
    }
    let mut edits = serde_json::Map::new();
    if !env.is_empty() {
        edits.insert("env".into(), json!(env));
    }
    let nodes: Vec<Value> = control_nodes(dev_root).iter().map(node_json).collect();
    if !nodes.is_empty() {
        edits.insert("deviceNodes".into(), Value::Array(nodes));
    }
    edits.insert("mounts".into(), Value::Array(mounts));

    json!({
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": devices,
        "containerEdits": Value::Object(edits),
    })
}

/// Writes `spec` to `<dir>/volcano.sh-vgpu.json` atomically; returns whether the file changed.
pub fn write_spec(dir: &Path, spec: &Value) -> Result<bool, CdiError> {
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| CdiError { path, source }
    };
    let target = dir.join(SPEC_FILE);
    let mut text = serde_json::to_string_pretty(spec).map_err(|e| CdiError {
        path: target.clone(),
        source: e.into(),
    })?;
    text.push('\n');
    if std::fs::read_to_string(&target).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(failed(dir))?;
    // Hidden and not `.json`/`.yaml`: CDI registries watching the directory never parse a half-written file.
    let temp = dir.join(format!(".{SPEC_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.sync_all()
    };
    if let Err(error) = write() {
        let _ = std::fs::remove_file(&temp);
        return Err(failed(&temp)(error));
    }
    std::fs::rename(&temp, &target).map_err(failed(&target))?;
    Ok(true)
}

/// How often the spec is rebuilt besides health changes: control nodes such as `/dev/nvidia-uvm` appear
/// when their module loads (often at the first CUDA call on the node), and a spec file removed by hand comes
/// back. A rebuild that changes nothing writes nothing.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(30);
/// Retry delay after a failed write.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the spec current: rebuilt on every GPU health change and every `refresh`, until the health channel
/// closes. A failed write is logged and retried every few seconds (the spec on disk is then out of date, and
/// the log says so).
pub async fn keep_current(
    inputs: SpecInputs,
    inventory: std::sync::Arc<Inventory>,
    mut health: watch::Receiver<Vec<bool>>,
    refresh: std::time::Duration,
) {
    let dir = inputs.delivery.cdi_spec_dir.clone();
    loop {
        let healthy = health.borrow_and_update().clone();
        let spec = build_spec(&inputs, &inventory, &healthy);
        let wait = match write_spec(&dir, &spec) {
            Ok(changed) => {
                if changed {
                    let gpus = healthy.iter().filter(|h| **h).count();
                    tracing::info!(path = %dir.join(SPEC_FILE).display(), healthy_gpus = gpus, "CDI spec updated");
                }
                refresh
            }
            Err(error) => {
                tracing::error!(error = %crate::error::error_chain(&error), "CDI spec out of date; retrying in 5 s");
                RETRY.min(refresh)
            }
        };
        tokio::select! {
            changed = health.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::inventory::Gpu;

    fn inventory() -> Inventory {
        Inventory {
            gpus: (0..2)
                .map(|i| Gpu {
                    nvml_index: i,
                    uuid: format!("GPU-0000000{i}-0000-0000-0000-000000000000"),
                    model: "NVIDIA T4".into(),
                    memory_bytes: 16 << 30,
                    minor: i + 4,
                    numa_node: None,
                    pci_bus_id: String::new(),
                })
                .collect(),
        }
    }

    fn inputs() -> SpecInputs {
        SpecInputs {
            delivery: DeliverySettings::default(),
            hook_path: "/usr/local/vgpu".into(),
            lock_dir: "/tmp/vgpulock".into(),
        }
    }

    fn names(spec: &Value) -> Vec<String> {
        spec["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn unhealthy_gpus_leave_the_spec_and_the_preload_device_stays() {
        let inv = inventory();
        let all = build_spec(&inputs(), &inv, &[true, true]);
        assert_eq!(
            names(&all),
            vec![
                inv.gpus[0].uuid.clone(),
                inv.gpus[1].uuid.clone(),
                PRELOAD_DEVICE.into()
            ]
        );
        assert_eq!(
            all["devices"][1]["containerEdits"]["deviceNodes"][0]["path"],
            "/dev/nvidia5"
        );
        let one = build_spec(&inputs(), &inv, &[true, false]);
        assert_eq!(
            names(&one),
            vec![inv.gpus[0].uuid.clone(), PRELOAD_DEVICE.into()]
        );
    }

    #[test]
    fn writes_only_on_change_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = build_spec(&inputs(), &inventory(), &[true, true]);
        assert!(write_spec(dir.path(), &spec).unwrap());
        assert!(!write_spec(dir.path(), &spec).unwrap());
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, vec![std::ffi::OsString::from(SPEC_FILE)]);
        let read: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(SPEC_FILE)).unwrap())
                .unwrap();
        assert_eq!(read, spec);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_nodes_that_appear_later_and_health_changes_reach_the_file() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/nvidiactl"), b"").unwrap();
        let mut inputs = inputs();
        inputs.delivery.dev_root = root.path().to_owned();
        inputs.delivery.cdi_spec_dir = root.path().join("cdi");
        let file = root.path().join("cdi").join(SPEC_FILE);
        let (tx, rx) = watch::channel(vec![true, true]);
        let task = tokio::spawn(keep_current(
            inputs,
            std::sync::Arc::new(inventory()),
            rx,
            std::time::Duration::from_millis(20),
        ));
        let read = || -> Option<Value> {
            serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok()
        };
        let wait_for = |what: &str, cond: &dyn Fn(&Value) -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                if read().is_some_and(|s| cond(&s)) {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "{what}: {:?}", read());
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        let control = |s: &Value| {
            s["containerEdits"]["deviceNodes"]
                .as_array()
                .map_or(0, Vec::len)
        };
        wait_for("nvidiactl only", &|s| control(s) == 1);
        std::fs::write(root.path().join("dev/nvidia-uvm"), b"").unwrap();
        wait_for("nvidia-uvm added by the refresh", &|s| control(s) == 2);
        tx.send_replace(vec![false, true]);
        wait_for("GPU 0 removed", &|s| names(s).len() == 2);
        std::fs::remove_file(&file).unwrap();
        wait_for("a removed file comes back", &|s| names(s).len() == 2);
        drop(tx);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the task ends when health closes")
            .unwrap();
    }

    #[test]
    fn annotation_keys_are_fresh_and_short_enough() {
        let a = annotation_key("cdi.k8s.io/");
        assert_ne!(a, annotation_key("cdi.k8s.io/"));
        let name = a.strip_prefix("cdi.k8s.io/").unwrap();
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with("vgpu-device-plugin_"));
    }
}
