//! Noticing a kubelet restart: the kubelet deletes every socket in its directory and re-creates its own.
//!
//! An inotify watch on the directory reports the re-creation at once; a slow poll of the socket's identity
//! (inode and change time) catches what inotify cannot see, such as a directory replaced under a bind mount.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How often the identity of the kubelet socket is compared when inotify is silent.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Which file a path currently is, so a deleted and re-created socket counts as new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileIdentity {
    /// The identity of what is at `path` now, if anything.
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }
}

/// Watches the kubelet's socket directory.
#[derive(Debug)]
pub struct KubeletWatch {
    kubelet_socket: PathBuf,
    events: mpsc::UnboundedReceiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl KubeletWatch {
    /// Starts watching; without inotify (the directory is missing, or the watch limit is reached) the poll alone
    /// keeps working.
    pub fn new(kubelet_socket: &Path) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let socket = kubelet_socket.to_path_buf();
        let dir = kubelet_socket
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            let relevant = matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(_)
            ) && event.paths.iter().any(|p| p == &socket);
            if relevant {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "no inotify watch on the kubelet directory; polling every 2 s");
                None
            }
        };
        Self {
            kubelet_socket: kubelet_socket.to_path_buf(),
            events,
            _watcher: watcher,
        }
    }

    /// The kubelet socket's identity now.
    pub fn current(&self) -> Option<FileIdentity> {
        FileIdentity::of(&self.kubelet_socket)
    }

    /// Resolves once the kubelet socket exists and is not `known` (a new kubelet, or the first one).
    pub async fn changed_from(&mut self, known: Option<FileIdentity>) {
        loop {
            if let Some(now) = self.current()
                && Some(now) != known
            {
                return;
            }
            tokio::select! {
                _ = self.events.recv() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }

    /// Waits for a filesystem event or `timeout`, whichever is first.
    pub async fn event_or(&mut self, timeout: Duration) {
        tokio::select! {
            _ = self.events.recv() => {}
            _ = tokio::time::sleep(timeout) => {}
        }
    }
}
