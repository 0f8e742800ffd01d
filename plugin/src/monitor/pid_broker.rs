//! The host-PID broker, served for the limiters in containers: a process in a container's PID namespace
//! cannot learn its host PID (which NVML reports and the SM limiter matches on), so it asks the agent over a
//! unix socket under the lock directory and the kernel tells the agent who asked (`SO_PEERCRED`). The
//! protocol and the server are in the `vgpu-hostpid` crate, shared with the limiter; this runs that server on
//! a thread of its own, logs what it reports, and stops it with the agent.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use vgpu_hostpid::Event;

/// Serves the broker under `lock_dir` with the identity map (the agent runs in the host PID namespace) until
/// `stop` is cancelled; the server then removes its socket. While another broker answers there it waits for
/// it to go away; if the socket cannot be made at all it logs and returns (the agent keeps serving the
/// kubelet without it).
pub async fn run(lock_dir: PathBuf, stop: CancellationToken) {
    let server_stop = vgpu_hostpid::Stop::new();
    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("hostpid-broker".into())
        .spawn({
            let server_stop = server_stop.clone();
            move || {
                vgpu_hostpid::run(&lock_dir, vgpu_hostpid::identity(), &server_stop, log);
                let _ = done_tx.send(());
            }
        });
    let thread = match spawned {
        Ok(thread) => thread,
        Err(error) => {
            tracing::warn!(%error, "cannot start the host-PID broker's thread; serving without it");
            return;
        }
    };
    tokio::select! {
        () = stop.cancelled() => server_stop.stop(),
        _ = &mut done => {}
    }
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(error) => tracing::warn!(%error, "the host-PID broker's thread could not be joined"),
    }
}

/// What the server reports, as the agent logs it.
fn log(event: Event<'_>) {
    match event {
        Event::Serving(path) => {
            tracing::info!(socket = %path.display(), "serving the host-PID broker")
        }
        Event::Waiting(error) | Event::Unavailable(error) => tracing::warn!("{error}"),
        Event::AcceptFailed(error) => tracing::warn!(%error, "host-PID broker: accept failed"),
        Event::ConnectionFailed(error) => {
            tracing::debug!(%error, "host-PID broker connection failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// One request over the socket, as the limiter sends it.
    fn ask(lock_dir: &std::path::Path) -> Option<i32> {
        let mut stream =
            std::os::unix::net::UnixStream::connect(vgpu_hostpid::socket_path(lock_dir)).ok()?;
        stream.write_all(&vgpu_hostpid::request()).ok()?;
        let mut reply = [0u8; vgpu_hostpid::REPLY_LEN];
        stream.read_exact(&mut reply).ok()?;
        vgpu_hostpid::parse_reply(&reply)
    }

    #[tokio::test]
    async fn serves_until_cancelled_then_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(dir.path().to_owned(), stop.clone()));
        let socket = vgpu_hostpid::socket_path(dir.path());
        let mut answer = None;
        for _ in 0..200 {
            let lock_dir = dir.path().to_owned();
            answer = tokio::task::spawn_blocking(move || ask(&lock_dir))
                .await
                .unwrap();
            if answer.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            answer,
            Some(std::process::id() as i32),
            "a client learns its own PID"
        );
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the broker stops when cancelled")
            .unwrap();
        assert!(
            std::fs::symlink_metadata(&socket).is_err(),
            "socket removed"
        );
    }
}
