//! The host-PID broker: tells a process in a GPU container its PID in the host's PID namespace,
//! which NVML reports and the limiter needs to find its own utilisation samples (the SM cap).
//!
//! HAMi-core guesses the host PID by diffing NVML's process list around a context creation, which
//! two pods starting at once on one GPU confuse. The broker is exact: it listens on
//! `<lock dir>/hostpid/broker.sock` (host `/tmp/vgpulock`, mounted at `/tmp/vgpulock` in every
//! container), and for each connection asks the kernel who the peer is (`SO_PEERCRED`). The kernel
//! translates the peer's PID into the agent's PID namespace, which is the host's because the agent
//! runs with `hostPID` (without it, peers from other namespaces read as PID 0 and get an error
//! reply). A process can only ever learn its own PID.
//!
//! Wire format (HAMi's broker, `HAMi:docs/develop/hostpid-broker.md`, network byte order): request
//! `"HPID"` u16 version (1) u16 command (1 = my host PID); reply `"HPID"` u16 version (1) u16
//! status u32 PID. Status 0 = ok, [`STATUS_BAD_REQUEST`], [`STATUS_UNKNOWN_PEER`]. A client that
//! sends nothing within [`REQUEST_TIMEOUT`] is dropped.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Directory under the lock directory.
pub const SOCKET_DIR: &str = "hostpid";
/// Socket file name.
pub const SOCKET_NAME: &str = "broker.sock";
/// Protocol version spoken.
pub const VERSION: u16 = 1;
/// Command: "what is my host PID".
pub const CMD_HOST_PID: u16 = 1;
/// Reply status: the request was not `"HPID"` v1 command 1.
pub const STATUS_BAD_REQUEST: u16 = 1;
/// Reply status: the kernel did not say who the peer is (e.g. the agent lacks `hostPID`).
pub const STATUS_UNKNOWN_PEER: u16 = 2;
/// How long a connected client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Maps the PID the kernel reports for a peer to the PID NVML uses. Production: identity (the agent's
/// namespace is the host's). Tests on the gpu-sim inject its simulated namespace offset.
pub type PidMap = Arc<dyn Fn(i32) -> Option<i32> + Send + Sync>;

/// Why the broker cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The socket directory or socket could not be created.
    #[error(
        "cannot serve the host-PID broker at {path}: {source}; check that --lock-dir is a writable \
         host directory (the SM cap then counts the whole GPU as each container's)"
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another broker answers on the socket (a second agent on the node, e.g. during an update).
    #[error("another host-PID broker is serving {path}; waiting for it to go away")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
}

/// The socket path for `lock_dir`.
pub fn socket_path(lock_dir: &Path) -> PathBuf {
    lock_dir.join(SOCKET_DIR).join(SOCKET_NAME)
}

/// Creates `<lock_dir>/hostpid/` (mode 0755) and binds the socket (mode 0666, so containers running
/// as any user can connect), replacing a stale socket left by an earlier agent — but not a live
/// one ([`BrokerError::InUse`]).
pub fn bind(lock_dir: &Path) -> Result<UnixListener, BrokerError> {
    let path = socket_path(lock_dir);
    let err = |source| BrokerError::Bind {
        path: path.clone(),
        source,
    };
    let dir = lock_dir.join(SOCKET_DIR);
    std::fs::create_dir_all(&dir).map_err(err)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(BrokerError::InUse { path });
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(&path).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(listener)
}

