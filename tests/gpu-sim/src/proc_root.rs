//! A fake `/proc` for the node agent's PID-to-container mapping: a directory holding `<pid>/cgroup` files
//! ([`ProcRoot`]) and the text a real node's kernel shows in them ([`cgroup_file`]).
//!
//! The formats, as the kubelet (`pkg/kubelet/cm/cgroup_manager_linux.go`: slice names from the cgroup name's
//! components, UID dashes turned into underscores under systemd) and the runtimes (runc's
//! `slice:prefix:name` becomes `<prefix>-<id>.scope` under systemd; CRI-O prefixes `crio-` under cgroupfs)
//! lay them out:
//!
//! * **v1** (legacy): one `hierarchy-id:controllers:path` line per mounted hierarchy, highest id first,
//!   ending with `1:name=systemd:`; every controller shows the container's path except `rdma` and `misc`,
//!   which the kubelet does not manage (`/`).
//! * **hybrid** (systemd's default on Ubuntu 18.04–21.04, Debian 10): the v1 lines plus `0::<path>` for the
//!   unified hierarchy, where systemd (the systemd driver) placed the container's scope; under the cgroupfs
//!   driver nobody moves the process there, so it stays in its runtime's unit (`0::/system.slice/containerd.service`).
//! * **v2**: the single line `0::<path>`.
//!
//! Paths (`<uid_>` is the UID with `_` for `-`):
//!
//! | driver | QoS | runtime | path |
//! |---|---|---|---|
//! | cgroupfs | guaranteed | containerd/docker | `/kubepods/pod<uid>/<id>` |
//! | cgroupfs | burstable/besteffort | containerd/docker | `/kubepods/burstable/pod<uid>/<id>` |
//! | cgroupfs | any | CRI-O | `.../pod<uid>/crio-<id>` |
//! | systemd | guaranteed | any | `/kubepods.slice/kubepods-pod<uid_>.slice/<scope>` |
//! | systemd | burstable | any | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/<scope>` |
//! | systemd | any | containerd / CRI-O / docker | scope `cri-containerd-<id>.scope` / `crio-<id>.scope` / `docker-<id>.scope` |

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// How the node's cgroups are mounted and who names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CgroupLayout {
    /// cgroup v1 only (e.g. CentOS 7), kubelet and runtime with the cgroupfs driver.
    V1Cgroupfs,
    /// cgroup v1 only, systemd driver.
    V1Systemd,
    /// v1 controllers plus the unified hierarchy (`0::` line), cgroupfs driver.
    HybridCgroupfs,
    /// v1 controllers plus the unified hierarchy, systemd driver.
    HybridSystemd,
    /// cgroup v2 (unified), cgroupfs driver (e.g. k3s' default).
    V2Cgroupfs,
    /// cgroup v2, systemd driver (kubeadm's default since 1.22).
    V2Systemd,
}

impl CgroupLayout {
    /// Every layout.
    pub const ALL: [CgroupLayout; 6] = [
        Self::V1Cgroupfs,
        Self::V1Systemd,
        Self::HybridCgroupfs,
        Self::HybridSystemd,
        Self::V2Cgroupfs,
        Self::V2Systemd,
    ];

    /// Whether the kubelet and runtime use the systemd cgroup driver.
    pub fn systemd(self) -> bool {
        matches!(
            self,
            Self::V1Systemd | Self::HybridSystemd | Self::V2Systemd
        )
    }
}

/// The container runtime (its cgroup naming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// containerd's CRI plugin: `cri-containerd-<id>.scope` / `<id>`.
    Containerd,
    /// CRI-O: `crio-<id>.scope` / `crio-<id>`.
    CriO,
    /// Docker through dockershim or cri-dockerd: `docker-<id>.scope` / `<id>`.
    Docker,
}

impl Runtime {
    /// Every runtime.
    pub const ALL: [Runtime; 3] = [Self::Containerd, Self::CriO, Self::Docker];
}

