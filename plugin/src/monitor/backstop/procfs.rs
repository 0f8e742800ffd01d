//! The `/proc` edge of the backstop: which container a host PID belongs to (its cgroup, through
//! [`crate::monitor::cgroup`]), cached by `(pid, start time)`, and the kill that re-checks it.
//!
//! A process's start time (`/proc/<pid>/stat` field 22, clock ticks since boot) never changes and a reused
//! PID gets a new one, so `(pid, start time)` names one process for ever: a steady state costs one small
//! `stat` read per GPU process and round, never a cgroup re-read or re-parse. Entries of PIDs not seen in a
//! round are dropped.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::monitor::cgroup::{ContainerRef, read_container_of};

/// Who a GPU process is, as far as its cgroup says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// No `/proc/<pid>` (it exited since NVML listed it, or it is in no PID namespace the agent sees).
    Gone,
    /// A process in no Kubernetes container (a host process, or a container not run by the kubelet).
    Host,
    /// A container: pod UID and runtime container ID.
    Container(ContainerRef),
}

/// Why `/proc/<pid>` could not be read (other than the process being gone).
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// `stat` or `cgroup` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `stat` has no field 22.
    #[error("{path} has no start time (field 22)")]
    Malformed {
        /// The file.
        path: PathBuf,
    },
}

/// The start time (field 22) in `/proc/<pid>/stat` contents. The command (field 2) is in parentheses and may
/// hold spaces and parentheses itself, so fields are counted after the last `)`.
pub fn start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After the command: field 3 (state) is the first; field 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Owners by `(pid, start time)`, with the buffers a round reuses.
#[derive(Debug)]
pub struct OwnerCache {
    root: PathBuf,
    known: HashMap<u32, (u64, Owner)>,
    /// PIDs seen this round (entries of others are dropped at [`OwnerCache::end_round`]).
    seen: HashMap<u32, ()>,
    path: PathBuf,
    buf: Vec<u8>,
    /// cgroup reads since start (the benchmark shows the steady state does none).
    pub cgroup_reads: u64,
}

impl OwnerCache {
    /// A cache over the proc root `root` (the host's `/proc` as the agent sees it).
    pub fn new(root: PathBuf) -> Self {
        Self {
            path: root.clone(),
            root,
            known: HashMap::new(),
            seen: HashMap::new(),
            buf: Vec::with_capacity(512),
            cgroup_reads: 0,
        }
    }

    /// The proc root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The owner of `pid` and its start time (0 when gone). Errors other than a gone process are returned; the
    /// caller treats the process as unattributable.
    pub fn owner(&mut self, pid: u32) -> Result<(u64, Owner), ProcError> {
        self.seen.insert(pid, ());
        let Some(start) = self.read_start_time(pid)? else {
            self.known.remove(&pid);
            return Ok((0, Owner::Gone));
        };
        if let Some((known_start, owner)) = self.known.get(&pid)
            && *known_start == start
        {
            return Ok((start, owner.clone()));
        }
        self.cgroup_reads += 1;
        let owner = match read_container_of(&self.root, pid) {
            Ok(Some(container)) => Owner::Container(container),
            Ok(None) => Owner::Host,
            Err(source) => {
                return Err(ProcError::Read {
                    path: self.root.join(pid.to_string()).join("cgroup"),
                    source,
                });
            }
        };
        // The process may have exited and its PID been reused between the two reads: only a start time read
        // again after the cgroup makes the pair one process's.
        if self.read_start_time(pid)? != Some(start) {
            self.known.remove(&pid);
            return Ok((0, Owner::Gone));
        }
        self.known.insert(pid, (start, owner.clone()));
        Ok((start, owner))
    }

    /// Forgets PIDs not asked about since the last call.
    pub fn end_round(&mut self) {
        let seen = &self.seen;
        self.known.retain(|pid, _| seen.contains_key(pid));
        self.seen.clear();
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// `Ok(None)` when the process is gone.
    fn read_start_time(&mut self, pid: u32) -> Result<Option<u64>, ProcError> {
        use std::fmt::Write as _;
        let mut name = String::with_capacity(16);
        let _ = write!(name, "{pid}/stat");
        self.path.clear();
        self.path.push(&self.root);
        self.path.push(&name);
        self.buf.clear();
        match std::fs::File::open(&self.path).and_then(|mut f| f.read_to_end(&mut self.buf)) {
            Ok(_) => {}
            Err(e) if gone(&e) => return Ok(None),
            Err(source) => {
                return Err(ProcError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        // An empty read: the process exited while the file was open.
        if self.buf.is_empty() {
            return Ok(None);
        }
        start_time(&self.buf)
            .map(Some)
            .ok_or_else(|| ProcError::Malformed {
                path: self.path.clone(),
            })
    }
}

fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOTDIR))
}

/// What a kill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Killed {
    /// SIGKILL sent through a pidfd.
    Pidfd,
    /// SIGKILL sent with kill(2): the kernel has no pidfd_open (before Linux 5.3).
    Kill,
    /// The process was gone already, or its PID now names another process: nothing sent.
    Gone,
    /// The PID now belongs to another container (or none): nothing sent.
    NotTheContainer,
}