/// Serves until the task is dropped, one task per connection (owned here: dropped with the server).
pub async fn serve(listener: UnixListener, map: PidMap) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        match accepted {
            Ok((stream, _)) => {
                let map = Arc::clone(&map);
                connections.spawn(async move {
                    if let Err(error) = answer(stream, &map).await {
                        tracing::debug!(%error, "host-PID broker connection failed");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "host-PID broker: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The identity map (production).
pub fn identity() -> PidMap {
    Arc::new(Some)
}

/// Binds under `lock_dir` and serves with the identity map until `stop` is cancelled, then removes its socket
/// (so the next agent binds at once). While another broker answers there it checks again every
/// [`TAKEOVER_POLL`]; if the socket cannot be made at all it logs and returns (the agent keeps serving the
/// kubelet without it).
pub async fn run(lock_dir: PathBuf, stop: CancellationToken) {
    let mut reported = false;
    loop {
        match bind(&lock_dir) {
            Ok(listener) => {
                let path = socket_path(&lock_dir);
                let ours = std::fs::metadata(&path).ok().map(|m| m.ino());
                tracing::info!(socket = %path.display(), "serving the host-PID broker");
                stop.run_until_cancelled(serve(listener, identity())).await;
                // Only the socket we bound: never one a newer broker has put in its place.
                if ours.is_some() && std::fs::metadata(&path).ok().map(|m| m.ino()) == ours {
                    let _ = std::fs::remove_file(&path);
                }
                return;
            }
            Err(error @ BrokerError::InUse { .. }) => {
                if !std::mem::replace(&mut reported, true) {
                    tracing::warn!("{error}");
                }
                if stop
                    .run_until_cancelled(tokio::time::sleep(TAKEOVER_POLL))
                    .await
                    .is_none()
                {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!("{error}");
                return;
            }
        }
    }
}

/// How often a waiting broker checks whether the live one went away.
pub const TAKEOVER_POLL: Duration = Duration::from_secs(5);

async fn answer(mut stream: UnixStream, map: &PidMap) -> io::Result<()> {
    let peer = stream.peer_cred()?.pid();
    let mut request = [0u8; 8];
    tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut request))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let (status, pid) = decide(&request, peer, map);
    stream.write_all(&reply(status, pid)).await?;
    stream.shutdown().await
}

/// The answer to `request` from a peer the kernel identified as `peer`.
fn decide(request: &[u8; 8], peer: Option<i32>, map: &PidMap) -> (u16, u32) {
    let version = u16::from_be_bytes([request[4], request[5]]);
    let cmd = u16::from_be_bytes([request[6], request[7]]);
    if &request[..4] != b"HPID" || version != VERSION || cmd != CMD_HOST_PID {
        return (STATUS_BAD_REQUEST, 0);
    }
    match peer.filter(|&p| p > 0).and_then(|p| map(p)) {
        Some(pid) if pid > 0 => (0, pid as u32),
        _ => (STATUS_UNKNOWN_PEER, 0),
    }
}

fn reply(status: u16, pid: u32) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[..4].copy_from_slice(b"HPID");
    r[4..6].copy_from_slice(&VERSION.to_be_bytes());
    r[6..8].copy_from_slice(&status.to_be_bytes());
    r[8..].copy_from_slice(&pid.to_be_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_learns_its_own_pid_through_so_peercred() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path()).unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(|p| Some(p + 1_000_000))));
        let mut s = UnixStream::connect(socket_path(dir.path())).await.unwrap();
        s.write_all(b"HPID\0\x01\0\x01").await.unwrap();
        let mut r = [0u8; 12];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..8], b"HPID\0\x01\0\0");
        let pid = u32::from_be_bytes([r[8], r[9], r[10], r[11]]);
        assert_eq!(pid, std::process::id() + 1_000_000);
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
        server.abort();
    }

    #[test]
    fn bad_requests_and_unknown_peers_get_an_error_status() {
        let map = identity();
        assert_eq!(decide(b"HPID\0\x01\0\x01", Some(42), &map), (0, 42));
        assert_eq!(
            decide(b"HPID\0\x02\0\x01", Some(42), &map),
            (STATUS_BAD_REQUEST, 0)
        );
        assert_eq!(
            decide(b"HPID\0\x01\0\x07", Some(42), &map),
            (STATUS_BAD_REQUEST, 0)
        );
        assert_eq!(decide(b"GET / HT", Some(42), &map), (STATUS_BAD_REQUEST, 0));
        assert_eq!(
            decide(b"HPID\0\x01\0\x01", Some(0), &map),
            (STATUS_UNKNOWN_PEER, 0)
        );
        assert_eq!(
            decide(b"HPID\0\x01\0\x01", None, &map),
            (STATUS_UNKNOWN_PEER, 0)
        );
    }

    #[tokio::test]
    async fn a_stopped_broker_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let broker = tokio::spawn(run(dir.path().to_owned(), stop.clone()));
        let path = socket_path(dir.path());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&path).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "broker never served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), broker)
            .await
            .expect("the broker ends when stopped")
            .unwrap();
        assert!(!path.exists(), "socket left behind");
    }

    #[tokio::test]
    async fn a_live_broker_is_not_displaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = bind(dir.path()).unwrap();
        let server = tokio::spawn(serve(first, identity()));
        let second = tokio::task::spawn_blocking({
            let p = dir.path().to_owned();
            move || bind(&p).map(|_| ())
        })
        .await
        .unwrap();
        assert!(
            matches!(second, Err(BrokerError::InUse { .. })),
            "{second:?}"
        );
        server.abort();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(SOCKET_DIR)).unwrap();
        std::fs::write(socket_path(dir.path()), b"stale").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { bind(dir.path()).unwrap() });
    }
}
