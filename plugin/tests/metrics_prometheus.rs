//! The agent's `/metrics` against the real Prometheus tools (Debian's `prometheus` package, listed in
//! `tests/prereqs/apt.txt` and installed by `tests/prereqs/install.sh`, which the README's `tests/run` runs): `promtool check metrics` on a real scrape, and a real Prometheus server on loopback scraping
//! the agent and answering per-container queries through its HTTP API.
//!
//! The agent runs as in production: the real binary on the gpu-sim, a fake kubelet, a fake apiserver holding
//! one pod bound to the node, and that pod's container writing its shared region (made with the region crate,
//! as the limiter makes it) into the cache directory. Without the binaries the tests fail with the command that
//! installs them, on a user's machine as under `CI=true`: a test reported `ok` must have run. The same node also shows the agent running the monitor's priority feedback.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use harness::FakeKubelet;
use harness::apiserver::FakeApiServer;
use serde_json::{Value, json};

const NODE: &str = "node-a";
const USED: u64 = 300 << 20;
const LIMIT: u64 = 1000 << 20;

/// The contract's legacy names (docs/volcano-contract.md §7.1); promlint calls them camelCase, and they must stay as they are.
const LEGACY: [&str; 7] = [
    "HostGPUMemoryUsage",
    "HostCoreUtilization",
    "vGPU_device_memory_usage_in_bytes",
    "vGPU_device_memory_limit_in_bytes",
    "Device_memory_desc_of_container",
    "Device_utilization_desc_of_container",
    "Device_last_kernel_of_container",
];

/// `name` on PATH; fails naming the command that installs it when it is missing (never a silent skip).
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on PATH: this test needs Debian's prometheus package; run tests/prereqs/install.sh \
                 (as root, or it prints the apt-get command), or `sudo apt-get install prometheus`"
            )
        })
}

/// The agent with one pod on the node whose container `cuda` uses GPU 1 through a real region file.
struct Node {
    _sim: SimNode,
    _dir: tempfile::TempDir,
    _kubelet: FakeKubelet,
    _api: FakeApiServer,
    agent: Agent,
    port: u16,
    gpu: String,
    region: PathBuf,
}