/// Why a kill failed.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    /// `/proc` could not be read again.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A syscall failed.
    #[error("{call} failed for PID {pid}")]
    Syscall {
        /// The syscall.
        call: &'static str,
        /// The PID.
        pid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// SIGKILLs `pid` if it is still the process of container `expected` that started at `start_time`.
///
/// Against PID reuse: `pidfd_open` pins the process that has the PID now; then its start time and cgroup are
/// read again under the proc root, and only if both still match is SIGKILL sent through the pidfd, which can
/// only ever reach the pinned process (if it died meanwhile, the send fails with ESRCH and nothing else is
/// touched). Where the kernel has no pidfd (ENOSYS, Linux before 5.3) the same checks run and kill(2) is used:
/// there a PID reused in the microseconds between the check and the kill could be hit, which is the
/// documented trade-off of old kernels.
pub fn kill_verified(
    cache: &mut OwnerCache,
    pid: u32,
    start_time: u64,
    expected: &ContainerRef,
) -> Result<Killed, KillError> {
    use rustix::process::{Pid, PidfdFlags, Signal, kill_process, pidfd_open, pidfd_send_signal};
    let Some(target) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ok(Killed::Gone);
    };
    let pidfd = match pidfd_open(target, PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(rustix::io::Errno::SRCH) => return Ok(Killed::Gone),
        Err(rustix::io::Errno::NOSYS) => None,
        Err(errno) => {
            return Err(KillError::Syscall {
                call: "pidfd_open",
                pid,
                source: errno.into(),
            });
        }
    };
    // Re-read, bypassing the cache: the check must see the process as it is now.
    cache.known.remove(&pid);
    match cache.owner(pid)? {
        (0, _) => return Ok(Killed::Gone),
        (start, _) if start != start_time => return Ok(Killed::Gone),
        (_, Owner::Container(now)) if now == *expected => {}
        _ => return Ok(Killed::NotTheContainer),
    }
    let (call, sent, how) = match &pidfd {
        Some(fd) => (
            "pidfd_send_signal",
            pidfd_send_signal(fd, Signal::KILL),
            Killed::Pidfd,
        ),
        None => ("kill", kill_process(target, Signal::KILL), Killed::Kill),
    };
    match sent {
        Ok(()) => Ok(how),
        Err(rustix::io::Errno::SRCH) => Ok(Killed::Gone),
        Err(errno) => Err(KillError::Syscall {
            call,
            pid,
            source: errno.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f0c9f43-4b5a-4c7e-9f4d-2b1c3a4d5e6f";

    fn id(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn cgroup(container: &str) -> String {
        format!("0::/kubepods/burstable/pod{UID}/{container}\n")
    }

    fn stat(pid: u32, start: u64) -> String {
        format!("{pid} (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")
    }

    fn put(root: &Path, pid: u32, start: u64, cgroup_text: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), stat(pid, start)).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup_text).unwrap();
    }

    #[test]
    fn a_cgroup_is_read_once_per_pid_and_start_time() {
        let root = tempfile::tempdir().unwrap();
        let mut cache = OwnerCache::new(root.path().to_owned());
        put(root.path(), 7, 100, &cgroup(&id(1)));
        let want = Owner::Container(ContainerRef {
            pod_uid: UID.into(),
            container_id: id(1),
        });
        for _ in 0..5 {
            assert_eq!(cache.owner(7).unwrap(), (100, want.clone()));
            cache.end_round();
        }
        assert_eq!(cache.cgroup_reads, 1, "a steady state reads no cgroup");
        // The PID is reused by a host process: a new start time, read again.
        put(root.path(), 7, 200, "0::/system.slice/sshd.service\n");
        assert_eq!(cache.owner(7).unwrap(), (200, Owner::Host));
        assert_eq!(cache.cgroup_reads, 2);
        // Gone, and forgotten after a round without it.
        std::fs::remove_dir_all(root.path().join("7")).unwrap();
        assert_eq!(cache.owner(7).unwrap(), (0, Owner::Gone));
        cache.end_round();
        cache.end_round();
        assert!(cache.is_empty());
        // Odd contents never panic: a stat without field 22 is an error, an unparsable cgroup a host process.
        let dir = root.path().join("8");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), "8 (x").unwrap();
        assert!(matches!(cache.owner(8), Err(ProcError::Malformed { .. })));
        put(root.path(), 9, 1, "\u{0}garbage:::\n");
        assert_eq!(cache.owner(9).unwrap(), (1, Owner::Host));
    }

    #[test]
    fn the_kill_checks_start_time_and_container_again_and_signals_through_a_pidfd() {
        let root = tempfile::tempdir().unwrap();
        let mut cache = OwnerCache::new(root.path().to_owned());
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = child.id();
        let real = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
        let start = start_time(&real).unwrap();
        let dir = root.path().join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), &real).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup(&id(1))).unwrap();
        let mine = ContainerRef {
            pod_uid: UID.into(),
            container_id: id(1),
        };
        let other = ContainerRef {
            pod_uid: UID.into(),
            container_id: id(2),
        };
        assert_eq!(
            kill_verified(&mut cache, pid, start, &other).unwrap(),
            Killed::NotTheContainer
        );
        assert_eq!(
            kill_verified(&mut cache, pid, start + 1, &mine).unwrap(),
            Killed::Gone,
            "another start time is another process"
        );
        assert!(child.try_wait().unwrap().is_none(), "nothing was sent");
        assert_eq!(
            kill_verified(&mut cache, pid, start, &mine).unwrap(),
            Killed::Pidfd
        );
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: the PID names no process now.
        assert_eq!(
            kill_verified(&mut cache, pid, start, &mine).unwrap(),
            Killed::Gone
        );
    }

    #[test]
    fn the_start_time_is_field_22_counted_after_the_last_parenthesis() {
        let mut stat =
            b"4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 "
                .to_vec();
        stat.extend_from_slice(
            b"987654 1000000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0\n",
        );
        assert_eq!(start_time(&stat), Some(987_654));
        assert_eq!(start_time(b"1 (x) S 1 2"), None);
        assert_eq!(start_time(b"garbage"), None);
        assert_eq!(start_time(&[0xff, b')', b' ', 0xfe]), None);
    }
}