/// A pod's QoS class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    /// Directly under `kubepods` (no QoS level).
    Guaranteed,
    /// Under `burstable`.
    Burstable,
    /// Under `besteffort`.
    BestEffort,
}

impl Qos {
    /// Every QoS class.
    pub const ALL: [Qos; 3] = [Self::Guaranteed, Self::Burstable, Self::BestEffort];
}

/// The cgroup path of a container (what follows the last `:` of a line), e.g.
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`.
///
/// `pod_uid` as the API shows it (with dashes); `container_id` the runtime's 64-hex id.
pub fn container_cgroup_path(
    systemd: bool,
    runtime: Runtime,
    qos: Qos,
    pod_uid: &str,
    container_id: &str,
) -> String {
    if systemd {
        let uid = pod_uid.replace('-', "_");
        let scope = match runtime {
            Runtime::Containerd => "cri-containerd",
            Runtime::CriO => "crio",
            Runtime::Docker => "docker",
        };
        let pod = match qos {
            Qos::Guaranteed => format!("/kubepods.slice/kubepods-pod{uid}.slice"),
            Qos::Burstable => format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
            ),
            Qos::BestEffort => format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"
            ),
        };
        format!("{pod}/{scope}-{container_id}.scope")
    } else {
        let pod = match qos {
            Qos::Guaranteed => format!("/kubepods/pod{pod_uid}"),
            Qos::Burstable => format!("/kubepods/burstable/pod{pod_uid}"),
            Qos::BestEffort => format!("/kubepods/besteffort/pod{pod_uid}"),
        };
        match runtime {
            Runtime::CriO => format!("{pod}/crio-{container_id}"),
            Runtime::Containerd | Runtime::Docker => format!("{pod}/{container_id}"),
        }
    }
}

/// The v1 hierarchies of a typical node (kernel 5.15, so with `misc`), highest id first, and whether the
/// kubelet places containers in them (`rdma` and `misc` it leaves at `/`).
const V1_HIERARCHIES: [(&str, bool); 13] = [
    ("misc", false),
    ("cpuset", true),
    ("hugetlb", true),
    ("freezer", true),
    ("rdma", false),
    ("net_cls,net_prio", true),
    ("devices", true),
    ("blkio", true),
    ("perf_event", true),
    ("memory", true),
    ("pids", true),
    ("cpu,cpuacct", true),
    ("name=systemd", true),
];

/// The text of `/proc/<pid>/cgroup` for a process of container `container_id` in pod `pod_uid`, exactly as
/// the kernel prints it on a node with this layout and runtime (newline-terminated lines).
pub fn cgroup_file(
    layout: CgroupLayout,
    runtime: Runtime,
    qos: Qos,
    pod_uid: &str,
    container_id: &str,
) -> String {
    let path = container_cgroup_path(layout.systemd(), runtime, qos, pod_uid, container_id);
    let unified = match runtime {
        Runtime::Containerd => "/system.slice/containerd.service",
        Runtime::CriO => "/system.slice/crio.service",
        Runtime::Docker => "/system.slice/docker.service",
    };
    file_for(layout, &path, unified)
}

/// The text of `/proc/<pid>/cgroup` for a host process in systemd unit `unit` (e.g. `sshd.service`, or
/// `kubelet.service`): in no pod.
pub fn host_cgroup_file(layout: CgroupLayout, unit: &str) -> String {
    let path = format!("/system.slice/{unit}");
    file_for(layout, &path, &path)
}

fn file_for(layout: CgroupLayout, path: &str, cgroupfs_unified: &str) -> String {
    let mut text = String::new();
    if !matches!(layout, CgroupLayout::V2Cgroupfs | CgroupLayout::V2Systemd) {
        let count = V1_HIERARCHIES.len();
        for (i, (controllers, managed)) in V1_HIERARCHIES.iter().enumerate() {
            let shown = if *managed { path } else { "/" };
            let _ = writeln!(text, "{}:{controllers}:{shown}", count - i);
        }
    }
    match layout {
        CgroupLayout::V1Cgroupfs | CgroupLayout::V1Systemd => {}
        CgroupLayout::HybridCgroupfs => {
            let _ = writeln!(text, "0::{cgroupfs_unified}");
        }
        CgroupLayout::HybridSystemd | CgroupLayout::V2Cgroupfs | CgroupLayout::V2Systemd => {
            let _ = writeln!(text, "0::{path}");
        }
    }
    text
}

/// A directory standing in for the host's `/proc`: `<root>/<pid>/cgroup` files, for code that maps PIDs to
/// containers under an injectable proc root.
#[derive(Debug)]
pub struct ProcRoot {
    root: PathBuf,
}

impl ProcRoot {
    /// Uses (and creates if needed) `dir` as the proc root.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let root = dir.into();
        fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    /// The proc root, to hand to the code under test.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Adds (or replaces) process `pid` with this `cgroup` file text.
    pub fn add(&self, pid: u32, cgroup_text: &str) -> io::Result<()> {
        let dir = self.root.join(pid.to_string());
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("cgroup"), cgroup_text)
    }

    /// Removes process `pid`, as when it exits (no error if it is not there).
    pub fn remove(&self, pid: u32) -> io::Result<()> {
        match fs::remove_dir_all(self.root.join(pid.to_string())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f0c9f43-4b5a-4c7e-9f4d-2b1c3a4d5e6f";
    const ID: &str = "8d3e1c0b9a7f6e5d4c3b2a190817263544f3e2d1c0b9a8f7e6d5c4b3a2918070";

    #[test]
    fn v1_systemd_containerd_burstable_matches_a_real_node() {
        let text = cgroup_file(
            CgroupLayout::V1Systemd,
            Runtime::Containerd,
            Qos::Burstable,
            UID,
            ID,
        );
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0c9f43_4b5a_4c7e_9f4d_2b1c3a4d5e6f.slice/cri-containerd-{ID}.scope"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 13);
        assert_eq!(lines[0], "13:misc:/");
        assert_eq!(lines[4], "9:rdma:/");
        assert_eq!(lines[9], format!("4:memory:{path}"));
        assert_eq!(lines[12], format!("1:name=systemd:{path}"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn v2_and_hybrid_lines() {
        let v2 = cgroup_file(
            CgroupLayout::V2Cgroupfs,
            Runtime::CriO,
            Qos::Guaranteed,
            UID,
            ID,
        );
        assert_eq!(v2, format!("0::/kubepods/pod{UID}/crio-{ID}\n"));
        let hybrid = cgroup_file(
            CgroupLayout::HybridCgroupfs,
            Runtime::Docker,
            Qos::BestEffort,
            UID,
            ID,
        );
        assert!(hybrid.contains(&format!("4:memory:/kubepods/besteffort/pod{UID}/{ID}\n")));
        assert!(hybrid.ends_with("0::/system.slice/docker.service\n"));
        let v2s = cgroup_file(
            CgroupLayout::V2Systemd,
            Runtime::CriO,
            Qos::Guaranteed,
            UID,
            ID,
        );
        assert_eq!(
            v2s,
            format!(
                "0::/kubepods.slice/kubepods-pod5f0c9f43_4b5a_4c7e_9f4d_2b1c3a4d5e6f.slice/crio-{ID}.scope\n"
            )
        );
    }

    #[test]
    fn proc_root_add_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let proc = ProcRoot::new(dir.path().join("proc")).unwrap();
        proc.add(4242, "0::/system.slice/sshd.service\n").unwrap();
        assert_eq!(
            fs::read_to_string(proc.path().join("4242/cgroup")).unwrap(),
            "0::/system.slice/sshd.service\n"
        );
        proc.remove(4242).unwrap();
        assert!(!proc.path().join("4242").exists());
        proc.remove(4242).unwrap();
    }
}
