//! `sim-node`: the node agent on simulated GPUs, with a fake kubelet, on a machine with no GPU and no cluster.
//!
//! * `sim-node run` (the default) runs the whole flow for one pod on simulated GPUs and prints it (see
//!   `sim_node::flow`): registration, a Volcano bind, Allocate, a CUDA program refused at its memory cap and
//!   paced at its SM cap, the pod's metrics. `--keep-running` then keeps the agent up until Ctrl-C.
//! * `sim-node bench` prints the agent's figures: start-up time, idle memory, message sizes, re-registration;
//!   `bench-handshake` the node writes against an old scheduler; `bench-scrape` the metrics scrape path.
//! * `sim-node agent …` is the agent itself (the same code as `vgpu-device-plugin`); `run` and `bench` start
//!   it as a child process so the gpu-sim's environment applies to it alone.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use harness::{FakeKubelet, ResourceView};
use kubelet_api::v1beta1::HEALTHY;
use sim_node::agent::{AgentBinary, ChildGuard, agent_command};
use sim_node::flow::{self, FlowOptions, RESOURCES};

mod scrape_bench;

#[derive(Debug, Parser)]
#[command(
    name = "sim-node",
    about = "The vGPU node agent on simulated GPUs, with a fake kubelet"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The whole flow for one pod on simulated GPUs, printed (the default).
    Run(RunArgs),
    /// Measure the agent and print the figures.
    Bench(BenchArgs),
    /// Node writes per hour against a simulated Volcano v1.15.0 scheduler that still uses the handshake.
    BenchHandshake(HandshakeArgs),
    /// `/metrics` latency and the agent's memory with many containers' regions on 8 GPUs.
    BenchScrape(ScrapeArgs),
    /// The agent itself, with `vgpu-device-plugin`'s flags.
    #[command(disable_help_flag = true)]
    Agent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Model {
    T4,
    A100_40gb,
    A100_80gb,
    H100_80gb,
}

