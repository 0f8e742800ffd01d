//! Owning the agent's tasks: every task runs in one [`JoinSet`] under one [`CancellationToken`], so none is
//! left running unseen and one stop reaches them all.
//!
//! While the agent serves, a task that ends (returns or panics) is noticed and logged by name; one marked
//! [`OnEnd::Stop`] stops the agent. At the stop the token is cancelled, each task finishes its current step
//! (the endpoints drain the Allocate in flight), and whatever is still running at the bound is aborted and
//! named.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::error_chain;

/// What the agent does when a task ends while it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEnd {
    /// Say so and keep serving without it: a background duty.
    Log,
    /// Stop the agent, with the task's error if it has one: the agent is nothing without it.
    Stop,
}

/// A task that panicked: the agent stops with this when the task was one it cannot serve without.
#[derive(Debug, thiserror::Error)]
#[error("the {task} task panicked: {message}")]
pub struct Panicked {
    /// The task's name.
    pub task: &'static str,
    /// The panic's message.
    pub message: String,
}

/// The agent's tasks and their one stop.
#[derive(Debug)]
pub struct Supervisor<E> {
    set: JoinSet<Result<(), E>>,
    names: HashMap<Id, (&'static str, OnEnd)>,
    token: CancellationToken,
}

/// How a task ended.
enum Ending<E> {
    Returned,
    Failed(E),
    Panicked(String),
    Aborted,
}

impl<E> Supervisor<E>
where
    E: std::error::Error + From<Panicked> + Send + 'static,
{
    /// No task yet; `token` is the agent's stop.
    pub fn new(token: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            token,
        }
    }

