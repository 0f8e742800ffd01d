//! `sim-node bench-scrape` (not a test): `/metrics` latency and the agent's resident memory with 100 containers
//! on 8 GPUs, through the agent's own scrape path.
//!
//! ```sh
//! cargo build --release --workspace && target/release/sim-node bench-scrape [--scrapes N] [--containers N]
//! ```
//!
//! A subcommand of sim-node rather than an example of the plugin: an example builds the plugin's
//! dev-dependencies into the release profile, with other features, which rebuilt most of the workspace; here it
//! reuses what `cargo build --release --workspace` built.
//!
//! Defaults: 10,000 scrapes, 100 containers. The node is the gpu-sim with 8 A100 80GB; the pods are in a fake
//! apiserver (on loopback, in this process) and reach the agent's pod cache through its real watch; every
//! container has a real region file (made with the region crate, as the limiter makes it) in the cache root,
//! with two processes holding memory. The exporter is the agent's (`vgpu_metrics::serve` with the agent's
//! `NodeSnapshot`), scraped over one keep-alive HTTP/1.1 connection as Prometheus does, asking for
//! OpenMetrics. Prints latency percentiles and the process's RSS (start, end, max) across the run.

// A measurement, not the agent: a failed setup step is a bug to see at once, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use harness::apiserver::FakeApiServer;
use nvml_wrapper::Nvml;
use serde_json::json;
use tokio::sync::watch;
use vgpu_device_plugin::handoff::pod_cache::PodCache;
use vgpu_device_plugin::monitor::metrics::NodeSnapshot;
use vgpu_metrics::{AgentMetrics, SnapshotSource};
use vgpu_region::{MemoryKind, Region, RegionConfig};

const NODE: &str = "bench-node";
const GPUS: u32 = 8;
/// Set in the child that measures (it inherits the gpu-sim's environment).
const CHILD: &str = "SCRAPE_BENCH_CHILD";

