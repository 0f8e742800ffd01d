//! The endpoints' lifecycle: serve the three endpoints, register them with the kubelet, and serve and register
//! them again whenever the kubelet restarts or our sockets are removed, until the agent stops; then finish the
//! Allocate in flight ([`DRAIN`]), stop serving and remove the sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vgpu_metrics::AgentMetrics;

use crate::config::ResourceNames;
use crate::error::error_chain;
use crate::gpu::inventory::Inventory;
use crate::gpu::plan::DevicePlan;
use crate::handoff::allocator::Allocator;
use crate::kubelet::endpoint::{EndpointError, RunningEndpoint};
use crate::kubelet::registration::register;
use crate::kubelet::service::ResourceService;
use crate::kubelet::socket_watch::{FileIdentity, KubeletWatch};

/// Registration retries start fast (a restarting kubelet creates its socket a moment before it answers)
/// and back off to this.
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often our own sockets are checked for deletion behind our back.
const SOCKET_CHECK: Duration = Duration::from_secs(2);
/// Serving the endpoints again after a transient failure starts this fast and backs off to
/// [`REGISTER_RETRY_MAX`].
const ENDPOINT_RETRY_START: Duration = Duration::from_millis(50);
/// How long a stop waits for an Allocate in flight: inside the pod's default 30 s termination grace.
pub const DRAIN: Duration = Duration::from_secs(20);
/// The longest a stop of the endpoints takes: [`DRAIN`], then at most a second per endpoint's server.
pub const STOP_BOUND: Duration = Duration::from_secs(DRAIN.as_secs() + 3);

/// Why the endpoints are not serving the kubelet (yet), for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServing {
    /// Before the first registration went through.
    #[error("registering with the kubelet")]
    Registering,
    /// The kubelet restarted or our socket was removed: serving and registering again.
    #[error("registering with the kubelet again")]
    RegisteringAgain,
    /// Serving failed in a way that can pass by itself; retried with backoff.
    #[error("serving the endpoints: {reason}; retrying")]
    Retrying {
        /// The failure and its causes, on one line.
        reason: String,
    },
}

/// What every (re)start of the endpoints shares.
#[derive(Debug)]
pub struct Endpoints {
    /// The kubelet's Registration socket.
    pub kubelet_socket: PathBuf,
    /// Where our sockets go: the kubelet's socket directory.
    pub socket_dir: PathBuf,
    /// The three resource names.
    pub resources: ResourceNames,
    /// The GPUs.
    pub inventory: Arc<Inventory>,
    /// One plan per resource.
    pub plans: Vec<Arc<DevicePlan>>,
    /// Each GPU's health.
    pub health: watch::Receiver<Vec<bool>>,
    /// The Volcano hand-off; `None` serves counts only.
    pub allocator: Option<Arc<Allocator>>,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
}

/// Serves and registers the endpoints until `stop` is cancelled, then drains and stops them (sockets removed).
/// `report` hears whether the kubelet is served. An error that cannot pass by itself is returned (the agent
/// exits with it); transient ones are retried.
pub async fn serve(
    endpoints: Endpoints,
    report: impl Fn(Result<(), NotServing>),
    stop: CancellationToken,
) -> Result<(), EndpointError> {
    let mut watch = KubeletWatch::new(&endpoints.kubelet_socket);
    loop {
        let started = Instant::now();
        let running = tokio::select! {
            running = start_endpoints_retrying(&endpoints, &report) => running?,
            () = stop.cancelled() => return Ok(()),
        };
        let registered = tokio::select! {
            id = register_all(&endpoints.kubelet_socket, &running, &mut watch) => id,
            () = stop.cancelled() => None,
        };
        let Some(kubelet) = registered else {
            drain_and_stop(running, endpoints.allocator.as_deref()).await;
            return Ok(());
        };
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "all endpoints registered with the kubelet"
        );
        report(Ok(()));

        tokio::select! {
            () = stop.cancelled() => {
                tracing::info!("shutting down: stopping endpoints and removing their sockets");
                drain_and_stop(running, endpoints.allocator.as_deref()).await;
                return Ok(());
            }
            () = watch.changed_from(Some(kubelet)) => {
                tracing::info!("kubelet socket re-created (kubelet restarted); serving and registering again");
            }
            gone = socket_removed(&running) => {
                tracing::info!(socket = %gone.display(), "our socket was removed; serving and registering again");
            }
        }
        report(Err(NotServing::RegisteringAgain));
        stop_all(running).await;
    }
}

