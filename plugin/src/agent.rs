//! The node agent's lifecycle: load NVML, discover GPUs, plan the three device lists, start the health
//! monitor, then serve and register the endpoints, and serve and register them again whenever the kubelet
//! restarts, until shutdown.
//!
//! The metrics listener comes up first, so that while NVML cannot be initialised (no driver yet, NVIDIA
//! runtime not the default) `/readyz` says why and `vgpu_agent_nvml_up` is 0; NVML is retried with backoff
//! ([`crate::gpu::nvml`]) and start-up continues when it appears, without a restart.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::InitFlags;
use nvml_wrapper::error::NvmlError;
use tokio::sync::watch;

use kube::Client;

use crate::cluster::{self, ApiClients, ClusterError};
use crate::config::ResourceKind;
use crate::config::device::{self, VolcanoConfig};
use crate::config::{AgentConfig, InvalidSetting};
use crate::container::cdi::{self, CdiError, SpecInputs};
use crate::container::response::LimiterSettings;
use crate::error::error_chain;
use crate::gpu::health::{XidPolicy, spawn_monitor};
use crate::gpu::inventory::apply_filter;
use crate::gpu::inventory::{DiscoveryError, Inventory, discover};
use crate::gpu::plan::{DevicePlan, MessageTooLarge};
use crate::handoff::allocator::{Allocator, HandoffSettings};
use crate::handoff::node_annotations;
use crate::handoff::pod_cache::PodCache;
use crate::kubelet::endpoint::{EndpointError, RunningEndpoint};
use crate::kubelet::registration::register;
use crate::kubelet::service::ResourceService;
use crate::kubelet::socket_watch::{FileIdentity, KubeletWatch};
use crate::monitor::metrics::NodeSnapshot;
use vgpu_metrics::AgentMetrics;

/// Registration retries start fast (a restarting kubelet creates its socket a moment before it answers)
/// and back off to this.
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often our own sockets are checked for deletion behind our back.
const SOCKET_CHECK: Duration = Duration::from_secs(2);
/// Serving the endpoints again after a transient failure starts this fast and backs off to
/// [`REGISTER_RETRY_MAX`].
const ENDPOINT_RETRY_START: Duration = Duration::from_millis(50);
/// How long a stop waits for an Allocate in flight: inside the pod's default 30 s termination grace.
const DRAIN: Duration = Duration::from_secs(20);