/// Runs the benchmark: in a child process of the same binary, with the gpu-sim's environment. `concurrent`
/// scrapers at once (`--concurrent`), each on its own keep-alive connection, share the `scrapes`: what several
/// Prometheus replicas, or a scrape storm, cost the agent.
pub fn run(
    scrapes: usize,
    containers: usize,
    concurrent: usize,
) -> anyhow::Result<std::process::ExitStatus> {
    anyhow::ensure!(
        scrapes > 0 && containers > 0 && concurrent > 0,
        "--scrapes, --containers and --concurrent: expected at least 1 each, got {scrapes}, {containers} and \
         {concurrent}"
    );
    if std::env::var_os(CHILD).is_some() {
        bench(scrapes, containers, concurrent);
        return Ok(std::process::ExitStatus::default());
    }
    // The gpu-sim is found through the environment, which a Rust 2024 program may not set for itself: run the
    // measurement in a child that inherits it. `sim` lives until the child is done and then removes its
    // temporary directory (an early `process::exit` here once leaked `/tmp/gpu-sim-*`).
    let sim = SimNode::new(NodeSpec::uniform(GPUS, GpuSpec::a100_80gb))?;
    println!(
        "bench-scrape: {containers} containers on {GPUS} simulated A100-80GB, {scrapes} scrapes (setting up the pods \
         and their region files first)…"
    );
    let status = Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .envs(sim.env())
        .env(CHILD, "1")
        .status()?;
    drop(sim);
    Ok(status)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn bench(scrapes: usize, containers: usize, concurrent: usize) {
    let nvml = Arc::new(
        Nvml::builder()
            .lib_path(gpu_sim::nvml_library().as_os_str())
            .init()
            .expect("NVML from the gpu-sim"),
    );
    let inventory = Arc::new(
        vgpu_device_plugin::gpu::inventory::discover(&nvml, Path::new("/nonexistent-sysfs"))
            .expect("discovery"),
    );
    let uuids: Vec<String> = inventory.gpus.iter().map(|g| g.uuid.clone()).collect();

    // Pods in the apiserver, watched by the agent's pod cache.
    let api = FakeApiServer::start().await.expect("fake apiserver");
    let work = tempfile::tempdir().expect("tempdir");
    let kubeconfig = work.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None).expect("kubeconfig");
    let config = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(config, &Default::default())
            .await
            .expect("client config"),
    )
    .expect("client");
    let root = work.path().join("containers");
    let mut regions = Vec::with_capacity(containers);
    for i in 0..containers {
        let gpu = &uuids[i % uuids.len()];
        let pod = api
            .create(
                "/api/v1/namespaces/bench/pods",
                json!({
                    "metadata": {"name": format!("pod-{i:03}"), "namespace": "bench", "annotations": {
                        "volcano.sh/vgpu-node": NODE,
                        "volcano.sh/vgpu-ids-new": format!("{gpu},NVIDIA,8000,10:;"),
                        "volcano.sh/bind-phase": "success",
                    }},
                    "spec": {"nodeName": NODE, "containers": [{"name": "cuda", "image": "cuda"}]},
                    "status": {"phase": "Running"}
                }),
            )
            .expect("create pod");
        let uid = pod["metadata"]["uid"].as_str().expect("uid");
        let dir = root.join(format!("{uid}_cuda"));
        std::fs::create_dir_all(&dir).expect("cache dir");
        let mut limits = RegionConfig::default();
        limits.limits[0] = 8000 << 20;
        limits.sm_limits[0] = 10;
        let region =
            Region::open_or_create(&dir.join(format!("{i}.cache")), &limits).expect("region file");
        region.set_device_info(&[gpu]).expect("device info");
        region.register_current_process().expect("slot");
        region
            .add_usage(0, MemoryKind::Context, 300 << 20)
            .expect("usage");
        region
            .add_usage(0, MemoryKind::Data, (i as u64 % 50) << 24)
            .expect("usage");
        region.record_kernel_launch(1_790_000_000);
        regions.push(region);
    }
    let (pods, _watch) = PodCache::start(client, NODE);
    assert!(pods.wait_ready(Duration::from_secs(30)).await, "pod watch");
    while pods.cached().len() < containers {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let metrics = Arc::new(AgentMetrics::new(env!("CARGO_PKG_VERSION")));
    let (_health_tx, health) = watch::channel(vec![true; inventory.gpus.len()]);
    let source = Arc::new(
        NodeSnapshot::new(
            Arc::clone(&nvml),
            Arc::clone(&inventory),
            health,
            Some((pods, NODE.to_owned())),
        )
        .with_regions(root, Arc::clone(&metrics)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr");
    let (_ready_tx, ready) = watch::channel(Ok(()));
    let server = tokio::spawn(vgpu_metrics::serve(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&source) as Arc<dyn SnapshotSource>,
        ready,
        std::future::pending(),
    ));

    let report = tokio::task::spawn_blocking(move || {
        let mut report = scrape_loop(addr, if concurrent > 1 { 1 } else { scrapes }, containers);
        if concurrent > 1 {
            let (latency, rss_kib) = concurrent_scrapes(addr, scrapes, concurrent);
            report.latency = latency;
            report.rss_kib = rss_kib;
        }
        report
    })
    .await
    .expect("scrape loop");
    // Where the time goes, outside HTTP (after the scrapes: directories settled, as on a node).
    let parts = {
        let (source, metrics) = (Arc::clone(&source), Arc::clone(&metrics));
        let (nvml, inventory) = (Arc::clone(&nvml), Arc::clone(&inventory));
        tokio::task::spawn_blocking(move || {
            let (mut read, mut encode, mut nvml_only) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..200 {
                // The NVML part alone: what the snapshot asks per GPU.
                let t = Instant::now();
                for gpu in &inventory.gpus {
                    let device = nvml.device_by_index(gpu.nvml_index).expect("device");
                    let _ = device.memory_info().expect("memory");
                    let _ = device.utilization_rates().expect("utilization");
                }
                nvml_only.push(t.elapsed());
                let t = Instant::now();
                let snapshot = source.snapshot();
                read.push(t.elapsed());
                let t = Instant::now();
                let text = metrics.encode(&snapshot).expect("encode");
                encode.push(t.elapsed());
                assert!(!text.is_empty());
            }
            (read, encode, nvml_only)
        })
        .await
        .expect("parts")
    };

    server.abort();

    if concurrent > 1 {
        println!(
            "scrape benchmark: {containers} containers on {GPUS} GPUs, {scrapes} scrapes by {concurrent} scrapers at \
             once, each on its own keep-alive connection"
        );
    } else {
        println!(
            "scrape benchmark: {containers} containers on {GPUS} GPUs, {scrapes} scrapes over one keep-alive \
             connection"
        );
    }
    println!(
        "exposition: {} bytes, {} series ({} per-container)",
        report.bytes, report.series, report.container_series
    );
    let mut latency = report.latency;
    println!(
        "scrape latency: p50 {} p90 {} p99 {} max {}  (goal: p99 under 10 ms)",
        ms(percentile(&mut latency, 50.0)),
        ms(percentile(&mut latency, 90.0)),
        ms(percentile(&mut latency, 99.0)),
        ms(percentile(&mut latency, 100.0)),
    );
    let (mut read, mut encode, mut nvml_only) = parts;
    println!(
        "  of which (p50, outside HTTP): reading NVML, pods and {containers} regions {} (NVML alone {}), encoding {}",
        ms(percentile(&mut read, 50.0)),
        ms(percentile(&mut nvml_only, 50.0)),
        ms(percentile(&mut encode, 50.0)),
    );
    let rss = &report.rss_kib;
    println!(
        "resident memory (RSS) over the scrapes: start {} KiB, end {} KiB, max {} KiB, end - start {:+} KiB",
        rss[0],
        rss[rss.len() - 1],
        rss.iter().max().copied().unwrap_or(0),
        rss[rss.len() - 1] as i64 - rss[0] as i64,
    );
    if concurrent > 1 {
        println!("  RSS every 20 ms (KiB): {rss:?}");
    } else {
        println!(
            "  RSS every {} scrapes (KiB): {:?}",
            (scrapes / 10).max(1),
            rss
        );
    }
    drop(regions);
}

struct Report {
    latency: Vec<Duration>,
    rss_kib: Vec<u64>,
    bytes: usize,
    series: usize,
    container_series: usize,
}

fn scrape_loop(addr: std::net::SocketAddr, scrapes: usize, containers: usize) -> Report {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut scrape = || {
        writer
            .write_all(
                b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: application/openmetrics-text;version=1.0.0,\
                  text/plain;version=0.0.4;q=0.5\r\n\r\n",
            )
            .expect("send");
        let mut length = 0usize;
        let mut status = String::new();
        reader.read_line(&mut status).expect("status");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).expect("body");
        body
    };
    // Warm-up: allocator pools, the pod cache's first reads, page cache.
    let mut body = Vec::new();
    for _ in 0..100 {
        body = scrape();
    }
    let text = String::from_utf8(body).expect("utf-8");
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    let container_series = text
        .lines()
        .filter(|l| l.contains("pod=\"pod-") || l.contains("podname=\"pod-"))
        .count();
    assert!(
        container_series >= containers,
        "every container has series:\n{text}"
    );
    let every = (scrapes / 10).max(1);
    let mut rss_kib = vec![current_rss_kib()];
    let mut latency = Vec::with_capacity(scrapes);
    for i in 1..=scrapes {
        let t = Instant::now();
        let body = scrape();
        latency.push(t.elapsed());
        assert!(!body.is_empty());
        if i % every == 0 {
            rss_kib.push(current_rss_kib());
        }
    }
    Report {
        latency,
        rss_kib,
        bytes: text.len(),
        series,
        container_series,
    }
}