    /// The stop every task watches.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Spawns a task that watches [`Self::token`] itself and ends once its current step is done.
    pub fn spawn(
        &mut self,
        name: &'static str,
        on_end: OnEnd,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, on_end));
    }

    /// Spawns a loop with nothing to finish: it is given up at its next `await` once the token is cancelled.
    pub fn spawn_until_cancelled(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let token = self.token.clone();
        self.spawn(name, OnEnd::Log, async move {
            token.run_until_cancelled(task).await;
            Ok(())
        });
    }

    /// Owns a task spawned elsewhere: it is given up like [`Self::spawn_until_cancelled`], and aborted with its
    /// owner.
    pub fn adopt(&mut self, name: &'static str, task: JoinHandle<()>) {
        let token = self.token.clone();
        // Made here, not in the task: dropped, even unpolled, it aborts what it holds.
        let mut task = AbortOnDrop(task);
        self.spawn(name, OnEnd::Log, async move {
            match token.run_until_cancelled(&mut task.0).await {
                Some(Err(error)) if error.is_panic() => {
                    std::panic::resume_unwind(error.into_panic())
                }
                _ => Ok(()),
            }
        });
    }

    /// Owns an OS thread that watches the token itself: joined off the runtime, its panic is the task's.
    pub fn adopt_thread(
        &mut self,
        name: &'static str,
        on_end: OnEnd,
        thread: std::thread::JoinHandle<()>,
    ) {
        self.spawn(name, on_end, async move {
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(_) => Ok(()),
            }
        });
    }

    /// Watches the tasks until the token is cancelled. A task that ends meanwhile is logged; when it is one the
    /// agent cannot serve without ([`OnEnd::Stop`]), the token is cancelled and its error (or its panic) is
    /// returned, for the caller to report once.
    pub async fn supervise(&mut self) -> Result<(), E> {
        loop {
            let joined = tokio::select! {
                // First: a task that ended because of the stop is the stop's to count, not a death.
                biased;
                () = self.token.cancelled() => return Ok(()),
                Some(joined) = self.set.join_next_with_id() => joined,
            };
            let (name, on_end, ending) = self.ending(joined);
            match (on_end, ending) {
                (OnEnd::Log, Ending::Returned) => tracing::warn!(
                    task = name,
                    "task ended on its own; the agent keeps serving without it"
                ),
                (OnEnd::Log, Ending::Failed(error)) => tracing::error!(
                    task = name, error = %error_chain(&error),
                    "task failed; the agent keeps serving without it"
                ),
                (OnEnd::Log, Ending::Panicked(message)) => tracing::error!(
                    task = name, panic = %message,
                    "task panicked; the agent keeps serving without it"
                ),
                (_, Ending::Aborted) => {
                    tracing::warn!(task = name, "task was aborted")
                }
                (OnEnd::Stop, ending) => {
                    self.token.cancel();
                    return match ending {
                        Ending::Failed(error) => Err(error),
                        Ending::Panicked(message) => Err(Panicked {
                            task: name,
                            message,
                        }
                        .into()),
                        _ => {
                            tracing::warn!(
                                task = name,
                                "task ended on its own; stopping the agent"
                            );
                            Ok(())
                        }
                    };
                }
            }
        }
    }

    /// Stops every task: cancels the token, waits up to `bound` for each to finish its current step, then
    /// aborts and names the ones still running. The first error of a task the agent cannot serve without is
    /// returned; other endings are logged.
    pub async fn stop(mut self, bound: Duration) -> Result<(), E> {
        self.token.cancel();
        let deadline = tokio::time::Instant::now() + bound;
        let mut first_error = None;
        let mut stopped = 0usize;
        loop {
            let joined = match tokio::time::timeout_at(deadline, self.set.join_next_with_id()).await
            {
                Ok(Some(joined)) => joined,
                Ok(None) => break,
                Err(_) => {
                    let mut late: Vec<&str> = self.names.values().map(|(name, _)| *name).collect();
                    late.sort_unstable();
                    tracing::warn!(
                        tasks = ?late, bound_ms = bound.as_millis() as u64,
                        "tasks still running at the stop bound; aborting them"
                    );
                    let aborted = late.len();
                    self.set.shutdown().await;
                    tracing::info!(stopped, aborted, "agent tasks stopped");
                    return first_error.map_or(Ok(()), Err);
                }
            };
            stopped += 1;
            let (name, on_end, ending) = self.ending(joined);
            match ending {
                Ending::Returned | Ending::Aborted => tracing::debug!(task = name, "task stopped"),
                Ending::Failed(error) if on_end == OnEnd::Stop && first_error.is_none() => {
                    first_error = Some(error);
                }
                Ending::Failed(error) => tracing::error!(
                    task = name, error = %error_chain(&error), "task failed while stopping"
                ),
                Ending::Panicked(message) => {
                    tracing::error!(task = name, panic = %message, "task panicked while stopping")
                }
            }
        }
        tracing::info!(stopped, aborted = 0, "agent tasks stopped");
        first_error.map_or(Ok(()), Err)
    }

    /// The name, policy and ending of a joined task, which is forgotten.
    fn ending(
        &mut self,
        joined: Result<(Id, Result<(), E>), JoinError>,
    ) -> (&'static str, OnEnd, Ending<E>) {
        let (id, ending) = match joined {
            Ok((id, Ok(()))) => (id, Ending::Returned),
            Ok((id, Err(error))) => (id, Ending::Failed(error)),
            Err(error) => {
                let id = error.id();
                if error.is_panic() {
                    (id, Ending::Panicked(panic_message(error.into_panic())))
                } else {
                    (id, Ending::Aborted)
                }
            }
        };
        let (name, on_end) = self.names.remove(&id).unwrap_or(("unnamed", OnEnd::Log));
        (name, on_end, ending)
    }
}