/// Why the agent cannot serve. Each variant's message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag or config value is out of range.
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    /// NVML could not be loaded or initialised.
    #[error("{}", crate::gpu::nvml::diagnosis(lib, source))]
    Nvml {
        /// The library path or name tried.
        lib: PathBuf,
        /// NVML's error.
        source: NvmlError,
    },
    /// The CDI spec could not be written.
    #[error(transparent)]
    Cdi(#[from] CdiError),
    /// No usable GPU.
    #[error("GPU discovery failed: {0}")]
    Discovery(#[from] DiscoveryError),
    /// A device list would not fit in one kubelet message.
    #[error(transparent)]
    TooLarge(#[from] MessageTooLarge),
    /// An endpoint could not be served.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The cluster side (client, config maps) could not be set up.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The node is configured for MIG, which this agent does not serve yet.
    #[error(
        "this node's operatingmode is mig (volcano-vgpu-node-config), which this agent does not serve yet; set it to \
         hami-core or run the Go plugin on MIG nodes"
    )]
    MigNotSupported,
    /// `--node-name`, `--hook-path` or `--cache-root` cannot be used (checked at start, hand-off on).
    #[error(transparent)]
    StartCheck(#[from] crate::handoff::start_check::StartCheckError),
    /// The health thread could not be started.
    #[error("cannot start the GPU health thread")]
    HealthThread(#[source] std::io::Error),
}

/// What the agent discovered and will serve, ready before anything is served.
#[derive(Debug)]
pub struct Prepared {
    nvml: Arc<Nvml>,
    /// The GPUs, sorted by minor number, after `filterdevices`.
    pub inventory: Arc<Inventory>,
    /// One plan per resource, in [`ResourceKind::ALL`] order.
    pub plans: Vec<Arc<DevicePlan>>,
    /// The merged Volcano configuration.
    pub volcano: Arc<VolcanoConfig>,
}

/// Loads NVML, discovers the GPUs and plans the device lists: every check that can refuse to start.
pub fn prepare(config: &AgentConfig, volcano: VolcanoConfig) -> Result<Prepared, AgentError> {
    volcano.sharing.validate()?;
    if volcano.operating_mode == "mig" {
        return Err(AgentError::MigNotSupported);
    }
    let nvml = init_nvml(&config.nvml_lib).map_err(|source| AgentError::Nvml {
        lib: config.nvml_lib.clone(),
        source,
    })?;
    if let Ok(version) = nvml.sys_driver_version() {
        tracing::info!(driver = %version, lib = %config.nvml_lib.display(), "NVML initialised");
    }
    let mut inventory = discover(&nvml, &config.sysfs_root)?;
    apply_filter(&mut inventory, &volcano.filter);
    if inventory.gpus.is_empty() {
        return Err(DiscoveryError::NoGpus.into());
    }
    volcano
        .sharing
        .check_memory_factor(inventory.gpus.iter().map(|gpu| gpu.memory_mib()))?;
    for gpu in &inventory.gpus {
        tracing::info!(
            uuid = %gpu.uuid, model = %gpu.model, memory_mib = gpu.memory_mib(), minor = gpu.minor,
            numa = ?gpu.numa_node, "GPU discovered"
        );
    }
    let mut plans = Vec::new();
    for kind in ResourceKind::ALL {
        let plan = DevicePlan::new(kind, &inventory, &volcano.sharing)?;
        tracing::info!(
            resource = volcano.resources.get(kind), ids = plan.total(), id_style = ?plan.style,
            max_message_bytes = plan.max_message_bytes, "device list planned"
        );
        plans.push(Arc::new(plan));
    }
    Ok(Prepared {
        nvml: Arc::new(nvml),
        inventory: Arc::new(inventory),
        plans,
        volcano: Arc::new(volcano),
    })
}

/// Initialises NVML so that a node without GPUs is reported as such by discovery rather than as an opaque
/// init failure (`NVML_INIT_FLAG_NO_GPUS`); drivers older than `nvmlInitWithFlags` get a plain init.
fn init_nvml(lib: &Path) -> Result<Nvml, NvmlError> {
    match Nvml::builder()
        .lib_path(lib.as_os_str())
        .flags(InitFlags::NO_GPUS)
        .init()
    {
        Err(NvmlError::FailedToLoadSymbol(_)) => Nvml::builder().lib_path(lib.as_os_str()).init(),
        other => other,
    }
}

/// Runs the agent until `shutdown` resolves, then stops serving and removes its sockets.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    config.delivery.validate()?;
    warn_about_ineffective_flags(&config.delivery);
    let metrics = Arc::new(AgentMetrics::new(env!("CARGO_PKG_VERSION")));
    let (ready_tx, ready_rx) = watch::channel(Err("starting".to_owned()));
    let source = Arc::new(LateSource::default());
    let mut early_tasks = Vec::new();
    if let Some(address) = config.metrics_address {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving /metrics, /healthz and /readyz");
                early_tasks.push(tokio::spawn(vgpu_metrics::serve(
                    listener,
                    Arc::clone(&metrics),
                    Arc::clone(&source) as Arc<dyn vgpu_metrics::SnapshotSource>,
                    ready_rx,
                    std::future::pending(),
                )));
            }
            // The endpoints matter more than the metrics: say so and keep serving the kubelet.
            Err(error) => {
                tracing::error!(%address, %error, "cannot listen for metrics; serving without them")
            }
        }
    }
    let early = Early {
        metrics,
        ready: ready_tx,
        source,
    };
    let result = run_with(config, early, shutdown).await;
    for task in early_tasks {
        task.abort();
    }
    result
}

/// Flags that are valid but change nothing in the chosen combination: said once at start.
fn warn_about_ineffective_flags(delivery: &crate::config::DeliverySettings) {
    if delivery.pass_device_specs && delivery.strategies.cdi_only() {
        tracing::warn!(
            "--pass-device-specs has no effect with a CDI-only --device-list-strategy: the device nodes come from the CDI spec"
        );
    }
}