/// `concurrent` threads, each scraping over its own keep-alive connection, `scrapes` in all; the process's RSS
/// sampled every 20 ms meanwhile. Returns every scrape's latency and the RSS samples (the first before any).
fn concurrent_scrapes(
    addr: std::net::SocketAddr,
    scrapes: usize,
    concurrent: usize,
) -> (Vec<Duration>, Vec<u64>) {
    let per_thread = scrapes.div_ceil(concurrent);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Arc::new(std::sync::Barrier::new(concurrent + 1));
    let threads: Vec<_> = (0..concurrent)
        .map(|_| {
            let (done, start) = (Arc::clone(&done), Arc::clone(&start));
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let mut writer = stream.try_clone().expect("clone");
                let mut reader = BufReader::new(stream);
                start.wait();
                let mut latency = Vec::with_capacity(per_thread);
                for _ in 0..per_thread {
                    let t = Instant::now();
                    let body = scrape_once(&mut writer, &mut reader);
                    latency.push(t.elapsed());
                    assert!(!body.is_empty());
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                latency
            })
        })
        .collect();
    let mut rss_kib = vec![current_rss_kib()];
    start.wait();
    while done.load(std::sync::atomic::Ordering::SeqCst) < concurrent {
        std::thread::sleep(Duration::from_millis(20));
        rss_kib.push(current_rss_kib());
    }
    let latency = threads
        .into_iter()
        .flat_map(|t| t.join().expect("scraper"))
        .collect();
    (latency, rss_kib)
}

/// One `GET /metrics` asking for OpenMetrics on a keep-alive connection; the body.
fn scrape_once(writer: &mut TcpStream, reader: &mut BufReader<TcpStream>) -> Vec<u8> {
    writer
        .write_all(
            b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: application/openmetrics-text;version=1.0.0,\
              text/plain;version=0.0.4;q=0.5\r\n\r\n",
        )
        .expect("send");
    let mut length = 0usize;
    let mut status = String::new();
    reader.read_line(&mut status).expect("status");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).expect("body");
    body
}

fn current_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(values: &mut [Duration], p: f64) -> Duration {
    values.sort_unstable();
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