impl Model {
    fn spec(self) -> fn(u32) -> GpuSpec {
        match self {
            Model::T4 => GpuSpec::t4,
            Model::A100_40gb => GpuSpec::a100_40gb,
            Model::A100_80gb => GpuSpec::a100_80gb,
            Model::H100_80gb => GpuSpec::h100_80gb,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Simulated GPUs on the node.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
    /// Their model.
    #[arg(long, value_enum, default_value = "t4")]
    model: Model,
    /// The example pod to bind, a file of volcano-config/examples/.
    #[arg(long, default_value = "pod-one-vgpu.yaml")]
    example: String,
    /// The libvgpu.so to install [default: built now with cargo, in the profile sim-node was built in].
    #[arg(long)]
    libvgpu: Option<PathBuf>,
    /// Modelled duration of each kernel the CUDA program launches, in microseconds.
    #[arg(long, default_value_t = 2000)]
    kernel_us: u64,
    /// How long the CUDA program launches kernels, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    run_ms: u64,
    /// After the flow, keep the agent running (metrics, fault injection) until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Show the agent's own log lines instead of writing them to a file.
    #[arg(long)]
    verbose: bool,
    /// Flags for the agent, after `--` (e.g. `-- --gpu-memory-factor 10`).
    #[arg(last = true)]
    agent_args: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
struct BenchArgs {
    /// Start-ups to time.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Seconds of idling before resident memory is read.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
}

#[derive(Debug, Clone, clap::Args)]
struct ScrapeArgs {
    /// Scrapes to time.
    #[arg(long, default_value_t = 10_000)]
    scrapes: usize,
    /// Containers on the node, each with its own region file.
    #[arg(long, default_value_t = 100)]
    containers: usize,
    /// Scrapers at once, each on its own keep-alive connection (1: one scraper, as Prometheus).
    #[arg(long, default_value_t = 1)]
    concurrent: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct HandshakeArgs {
    /// How long to run, in seconds (the scheduler's rule works on a 60 s clock).
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// How often something else updates the Node (the kubelet reports status every 5 min at rest; less is
    /// harsher on us, since every node update makes the old scheduler re-check the handshake).
    #[arg(long, default_value_t = 30)]
    node_update_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or_else(|| {
        Cmd::Run(RunArgs {
            gpus: 8,
            model: Model::T4,
            example: "pod-one-vgpu.yaml".to_owned(),
            libvgpu: None,
            kernel_us: 2000,
            run_ms: 1500,
            keep_running: false,
            verbose: false,
            agent_args: Vec::new(),
        })
    });
    let run = |future: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build();
        match runtime
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(future))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("sim-node: {error:#}");
                ExitCode::FAILURE
            }
        }
    };
    match command {
        Cmd::Agent { args } => vgpu_device_plugin::cli::main_from(
            std::iter::once(OsString::from("vgpu-device-plugin")).chain(args),
        ),
        Cmd::Run(args) => run(Box::pin(run_node(args))),
        Cmd::Bench(args) => run(Box::pin(bench(args))),
        Cmd::BenchHandshake(args) => run(Box::pin(bench_handshake(args))),
        // Not in `run`'s runtime: the measuring child builds its own.
        Cmd::BenchScrape(args) => {
            match scrape_bench::run(args.scrapes, args.containers, args.concurrent) {
                Ok(status) if status.success() => ExitCode::SUCCESS,
                Ok(status) => {
                    eprintln!("sim-node bench-scrape: the measuring process ended with {status}");
                    ExitCode::FAILURE
                }
                Err(error) => {
                    eprintln!("sim-node bench-scrape: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run_node(args: RunArgs) -> anyhow::Result<()> {
    let mut options = FlowOptions::new(AgentBinary::find()?);
    options.gpus = args.gpus;
    options.model = args.model.spec();
    options.example = args.example;
    options.libvgpu = args.libvgpu;
    options.kernel_ns = args.kernel_us.saturating_mul(1000);
    options.run_ms = args.run_ms;
    options.verbose = args.verbose;
    options.extra_agent_args = args.agent_args;
    let example = options.example.clone();
    let mut say = |line: String| println!("{line}");
    let (report, running) = flow::run(options, &mut say).await?;
    println!();
    for line in flow::summary(&report, &example) {
        println!("{line}");
    }
    if !args.keep_running {
        let status = running.stop()?;
        println!(
            "agent stopped on SIGTERM ({status}); the simulated node and its files are removed."
        );
        return Ok(());
    }
    println!();
    println!(
        "The agent keeps running. Metrics: curl http://127.0.0.1:{}/metrics   (health: /healthz, readiness: /readyz)",
        running.metrics_port
    );
    println!(
        "  the pod's refusals stay counted after its program exited: curl -s http://127.0.0.1:{}/metrics | grep allocations_refused",
        running.metrics_port
    );
    let first = report.gpus.first().cloned().unwrap_or_default();
    println!("Inject a fault from another shell, for example:");
    println!(
        "  echo 'xid {first} 79' >> {}",
        running.sim.control_file().display()
    );
    println!("Ctrl-C to stop.");
    let mut last: HashMap<String, (usize, usize)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for resource in flow::RESOURCES {
            if let Some(view) = running.kubelet.resource(resource) {
                let now = summarize(&view);
                if last.get(resource).is_some_and(|l| *l != now) {
                    println!(
                        "  {resource:<24} {:>7} devices, {:>7} healthy",
                        now.0, now.1
                    );
                }
                last.insert(resource.to_string(), now);
            }
        }
    }
    let status = running.stop()?;
    println!("agent stopped on SIGTERM ({status})");
    Ok(())
}

fn summarize(view: &ResourceView) -> (usize, usize) {
    let healthy = view.devices.iter().filter(|d| d.health == HEALTHY).count();
    (view.devices.len(), healthy)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let agent_bin = AgentBinary::find()?;
    println!(
        "agent binary: {} ({})",
        agent_bin.describe(),
        agent_bin.explain()
    );
    let sim = SimNode::new(NodeSpec::uniform(8, GpuSpec::a100_80gb))?;
    println!(
        "timing {} start-ups and kubelet restarts on 8 simulated A100-80GB…",
        args.runs.max(1)
    );
    let factor_args = ["--gpu-memory-factor", "10"];

    // 1. Start to all three endpoints registered, 8 GPUs.
    let mut starts = Vec::new();
    let mut reregisters = Vec::new();
    for _ in 0..args.runs.max(1) {
        let dir = tempfile::tempdir()?;
        let mut kubelet = FakeKubelet::start(dir.path()).await?;
        let mut cmd = agent_command(&sim, kubelet.socket(), &agent_bin);
        cmd.args(factor_args).stderr(Stdio::null());
        let t0 = Instant::now();
        let agent = ChildGuard(cmd.spawn()?);
        kubelet
            .wait_for_resources(&RESOURCES, Duration::from_secs(20))
            .await?;
        starts.push(t0.elapsed().as_secs_f64() * 1000.0);

        let before = kubelet.registrations().len();
        let t1 = Instant::now();
        kubelet.restart().await?;
        kubelet
            .wait_until(Duration::from_secs(20), "re-registration", |r| {
                RESOURCES
                    .iter()
                    .all(|n| r.get(*n).is_some_and(|v| v.streaming && v.updates > 0))
            })
            .await?;
        reregisters.push(t1.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            kubelet.registrations().len() == before + 3,
            "three re-registrations"
        );
        agent.terminate(Duration::from_secs(10))?;
    }
    starts.sort_by(f64::total_cmp);
    reregisters.sort_by(f64::total_cmp);
    println!(
        "start → 3 endpoints registered and listed (8 × A100-80GB, {} runs): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms (goal < 300 ms)",
        starts.len(),
        percentile(&starts, 0.5),
        percentile(&starts, 0.9),
        starts[starts.len() - 1]
    );
    println!(
        "kubelet restart → 3 endpoints registered and listed again: p50 {:.1} ms, max {:.1} ms (goal < 1000 ms)",
        percentile(&reregisters, 0.5),
        reregisters[reregisters.len() - 1]
    );

    // 2. Idle resident memory with 8 GPUs.
    println!(
        "idling {} s before reading resident memory…",
        args.idle_secs
    );
    let dir = tempfile::tempdir()?;
    let kubelet = FakeKubelet::start(dir.path()).await?;
    let mut cmd = agent_command(&sim, kubelet.socket(), &agent_bin);
    cmd.args(factor_args).stderr(Stdio::null());
    let agent = ChildGuard(cmd.spawn()?);
    let views = kubelet
        .wait_for_resources(&RESOURCES, Duration::from_secs(20))
        .await?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let rss = rss_kib(agent.0.id())?;
    println!(
        "idle resident memory, 8 GPUs, kubelet streams open: {:.1} MiB (goal < 20 MiB)",
        rss as f64 / 1024.0
    );
    for resource in RESOURCES {
        println!(
            "  largest ListAndWatch message seen by the kubelet, {resource} at factor 10: {} bytes",
            views[resource].largest_message_bytes
        );
    }
    agent.terminate(Duration::from_secs(10))?;

    // 3. Message size for 8 × 80 GB at factor 1, in both ID spellings, against the kubelet's limit.
    use vgpu_device_plugin::config::ResourceKind;
    use vgpu_device_plugin::config::SharingSettings;
    use vgpu_device_plugin::gpu::inventory::{Gpu, Inventory};
    use vgpu_device_plugin::gpu::plan::{DevicePlan, IdStyle, message_len};
    let inventory = Inventory {
        gpus: sim
            .spec()
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| Gpu {
                nvml_index: i as u32,
                uuid: g.uuid.clone(),
                model: g.name.clone(),
                memory_bytes: g.memory_mib << 20,
                minor: g.minor,
                numa_node: g.numa_node,
                pci_bus_id: g.pci_bus_id.clone(),
            })
            .collect(),
    };
    let factor1 = SharingSettings::default();
    let upstream = message_len(
        ResourceKind::Memory,
        IdStyle::Upstream,
        &inventory,
        &factor1,
    );
    let compact = message_len(ResourceKind::Memory, IdStyle::Compact, &inventory, &factor1);
    println!(
        "vgpu-memory ListAndWatch for 8 × 80 GB at factor 1: {upstream} bytes with the Go plugin's IDs, {compact} bytes \
         with compact IDs; the kubelet's limit is {} bytes",
        kubelet_api::v1beta1::KUBELET_MAX_RECV_MESSAGE_BYTES
    );
    match DevicePlan::new(ResourceKind::Memory, &inventory, &factor1) {
        Ok(plan) => println!("  accepted: {} bytes", plan.max_message_bytes),
        Err(refusal) => println!("  refused at start: {}", refusal.fix),
    }

    bench_allocate(&agent_bin, &args).await
}

/// A gpu-sim node with a stand-in kubelet and an apiserver that holds node `node`, and the agent's command
/// for them (`KUBECONFIG`, `NODE_NAME`, no node config, log discarded); `dir` holds their files.
struct Cluster {
    sim: SimNode,
    dir: tempfile::TempDir,
    kubelet: FakeKubelet,
    api: harness::FakeApiServer,
}

async fn fake_cluster(
    node: &str,
    spec: NodeSpec,
    agent_bin: &AgentBinary,
) -> anyhow::Result<(Cluster, std::process::Command)> {
    let sim = SimNode::new(spec)?;
    let dir = tempfile::tempdir()?;
    let kubelet = FakeKubelet::start(dir.path()).await?;
    let api = harness::FakeApiServer::start().await?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None)?;
    api.create(
        "/api/v1/nodes",
        serde_json::json!({"metadata": {"name": node}}),
    )?;
    let mut cmd = agent_command(&sim, kubelet.socket(), agent_bin);
    cmd.env("KUBECONFIG", &kubeconfig)
        .env("NODE_NAME", node)
        .arg("--node-config")
        .arg(dir.path().join("none.json"))
        .stderr(Stdio::null());
    Ok((
        Cluster {
            sim,
            dir,
            kubelet,
            api,
        },
        cmd,
    ))
}

/// Allocate latency with 1,000 pods on the node and 10,000 in the cluster, patches included, and the node
/// writes the agent makes at rest.
async fn bench_allocate(agent_bin: &AgentBinary, args: &BenchArgs) -> anyhow::Result<()> {
    use serde_json::json;

    const NODE: &str = "bench-node";
    let (
        Cluster {
            sim,
            dir,
            kubelet,
            api,
        },
        mut cmd,
    ) = fake_cluster(NODE, NodeSpec::uniform(8, GpuSpec::a100_80gb), agent_bin).await?;
    let uuid = sim.spec().gpus[0].uuid.clone();
    let pod = |name: &str, node: &str, annotations: serde_json::Value, phase: &str| {
        json!({
            "metadata": {"name": name, "namespace": "bench", "annotations": annotations},
            "spec": {"nodeName": node, "containers": [{"name": "cuda", "image": "cuda",
                "resources": {"limits": {"volcano.sh/vgpu-number": "1", "volcano.sh/vgpu-memory": "1000"}}}]},
            "status": {"phase": phase}
        })
    };
    // 9,000 pods elsewhere, 1,000 finished vGPU pods here.
    println!("creating 10,000 pods in the fake apiserver, 1,000 of them on this node…");
    for i in 0..9_000 {
        api.create(
            "/api/v1/namespaces/bench/pods",
            pod(
                &format!("other-{i}"),
                &format!("node-{}", i % 300),
                json!({}),
                "Running",
            ),
        )?;
    }
    let done = json!({"volcano.sh/vgpu-node": NODE, "volcano.sh/bind-phase": "success",
        "volcano.sh/vgpu-time": "18446744073709551615", "volcano.sh/devices-to-allocate": ""});
    for i in 0..1_000 {
        api.create(
            "/api/v1/namespaces/bench/pods",
            pod(&format!("here-{i}"), NODE, done.clone(), "Running"),
        )?;
    }

    cmd.args(["--gpu-memory-factor", "10", "--hook-path"])
        .arg(dir.path().join("hook"))
        .arg("--lock-dir")
        .arg(dir.path().join("lock"));
    let agent = ChildGuard(cmd.spawn()?);
    let views = kubelet
        .wait_for_resources(&RESOURCES, Duration::from_secs(30))
        .await?;
    let id = views[RESOURCES[0]].devices[0].id.clone();

    let mut latencies = Vec::new();
    let runs = (args.runs * 20).max(50);
    for i in 0..runs {
        let queue = format!("{uuid},NVIDIA,1000,0:");
        let annotations = json!({"volcano.sh/vgpu-node": NODE, "volcano.sh/vgpu-time": (1_787_220_000 + i).to_string(),
            "volcano.sh/bind-phase": "allocating", "volcano.sh/vgpu-ids-new": queue, "volcano.sh/devices-to-allocate": queue});
        api.create(
            "/api/v1/namespaces/bench/pods",
            pod(&format!("new-{i}"), NODE, annotations, "Pending"),
        )?;
        // Let the watch deliver it, as it would have long before the kubelet admits the pod.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t = Instant::now();
        let response = kubelet.allocate(RESOURCES[0], &[id.as_str()]).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        response.map_err(|s| anyhow::anyhow!("Allocate failed: {}", s.message()))?;
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "Allocate with 1,000 pods on the node and 10,000 in the cluster ({} calls, patches included): p50 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms (goal p99 < 10 ms)",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
    let unscoped = api
        .requests()
        .iter()
        .filter(|r| {
            r.verb() == "list" && r.path.ends_with("/pods") && !r.query.contains("fieldSelector")
        })
        .count();
    println!("  pod LISTs without a field selector: {unscoped}");
    println!(
        "  agent resident memory after them, 1,000 pods on the node in its watch cache: {:.1} MiB",
        rss_kib(agent.0.id())? as f64 / 1024.0
    );

    // Node writes at rest: after start-up, with a current scheduler (nobody touches the handshake).
    let node_path = format!("/api/v1/nodes/{NODE}");
    let before = api.count("PATCH", &node_path);
    let window = Duration::from_secs(args.idle_secs.max(10));
    println!("counting node writes at rest for {} s…", window.as_secs());
    tokio::time::sleep(window).await;
    let writes = api.count("PATCH", &node_path) - before;
    println!(
        "node writes at rest with a current scheduler: {writes} in {} s (= {:.0} per hour; the Go plugin makes 120)",
        window.as_secs(),
        writes as f64 * 3600.0 / window.as_secs_f64()
    );
    agent.terminate(Duration::from_secs(10))?;
    Ok(())
}

/// How often the long benchmarks say where they are.
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

/// Plays Volcano v1.15.0's handshake rule (docs/volcano-contract.md §2.3) on every node update, with another writer updating
/// the node now and then, and counts the agent's node writes.
async fn bench_handshake(args: HandshakeArgs) -> anyhow::Result<()> {
    use serde_json::json;
    use vgpu_device_plugin::volcano::handshake::format_scheduler_time;

    const NODE: &str = "old-scheduler-node";
    const KEY: &str = "volcano.sh/node-vgpu-handshake";
    let agent_bin = AgentBinary::find()?;
    let (
        Cluster {
            sim: _sim,
            dir: _dir,
            kubelet,
            api,
        },
        mut cmd,
    ) = fake_cluster(NODE, NodeSpec::uniform(2, GpuSpec::t4), &agent_bin).await?;
    let agent = ChildGuard(cmd.spawn()?);
    kubelet
        .wait_for_resources(&RESOURCES, Duration::from_secs(30))
        .await?;
    let node_path = format!("/api/v1/nodes/{NODE}");

    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    };
    let start = Instant::now();
    let start_writes = api.count("PATCH", &node_path);
    let mut last_rv = 0;
    let mut next_update = Instant::now() + Duration::from_secs(args.node_update_secs);
    let (mut scheduler_writes, mut dropped) = (0u64, 0u64);
    println!(
        "bench-handshake: {} s against a simulated Volcano v1.15.0 scheduler (the rule works on a 60 s clock), a \
         progress line every {} s",
        args.seconds,
        PROGRESS_EVERY.as_secs()
    );
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if Instant::now() >= next_progress {
            println!(
                "  {:>4} / {} s: agent {} node writes, scheduler {scheduler_writes}, node marked Deleted {dropped} times",
                start.elapsed().as_secs(),
                args.seconds,
                api.count("PATCH", &node_path) - start_writes
            );
            next_progress += PROGRESS_EVERY;
        }
        if Instant::now() >= next_update {
            api.patch_object(
                "nodes",
                None,
                NODE,
                json!({"metadata": {"labels": {"heartbeat": now().to_string()}}}),
            )?;
            next_update = Instant::now() + Duration::from_secs(args.node_update_secs);
        }
        let Some(node) = api.get_object("nodes", None, NODE) else {
            continue;
        };
        let rv: u64 = node["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if rv == last_rv {
            continue;
        }
        last_rv = rv;
        // A node update: the old scheduler rebuilds NodeInfo and applies the handshake rule.
        let value = node["metadata"]["annotations"][KEY]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let reply = if value.is_empty() || value.contains("Deleted") {
            dropped += u64::from(!value.is_empty());
            None
        } else if let Some(at) = value.strip_prefix("Requesting_") {
            let stale = vgpu_device_plugin::volcano::handshake::parse_scheduler_time(at)
                .is_none_or(|t| now() > t + 60);
            stale.then(|| format!("Deleted_{}", format_scheduler_time(now())))
        } else {
            Some(format!("Requesting_{}", format_scheduler_time(now())))
        };
        if let Some(reply) = reply {
            if reply.starts_with("Deleted") {
                dropped += 1;
            }
            api.patch_object(
                "nodes",
                None,
                NODE,
                json!({"metadata": {"annotations": {KEY: reply}}}),
            )?;
            scheduler_writes += 1;
        }
    }
    let ours = api.count("PATCH", &node_path) - start_writes;
    let hours = start.elapsed().as_secs_f64() / 3600.0;
    println!(
        "old scheduler (v1.15.0 handshake), node updated every {} s, {} s: agent {ours} node writes ({:.0}/h), \
         scheduler {scheduler_writes} ({:.0}/h), node marked Deleted {dropped} times",
        args.node_update_secs,
        args.seconds,
        ours as f64 / hours,
        scheduler_writes as f64 / hours
    );
    agent.terminate(Duration::from_secs(10))?;
    Ok(())
}