/// What [`run`] sets up before NVML: the metrics listener's state.
struct Early {
    metrics: Arc<AgentMetrics>,
    ready: watch::Sender<Result<(), String>>,
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

async fn run_with(
    config: AgentConfig,
    early: Early,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    let clients = match &config.node_name {
        Some(_) => match cluster::clients(config.cluster.api_bounds).await {
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
        },
        None => {
            tracing::warn!(
                "NODE_NAME is not set: serving device counts only, without node annotations or the Volcano hand-off"
            );
            None
        }
    };
    let client = clients.as_ref().map(|c| c.requests.clone());
    let volcano = match &client {
        Some(client) => {
            // Start-up reads are bounded by --apiserver-wait; SIGTERM meanwhile stops the agent at once.
            let reads = async {
                let volcano = crate::config::load::load_config(client, &config).await?;
                crate::handoff::start_check::check_handoff_start(client, &config).await?;
                Ok::<_, AgentError>(volcano)
            };
            let volcano = tokio::select! {
                read = reads => read?,
                () = &mut shutdown => return Ok(()),
            };
            tracing::info!(node = ?config.node_name, "Volcano hand-off on: node and pod annotations are read and written");
            volcano
        }
        None => {
            let node = crate::config::load::read_node_config(&config.cluster.node_config_path);
            device::merge_lenient(
                None,
                node.as_ref().map(|(s, f)| (s.as_str(), f)),
                config.node_name.as_deref(),
                &config.explicit,
            )
        }
    };
    let mut backoff = crate::gpu::nvml::BACKOFF_START;
    let mut last_reason = None;
    let prepared = loop {
        let attempt = {
            let (config, volcano) = (config.clone(), volcano.clone());
            tokio::task::spawn_blocking(move || prepare(&config, volcano))
                .await
                .expect("prepare does not panic")
        };
        let error = match attempt {
            Ok(prepared) => break prepared,
            Err(AgentError::Nvml { lib, source }) if !config.fail_on_init_error => (lib, source),
            Err(error) => return Err(error),
        };
        let (lib, source) = error;
        let reason = crate::gpu::nvml::reason(&source);
        let library = lib.display().to_string();
        early.metrics.nvml_status(Err((reason, &library)));
        let _ = early.ready.send_replace(Err(format!(
            "NVML unavailable ({reason}) from {library}; retrying"
        )));
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
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut shutdown => return Ok(()),
        }
        backoff = crate::gpu::nvml::next_backoff(backoff);
    };
    if last_reason.is_some() {
        tracing::info!("NVML is available now; continuing start-up");
    }
    early.metrics.nvml_status(Ok(()));
    serve(config, clients, prepared, early, shutdown).await
}

