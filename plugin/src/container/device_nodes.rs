//! The NVIDIA device nodes a GPU container needs, found under `--dev-root` (docs/volcano-contract.md §4, "Device specs"):
//! the control nodes `/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools` and `/dev/nvidia-modeset`
//! where present, and `/dev/nvidia<minor>` for each assigned GPU.
//!
//! Used twice: in a container's answer with `--pass-device-specs` (nodes without the NVIDIA runtime; the kubelet
//! edge turns them into `DeviceSpec`s), and as the CDI spec's `deviceNodes` ([`crate::container::cdi`]).

use std::collections::BTreeMap;
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

/// The MIG device a container is handed, as its device nodes need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigNodeIds {
    /// The parent GPU's minor (`/dev/nvidia<minor>`, and `gpu<minor>` in `mig-minors`).
    pub gpu_minor: u32,
    /// The GPU instance id.
    pub gi_id: u32,
    /// The compute instance id.
    pub ci_id: u32,
}

/// Parses `mig-minors`: one `<capability> <minor>` per line (`config 1`, `monitor 2`, `gpu0/gi1/access 12`,
/// `gpu0/gi1/ci0/access 13`), blank lines skipped. Anything else is an error naming the line.
pub fn parse_mig_minors(text: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let parsed = match (words.next(), words.next(), words.next()) {
            (Some(name), Some(minor), None) => minor.parse::<u32>().ok().map(|m| (name, m)),
            _ => None,
        };
        let Some((name, minor)) = parsed else {
            return Err(format!(
                "line {}: {line:?} is not `<capability> <minor>`",
                n + 1
            ));
        };
        out.insert(name.to_owned(), minor);
    }
    Ok(out)
}

/// The device nodes of a container handed these MIG devices: the control nodes, each parent GPU's
/// `/dev/nvidia<minor>`, and the `/dev/nvidia-caps/nvidia-cap<N>` of its GPU instance's and compute instance's
/// `access` capabilities, N read from `minors_file` (`mig-minors`). Without the file, or without a line for
/// one of the capabilities, no nodes: the error names the file and the line looked for (a MIG device the
/// container cannot open is never handed out).
pub fn mig_nodes(
    dev_root: &Path,
    minors_file: &Path,
    devices: &[MigNodeIds],
) -> Result<Vec<DeviceNode>, String> {
    let text = std::fs::read_to_string(minors_file)
        .map_err(|e| format!("cannot read {}: {e}", minors_file.display()))?;
    let minors = parse_mig_minors(&text).map_err(|e| format!("{}: {e}", minors_file.display()))?;
    let mut nodes = control_nodes(dev_root);
    for d in devices {
        let gpu = gpu_node(dev_root, d.gpu_minor);
        if !nodes.contains(&gpu) {
            nodes.push(gpu);
        }
        let gi = format!("gpu{}/gi{}/access", d.gpu_minor, d.gi_id);
        let ci = format!("gpu{}/gi{}/ci{}/access", d.gpu_minor, d.gi_id, d.ci_id);
        for cap in [gi, ci] {
            let Some(minor) = minors.get(&cap) else {
                return Err(format!(
                    "{} has no line `{cap} <minor>` (the MIG device's capability)",
                    minors_file.display()
                ));
            };
            let cap_node = node(dev_root, &format!("/dev/nvidia-caps/nvidia-cap{minor}"));
            if !nodes.contains(&cap_node) {
                nodes.push(cap_node);
            }
        }
    }
    Ok(nodes)
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

    /// `/proc/driver/nvidia-caps/mig-minors` as a driver writes it (head of a real file: 8 GPUs x 15 GIs x 8 CIs).
    const REAL_MIG_MINORS: &str = "config 1\nmonitor 2\ngpu0/gi0/access 3\ngpu0/gi0/ci0/access 4\n\
gpu0/gi0/ci1/access 5\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\ngpu0/gi1/ci1/access 14\n\
gpu1/gi1/access 147\ngpu1/gi1/ci0/access 148\n";

    #[test]
    fn parses_the_real_format() {
        let minors = parse_mig_minors(REAL_MIG_MINORS).unwrap();
        assert_eq!(minors["config"], 1);
        assert_eq!(minors["monitor"], 2);
        assert_eq!(minors["gpu0/gi1/access"], 12);
        assert_eq!(minors["gpu0/gi1/ci0/access"], 13);
        assert_eq!(minors["gpu1/gi1/ci0/access"], 148);
        assert_eq!(minors.len(), 10);
    }

    #[test]
    fn garbage_is_an_error_naming_the_line() {
        for bad in [
            "gpu0/gi1/access twelve",
            "gpu0/gi1/access",
            "gpu0/gi1/access 1 2",
            "-1",
        ] {
            let err = parse_mig_minors(&format!("config 1\n{bad}\n")).unwrap_err();
            assert!(err.starts_with("line 2: "), "{bad}: {err}");
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn mig_nodes_are_the_parent_gpu_and_both_caps() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/nvidiactl"), b"").unwrap();
        let minors = root.path().join("mig-minors");
        std::fs::write(&minors, REAL_MIG_MINORS).unwrap();
        let ids = MigNodeIds {
            gpu_minor: 1,
            gi_id: 1,
            ci_id: 0,
        };
        let got: Vec<String> = mig_nodes(root.path(), &minors, &[ids])
            .unwrap()
            .into_iter()
            .map(|n| {
                assert_eq!(n.host_path, root.path().join(&n.container_path[1..]));
                n.container_path
            })
            .collect();
        assert_eq!(
            got,
            [
                "/dev/nvidiactl",
                "/dev/nvidia1",
                "/dev/nvidia-caps/nvidia-cap147",
                "/dev/nvidia-caps/nvidia-cap148"
            ]
        );
    }

    #[test]
    fn a_missing_line_or_file_names_what_was_looked_for() {
        let root = tempfile::tempdir().unwrap();
        let minors = root.path().join("mig-minors");
        let ids = MigNodeIds {
            gpu_minor: 0,
            gi_id: 2,
            ci_id: 0,
        };
        let err = mig_nodes(root.path(), &minors, &[ids]).unwrap_err();
        assert!(
            err.starts_with(&format!("cannot read {}: ", minors.display())),
            "{err}"
        );
        std::fs::write(&minors, REAL_MIG_MINORS).unwrap();
        let err = mig_nodes(root.path(), &minors, &[ids]).unwrap_err();
        assert_eq!(
            err,
            format!(
                "{} has no line `gpu0/gi2/access <minor>` (the MIG device's capability)",
                minors.display()
            )
        );
        let ci = MigNodeIds { ci_id: 7, ..ids };
        let ci = MigNodeIds { gi_id: 1, ..ci };
        let err = mig_nodes(root.path(), &minors, &[ci]).unwrap_err();
        assert!(
            err.contains("no line `gpu0/gi1/ci7/access <minor>`"),
            "{err}"
        );
    }
}
