//! The NVIDIA device nodes a GPU container needs, found under `--dev-root` (docs/volcano-contract.md §4, "Device specs"):
//! the control nodes `/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools` and `/dev/nvidia-modeset`
//! where present, and `/dev/nvidia<minor>` for each assigned GPU.
//!
//! Used twice: in a container's answer with `--pass-device-specs` (nodes without the NVIDIA runtime; the kubelet
//! edge turns them into `DeviceSpec`s), and as the CDI spec's `deviceNodes` ([`crate::container::cdi`]).

use std::path::{Path, PathBuf};

/// The driver's control devices, in the order they are returned; each only when present under the dev root
/// (`nvidia-uvm-tools` and `nvidia-modeset` are missing on many nodes, `nvidia-uvm` until its module loads).
pub const CONTROL_DEVICES: [&str; 4] = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

/// One device node: where the container sees it, and where it is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// `/dev/...` in the container.
    pub container_path: String,
    /// The same node under the dev root on the host.
    pub host_path: PathBuf,
}

/// `container_path` (absolute, under `/dev`) under `dev_root`.
fn node(dev_root: &Path, container_path: &str) -> DeviceNode {
    DeviceNode {
        container_path: container_path.to_owned(),
        host_path: dev_root.join(container_path.trim_start_matches('/')),
    }
}

/// The control devices present under `dev_root`.
pub fn control_nodes(dev_root: &Path) -> Vec<DeviceNode> {
    CONTROL_DEVICES
        .iter()
        .map(|path| node(dev_root, path))
        .filter(|n| n.host_path.exists())
        .collect()
}

/// `/dev/nvidia<minor>` of one GPU. Always returned: the GPU exists (NVML reported it), and a node missing on
/// the host must fail the container's start loudly rather than hand it a GPU-less container.
pub fn gpu_node(dev_root: &Path, minor: u32) -> DeviceNode {
    node(dev_root, &format!("/dev/nvidia{minor}"))
}

/// The device nodes of a container with the GPUs of these minor numbers: control nodes first, then one per
/// GPU (the Go plugin's set; the kubelet edge hands each out `rw`).
pub fn container_nodes(dev_root: &Path, minors: &[u32]) -> Vec<DeviceNode> {
    control_nodes(dev_root)
        .into_iter()
        .chain(minors.iter().map(|&minor| gpu_node(dev_root, minor)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_present_control_nodes_and_every_assigned_gpu() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dev")).unwrap();
        for name in ["nvidiactl", "nvidia-uvm", "nvidia3"] {
            std::fs::write(root.path().join("dev").join(name), b"").unwrap();
        }
        let nodes = container_nodes(root.path(), &[3, 5]);
        let got: Vec<(&str, PathBuf)> = nodes
            .iter()
            .map(|n| (n.container_path.as_str(), n.host_path.clone()))
            .collect();
        let host = |n: &str| root.path().join("dev").join(n);
        assert_eq!(
            got,
            vec![
                ("/dev/nvidiactl", host("nvidiactl")),
                ("/dev/nvidia-uvm", host("nvidia-uvm")),
                ("/dev/nvidia3", host("nvidia3")),
                ("/dev/nvidia5", host("nvidia5")),
            ]
        );
    }

    #[test]
    fn the_default_root_maps_dev_to_itself() {
        assert_eq!(
            gpu_node(Path::new("/"), 7),
            DeviceNode {
                container_path: "/dev/nvidia7".into(),
                host_path: PathBuf::from("/dev/nvidia7"),
            }
        );
    }
}