/// The serving half of [`run`], after [`prepare`].
async fn serve(
    config: AgentConfig,
    clients: Option<ApiClients>,
    prepared: Prepared,
    early: Early,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let Prepared {
        nvml,
        inventory,
        plans,
        volcano,
    } = prepared;
    let client: Option<Client> = clients.as_ref().map(|c| c.requests.clone());
    let (policy, warnings) = XidPolicy::from_env(
        config.health.disable.as_deref(),
        config.health.enable.as_deref(),
    );
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let Early {
        metrics,
        ready: ready_tx,
        source: late_source,
    } = early;
    let _ = ready_tx.send_replace(Err("registering with the kubelet".to_owned()));
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
    let (health_tx, health_rx) = watch::channel(vec![true; inventory.gpus.len()]);
    let stop_health = Arc::new(AtomicBool::new(false));
    let monitor = spawn_monitor(
        Arc::clone(&nvml),
        Arc::clone(&inventory),
        config.health.clone(),
        policy,
        health_tx,
        Arc::clone(&stop_health),
    )
    .map_err(AgentError::HealthThread)?;

    let mut background = Vec::new();
    // The limiters in containers ask it for their host PIDs (the SM cap); see `pid_broker`.
    background.push(tokio::spawn(crate::monitor::pid_broker::run(
        config.lock_dir.clone(),
    )));
    // HAMi's monitor duty: priority feedback into every container's shared region (aborted at shutdown).
    background.push(tokio::spawn(crate::monitor::feedback::run(
        config.cache_root(),
        crate::monitor::feedback::FEEDBACK_PERIOD,
        crate::monitor::feedback::Reporting {
            metrics: Some(Arc::clone(&metrics)),
            client: client.clone(),
            node: config.node_name.clone(),
        },
    )));
    if config.delivery.strategies.any_cdi() {
        background.push(tokio::spawn(cdi::keep_current(
            cdi_inputs,
            Arc::clone(&inventory),
            health_rx.clone(),
            cdi::REFRESH,
        )));
    }
    let mut pod_cache = None;
    let allocator = match (&clients, &config.node_name) {
        (Some(clients), Some(node)) => {
            let client = &clients.requests;
            let (pods, pod_task) = PodCache::start_bounded(
                client.clone(),
                clients.watches.clone(),
                node,
                clients.bounds,
            );
            pod_cache = Some((pods.clone(), node.clone()));
            background.push(tokio::spawn(crate::monitor::cache_cleanup::run(
                pods.clone(),
                config.cache_root(),
                config.cache_grace,
                config
                    .cache_grace
                    .clamp(Duration::from_millis(200), Duration::from_secs(30)),
            )));
            background.push(pod_task);
            background.push(tokio::spawn(node_annotations::publish(
                clients.clone(),
                node.clone(),
                Arc::clone(&inventory),
                Arc::clone(&volcano),
                health_rx.clone(),
                config.cluster.handshake,
                Arc::clone(&metrics),
            )));
            if !pods.wait_ready(Duration::from_secs(5)).await {
                tracing::warn!(
                    "pod watch not synced after 5 s; Allocate reads pods directly until it is"
                );
            }
            let limiter = LimiterSettings {
                memory_factor: volcano.sharing.memory_factor,
                memory_scaling: volcano.memory_scaling,
                disable_core_limit: volcano.disable_core_limit,
                hook_path: config.hook_path.clone(),
                lock_dir: config.lock_dir.clone(),
                gdrcopy: config.container_features[0],
                gds: config.container_features[1],
                mofed: config.container_features[2],
                delivery: config.delivery.clone(),
                gpu_minors: inventory
                    .gpus
                    .iter()
                    .map(|gpu| (gpu.uuid.clone(), gpu.minor))
                    .collect(),
            };
            let settings = HandoffSettings {
                config: Arc::clone(&volcano),
                limiter,
                cache_root: config.cache_root(),
            };
            Some(Arc::new(Allocator::new(
                client.clone(),
                node,
                pods,
                settings,
                Arc::clone(&inventory),
                Arc::clone(&metrics),
            )))
        }
        _ => None,
    };

    if config.metrics_address.is_some() {
        let source = Arc::new(
            NodeSnapshot::new(nvml, Arc::clone(&inventory), health_rx.clone(), pod_cache)
                .with_regions(config.cache_root(), Arc::clone(&metrics)),
        );
        let _ = late_source.0.set(source);
    }

    let shared = Shared {
        config: &config,
        volcano: &volcano,
        inventory: &inventory,
        plans: &plans,
        health: &health_rx,
        allocator,
        metrics: &metrics,
    };
    let result = serve_until(&shared, &ready_tx, shutdown).await;
    for task in background {
        task.abort();
    }
    stop_health.store(true, Ordering::Relaxed);
    // The monitor notices within one event-wait slice; joining keeps NVML alive until it is done with it.
    let _ = tokio::task::spawn_blocking(move || monitor.join()).await;
    result
}

/// What every (re)start of the endpoints shares.
struct Shared<'a> {
    config: &'a AgentConfig,
    volcano: &'a VolcanoConfig,
    inventory: &'a Arc<Inventory>,
    plans: &'a [Arc<DevicePlan>],
    health: &'a watch::Receiver<Vec<bool>>,
    allocator: Option<Arc<Allocator>>,
    metrics: &'a Arc<AgentMetrics>,
}

