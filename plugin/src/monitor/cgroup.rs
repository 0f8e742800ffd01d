//! Which pod and container a host process belongs to, from its `/proc/<pid>/cgroup` file.
//!
//! The memory backstop asks NVML for the processes holding GPU memory (host PIDs) and needs each one's pod
//! and container. The kubelet and the runtime encode both in the process's cgroup path, in one of these
//! shapes (the pod UID has underscores in systemd slice names, dashes elsewhere; `<id>` is the runtime's
//! 64-hex container id):
//!
//! | driver | path |
//! |---|---|
//! | systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope` (also `crio-<id>.scope`, `docker-<id>.scope`; guaranteed pods have no QoS slice: `kubepods-pod<uid_>.slice`) |
//! | cgroupfs | `/kubepods/burstable/pod<uid>/<id>` (guaranteed: `/kubepods/pod<uid>/<id>`; CRI-O: `crio-<id>`) |
//! | runc's unconverted systemd name | `.../kubepods-burstable-pod<uid_>.slice:cri-containerd:<id>` (one segment) |
//!
//! The file itself is cgroup v1 (one `hierarchy-id:controllers:path` line per hierarchy, e.g.
//! `9:memory:/kubepods/...`), v2 (a single `0::/path`) or hybrid (both). Static pods have a 32-hex UID
//! without dashes. A kubelet `--cgroup-root` adds to the slice names (kind: `kubelet-kubepods-...`), and the
//! path may carry a prefix: a runtime nested in a container (kind, k3d: `/system.slice/containerd.service/...`,
//! `/docker/<id>/kubepods/...`) or the reader's own cgroup namespace (`0::/../../kubepods-...`). So the pod
//! segment is looked for anywhere in the path; the **first** one counts, because the levels above a
//! container are the kubelet's, while a container allowed to make cgroups could nest a forged
//! `pod<other uid>/<other id>` below its own.
//!
//! Not a container, so `None`: CRI-O's monitor `crio-conmon-<id>` (it sits in the pod's cgroup but is not
//! the container), a process in a pod's cgroup but in no container's, host processes. A pod's sandbox
//! (pause) container has an id like any other: it is returned, and the caller matches ids against the
//! pod's container statuses.

use std::io;
use std::path::Path;

/// A process's pod and container, from its cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// The pod's UID, with dashes, lower case (a static pod's is 32 hex digits without dashes).
    pub pod_uid: String,
    /// The runtime's 64-hex container id, lower case, without a `containerd://`-style prefix.
    pub container_id: String,
}

/// Parses the text of /proc/<pid>/cgroup.
///
/// Lines that are not `hierarchy-id:controllers:path` are skipped. Among the lines that name a container,
/// the `memory` controller's wins (it is the one GPU memory is about), then the v2 `0::` line, then the
/// first other one; in practice they all agree.
pub fn container_of(cgroup_file: &str) -> Option<ContainerRef> {
    let mut best: Option<(u8, ContainerRef)> = None;
    for line in cgroup_file.lines() {
        let Some((rank, path)) = parse_line(line) else {
            continue;
        };
        if best.as_ref().is_some_and(|(b, _)| *b <= rank) {
            continue;
        }
        if let Some(found) = container_of_path(path) {
            best = Some((rank, found));
        }
    }
    best.map(|(_, found)| found)
}

