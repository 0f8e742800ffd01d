//! The host-PID broker: tells a process in a GPU container its PID in the host's PID namespace,
//! which NVML reports and the limiter needs to find its own utilisation samples (the SM cap).
//!
//! HAMi-core guesses the host PID by diffing NVML's process list around a context creation, which
//! two pods starting at once on one GPU confuse. The broker is exact: it listens on
//! `<lock dir>/hostpid/broker.sock` (host `/tmp/vgpulock`, mounted at `/tmp/vgpulock` in every
//! container), and for each connection asks the kernel who the peer is (`SO_PEERCRED`). The kernel
//! translates the peer's PID into the server's PID namespace, which is the host's when the server
//! (the node agent) runs with `hostPID` (without it, peers from other namespaces read as PID 0 and
//! get an error reply). A process can only ever learn its own PID.
//!
//! Wire format (HAMi's broker, `HAMi:docs/develop/hostpid-broker.md`, network byte order): request
//! `"HPID"` u16 version (1) u16 command (1 = my host PID); reply `"HPID"` u16 version (1) u16
//! status u32 PID. Status [`STATUS_OK`], [`STATUS_BAD_REQUEST`], [`STATUS_UNKNOWN_PEER`]. A client
//! that sends nothing within [`REQUEST_TIMEOUT`] is dropped without a reply.
//!
//! Two halves, std + libc only:
//!
//! * **The protocol**, for both sides: [`request`], [`decide`], [`encode_reply`], [`parse_reply`],
//!   [`socket_path`]. The limiter (the client, `libvgpu.so`) uses only these.
//! * **The one server**: [`bind`] (creates the socket, replaces a stale one, refuses to displace a
//!   live one), [`serve`] (a blocking accept loop for the caller's thread and one responder thread
//!   that waits for every connection's request at once, until a [`Stop`] is signalled), [`run`] (bind, wait while another broker
//!   answers, serve — what the node agent runs). Events go to a plain `fn` so the caller logs them
//!   its own way.

use std::ffi::c_void;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// First four bytes of every request and reply.
pub const MAGIC: [u8; 4] = *b"HPID";
/// Protocol version spoken.
pub const VERSION: u16 = 1;
/// Command: "what is my host PID".
pub const CMD_HOST_PID: u16 = 1;
/// Reply status: the PID follows.
pub const STATUS_OK: u16 = 0;
/// Reply status: the request was not `"HPID"` v1 command 1.
pub const STATUS_BAD_REQUEST: u16 = 1;
/// Reply status: the kernel did not say who the peer is (e.g. the server lacks `hostPID`).
pub const STATUS_UNKNOWN_PEER: u16 = 2;
/// Bytes in a request.
pub const REQUEST_LEN: usize = 8;
/// Bytes in a reply.
pub const REPLY_LEN: usize = 12;

/// Directory under the lock directory.
pub const SOCKET_DIR: &str = "hostpid";
/// Socket file name.
pub const SOCKET_NAME: &str = "broker.sock";
/// The socket as a container sees it (the lock directory is mounted at `/tmp/vgpulock`).
pub const CONTAINER_SOCKET: &str = "/tmp/vgpulock/hostpid/broker.sock";
/// How long a connected client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often [`run`] checks whether a live broker it found went away.
pub const TAKEOVER_POLL: Duration = Duration::from_secs(5);
/// How long [`serve`] waits after a failed `accept` before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// The protocol
// ---------------------------------------------------------------------------------------------

/// The socket path for `lock_dir`.
pub fn socket_path(lock_dir: &Path) -> PathBuf {
    lock_dir.join(SOCKET_DIR).join(SOCKET_NAME)
}

/// The client's request: "what is my host PID".
pub fn request() -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[..4].copy_from_slice(&MAGIC);
    r[4..6].copy_from_slice(&VERSION.to_be_bytes());
    r[6..8].copy_from_slice(&CMD_HOST_PID.to_be_bytes());
    r
}