async fn serve_until(
    shared: &Shared<'_>,
    ready: &watch::Sender<Result<(), String>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let config = shared.config;
    let dir = config.socket_dir();
    let mut watch = KubeletWatch::new(&config.kubelet_socket);
    tokio::pin!(shutdown);
    loop {
        let started = Instant::now();
        let endpoints = tokio::select! {
            started = start_endpoints_retrying(&dir, shared, ready) => started?,
            () = &mut shutdown => return Ok(()),
        };
        let registered = tokio::select! {
            id = register_all(config, &endpoints, &mut watch) => id,
            () = &mut shutdown => None,
        };
        let Some(kubelet) = registered else {
            drain_and_stop(endpoints, shared.allocator.as_deref()).await;
            return Ok(());
        };
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "all endpoints registered with the kubelet"
        );
        let _ = ready.send_replace(Ok(()));

        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutting down: stopping endpoints and removing their sockets");
                drain_and_stop(endpoints, shared.allocator.as_deref()).await;
                return Ok(());
            }
            () = watch.changed_from(Some(kubelet)) => {
                tracing::info!("kubelet socket re-created (kubelet restarted); serving and registering again");
            }
            gone = socket_removed(&endpoints) => {
                tracing::info!(socket = %gone.display(), "our socket was removed; serving and registering again");
            }
        }
        let _ = ready.send_replace(Err("registering with the kubelet again".to_owned()));
        stop_all(endpoints).await;
    }
}

/// [`start_endpoints`], again and again with backoff while what fails can pass by itself (a kubelet restart
/// deleting our sockets mid-start, a self-check that did not get through); an error that cannot pass is
/// returned, and the agent exits with it.
async fn start_endpoints_retrying(
    dir: &Path,
    shared: &Shared<'_>,
    ready: &watch::Sender<Result<(), String>>,
) -> Result<Vec<RunningEndpoint>, AgentError> {
    let mut backoff = ENDPOINT_RETRY_START;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match start_endpoints(dir, shared).await {
            Ok(endpoints) => {
                if attempt > 1 {
                    tracing::info!(attempts = attempt, "endpoints serving again");
                }
                return Ok(endpoints);
            }
            Err(AgentError::Endpoint(error)) if error.is_transient() => {
                let reason = error_chain(&error);
                tracing::warn!(error = %reason, attempt, retry_in_ms = backoff.as_millis() as u64, "cannot serve the endpoints yet; retrying");
                let _ =
                    ready.send_replace(Err(format!("serving the endpoints: {reason}; retrying")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REGISTER_RETRY_MAX);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Stops serving for good (SIGTERM): an Allocate in flight is finished first, within [`DRAIN`], so the
/// kubelet's answer and the pod's annotations agree; later ones are refused meanwhile.
async fn drain_and_stop(endpoints: Vec<RunningEndpoint>, allocator: Option<&Allocator>) {
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
    stop_all(endpoints).await;
}

async fn start_endpoints(
    dir: &Path,
    shared: &Shared<'_>,
) -> Result<Vec<RunningEndpoint>, AgentError> {
    let mut endpoints = Vec::with_capacity(shared.plans.len());
    for plan in shared.plans {
        let name = shared.volcano.resources.get(plan.kind).to_owned();
        let started = RunningEndpoint::start(dir, plan.kind, &name, |stopping| {
            ResourceService::new(
                name.clone(),
                Arc::clone(plan),
                Arc::clone(shared.inventory),
                shared.health.clone(),
                stopping,
                shared.allocator.clone(),
                Arc::clone(shared.metrics),
            )
        })
        .await;
        match started {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(error) => {
                stop_all(endpoints).await;
                return Err(error.into());
            }
        }
    }
    Ok(endpoints)
}

/// Registers every endpoint, retrying while the kubelet is absent or refuses; returns the identity of the
/// kubelet socket that accepted them all.
async fn register_all(
    config: &AgentConfig,
    endpoints: &[RunningEndpoint],
    watch: &mut KubeletWatch,
) -> Option<FileIdentity> {
    let mut warned = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(kubelet) = watch.current() else {
            if !warned {
                tracing::warn!(socket = %config.kubelet_socket.display(), "kubelet socket not there yet; waiting for it");
                warned = true;
            }
            watch.changed_from(None).await;
            continue;
        };
        let mut failure = None;
        for endpoint in endpoints {
            if let Err(error) = register(
                &config.kubelet_socket,
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

async fn socket_removed(endpoints: &[RunningEndpoint]) -> PathBuf {
    loop {
        tokio::time::sleep(SOCKET_CHECK).await;
        if let Some(gone) = endpoints.iter().find(|e| !e.socket_exists()) {
            return gone.socket.clone();
        }
    }
}

async fn stop_all(endpoints: Vec<RunningEndpoint>) {
    for endpoint in endpoints {
        endpoint.stop().await;
    }
}