/// [`start_endpoints`], again and again with backoff while what fails can pass by itself (a kubelet restart
/// deleting our sockets mid-start, a self-check that did not get through); an error that cannot pass is
/// returned.
async fn start_endpoints_retrying(
    endpoints: &Endpoints,
    report: &impl Fn(Result<(), NotServing>),
) -> Result<Vec<RunningEndpoint>, EndpointError> {
    let mut backoff = ENDPOINT_RETRY_START;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match start_endpoints(endpoints).await {
            Ok(running) => {
                if attempt > 1 {
                    tracing::info!(attempts = attempt, "endpoints serving again");
                }
                return Ok(running);
            }
            Err(error) if error.is_transient() => {
                let reason = error_chain(&error);
                tracing::warn!(error = %reason, attempt, retry_in_ms = backoff.as_millis() as u64, "cannot serve the endpoints yet; retrying");
                report(Err(NotServing::Retrying { reason }));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REGISTER_RETRY_MAX);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Stops serving for good (the agent stops): an Allocate in flight is finished first, within [`DRAIN`], so
/// the kubelet's answer and the pod's annotations agree; later ones are refused meanwhile.
async fn drain_and_stop(running: Vec<RunningEndpoint>, allocator: Option<&Allocator>) {
    if let Some(allocator) = allocator {
        let started = Instant::now();
        if allocator.drain(DRAIN).await {
            let waited = started.elapsed();
            if waited > Duration::from_millis(100) {
                tracing::info!(
                    waited_ms = waited.as_millis() as u64,
                    "the Allocate in flight finished; stopping"
                );
            }
        } else {
            tracing::warn!(
                bound_s = DRAIN.as_secs(),
                "an Allocate was still running at the stop bound; stopping anyway"
            );
        }
    }
    stop_all(running).await;
}

async fn start_endpoints(endpoints: &Endpoints) -> Result<Vec<RunningEndpoint>, EndpointError> {
    let mut running = Vec::with_capacity(endpoints.plans.len());
    for plan in &endpoints.plans {
        let name = endpoints.resources.get(plan.kind).to_owned();
        let started = RunningEndpoint::start(&endpoints.socket_dir, plan.kind, &name, |stopping| {
            ResourceService::new(
                name.clone(),
                Arc::clone(plan),
                Arc::clone(&endpoints.inventory),
                endpoints.health.clone(),
                stopping,
                endpoints.allocator.clone(),
                Arc::clone(&endpoints.metrics),
            )
        })
        .await;
        match started {
            Ok(endpoint) => running.push(endpoint),
            Err(error) => {
                stop_all(running).await;
                return Err(error);
            }
        }
    }
    Ok(running)
}

/// Registers every endpoint, retrying while the kubelet is absent or refuses; returns the identity of the
/// kubelet socket that accepted them all.
async fn register_all(
    kubelet_socket: &Path,
    running: &[RunningEndpoint],
    watch: &mut KubeletWatch,
) -> Option<FileIdentity> {
    let mut warned = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(kubelet) = watch.current() else {
            if !warned {
                tracing::warn!(socket = %kubelet_socket.display(), "kubelet socket not there yet; waiting for it");
                warned = true;
            }
            watch.changed_from(None).await;
            continue;
        };
        let mut failure = None;
        for endpoint in running {
            if let Err(error) = register(
                kubelet_socket,
                &endpoint.file_name(),
                &endpoint.resource_name,
                endpoint.options,
            )
            .await
            {
                failure = Some(error);
                break;
            }
            tracing::info!(resource = %endpoint.resource_name, socket = %endpoint.file_name(), "registered with the kubelet");
        }
        match failure {
            None => return Some(kubelet),
            Some(error) => {
                tracing::warn!(error = %error_chain(&error), retry_in_ms = backoff.as_millis() as u64, "registration failed");
                watch.event_or(backoff).await;
                backoff = (backoff * 2).min(REGISTER_RETRY_MAX);
            }
        }
    }
}

async fn socket_removed(running: &[RunningEndpoint]) -> PathBuf {
    loop {
        tokio::time::sleep(SOCKET_CHECK).await;
        if let Some(gone) = running.iter().find(|e| !e.socket_exists()) {
            return gone.socket.clone();
        }
    }
}

async fn stop_all(running: Vec<RunningEndpoint>) {
    for endpoint in running {
        endpoint.stop().await;
    }
}
