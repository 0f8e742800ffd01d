//! This process's PID as NVML reports it (the host's PID namespace), needed to pick the
//! container's processes out of `nvmlDeviceGetProcessUtilization`.
//!
//! HAMi-core diffs NVML's process list before and after creating a context, which confuses two
//! pods starting at once on one GPU. Here, in order:
//!
//! 1. **The node agent's broker** (exact): one connection to the unix socket
//!    `/tmp/vgpulock/hostpid/broker.sock` (the lock directory every container mounts;
//!    `VGPU_HOSTPID_SOCKET` overrides the path, `off` disables). The agent runs with `hostPID`, learns
//!    the caller's PID with `SO_PEERCRED` — the kernel translates it into the agent's namespace —
//!    and replies with it. Wire format: HAMi's broker (`HAMi:docs/develop/hostpid-broker.md`),
//!    request `"HPID"` u16 version 1, u16 command 1; reply `"HPID"` u16 version, u16 status (0 =
//!    ok), u32 PID, network byte order — crate `vgpu-hostpid`, which also holds the server the
//!    node agent runs. Connect, send and receive are bounded by
//!    [`BROKER_TIMEOUT_MS`]; a missing socket fails at once.
//! 2. **The host PID namespace** (exact): if `/proc/self/ns/pid` is the initial namespace
//!    (`pid:[4026531836]`, the kernel's `PROC_PID_INIT_INO`), `getpid()` is the host PID.
//! 3. Otherwise **unknown**: no guess. The SM watcher then treats the whole device's utilisation
//!    as the container's (never under-counts, so the cap still holds; it only over-throttles when
//!    the GPU is shared), and says so once.

use crate::infra::config::getenv;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vgpu_hostpid::{CONTAINER_SOCKET, REPLY_LEN, parse_reply, request};

/// Bound on each broker exchange step.
pub(crate) const BROKER_TIMEOUT_MS: u64 = 200;
/// `PROC_PID_INIT_INO`: the inode of the initial PID namespace.
const INIT_PID_NS: &[u8] = b"pid:[4026531836]";

/// Where the host PID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostPid {
    Broker(i32),
    HostNamespace(i32),
    Unknown,
}

impl HostPid {
    pub(crate) fn pid(self) -> Option<i32> {
        match self {
            Self::Broker(p) | Self::HostNamespace(p) => Some(p),
            Self::Unknown => None,
        }
    }
}

/// Resolves this process's host PID (blocking for at most a few hundred ms).
pub(crate) fn resolve() -> HostPid {
    let socket = match getenv(c"VGPU_HOSTPID_SOCKET") {
        Some(b"off") => None,
        Some(v) if !v.is_empty() => Some(std::ffi::OsStr::new(
            std::str::from_utf8(v).unwrap_or_default(),
        )),
        _ => Some(std::ffi::OsStr::new(CONTAINER_SOCKET)),
    };
    if let Some(path) = socket
        && !path.is_empty()
        && let Some(pid) = ask_broker(std::path::Path::new(path))
    {
        return HostPid::Broker(pid);
    }
    if in_initial_pid_namespace() {
        // SAFETY: getpid has no preconditions.
        return HostPid::HostNamespace(unsafe { libc::getpid() });
    }
    HostPid::Unknown
}

fn ask_broker(path: &std::path::Path) -> Option<i32> {
    if !path.exists() {
        return None;
    }
    let mut stream = UnixStream::connect(path).ok()?;
    let timeout = Some(Duration::from_millis(BROKER_TIMEOUT_MS));
    stream.set_read_timeout(timeout).ok()?;
    stream.set_write_timeout(timeout).ok()?;
    stream.write_all(&request()).ok()?;
    let mut reply = [0u8; REPLY_LEN];
    stream.read_exact(&mut reply).ok()?;
    parse_reply(&reply)
}

fn in_initial_pid_namespace() -> bool {
    std::fs::read_link("/proc/self/ns/pid")
        .is_ok_and(|p| p.as_os_str().as_encoded_bytes() == INIT_PID_NS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_socket_fails_at_once() {
        let t = std::time::Instant::now();
        assert_eq!(
            ask_broker(std::path::Path::new("/nonexistent/broker.sock")),
            None
        );
        assert!(t.elapsed() < Duration::from_millis(BROKER_TIMEOUT_MS));
    }
}