/// The server's answer `(status, pid)` to `request` from a peer the kernel identified as `peer`,
/// mapped through `map` (kernel PID → the PID NVML uses).
pub fn decide(
    request: &[u8; REQUEST_LEN],
    peer: Option<i32>,
    map: &dyn Fn(i32) -> Option<i32>,
) -> (u16, u32) {
    let version = u16::from_be_bytes([request[4], request[5]]);
    let cmd = u16::from_be_bytes([request[6], request[7]]);
    if request[..4] != MAGIC || version != VERSION || cmd != CMD_HOST_PID {
        return (STATUS_BAD_REQUEST, 0);
    }
    match peer.filter(|&p| p > 0).and_then(map) {
        Some(pid) if pid > 0 => (STATUS_OK, pid as u32),
        _ => (STATUS_UNKNOWN_PEER, 0),
    }
}

/// The server's reply bytes.
pub fn encode_reply(status: u16, pid: u32) -> [u8; REPLY_LEN] {
    let mut r = [0u8; REPLY_LEN];
    r[..4].copy_from_slice(&MAGIC);
    r[4..6].copy_from_slice(&VERSION.to_be_bytes());
    r[6..8].copy_from_slice(&status.to_be_bytes());
    r[8..].copy_from_slice(&pid.to_be_bytes());
    r
}

/// The client's reading of a reply: the PID, or `None` unless it is an "ok" with a positive PID.
pub fn parse_reply(reply: &[u8; REPLY_LEN]) -> Option<i32> {
    if reply[..4] != MAGIC {
        return None;
    }
    let status = u16::from_be_bytes([reply[6], reply[7]]);
    let pid = u32::from_be_bytes([reply[8], reply[9], reply[10], reply[11]]);
    (status == STATUS_OK && pid > 0 && pid <= i32::MAX as u32).then_some(pid as i32)
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// Maps the PID the kernel reports for a peer to the PID NVML uses. Production: [`identity`] (the
/// server's namespace is the host's). Tests on the gpu-sim inject its simulated namespace offset.
pub type PidMap = Arc<dyn Fn(i32) -> Option<i32> + Send + Sync>;

/// The identity map (production).
pub fn identity() -> PidMap {
    Arc::new(Some)
}

/// Why the broker cannot listen.
#[derive(Debug)]
pub enum BindError {
    /// The socket directory or socket could not be created.
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another broker answers on the socket (a second agent on the node, e.g. during an update).
    InUse {
        /// The socket path.
        path: PathBuf,
    },
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bind { path, source } => write!(
                f,
                "cannot serve the host-PID broker at {}: {source}; check that --lock-dir is a \
                 writable host directory (the SM cap then counts the whole GPU as each container's)",
                path.display()
            ),
            Self::InUse { path } => write!(
                f,
                "another host-PID broker is serving {}; waiting for it to go away",
                path.display()
            ),
        }
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Bind { source, .. } => Some(source),
            Self::InUse { .. } => None,
        }
    }
}