/// Reads <proc_root>/<pid>/cgroup; Ok(None) when the process is in no pod (host process, or gone: NotFound is Ok(None)).
///
/// A process that exits while its file is read makes the kernel answer `ESRCH`: also `Ok(None)`. The file
/// is read as bytes (a cgroup name need not be UTF-8; such bytes never form a pod or container id).
pub fn read_container_of(proc_root: &Path, pid: u32) -> io::Result<Option<ContainerRef>> {
    /// `ESRCH` on Linux: procfs's answer for a task that is gone.
    const ESRCH: i32 = 3;
    let path = proc_root.join(pid.to_string()).join("cgroup");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(container_of(&String::from_utf8_lossy(&bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Splits one line into its rank (lower is preferred) and path, or `None` if it is not a cgroup line.
fn parse_line(line: &str) -> Option<(u8, &str)> {
    let line = line.trim_end_matches(['\r', '\n']);
    let mut parts = line.splitn(3, ':');
    let (hierarchy, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
    if hierarchy.is_empty()
        || !hierarchy.bytes().all(|b| b.is_ascii_digit())
        || !path.starts_with('/')
    {
        return None;
    }
    let rank = if controllers.split(',').any(|c| c == "memory") {
        0
    } else if hierarchy == "0" && controllers.is_empty() {
        1
    } else {
        2
    };
    Some((rank, path))
}

/// The container a cgroup path names: the first pod segment, and the container segment right after it.
fn container_of_path(path: &str) -> Option<ContainerRef> {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    while let Some(segment) = segments.next() {
        // runc's systemd form when it was not converted to a scope: "<pod slice>:<prefix>:<id>".
        if let Some((slice, rest)) = segment.split_once(':') {
            let Some(pod_uid) = systemd_pod_uid(slice) else {
                continue;
            };
            let (prefix, id) = rest.split_once(':')?;
            return container_id(prefix, id).map(|container_id| ContainerRef {
                pod_uid,
                container_id,
            });
        }
        if let Some(pod_uid) = systemd_pod_uid(segment).or_else(|| cgroupfs_pod_uid(segment)) {
            let container_id = container_segment(segments.next()?)?;
            return Some(ContainerRef {
                pod_uid,
                container_id,
            });
        }
    }
    None
}

/// `pod<uid>` (cgroupfs driver).
fn cgroupfs_pod_uid(segment: &str) -> Option<String> {
    normalize_uid(segment.strip_prefix("pod")?, b'-')
}

/// `<...>-kubepods-<...>-pod<uid with _>.slice` (systemd driver; the slice name lists its ancestors).
fn systemd_pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice")?;
    let (ancestors, pod) = name.rsplit_once('-')?;
    if !ancestors.split('-').any(|a| a == "kubepods") {
        return None;
    }
    normalize_uid(pod.strip_prefix("pod")?, b'_')
}

/// A UID as the kubelet spells it in cgroup names, with `separator` between the groups of a UUID, or a
/// static pod's 32 hex digits; returned lower case, with dashes.
fn normalize_uid(uid: &str, separator: u8) -> Option<String> {
    let bytes = uid.as_bytes();
    let valid = match bytes.len() {
        36 => bytes.iter().enumerate().all(|(i, &b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == separator
            } else {
                b.is_ascii_hexdigit()
            }
        }),
        32 => bytes.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    };
    valid.then(|| uid.replace(char::from(separator), "-").to_ascii_lowercase())
}

/// The segment under the pod: `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`
/// (systemd), `<id>` or `crio-<id>` (cgroupfs). CRI-O's monitor, `crio-conmon-<id>`, is not a container.
fn container_segment(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    match name.rsplit_once('-') {
        Some((prefix, id)) => container_id(prefix, id),
        None => container_id("", name),
    }
}

/// `id` if it is a 64-hex container id and `prefix` a runtime's scope prefix (`""`: none).
fn container_id(prefix: &str, id: &str) -> Option<String> {
    let known = matches!(prefix, "" | "cri-containerd" | "crio" | "docker");
    (known && id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_sim::{CgroupLayout, ProcRoot, Qos, Runtime, cgroup_file, host_cgroup_file};
    use proptest::prelude::*;

    fn found(pod_uid: &str, container_id: &str) -> Option<ContainerRef> {
        Some(ContainerRef {
            pod_uid: pod_uid.to_owned(),
            container_id: container_id.to_owned(),
        })
    }

    // Hand-written fixtures, in the shapes real nodes print (ids and UIDs as they appear in public bug
    // reports' dumps of /proc/<pid>/cgroup and systemd-cgls), independent of gpu_sim's generator.

    #[test]
    fn v1_cgroupfs_containerd_besteffort() {
        let text = "\
11:devices:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
10:perf_event:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
9:memory:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
8:freezer:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
7:hugetlb:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
6:cpuset:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
5:blkio:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
4:rdma:/
3:pids:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
2:net_cls,net_prio:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
1:name=systemd:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376
";
        assert_eq!(
            container_of(text),
            found(
                "74c13223-5a00-11e9-b385-42010a80018d",
                "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376"
            )
        );
    }

    #[test]
    fn v1_cgroupfs_guaranteed_and_crio() {
        assert_eq!(
            container_of(
                "4:memory:/kubepods/pod58662905-8ccc-11e7-a695-c85b76cda386/1659f887a192f3515dd9b91a41d274abf29ca49de3d2330869131b2d93b45b94\n"
            ),
            found(
                "58662905-8ccc-11e7-a695-c85b76cda386",
                "1659f887a192f3515dd9b91a41d274abf29ca49de3d2330869131b2d93b45b94"
            )
        );
        assert_eq!(
            container_of(
                "7:cpu,cpuacct:/kubepods/burstable/pod91a8fc3a-0ecf-48b4-81bf-78a7275d348c/crio-f75aff467357c5d0ddd47cb7ad87ed38746e018992586ff66198a5c11218f634\n"
            ),
            found(
                "91a8fc3a-0ecf-48b4-81bf-78a7275d348c",
                "f75aff467357c5d0ddd47cb7ad87ed38746e018992586ff66198a5c11218f634"
            )
        );
    }

    #[test]
    fn v1_systemd_docker_and_crio() {
        let docker = "\
11:cpuacct,cpu:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5759a1ae_36ca_48a8_b20a_b0b5c8a90fb8.slice/docker-c8b38413c88eefe063b8cd3f01c16be5e3bda9693a19a68a88807baca9feb937.scope
6:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5759a1ae_36ca_48a8_b20a_b0b5c8a90fb8.slice/docker-c8b38413c88eefe063b8cd3f01c16be5e3bda9693a19a68a88807baca9feb937.scope
1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5759a1ae_36ca_48a8_b20a_b0b5c8a90fb8.slice/docker-c8b38413c88eefe063b8cd3f01c16be5e3bda9693a19a68a88807baca9feb937.scope
";
        assert_eq!(
            container_of(docker),
            found(
                "5759a1ae-36ca-48a8-b20a-b0b5c8a90fb8",
                "c8b38413c88eefe063b8cd3f01c16be5e3bda9693a19a68a88807baca9feb937"
            )
        );
        let crio = "\
12:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5ed8a4f6_db4e_4b7e_a87c_67da390d031d.slice/crio-c50666e24d9091a348a831015800cd8c603e3fb9ca23958b249f74e17487f21d.scope
9:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5ed8a4f6_db4e_4b7e_a87c_67da390d031d.slice/crio-c50666e24d9091a348a831015800cd8c603e3fb9ca23958b249f74e17487f21d.scope
1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5ed8a4f6_db4e_4b7e_a87c_67da390d031d.slice/crio-c50666e24d9091a348a831015800cd8c603e3fb9ca23958b249f74e17487f21d.scope
";
        assert_eq!(
            container_of(crio),
            found(
                "5ed8a4f6-db4e-4b7e-a87c-67da390d031d",
                "c50666e24d9091a348a831015800cd8c603e3fb9ca23958b249f74e17487f21d"
            )
        );
    }

    #[test]
    fn crio_conmon_is_not_the_container() {
        let conmon = "\
9:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/crio-conmon-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope
1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/crio-conmon-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope
";
        assert_eq!(container_of(conmon), None);
        assert_eq!(
            container_of(
                "0::/kubepods/burstable/pod91a8fc3a-0ecf-48b4-81bf-78a7275d348c/crio-conmon-f75aff467357c5d0ddd47cb7ad87ed38746e018992586ff66198a5c11218f634\n"
            ),
            None
        );
    }

    #[test]
    fn v2_systemd_containerd_crio_guaranteed_and_static_pods() {
        assert_eq!(
            container_of(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7fda01c4_0ece_403d_88b4_c371d66d132a.slice/cri-containerd-e58a24d4a722c99712cff74ef69d93311089584eb32617b3890e0dcb996133f1.scope\n"
            ),
            found(
                "7fda01c4-0ece-403d-88b4-c371d66d132a",
                "e58a24d4a722c99712cff74ef69d93311089584eb32617b3890e0dcb996133f1"
            )
        );
        assert_eq!(
            container_of(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod30cea2cf_1b80_4807_abad_d81453e199c5.slice/crio-a8077b08a56c0c6e33d6716557d882ac940cb09475c50372e22e84c40d0733f2.scope\n"
            ),
            found(
                "30cea2cf-1b80-4807-abad-d81453e199c5",
                "a8077b08a56c0c6e33d6716557d882ac940cb09475c50372e22e84c40d0733f2"
            )
        );
        // Guaranteed: no QoS slice.
        assert_eq!(
            container_of(
                "0::/kubepods.slice/kubepods-pod40934a46_d409_4f4a_bb8b_1ec0b0436320.slice/cri-containerd-afc114c69e71f18166abd63715398d7daa763c69a6454f71157272ab0bdca783.scope\n"
            ),
            found(
                "40934a46-d409-4f4a-bb8b-1ec0b0436320",
                "afc114c69e71f18166abd63715398d7daa763c69a6454f71157272ab0bdca783"
            )
        );
        // A pod's sandbox (pause) container is a container like the others; the caller tells them apart.
        assert_eq!(
            container_of(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-0ba8ac17e4e7a31fb82279503552fe94e64bab4745bf6fd2ff231e7c8ca8bed0.scope\n"
            ),
            found(
                "2ca4a155-3599-498d-bb9d-4446693fa3ea",
                "0ba8ac17e4e7a31fb82279503552fe94e64bab4745bf6fd2ff231e7c8ca8bed0"
            )
        );
        // A static pod's UID is the manifest's 32-hex hash.
        assert_eq!(
            container_of(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope\n"
            ),
            found(
                "8daa50c3a64c9ff60bb9eab7b44b56fd",
                "2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5"
            )
        );
    }

    #[test]
    fn hybrid_uses_the_v1_line_when_the_unified_one_names_no_pod() {
        let text = "\
12:memory:/kubepods/burstable/pod3b0b8ad1-e1f0-4c6d-9c5e-1f3a0b6f0f1f/ba64f7c0ec6c86df331a1a5daf464605c3a69c688ca7ebf156a7a067e8e75d09
1:name=systemd:/kubepods/burstable/pod3b0b8ad1-e1f0-4c6d-9c5e-1f3a0b6f0f1f/ba64f7c0ec6c86df331a1a5daf464605c3a69c688ca7ebf156a7a067e8e75d09
0::/system.slice/containerd.service
";
        assert_eq!(
            container_of(text),
            found(
                "3b0b8ad1-e1f0-4c6d-9c5e-1f3a0b6f0f1f",
                "ba64f7c0ec6c86df331a1a5daf464605c3a69c688ca7ebf156a7a067e8e75d09"
            )
        );
    }

    #[test]
    fn the_memory_line_wins_when_lines_disagree() {
        let text = "\
5:cpu,cpuacct:/kubepods/pod11111111-2222-4333-8444-555555555555/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
0::/kubepods/pod11111111-2222-4333-8444-555555555555/cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc
4:memory:/kubepods/pod11111111-2222-4333-8444-555555555555/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
";
        assert_eq!(
            container_of(text).map(|c| c.container_id),
            Some("b".repeat(64))
        );
        let without_memory: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
        assert_eq!(
            container_of(&without_memory).map(|c| c.container_id),
            Some("c".repeat(64))
        );
    }

    #[test]
    fn nested_runtimes_and_cgroup_namespaces() {
        let id = "499ef09f38420e5e16feb70d747dbce08f036eb4365173bef5589b21af38f2b7";
        let uid = "55c6c714-b240-4dec-9a45-57b61696ab6e";
        for text in [
            // kind: the kubelet's --cgroup-root=/kubelet, the node container's cgroup as the host sees it.
            format!(
                "0::/system.slice/docker-6b1d3a0c1c3e3c5b7f7a0d2b7a3f1e2d4c5b6a7980f1e2d3c4b5a69788796a5b.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-{id}.scope\n"
            ),
            // minikube with CRI-O inside a docker container.
            format!(
                "0::/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/crio-{id}.scope\n"
            ),
            // The cgroupfs driver under a delegated subtree (a runtime started inside a systemd unit).
            format!("0::/system.slice/k3s.service/kubepods/besteffort/pod{uid}/{id}\n"),
            // Read from inside a cgroup namespace: the path is relative to the reader's root.
            format!(
                "0::/../../kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-{id}.scope\n"
            ),
            format!("0::/../../../burstable/pod{uid}/{id}\n"),
            // runc's systemd cgroupsPath left unconverted (slice:prefix:name) under the runtime's unit.
            format!(
                "4:memory:/system.slice/containerd.service/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice:cri-containerd:{id}\n"
            ),
            // A process in a sub-cgroup the container made (systemd in a container, cgroupns).
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-{id}.scope/init.scope\n"
            ),
        ] {
            assert_eq!(container_of(&text), found(uid, id), "{text}");
        }
    }

    #[test]
    fn a_container_cannot_claim_another_pod_by_nesting_cgroups() {
        let mine = "0::/kubepods/burstable/pod11111111-2222-4333-8444-555555555555/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/kubepods/pod99999999-8888-4777-a666-555555555555/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n";
        assert_eq!(
            container_of(mine),
            found("11111111-2222-4333-8444-555555555555", &"a".repeat(64))
        );
    }

    #[test]
    fn processes_in_no_container() {
        for text in [
            "",
            "0::/\n",
            "0::/init.scope\n",
            "0::/system.slice/kubelet.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            // In the pod's cgroup but in no container's.
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod30cea2cf_1b80_4807_abad_d81453e199c5.slice\n",
            "4:memory:/kubepods/burstable/pod30cea2cf-1b80-4807-abad-d81453e199c5\n",
            "0::/kubepods.slice/kubepods-burstable.slice\n",
            // Docker outside Kubernetes, podman.
            "0::/system.slice/docker-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope\n",
            "0::/machine.slice/libpod-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope\n",
        ] {
            assert_eq!(container_of(text), None, "{text:?}");
        }
    }

    #[test]
    fn malformed_names_are_refused() {
        let id = "e58a24d4a722c99712cff74ef69d93311089584eb32617b3890e0dcb996133f1";
        for text in [
            // 63 and 65 hex digits, a non-hex digit.
            format!(
                "0::/kubepods/pod7fda01c4-0ece-403d-88b4-c371d66d132a/{}\n",
                &id[1..]
            ),
            format!("0::/kubepods/pod7fda01c4-0ece-403d-88b4-c371d66d132a/{id}0\n"),
            format!(
                "0::/kubepods/pod7fda01c4-0ece-403d-88b4-c371d66d132a/{}g\n",
                &id[1..]
            ),
            // UID too short, separators misplaced, the systemd separator in a cgroupfs name.
            format!("0::/kubepods/pod7fda01c4-0ece-403d-88b4-c371d66d132/{id}\n"),
            format!("0::/kubepods/pod7fda01c40-ece-403d-88b4-c371d66d132a/{id}\n"),
            format!("0::/kubepods/pod7fda01c4_0ece_403d_88b4_c371d66d132a/{id}\n"),
            // A systemd pod slice outside kubepods, an unknown scope prefix.
            format!(
                "0::/machine.slice/machine-pod7fda01c4_0ece_403d_88b4_c371d66d132a.slice/cri-containerd-{id}.scope\n"
            ),
            format!(
                "0::/kubepods.slice/kubepods-pod7fda01c4_0ece_403d_88b4_c371d66d132a.slice/libpod-{id}.scope\n"
            ),
            // Not a cgroup line: no hierarchy number, a relative path.
            format!("x::/kubepods/pod7fda01c4-0ece-403d-88b4-c371d66d132a/{id}\n"),
            format!("0::kubepods/pod7fda01c4-0ece-403d-88b4-c371d66d132a/{id}\n"),
            format!("/kubepods/pod7fda01c4-0ece-403d-88b4-c371d66d132a/{id}\n"),
        ] {
            assert_eq!(container_of(&text), None, "{text:?}");
        }
        // Upper-case hex is not what runtimes write, but it is unambiguous: normalised.
        assert_eq!(
            container_of(&format!(
                "0::/kubepods/pod7FDA01C4-0ECE-403D-88B4-C371D66D132A/{}\r\n",
                id.to_ascii_uppercase()
            )),
            found("7fda01c4-0ece-403d-88b4-c371d66d132a", id)
        );
    }

    const UIDS: [&str; 3] = [
        "5f0c9f43-4b5a-4c7e-9f4d-2b1c3a4d5e6f",
        "00e2c3a1-9b7d-4f6e-8a5c-3d2b1a0f9e8d",
        "8daa50c3a64c9ff60bb9eab7b44b56fd",
    ];
    const IDS: [&str; 2] = [
        "8d3e1c0b9a7f6e5d4c3b2a190817263544f3e2d1c0b9a8f7e6d5c4b3a2918070",
        "0000000000000000000000000000000000000000000000000000000000000001",
    ];

    #[test]
    fn every_generated_layout_parses_back() {
        let mut checked = 0;
        for layout in CgroupLayout::ALL {
            for runtime in Runtime::ALL {
                for qos in Qos::ALL {
                    for uid in UIDS {
                        for id in IDS {
                            let text = cgroup_file(layout, runtime, qos, uid, id);
                            assert_eq!(container_of(&text), found(uid, id), "{text}");
                            checked += 1;
                        }
                    }
                }
            }
            assert_eq!(
                container_of(&host_cgroup_file(layout, "kubelet.service")),
                None
            );
        }
        assert_eq!(checked, 6 * 3 * 3 * 3 * 2);
    }

    #[test]
    fn generated_files_match_the_hand_written_shapes() {
        // The generator and the parser must not agree on a wrong format: pin the generator to the
        // fixtures above.
        let v2 = cgroup_file(
            CgroupLayout::V2Systemd,
            Runtime::Containerd,
            Qos::BestEffort,
            "7fda01c4-0ece-403d-88b4-c371d66d132a",
            "e58a24d4a722c99712cff74ef69d93311089584eb32617b3890e0dcb996133f1",
        );
        assert_eq!(
            v2,
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7fda01c4_0ece_403d_88b4_c371d66d132a.slice/cri-containerd-e58a24d4a722c99712cff74ef69d93311089584eb32617b3890e0dcb996133f1.scope\n"
        );
        let v1 = cgroup_file(
            CgroupLayout::V1Cgroupfs,
            Runtime::CriO,
            Qos::Burstable,
            "91a8fc3a-0ecf-48b4-81bf-78a7275d348c",
            "f75aff467357c5d0ddd47cb7ad87ed38746e018992586ff66198a5c11218f634",
        );
        assert!(v1.contains(
            ":memory:/kubepods/burstable/pod91a8fc3a-0ecf-48b4-81bf-78a7275d348c/crio-f75aff467357c5d0ddd47cb7ad87ed38746e018992586ff66198a5c11218f634\n"
        ));
        assert!(v1.lines().all(|l| l.splitn(3, ':').count() == 3));
        assert!(
            v1.lines()
                .last()
                .is_some_and(|l| l.starts_with("1:name=systemd:/kubepods/"))
        );
        assert!(v1.contains(":rdma:/\n"));
        assert!(!v1.contains("0::"));
    }

    #[test]
    fn read_from_a_proc_root() {
        let dir = tempfile::tempdir().unwrap();
        let proc = ProcRoot::new(dir.path().join("proc")).unwrap();
        let (uid, id) = (UIDS[0], IDS[0]);
        proc.add(
            4242,
            &cgroup_file(
                CgroupLayout::HybridSystemd,
                Runtime::CriO,
                Qos::Burstable,
                uid,
                id,
            ),
        )
        .unwrap();
        proc.add(
            1,
            &host_cgroup_file(CgroupLayout::HybridSystemd, "init.scope"),
        )
        .unwrap();
        proc.add(
            77,
            "0::/kubepods/pod5f0c9f43-4b5a-4c7e-9f4d-2b1c3a4d5e6f/\u{fffd}\n",
        )
        .unwrap();
        std::fs::write(
            proc.path().join("77/cgroup"),
            b"0::/kubepods/\xff\xfe/pod5f0c9f43-4b5a-4c7e-9f4d-2b1c3a4d5e6f/8d3e1c0b9a7f6e5d4c3b2a190817263544f3e2d1c0b9a8f7e6d5c4b3a2918070\n",
        )
        .unwrap();

        assert_eq!(
            read_container_of(proc.path(), 4242).unwrap(),
            found(uid, id)
        );
        assert_eq!(read_container_of(proc.path(), 1).unwrap(), None);
        // Non-UTF-8 bytes elsewhere in the path do not hide the container.
        assert_eq!(read_container_of(proc.path(), 77).unwrap(), found(uid, id));
        // Gone: NotFound is Ok(None).
        assert_eq!(read_container_of(proc.path(), 999_999).unwrap(), None);
        proc.remove(4242).unwrap();
        assert_eq!(read_container_of(proc.path(), 4242).unwrap(), None);
        // Any other error is the caller's to see.
        std::fs::create_dir_all(proc.path().join("5/cgroup")).unwrap();
        assert!(read_container_of(proc.path(), 5).is_err());
    }

    #[test]
    fn reads_this_process_from_the_real_proc() {
        // Whatever this machine is, the real file parses without error (in a pod or not).
        let pid = std::process::id();
        let result = read_container_of(Path::new("/proc"), pid).unwrap();
        if let Some(found) = result {
            assert_eq!(found.container_id.len(), 64);
        }
    }

    /// What any `Some` answer must look like.
    fn well_formed(found: &ContainerRef) -> bool {
        let id_ok = found.container_id.len() == 64
            && found
                .container_id
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let uid = found.pod_uid.as_bytes();
        let uid_ok = match uid.len() {
            36 => uid.iter().enumerate().all(|(i, &b)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    b == b'-'
                } else {
                    matches!(b, b'0'..=b'9' | b'a'..=b'f')
                }
            }),
            32 => uid.iter().all(|&b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            _ => false,
        };
        id_ok && uid_ok
    }

    fn layout() -> impl Strategy<Value = CgroupLayout> {
        prop::sample::select(CgroupLayout::ALL.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            if let Some(found) = container_of(&text) {
                prop_assert!(well_formed(&found), "{found:?} from {text:?}");
            }
        }

        #[test]
        fn cgroup_like_text_never_panics(
            text in "([0-9]{0,2}:[a-z=,_]{0,12}:(/(kubepods|pod[0-9a-f_-]{30,40}|[0-9a-f]{62,66}|crio-|cri-containerd-|\\.slice|\\.scope|:|\\.\\.|-|_)*){0,6}\n?){0,8}"
        ) {
            if let Some(found) = container_of(&text) {
                prop_assert!(well_formed(&found), "{found:?} from {text:?}");
            }
        }

        #[test]
        fn generated_files_parse_back(
            layout in layout(),
            runtime in prop::sample::select(Runtime::ALL.to_vec()),
            qos in prop::sample::select(Qos::ALL.to_vec()),
            uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            id in "[0-9a-f]{64}",
            prefix in prop::sample::select(vec!["", "/system.slice/containerd.service", "/../..", "/docker/3f1e"]),
        ) {
            let text = cgroup_file(layout, runtime, qos, &uid, &id).replace(":/kubepods", &format!(":{prefix}/kubepods"));
            prop_assert_eq!(container_of(&text), found(&uid, &id));
        }

        #[test]
        fn mutated_files_never_panic_and_stay_well_formed(
            layout in layout(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 1..12),
        ) {
            let mut bytes = cgroup_file(layout, Runtime::Containerd, Qos::Burstable, UIDS[0], IDS[0]).into_bytes();
            for (at, op, byte) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => { bytes.remove(i); }
                    2 => bytes.insert(i, byte),
                    _ => bytes.truncate(i),
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Some(found) = container_of(&text) {
                prop_assert!(well_formed(&found), "{found:?} from {text:?}");
            }
        }
    }
}
