//! The composition root: read the settings, prepare the GPUs ([`crate::gpu::prepare`]: NVML, discovery, the
//! three device lists), then start every task the agent runs and own them until the agent stops.
//!
//! The metrics listener comes up first, so that while NVML cannot be initialised (no driver yet, NVIDIA
//! runtime not the default) `/readyz` says why and `vgpu_agent_nvml_up` is 0; NVML is retried with backoff
//! ([`crate::gpu::nvml`]) and start-up continues when it appears, without a restart.
//!
//! Every task is owned by one `Supervisor` (`agent/supervisor.rs`): the metrics listener, the GPU health
//! thread, the host-PID broker, the shared regions' feedback, the CDI spec, the pod watch, the cache cleanup,
//! the node annotations and the kubelet endpoints ([`crate::kubelet::lifecycle`]). On SIGTERM each finishes its
//! current step (the endpoints drain the Allocate in flight) and what overstays [`STOP_BOUND`] is aborted by
//! name. A task that ends while the agent serves is logged; the endpoints ending stops the agent.

mod supervisor;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vgpu_metrics::AgentMetrics;

use crate::cluster::{self, ApiClients, ClusterError};
use crate::config::device::{self, VolcanoConfig};
use crate::config::{AgentConfig, InvalidSetting};
use crate::container::cdi::{self, CdiError, SpecInputs};
use crate::container::response::LimiterSettings;
use crate::error::error_chain;
use crate::gpu::health::{XidPolicy, spawn_monitor};
use crate::gpu::inventory::Inventory;
use crate::gpu::mig::{MigControl, NvmlMig, RepartitionHold};
use crate::gpu::prepare::{PrepareError, Prepared, prepare};
use crate::handoff::allocator::Allocator;
use crate::handoff::decision::HandoffSettings;
use crate::handoff::node_annotations;
use crate::handoff::pod_cache::PodCache;
use crate::kubelet::endpoint::EndpointError;
use crate::kubelet::lifecycle::{self, Endpoints, NotServing};
use crate::monitor::backstop::{self, BackstopView, NvmlSource};
use crate::monitor::events::Reporting;
use crate::monitor::metrics::NodeSnapshot;
use crate::monitor::{cache_cleanup, feedback, pid_broker};
use crate::volcano::node_register::OperatingMode;
pub use supervisor::Panicked;
use supervisor::{OnEnd, Supervisor};

/// How long a stop may take before the tasks still running are aborted: the endpoints' drain and stop, and a
/// margin, inside the pod's default 30 s termination grace.
pub const STOP_BOUND: Duration = Duration::from_secs(lifecycle::STOP_BOUND.as_secs() + 2);