/// Creates `<lock_dir>/hostpid/` (mode 0755) and binds the socket (mode 0666, so containers running
/// as any user can connect), replacing a stale socket left by an earlier server — but not a live
/// one ([`BindError::InUse`]).
pub fn bind(lock_dir: &Path) -> Result<UnixListener, BindError> {
    let path = socket_path(lock_dir);
    let err = |source| BindError::Bind {
        path: path.clone(),
        source,
    };
    let dir = lock_dir.join(SOCKET_DIR);
    std::fs::create_dir_all(&dir).map_err(err)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    if UnixStream::connect(&path).is_ok() {
        return Err(BindError::InUse { path });
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

/// What the server reports, for the caller to log (the node agent: `Serving` info, `Waiting`,
/// `Unavailable` and `AcceptFailed` warnings, `ConnectionFailed` debug).
#[derive(Debug)]
pub enum Event<'a> {
    /// [`run`] bound the socket and serves it.
    Serving(&'a Path),
    /// [`run`] found a live broker on the socket and waits for it to go away (reported once).
    Waiting(&'a BindError),
    /// [`run`] cannot make the socket at all and gives up.
    Unavailable(&'a BindError),
    /// `accept` failed; [`serve`] tries again after 100 ms.
    AcceptFailed(&'a io::Error),
    /// One connection failed (no peer credentials, no request in time, the peer went away).
    ConnectionFailed(&'a io::Error),
}

/// Tells [`serve`] and [`run`] to return; cheap to clone, any clone stops them.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<StopInner>);

#[derive(Debug, Default)]
struct StopInner {
    state: Mutex<StopState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct StopState {
    stopped: bool,
    /// The listener [`serve`] is blocked on, to wake its `accept`.
    listener: Option<RawFd>,
}

impl Stop {
    /// Not stopped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops: a `serve` blocked in `accept` wakes and returns, a `run` waiting for another broker
    /// returns. Connections being answered finish on their own threads.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopped = true;
        if let Some(fd) = s.listener {
            // SAFETY: `fd` is the listener `serve` registered; it deregisters (under this lock)
            // before the listener is closed, so the descriptor is still that socket. Shutting a
            // listening socket down makes a blocked `accept` return.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        self.0.changed.notify_all();
    }

    /// Whether [`Stop::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    fn lock(&self) -> MutexGuard<'_, StopState> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps up to `d`; `true` when stopped meanwhile.
    fn wait(&self, d: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .0
            .changed
            .wait_timeout_while(s, d, |s| !s.stopped)
            .unwrap_or_else(PoisonError::into_inner);
        s.stopped
    }

    /// Registers the listener to wake; `false` when already stopped.
    fn watch(&self, fd: Option<RawFd>) -> bool {
        let mut s = self.lock();
        s.listener = fd;
        !s.stopped
    }
}

/// Serves `listener` on the calling thread until `stop` is signalled. Connections are answered by
/// one responder thread that waits for all their requests at once (`poll`), each for at most
/// [`REQUEST_TIMEOUT`]: a client that sends nothing delays nobody else, and since the socket is open
/// to every container, a tenant that connects in a loop and sends nothing costs the agent at most
/// [`MAX_WAITING`] descriptors (the oldest connection that has sent nothing is dropped for a new
/// one; a request already there is answered as the connection is taken), never a thread each. If
/// the responder cannot be started, each connection is answered on the accept loop.
pub fn serve(listener: UnixListener, map: PidMap, stop: &Stop, on_event: fn(Event<'_>)) {
    if !stop.watch(Some(listener.as_raw_fd())) {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel::<UnixStream>();
    let responder = {
        let map = Arc::clone(&map);
        std::thread::Builder::new()
            .name("hostpid-broker".into())
            .spawn(move || respond_all(&rx, &map, on_event))
            .is_ok()
    };
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stop.is_stopped() {
                    break;
                }
                if !responder {
                    respond(stream, &map, on_event);
                } else if let Err(std::sync::mpsc::SendError(stream)) = tx.send(stream) {
                    respond(stream, &map, on_event); // the responder is gone (it panicked)
                }
            }
            Err(error) => {
                if stop.is_stopped() {
                    break;
                }
                on_event(Event::AcceptFailed(&error));
                if stop.wait(ACCEPT_RETRY) {
                    break;
                }
            }
        }
    }
    // Dropping the sender ends the responder once it has answered or dropped what it holds.
    stop.watch(None);
}

/// Most connections waiting for their request at once.
pub const MAX_WAITING: usize = 256;
/// How often the responder takes new connections while others wait.
const RESPONDER_TICK_MS: u64 = 10;

/// A connection waiting for its request.
struct Waiting {
    stream: UnixStream,
    deadline: std::time::Instant,
    request: [u8; REQUEST_LEN],
    got: usize,
}

/// The responder: answers each connection handed over by `rx` once its request has come, drops
/// those that send nothing within [`REQUEST_TIMEOUT`]; returns when `rx`'s sender is gone.
fn respond_all(rx: &std::sync::mpsc::Receiver<UnixStream>, map: &PidMap, on_event: fn(Event<'_>)) {
    use std::sync::mpsc::TryRecvError;
    let mut waiting: std::collections::VecDeque<Waiting> = std::collections::VecDeque::new();
    // A new connection whose request is already there is answered at once; the others wait. Past
    // `MAX_WAITING`, the oldest that has sent nothing at all makes room (a flood of silent connections
    // cannot push out a client that is mid-request).
    let take = |waiting: &mut std::collections::VecDeque<Waiting>, stream: UnixStream| {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut w = Waiting {
            stream,
            deadline: std::time::Instant::now() + REQUEST_TIMEOUT,
            request: [0; REQUEST_LEN],
            got: 0,
        };
        match read_some(&mut w) {
            Ok(true) => {
                if let Err(error) = reply(&w.stream, &w.request, map) {
                    on_event(Event::ConnectionFailed(&error));
                }
                return;
            }
            Ok(false) => {}
            Err(error) => {
                on_event(Event::ConnectionFailed(&error));
                return;
            }
        }
        if waiting.len() >= MAX_WAITING {
            let silent = waiting.iter().position(|w| w.got == 0).unwrap_or(0);
            drop(waiting.remove(silent));
            on_event(Event::ConnectionFailed(&io::Error::other(
                "too many connections waiting for their request; the oldest silent one was dropped",
            )));
        }
        waiting.push_back(w);
    };
    loop {
        if waiting.is_empty() {
            match rx.recv() {
                Ok(stream) => take(&mut waiting, stream),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(stream) => take(&mut waiting, stream),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if waiting.is_empty() => return,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let mut fds: Vec<libc::pollfd> = waiting
            .iter()
            .map(|w| libc::pollfd {
                fd: w.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let now = std::time::Instant::now();
        let wait = waiting
            .iter()
            .map(|w| w.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or_default()
            .min(Duration::from_millis(RESPONDER_TICK_MS));
        // SAFETY: `fds` holds `fds.len()` valid pollfd entries for descriptors `waiting` owns.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                i32::try_from(wait.as_millis()).unwrap_or(i32::MAX),
            )
        };
        let now = std::time::Instant::now();
        let mut kept = std::collections::VecDeque::with_capacity(waiting.len());
        for (mut w, fd) in waiting.drain(..).zip(&fds) {
            let outcome = if fd.revents != 0 {
                read_some(&mut w)
            } else {
                Ok(false)
            };
            match outcome {
                Ok(true) => {
                    if let Err(error) = reply(&w.stream, &w.request, map) {
                        on_event(Event::ConnectionFailed(&error));
                    }
                }
                Ok(false) if now < w.deadline => kept.push_back(w),
                Ok(false) => {
                    drop(w); // closed before it is reported
                    on_event(Event::ConnectionFailed(&io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request",
                    )));
                }
                Err(error) => on_event(Event::ConnectionFailed(&error)),
            }
        }
        waiting = kept;
    }
}

/// Reads what has arrived of `w`'s request; `Ok(true)` once it is complete.
fn read_some(w: &mut Waiting) -> io::Result<bool> {
    loop {
        match (&w.stream).read(&mut w.request[w.got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a whole request",
                ));
            }
            Ok(n) => {
                w.got += n;
                if w.got == REQUEST_LEN {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The reply to a whole request, then end of stream (12 bytes fit any socket buffer: a
/// non-blocking write does not come up short).
fn reply(stream: &UnixStream, request: &[u8; REQUEST_LEN], map: &PidMap) -> io::Result<()> {
    let (status, pid) = decide(request, peer_pid(stream)?, &**map);
    let mut out = stream;
    out.write_all(&encode_reply(status, pid))?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// Binds under `lock_dir` and serves with `map` until `stop`, then removes the socket it bound. While
/// another broker answers there it checks again every [`TAKEOVER_POLL`]; if the socket cannot be made
/// at all it reports and returns (the node agent keeps serving the kubelet without it).
pub fn run(lock_dir: &Path, map: PidMap, stop: &Stop, on_event: fn(Event<'_>)) {
    let mut reported = false;
    while !stop.is_stopped() {
        match bind(lock_dir) {
            Ok(listener) => {
                let path = socket_path(lock_dir);
                let ours = inode(&path);
                on_event(Event::Serving(&path));
                serve(listener, map, stop, on_event);
                // Stopped: remove the socket so the next broker binds at once, but only the one we
                // bound, never one a newer broker has put in its place.
                if ours.is_some() && inode(&path) == ours {
                    let _ = std::fs::remove_file(&path);
                }
                return;
            }
            Err(error @ BindError::InUse { .. }) => {
                if !std::mem::replace(&mut reported, true) {
                    on_event(Event::Waiting(&error));
                }
                if stop.wait(TAKEOVER_POLL) {
                    return;
                }
            }
            Err(error) => {
                on_event(Event::Unavailable(&error));
                return;
            }
        }
    }
}

/// The inode at `path`, if anything is there.
fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

fn respond(stream: UnixStream, map: &PidMap, on_event: fn(Event<'_>)) {
    if let Err(error) = answer(stream, map) {
        on_event(Event::ConnectionFailed(&error));
    }
}

/// One connection: who is it (`SO_PEERCRED`), what does it ask (within [`REQUEST_TIMEOUT`]), the
/// reply, then end of stream.
fn answer(mut stream: UnixStream, map: &PidMap) -> io::Result<()> {
    let peer = peer_pid(&stream)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut request = [0u8; REQUEST_LEN];
    stream
        .read_exact(&mut request)
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::new(io::ErrorKind::TimedOut, "no request")
            }
            _ => e,
        })?;
    let (status, pid) = decide(&request, peer, &**map);
    stream.write_all(&encode_reply(status, pid))?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// The peer's PID as the kernel reports it in this process's PID namespace (0 when the peer is not
/// visible from it).
fn peer_pid(stream: &UnixStream) -> io::Result<Option<i32>> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a connected socket's descriptor, and an out-buffer of exactly `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast::<c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(cred.pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// A server on a private lock directory, on its own thread.
    struct Running {
        dir: PathBuf,
        _owned: Option<tempfile::TempDir>,
        stop: Stop,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(map: PidMap, on_event: fn(Event<'_>)) -> Self {
            let owned = tempfile::tempdir().unwrap();
            let mut r = Self::start_in(owned.path(), map, on_event);
            r._owned = Some(owned);
            r
        }

        fn start_in(dir: &Path, map: PidMap, on_event: fn(Event<'_>)) -> Self {
            let listener = bind(dir).unwrap();
            let stop = Stop::new();
            let s = stop.clone();
            let thread = std::thread::spawn(move || serve(listener, map, &s, on_event));
            Self {
                dir: dir.to_owned(),
                _owned: None,
                stop,
                thread: Some(thread),
            }
        }

        fn socket(&self) -> PathBuf {
            socket_path(&self.dir)
        }

        /// Sends `bytes`, returns everything the server sent back before closing.
        fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
            let mut s = UnixStream::connect(self.socket()).unwrap();
            s.write_all(bytes).unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).unwrap();
            reply
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.stop();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn ignore(_: Event<'_>) {}

    #[test]
    fn request_and_reply_use_hamis_wire_format() {
        assert_eq!(&request(), b"HPID\0\x01\0\x01");
        assert_eq!(&encode_reply(0, 12345), b"HPID\0\x01\0\0\0\0\x30\x39");
        let mut ok = *b"HPID\0\x01\0\0\0\0\x30\x39";
        assert_eq!(parse_reply(&ok), Some(12345));
        ok[7] = 1; // status: error
        assert_eq!(parse_reply(&ok), None);
        assert_eq!(parse_reply(b"XPID\0\x01\0\0\0\0\x30\x39"), None);
        assert_eq!(parse_reply(b"HPID\0\x01\0\0\0\0\0\0"), None, "pid 0");
        assert_eq!(parse_reply(b"HPID\0\x01\0\0\x80\0\0\0"), None, "beyond i32");
        assert_eq!(
            socket_path(Path::new("/tmp/vgpulock")),
            Path::new(CONTAINER_SOCKET)
        );
    }

    #[test]
    fn round_trip_a_client_learns_its_own_pid_through_so_peercred() {
        let server = Running::start(Arc::new(|p| Some(p + 1_000_000)), ignore);
        let reply = server.exchange(&request());
        let reply: [u8; REPLY_LEN] = reply.try_into().unwrap();
        assert_eq!(&reply[..8], b"HPID\0\x01\0\0");
        assert_eq!(
            parse_reply(&reply),
            Some(std::process::id() as i32 + 1_000_000)
        );
        let mode = std::fs::metadata(server.socket())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
    }

    #[test]
    fn bad_requests_get_a_bad_request_status() {
        let map = identity();
        assert_eq!(decide(b"HPID\0\x01\0\x01", Some(42), &*map), (0, 42));
        assert_eq!(
            decide(b"HPID\0\x02\0\x01", Some(42), &*map),
            (STATUS_BAD_REQUEST, 0)
        );
        assert_eq!(
            decide(b"HPID\0\x01\0\x07", Some(42), &*map),
            (STATUS_BAD_REQUEST, 0)
        );
        assert_eq!(
            decide(b"GET / HT", Some(42), &*map),
            (STATUS_BAD_REQUEST, 0)
        );
        let server = Running::start(identity(), ignore);
        assert_eq!(
            server.exchange(b"GET / HT"),
            encode_reply(STATUS_BAD_REQUEST, 0)
        );
    }

    #[test]
    fn unknown_peers_get_an_unknown_peer_status() {
        let map = identity();
        assert_eq!(
            decide(b"HPID\0\x01\0\x01", Some(0), &*map),
            (STATUS_UNKNOWN_PEER, 0)
        );
        assert_eq!(
            decide(b"HPID\0\x01\0\x01", None, &*map),
            (STATUS_UNKNOWN_PEER, 0)
        );
        // A peer the map does not know (the kernel's PID 0 for an invisible peer maps the same).
        let server = Running::start(Arc::new(|_| None), ignore);
        assert_eq!(
            server.exchange(&request()),
            encode_reply(STATUS_UNKNOWN_PEER, 0)
        );
    }

    static TIMED_OUT: AtomicUsize = AtomicUsize::new(0);
    fn count_timeouts(e: Event<'_>) {
        if let Event::ConnectionFailed(e) = e
            && e.kind() == io::ErrorKind::TimedOut
        {
            TIMED_OUT.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_silent_client_is_dropped_after_the_timeout_and_delays_nobody() {
        let server = Running::start(identity(), count_timeouts);
        let started = Instant::now();
        let mut silent = UnixStream::connect(server.socket()).unwrap();
        // Another client is answered at once meanwhile.
        assert_eq!(
            parse_reply(&server.exchange(&request()).try_into().unwrap()),
            Some(std::process::id() as i32)
        );
        assert!(started.elapsed() < REQUEST_TIMEOUT);
        let mut reply = Vec::new();
        silent.read_to_end(&mut reply).unwrap();
        assert!(reply.is_empty(), "no reply without a request: {reply:?}");
        assert!(started.elapsed() >= REQUEST_TIMEOUT);
        assert!(started.elapsed() < REQUEST_TIMEOUT * 3);
        // The server closes the connection before it reports the timeout: wait for the report.
        let reported = Instant::now() + Duration::from_secs(5);
        while TIMED_OUT.load(Ordering::Relaxed) == 0 && Instant::now() < reported {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(TIMED_OUT.load(Ordering::Relaxed), 1);
    }

    /// This process's threads named like the broker's responders.
    fn responder_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim_end() == "hostpid-broker")
            })
            .count()
    }

    #[test]
    fn a_flood_of_silent_clients_takes_no_thread_each_and_real_clients_are_answered_at_once() {
        static CROWDED: AtomicUsize = AtomicUsize::new(0);
        fn count_crowded(e: Event<'_>) {
            if let Event::ConnectionFailed(e) = e
                && e.to_string().contains("too many connections")
            {
                CROWDED.fetch_add(1, Ordering::Relaxed);
            }
        }
        let server = Running::start(identity(), count_crowded);
        // A client half-way through its request when the flood comes is not pushed out by it.
        let mut halfway = UnixStream::connect(server.socket()).unwrap();
        halfway.write_all(&request()[..4]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // More than fit: the oldest silent ones make room, never a real client.
        let silent: Vec<UnixStream> = (0..MAX_WAITING + 64)
            .map(|_| UnixStream::connect(server.socket()).unwrap())
            .collect();
        let crowded = Instant::now() + Duration::from_secs(5);
        while CROWDED.load(Ordering::Relaxed) < 64 && Instant::now() < crowded {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(CROWDED.load(Ordering::Relaxed) >= 64, "the flood made room");
        halfway.write_all(&request()[4..]).unwrap();
        let mut reply = Vec::new();
        halfway.read_to_end(&mut reply).unwrap();
        assert_eq!(
            parse_reply(&reply.try_into().unwrap()),
            Some(std::process::id() as i32)
        );
        // A real client (request written right after connecting) is answered at once, flood or not.
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(
                parse_reply(&server.exchange(&request()).try_into().unwrap()),
                Some(std::process::id() as i32)
            );
        }
        assert!(
            started.elapsed() < REQUEST_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        // Other tests of this binary run beside this one, each with a responder of its own.
        let threads = responder_threads();
        assert!(
            threads <= 8,
            "{threads} responder threads for {} silent clients",
            silent.len()
        );
        // Those past the bound were dropped at once, the others after the timeout: every one ends.
        for mut s in silent {
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).unwrap();
            assert!(reply.is_empty());
        }
    }

    #[test]
    fn stop_ends_serve_promptly() {
        let server = Running::start(identity(), ignore);
        let started = Instant::now();
        drop(server); // stops and joins
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_live_broker_is_not_displaced_and_run_takes_over_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let first = Running::start_in(dir.path(), Arc::new(|p| Some(p + 1)), ignore);
        assert!(matches!(bind(dir.path()), Err(BindError::InUse { .. })));
        // `run` waits while the first serves, without touching its socket.
        let stop = Stop::new();
        let waiting = std::thread::spawn({
            let (dir, stop) = (dir.path().to_owned(), stop.clone());
            move || run(&dir, Arc::new(|p| Some(p + 2)), &stop, ignore)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiting.is_finished());
        let me = std::process::id() as i32;
        let reply = first.exchange(&request()).try_into().unwrap();
        assert_eq!(parse_reply(&reply), Some(me + 1), "the first still answers");
        // The first goes (its socket file stays behind, stale): `run` takes over at its next poll.
        drop(first);
        let deadline = Instant::now() + TAKEOVER_POLL * 2;
        let answered_by = loop {
            let reply = UnixStream::connect(socket_path(dir.path()))
                .ok()
                .and_then(|mut s| {
                    s.write_all(&request()).ok()?;
                    let mut r = [0u8; REPLY_LEN];
                    s.read_exact(&mut r).ok()?;
                    parse_reply(&r)
                });
            if reply.is_some() || Instant::now() > deadline {
                break reply;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(answered_by, Some(me + 2), "the waiting broker took over");
        stop.stop();
        waiting.join().unwrap();
        assert!(
            std::fs::symlink_metadata(socket_path(dir.path())).is_err(),
            "a stopped broker removes the socket it bound"
        );
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(SOCKET_DIR)).unwrap();
        std::fs::write(socket_path(dir.path()), b"stale").unwrap();
        bind(dir.path()).unwrap();
        assert!(
            std::fs::metadata(socket_path(dir.path()))
                .unwrap()
                .file_type()
                .is_socket()
        );
    }

    use std::os::unix::fs::FileTypeExt;
}