impl Node {
    async fn start() -> Self {
        let sim = SimNode::new(NodeSpec::uniform(2, GpuSpec::t4)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let plane = ControlPlane::start(dir.path(), NODE).await;
        let gpu = sim.spec().gpus[1].uuid.clone();
        let pod = plane
            .api
            .create(
                "/api/v1/namespaces/ml/pods",
                json!({
                    "metadata": {"name": "train", "namespace": "ml", "annotations": {
                        "volcano.sh/vgpu-node": NODE,
                        "volcano.sh/vgpu-ids-new": format!("{gpu},NVIDIA,1000,0:;"),
                        "volcano.sh/bind-phase": "success",
                    }},
                    "spec": {"nodeName": NODE, "containers": [{"name": "cuda", "image": "cuda"}]},
                    "status": {"phase": "Running"}
                }),
            )
            .unwrap();
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();

        // The container's limiter: its region in the cache directory Allocate created.
        let cache = dir.path().join(format!("hook/vgpu/containers/{uid}_cuda"));
        std::fs::create_dir_all(&cache).unwrap();
        let mut config = vgpu_region::RegionConfig::default();
        config.limits[0] = LIMIT;
        // A 30 % SM cap (vgpu-cores 30): the monitor's sm_limit_enforced is only reported for a capped container.
        config.sm_limits[0] = 30;
        let region_file = cache.join("a.cache");
        let region = vgpu_region::Region::open_or_create(&region_file, &config).unwrap();
        region.set_device_info(&[&gpu]).unwrap();
        region.register_current_process().unwrap();
        region
            .add_usage(0, vgpu_region::MemoryKind::Data, USED)
            .unwrap();
        // The slot outlives `region` (dropping it would free the slot): usage stays in the file.
        std::mem::forget(region);

        let port = free_port();
        let mut cmd = plane.agent_command(&sim, dir.path(), NODE);
        cmd.env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"));
        let agent = Agent::spawn(cmd);
        let ControlPlane { kubelet, api, .. } = plane;
        kubelet
            .wait_for_resources(&ALL, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        let node = Self {
            _sim: sim,
            _dir: dir,
            _kubelet: kubelet,
            _api: api,
            agent,
            port,
            gpu,
            region: region_file,
        };
        // The pod watch delivers the pod, and the scrape names the container's series.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let body = node.scrape().await;
            if vgpu_metrics::find_value(
                &body,
                "vgpu_container_memory_used_bytes",
                &[("pod", "train")],
            )
            .is_some()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no per-container series:\n{body}\n{}",
                node.agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node
    }

    /// A scrape as curl or promtool makes it (no OpenMetrics in `Accept`).
    async fn scrape(&self) -> String {
        let port = self.port;
        let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .unwrap();
        assert!(status.contains("200"), "{status}");
        body
    }
}

/// Runs `promtool check metrics` on `exposition`; returns its exit status and output.
fn promtool_check(promtool: &Path, exposition: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The exposition without the legacy families (their names are fixed by the contract, not by promlint).
fn without_legacy(exposition: &str) -> String {
    exposition
        .lines()
        .filter(|line| {
            let name = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
                .unwrap_or(line);
            let name = name.split(['{', ' ']).next().unwrap_or("");
            !LEGACY.contains(&name)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape() {
    let promtool = tool("promtool");
    let node = Node::start().await;
    let body = node.scrape().await;
    for name in LEGACY {
        assert!(
            body.contains(&format!("# TYPE {name} gauge")),
            "{name}:\n{body}"
        );
    }

    // Every family but the contract's legacy names passes parsing and every lint.
    let clean = without_legacy(&body);
    assert!(clean.contains("vgpu_container_memory_used_bytes{"));
    let (ok, output) = promtool_check(&promtool, &clean);
    assert!(
        ok && output.trim().is_empty(),
        "promtool: {output}\n{clean}"
    );

    // The whole scrape parses; the only findings are the legacy names' camelCase, kept for old dashboards.
    let (_, output) = promtool_check(&promtool, &body);
    assert!(
        output.contains("HostGPUMemoryUsage metric names should be written in 'snake_case'"),
        "promtool linted the whole scrape: {output}"
    );
    for finding in output.lines().filter(|l| !l.trim().is_empty()) {
        let legacy = LEGACY.iter().any(|n| finding.starts_with(&format!("{n} ")));
        assert!(
            legacy && finding.contains("camelCase"),
            "unexpected promtool finding: {finding}\n{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_the_priority_feedback_on_its_cache_root() {
    let node = Node::start().await;
    // The limiter created the region with HAMi-core's initial words (recent_kernel 2, switch 1); the agent's
    // first round finds the container active and alone on its GPU: 1 and 0, and says so in the metrics.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let region = vgpu_region::RegionReader::read_snapshot(&node.region).unwrap();
        if (region.recent_kernel, region.utilization_switch) == (1, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no feedback: {:?}\n{}",
            (region.recent_kernel, region.utilization_switch),
            node.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = node.scrape().await;
    let c = [("pod", "train"), ("container", "cuda")];
    let value = |name: &str| vgpu_metrics::find_value(&body, name, &c);
    assert_eq!(
        value("vgpu_container_sm_limit_enforced"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(value("vgpu_container_launches_blocked"), Some(0.0));
    assert_eq!(value("vgpu_container_priority"), Some(1.0));
    assert!(
        node.agent
            .log_text()
            .contains("priority feedback into the containers' shared regions"),
        "{}",
        node.agent.log_text()
    );
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The single value of an instant query, once Prometheus has it.
async fn query(port: u16, promql: &str) -> Option<f64> {
    let path = format!("/api/v1/query?query={}", percent_encode(promql));
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, &path))
        .await
        .ok()?;
    if !status.contains("200") {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    assert_eq!(v["status"], "success", "{body}");
    let result = v["data"]["result"].as_array()?;
    assert!(
        result.len() <= 1,
        "one series expected for {promql}: {body}"
    );
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_agent_and_answers_per_container_queries() {
    let prometheus = tool("prometheus");
    let node = Node::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: vgpu\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            node.port
        ),
    )
    .unwrap();
    let web = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _server = Killed(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let clean = format!(
        "vgpu_container_memory_used_bytes{{namespace=\"ml\",pod=\"train\",container=\"cuda\",gpu_uuid=\"{}\",gpu_index=\"1\"}}",
        node.gpu
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let used = loop {
        if let Some(v) = query(web, &clean).await {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had {clean}; its log:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(used, USED as f64);

    assert_eq!(query(web, "up{job=\"vgpu\"}").await, Some(1.0));
    let legacy = format!(
        "vGPU_device_memory_limit_in_bytes{{podnamespace=\"ml\",podname=\"train\",ctrname=\"cuda\",vdeviceid=\"1\",deviceuuid=\"{}\",zone=\"vGPU\"}}",
        node.gpu
    );
    assert_eq!(query(web, &legacy).await, Some(LIMIT as f64));
    // A dashboard-style aggregation over the scraped series.
    assert_eq!(
        query(
            web,
            "sum by (gpu_uuid) (vgpu_container_memory_used_bytes) / on (gpu_uuid) group_left \
             vgpu_container_memory_limit_bytes"
        )
        .await,
        Some(USED as f64 / LIMIT as f64)
    );
    assert_eq!(query(web, "sum(vgpu_gpu_vgpus_allocated)").await, Some(1.0));
}