/// Why the agent cannot serve. Each variant's message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag or config value is out of range.
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    /// NVML, the GPUs or the device lists cannot be served.
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// The CDI spec could not be written.
    #[error(transparent)]
    Cdi(#[from] CdiError),
    /// An endpoint could not be served.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The cluster side (client, config maps) could not be set up.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// `--node-name`, `--hook-path` or `--cache-root` cannot be used (checked at start, hand-off on).
    #[error(transparent)]
    StartCheck(#[from] crate::handoff::start_check::StartCheckError),
    /// The health thread could not be started.
    #[error("cannot start the GPU health thread")]
    HealthThread(#[source] std::io::Error),
    /// A task the agent cannot serve without panicked.
    #[error(transparent)]
    Panicked(#[from] Panicked),
}

/// Runs the agent until `shutdown` resolves, then stops every task (the endpoints drain and remove their
/// sockets), within [`STOP_BOUND`].
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    config.delivery.validate()?;
    warn_about_ineffective_flags(&config.delivery);
    let mut tasks = Supervisor::new(CancellationToken::new());
    let stop = tasks.token().clone();
    let agent = async move {
        let served = start_and_supervise(config, &mut tasks).await;
        let stopped = tasks.stop(STOP_BOUND).await;
        served.and(stopped)
    };
    tokio::pin!(agent);
    tokio::select! {
        result = &mut agent => result,
        () = shutdown => {
            stop.cancel();
            agent.await
        }
    }
}

/// Flags that are valid but change nothing in the chosen combination: said once at start.
fn warn_about_ineffective_flags(delivery: &crate::config::DeliverySettings) {
    if delivery.pass_device_specs && delivery.strategies.cdi_only() {
        tracing::warn!(
            "--pass-device-specs has no effect with a CDI-only --device-list-strategy: the device nodes come from the CDI spec"
        );
    }
}

/// Why the agent is not ready, as `/readyz` says it.
#[derive(Debug, thiserror::Error)]
enum NotReady {
    #[error("starting")]
    Starting,
    #[error("NVML unavailable ({reason}) from {library}; retrying")]
    Nvml {
        reason: &'static str,
        library: String,
    },
    #[error(transparent)]
    Kubelet(#[from] NotServing),
}

/// The agent's readiness: typed here, text on the metrics listener's channel.
#[derive(Debug, Clone)]
struct Readiness(Arc<watch::Sender<Result<(), String>>>);

impl Readiness {
    fn set(&self, state: Result<(), NotReady>) {
        let _ = self
            .0
            .send_replace(state.map_err(|reason| reason.to_string()));
    }
}

/// What is set up before NVML: the metrics and the readiness the metrics listener serves.
struct Early {
    metrics: Arc<AgentMetrics>,
    ready: Readiness,
    source: Arc<LateSource>,
}

/// The metrics listener's data source, set once the GPUs are known; empty until then.
#[derive(Default)]
struct LateSource(std::sync::OnceLock<Arc<dyn vgpu_metrics::SnapshotSource>>);

impl vgpu_metrics::SnapshotSource for LateSource {
    fn snapshot(&self) -> vgpu_metrics::Snapshot {
        self.0.get().map(|s| s.snapshot()).unwrap_or_default()
    }
}

/// Starts everything, then watches the tasks until the agent stops or a task it cannot serve without ends.
/// `Ok` also when the stop came during start-up.
async fn start_and_supervise(
    config: AgentConfig,
    tasks: &mut Supervisor<AgentError>,
) -> Result<(), AgentError> {
    let stop = tasks.token().clone();
    let early = listen_for_metrics(&config, tasks).await;
    let clients = stop.run_until_cancelled(cluster_clients(&config)).await;
    let Some(clients) = clients else {
        return Ok(());
    };
    // Start-up reads are bounded by --apiserver-wait; SIGTERM meanwhile stops the agent at once.
    let Some(volcano) = stop
        .run_until_cancelled(volcano_config(&config, clients.as_ref()))
        .await
        .transpose()?
    else {
        return Ok(());
    };
    let Some(prepared) = prepare_retrying(&config, volcano, &early, &stop).await? else {
        return Ok(());
    };
    start(config, clients, prepared, early, tasks).await?;
    tasks.supervise().await
}

/// Binds the metrics listener, if one is configured, and serves `/metrics`, `/healthz` and `/readyz`.
async fn listen_for_metrics(config: &AgentConfig, tasks: &mut Supervisor<AgentError>) -> Early {
    let metrics = Arc::new(AgentMetrics::new(env!("CARGO_PKG_VERSION")));
    let (ready_tx, ready_rx) = watch::channel(Err(NotReady::Starting.to_string()));
    let source = Arc::new(LateSource::default());
    if let Some(address) = config.metrics_address {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving /metrics, /healthz and /readyz");
                let served = vgpu_metrics::serve(
                    listener,
                    Arc::clone(&metrics),
                    Arc::clone(&source) as Arc<dyn vgpu_metrics::SnapshotSource>,
                    ready_rx,
                    tasks.token().clone().cancelled_owned(),
                );
                tasks.spawn("metrics", OnEnd::Log, async move {
                    served.await;
                    Ok(())
                });
            }
            // The endpoints matter more than the metrics: say so and keep serving the kubelet.
            Err(error) => {
                tracing::error!(%address, %error, "cannot listen for metrics; serving without them")
            }
        }
    }
    Early {
        metrics,
        ready: Readiness(Arc::new(ready_tx)),
        source,
    }
}

/// The apiserver clients, when the node is named and a client can be made; otherwise the agent serves device
/// counts only, and says why.
async fn cluster_clients(config: &AgentConfig) -> Option<ApiClients> {
    if config.node_name.is_none() {
        tracing::warn!(
            "NODE_NAME is not set: serving device counts only, without node annotations or the Volcano hand-off"
        );
        return None;
    }
    match cluster::clients(config.cluster.api_bounds).await {
        Ok(clients) => Some(clients),
        // No kubeconfig and no service account: still serve the device counts, and say loudly why the
        // hand-off is off, instead of crash-looping a node's device plugin.
        Err(error) => {
            tracing::error!(
                error = %error_chain(&error),
                "no Kubernetes client: serving device counts only, without node annotations or the Volcano hand-off"
            );
            None
        }
    }
}

/// The merged Volcano configuration: from the config maps (and the hand-off's start checks) with a client,
/// from the node's file and the flags without.
async fn volcano_config(
    config: &AgentConfig,
    clients: Option<&ApiClients>,
) -> Result<VolcanoConfig, AgentError> {
    if let Some(clients) = clients {
        let volcano = crate::config::load::load_config(&clients.requests, config).await?;
        crate::handoff::start_check::check_handoff_start(&clients.requests, config).await?;
        tracing::info!(node = ?config.node_name, "Volcano hand-off on: node and pod annotations are read and written");
        return Ok(volcano);
    }
    let node = crate::config::load::read_node_config(&config.cluster.node_config_path);
    Ok(device::merge_lenient(
        None,
        node.as_ref().map(|(s, f)| (s.as_str(), f)),
        config.node_name.as_deref(),
        &config.explicit,
    ))
}

/// [`prepare`], again with backoff while NVML is unavailable (unless `--fail-on-init-error`); `None` when the
/// agent stops meanwhile.
async fn prepare_retrying(
    config: &AgentConfig,
    volcano: VolcanoConfig,
    early: &Early,
    stop: &CancellationToken,
) -> Result<Option<Prepared>, AgentError> {
    let mut backoff = crate::gpu::nvml::BACKOFF_START;
    let mut last_reason = None;
    let prepared = loop {
        let attempt = {
            let (config, volcano) = (config.clone(), volcano.clone());
            tokio::task::spawn_blocking(move || prepare(&config, volcano))
                .await
                .expect("prepare does not panic")
        };
        let (lib, source) = match attempt {
            Ok(prepared) => break prepared,
            Err(PrepareError::Nvml { lib, source }) if !config.fail_on_init_error => (lib, source),
            Err(error) => return Err(error.into()),
        };
        let reason = crate::gpu::nvml::reason(&source);
        let library = lib.display().to_string();
        early.metrics.nvml_status(Err((reason, &library)));
        if last_reason != Some(reason) {
            tracing::error!(
                retry_in_s = backoff.as_secs(),
                "{}",
                crate::gpu::nvml::diagnosis(&lib, &source)
            );
            last_reason = Some(reason);
        } else {
            tracing::warn!(%library, error = %source, retry_in_s = backoff.as_secs(), "NVML still unavailable");
        }
        early.ready.set(Err(NotReady::Nvml { reason, library }));
        if stop
            .run_until_cancelled(tokio::time::sleep(backoff))
            .await
            .is_none()
        {
            return Ok(None);
        }
        backoff = crate::gpu::nvml::next_backoff(backoff);
    };
    if last_reason.is_some() {
        tracing::info!("NVML is available now; continuing start-up");
    }
    early.metrics.nvml_status(Ok(()));
    Ok(Some(prepared))
}

/// Starts serving, after [`prepare`]: the CDI spec, the health thread, the background duties, the hand-off
/// and the endpoints, each a task of `tasks`.
async fn start(
    config: AgentConfig,
    clients: Option<ApiClients>,
    prepared: Prepared,
    early: Early,
    tasks: &mut Supervisor<AgentError>,
) -> Result<(), AgentError> {
    let Prepared {
        nvml,
        inventory,
        plans,
        volcano,
    } = prepared;
    let stop = tasks.token().clone();
    let Early {
        metrics,
        ready,
        source: late_source,
    } = early;
    ready.set(Err(NotServing::Registering.into()));
    let cdi_inputs = SpecInputs {
        delivery: config.delivery.clone(),
        hook_path: config.hook_path.clone(),
        lock_dir: config.lock_dir.clone(),
    };
    if config.delivery.strategies.any_cdi() {
        // Before any endpoint is served: Allocate may hand out CDI names as soon as it is.
        let spec = cdi::build_spec(&cdi_inputs, &inventory, &vec![true; inventory.gpus.len()]);
        cdi::write_spec(&config.delivery.cdi_spec_dir, &spec)?;
        tracing::info!(
            path = %config.delivery.cdi_spec_dir.join(cdi::SPEC_FILE).display(), kind = cdi::KIND,
            strategies = ?config.delivery.strategies.iter().collect::<Vec<_>>(), "CDI spec written"
        );
    }

    let (policy, warnings) = XidPolicy::from_env(
        config.health.disable.as_deref(),
        config.health.enable.as_deref(),
    );
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let (health_tx, health) = watch::channel(vec![true; inventory.gpus.len()]);
    // The health thread stops after the endpoints (when this guard, moved into their task, is dropped), so
    // their ListAndWatch streams go on until the endpoints stop, as the kubelet expects; it holds NVML until
    // it has stopped, within one event-wait slice.
    let health_stop = CancellationToken::new();
    let stop_health_after_endpoints = health_stop.clone().drop_guard();
    // MIG mode: the hand-off repartitions GPUs through NVML; the health monitor ignores what a repartition does
    // to its GPU while it runs (and shortly after).
    let repartitions = Arc::new(RepartitionHold::default());
    let mig: Option<Arc<dyn MigControl>> =
        (volcano.operating_mode == OperatingMode::Mig).then(|| {
            Arc::new(NvmlMig::new(Arc::clone(&nvml), Arc::clone(&repartitions)))
                as Arc<dyn MigControl>
        });
    let monitor = spawn_monitor(
        Arc::clone(&nvml),
        Arc::clone(&inventory),
        config.health.clone(),
        policy,
        health_tx,
        health_stop,
        Arc::clone(&repartitions),
    )
    .map_err(AgentError::HealthThread)?;
    // Without it no GPU's health reaches the kubelet (every ListAndWatch stream ends with its channel) and the
    // node annotations stop: the agent stops, and its DaemonSet starts it again, rather than serve on blind.
    // It ends by itself only once the endpoints have stopped, after the stop token.
    tasks.adopt_thread("gpu-health", OnEnd::Stop, monitor);

    // The limiters in containers ask it for their host PIDs (the SM cap); see `pid_broker`.
    let broker = pid_broker::run(config.lock_dir.clone(), stop.clone());
    tasks.spawn("pid-broker", OnEnd::Log, async move {
        broker.await;
        Ok(())
    });
    // Where the monitor loops' reports go: the counters, and Events bounded like every apiserver request.
    let reporting = Reporting {
        metrics: Some(Arc::clone(&metrics)),
        client: clients.as_ref().map(|c| c.requests.clone()),
        node: config.node_name.clone(),
        event_timeout: clients
            .as_ref()
            .map_or(crate::cluster::REQUEST_TIMEOUT, |c| c.bounds.request),
    };
    // HAMi's monitor duty: priority feedback into every container's shared region.
    tasks.spawn_until_cancelled(
        "feedback",
        feedback::run(
            config.cache_root(),
            feedback::FEEDBACK_PERIOD,
            reporting.clone(),
        ),
    );
    if config.delivery.strategies.any_cdi() {
        tasks.spawn_until_cancelled(
            "cdi-spec",
            cdi::keep_current(
                cdi_inputs,
                Arc::clone(&inventory),
                health.clone(),
                cdi::REFRESH,
            ),
        );
    }

    let mut pod_cache = None;
    let mut allocator = None;
    if let (Some(clients), Some(node)) = (&clients, &config.node_name) {
        let (pods, pod_task) = PodCache::start_bounded(
            clients.requests.clone(),
            clients.watches.clone(),
            node,
            clients.bounds,
        );
        tasks.adopt("pod-watch", pod_task);
        pod_cache = Some((pods.clone(), node.clone()));
        tasks.spawn_until_cancelled(
            "cache-cleanup",
            cache_cleanup::run(
                pods.clone(),
                config.cache_root(),
                config.cache_grace,
                config
                    .cache_grace
                    .clamp(Duration::from_millis(200), Duration::from_secs(30)),
            ),
        );
        tasks.spawn_until_cancelled(
            "node-annotations",
            node_annotations::publish(
                clients.clone(),
                node.clone(),
                Arc::clone(&inventory),
                Arc::clone(&volcano),
                health.clone(),
                config.cluster.handshake,
                Arc::clone(&metrics),
            ),
        );
        match stop
            .run_until_cancelled(pods.wait_ready(Duration::from_secs(5)))
            .await
        {
            Some(true) => {}
            Some(false) => tracing::warn!(
                "pod watch not synced after 5 s; Allocate reads pods directly until it is"
            ),
            None => return Ok(()),
        }
        let hand_off = hand_off(&config, clients, node, pods, &volcano, &inventory, &metrics);
        allocator = Some(Arc::new(match mig {
            Some(control) => hand_off.with_mig(control),
            None => hand_off,
        }));
    }

    // The memory backstop: NVML's view of every container's GPU memory against its recorded cap.
    let backstop_view = (config.backstop.mode != crate::config::BackstopMode::Off).then(|| {
        let view = Arc::new(BackstopView::default());
        tasks.spawn_until_cancelled(
            "memory-backstop",
            backstop::run(
                config.backstop.clone(),
                Box::new(NvmlSource::new(Arc::clone(&nvml), Arc::clone(&inventory))),
                config.cache_root(),
                pod_cache.as_ref().map(|(pods, _)| pods.clone()),
                Arc::clone(&view),
                reporting,
            ),
        );
        view
    });

    if config.metrics_address.is_some() {
        let mut snapshot =
            NodeSnapshot::new(nvml, Arc::clone(&inventory), health.clone(), pod_cache)
                .with_regions(config.cache_root(), Arc::clone(&metrics));
        if let Some(view) = backstop_view {
            snapshot = snapshot.with_backstop(view);
        }
        let _ = late_source.0.set(Arc::new(snapshot));
    }

    let endpoints = Endpoints {
        kubelet_socket: config.kubelet_socket.clone(),
        socket_dir: config.socket_dir(),
        resources: volcano.resources.clone(),
        inventory,
        plans,
        health,
        allocator,
        metrics,
    };
    let report = move |state: Result<(), NotServing>| ready.set(state.map_err(NotReady::from));
    tasks.spawn("kubelet-endpoints", OnEnd::Stop, async move {
        let _stop_health = stop_health_after_endpoints;
        lifecycle::serve(endpoints, report, stop).await?;
        Ok(())
    });
    Ok(())
}

/// The Volcano hand-off's Allocate side: what each container is handed, decided from the scheduler's
/// annotations.
fn hand_off(
    config: &AgentConfig,
    clients: &ApiClients,
    node: &str,
    pods: PodCache,
    volcano: &Arc<VolcanoConfig>,
    inventory: &Arc<Inventory>,
    metrics: &Arc<AgentMetrics>,
) -> Allocator {
    let features = config.container_features;
    let limiter = LimiterSettings {
        memory_factor: volcano.sharing.memory_factor,
        memory_scaling: volcano.memory_scaling,
        disable_core_limit: volcano.disable_core_limit,
        hook_path: config.hook_path.clone(),
        lock_dir: config.lock_dir.clone(),
        gdrcopy: features.gdrcopy,
        gds: features.gds,
        mofed: features.mofed,
        delivery: config.delivery.clone(),
        gpu_minors: inventory
            .gpus
            .iter()
            .map(|gpu| (gpu.uuid.clone(), gpu.minor))
            .collect(),
    };
    let settings = HandoffSettings {
        config: Arc::clone(volcano),
        limiter,
        cache_root: config.cache_root(),
        bounds: clients.bounds,
    };
    Allocator::new(
        clients.requests.clone(),
        node,
        pods,
        settings,
        Arc::clone(inventory),
        Arc::clone(metrics),
    )
}