/// Aborts a task when dropped: an adopted task goes with the task that owns it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("gave up")]
        GaveUp,
        #[error(transparent)]
        Panicked(#[from] Panicked),
    }

    fn supervisor() -> Supervisor<TestError> {
        Supervisor::new(CancellationToken::new())
    }

    #[tokio::test]
    async fn a_stop_ends_every_task_and_lets_each_finish_its_step() {
        let mut tasks = supervisor();
        let finished = Arc::new(AtomicUsize::new(0));
        for name in ["loop-a", "loop-b"] {
            let count = CountOnDrop(Arc::clone(&finished));
            tasks.spawn_until_cancelled(name, async move {
                let _count = count;
                std::future::pending::<()>().await;
            });
        }
        // A task that finishes a step after the stop, like the endpoints draining.
        let token = tasks.token().clone();
        let drained = Arc::clone(&finished);
        tasks.spawn("draining", OnEnd::Stop, async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drained.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let adopted = tokio::spawn(std::future::pending::<()>());
        let adopted_abort = adopted.abort_handle();
        tasks.adopt("adopted", adopted);
        let token = tasks.token().clone();
        let thread = std::thread::spawn(move || {
            while !token.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        tasks.adopt_thread("thread", OnEnd::Log, thread);

        let started = tokio::time::Instant::now();
        tasks.stop(Duration::from_secs(5)).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no task overstayed"
        );
        assert_eq!(
            finished.load(Ordering::SeqCst),
            3,
            "both loops dropped, the drain finished"
        );
        for _ in 0..100 {
            if adopted_abort.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            adopted_abort.is_finished(),
            "the adopted task is gone with its owner"
        );
    }

    #[tokio::test]
    async fn only_a_task_that_overstays_the_bound_is_aborted_and_named() {
        let (logs, _guard) = capture_logs();
        let mut tasks = supervisor();
        let finished = Arc::new(AtomicUsize::new(0));
        let count = CountOnDrop(Arc::clone(&finished));
        tasks.spawn("stubborn", OnEnd::Log, async move {
            let _count = count;
            std::future::pending::<()>().await;
            Ok(())
        });
        tasks.spawn_until_cancelled("polite", std::future::pending());
        tasks.stop(Duration::from_millis(50)).await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 1, "aborted, so dropped");
        let logs = text(&logs);
        let warning = logs
            .lines()
            .find(|l| l.contains("still running at the stop bound"))
            .unwrap_or_else(|| panic!("no warning: {logs}"));
        assert!(
            warning.contains("WARN") && warning.contains("stubborn") && !warning.contains("polite"),
            "{warning}"
        );
        assert!(
            logs.lines().any(|l| l.contains("agent tasks stopped")
                && l.contains("stopped=1")
                && l.contains("aborted=1")),
            "{logs}"
        );
    }

    fn text(logs: &std::sync::Mutex<Vec<u8>>) -> String {
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Everything logged on this thread (the test's runtime is single-threaded) while the guard lives.
    fn capture_logs() -> (
        Arc<std::sync::Mutex<Vec<u8>>>,
        tracing::subscriber::DefaultGuard,
    ) {
        #[derive(Clone)]
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink(Arc::default());
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (sink.0, tracing::subscriber::set_default(subscriber))
    }

    #[tokio::test]
    async fn a_background_task_that_dies_is_logged_and_the_others_keep_running() {
        let (logs, _guard) = capture_logs();
        let mut tasks = supervisor();
        tasks.spawn_until_cancelled("dies", async { panic!("boom") });
        tasks.spawn_until_cancelled("returns", async {});
        tasks.spawn_until_cancelled("serves", std::future::pending());
        let token = tasks.token().clone();
        let supervised = tokio::time::timeout(Duration::from_millis(300), tasks.supervise()).await;
        assert!(
            supervised.is_err(),
            "background endings do not stop the agent"
        );
        assert!(!token.is_cancelled());
        assert_eq!(tasks.names.len(), 1, "both endings were seen");
        assert!(tasks.names.values().all(|(name, _)| *name == "serves"));
        tasks.stop(Duration::from_secs(1)).await.unwrap();
        let logs =
            String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
        let line = |needles: &[&str]| logs.lines().any(|l| needles.iter().all(|n| l.contains(n)));
        assert!(
            line(&["ERROR", "\"dies\"", "boom", "task panicked"]),
            "{logs}"
        );
        assert!(
            line(&["WARN", "\"returns\"", "task ended on its own"]),
            "{logs}"
        );
        assert!(
            !logs.contains("\"serves\""),
            "a task that stops when asked is not reported: {logs}"
        );
    }

    #[tokio::test]
    async fn a_vital_task_that_fails_or_panics_stops_the_agent_with_its_error() {
        let mut tasks = supervisor();
        tasks.spawn("kubelet", OnEnd::Stop, async { Err(TestError::GaveUp) });
        let error = tasks.supervise().await.unwrap_err();
        assert!(matches!(error, TestError::GaveUp), "{error}");
        assert!(tasks.token().is_cancelled());

        let mut tasks = supervisor();
        tasks.spawn("kubelet", OnEnd::Stop, async { panic!("lost") });
        let error = tasks.supervise().await.unwrap_err();
        assert_eq!(error.to_string(), "the kubelet task panicked: lost");

        // A vital OS thread (the GPU health monitor's) that panics stops the agent the same way.
        let mut tasks = supervisor();
        let thread = std::thread::spawn(|| panic!("nvml went away"));
        tasks.adopt_thread("gpu-health", OnEnd::Stop, thread);
        let error = tasks.supervise().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the gpu-health task panicked: nvml went away"
        );
        assert!(tasks.token().is_cancelled());
    }

    struct CountOnDrop(Arc<AtomicUsize>);

    impl Drop for CountOnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
