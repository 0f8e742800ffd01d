//! The Grafana dashboard shipped in `metrics/grafana-dashboard.json`: valid JSON with the structure Grafana
//! needs, per-GPU and per-pod panels, and every metric name its queries use present in a real exposition
//! served by the exporter (over HTTP, asking for OpenMetrics as Prometheus does).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use vgpu_metrics::{
    AgentMetrics, AllocateResult, ContainerSample, GpuSample, MigDeviceSample, ObservedSample,
    Snapshot, SnapshotSource, UnaccountedSample,
};

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana-dashboard.json");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// Every PromQL expression: panel targets and (as `label_values(<selector>, label)`) variable queries.
fn queries(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for var in d["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            let q = var["query"]["query"].as_str().unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(selector, _label)| selector.to_owned())
                .unwrap_or_else(|| panic!("unexpected variable query {q}"));
            out.push(inner);
        }
    }
    out
}

const KEYWORDS: [&str; 12] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
];

/// Aggregation operators, which may be followed by a grouping clause instead of `(`.
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label names (inside
/// `{}` or grouping clauses), strings, ranges or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, close: char| -> usize {
        let mut j = i + 1;
        let mut in_string = false;
        while j < chars.len() {
            match chars[j] {
                '"' => in_string = !in_string,
                '\\' if in_string => j += 1,
                c if c == close && !in_string => return j + 1,
                _ => {}
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i = skip_to(i, '"');
        } else if c == '{' {
            i = skip_to(i, '}');
        } else if c == '[' {
            i = skip_to(i, ']');
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // Grafana variables and numbers (including `1e3`, `0.99`).
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let called = chars.get(j) == Some(&'(');
            let lower = word.to_ascii_lowercase();
            if AGGREGATIONS.contains(&lower.as_str()) {
                // `sum by (…) (…)`: the operator, whatever follows it.
            } else if KEYWORDS.contains(&lower.as_str()) {
                // A grouping clause's label list is not metric names.
                if called && lower != "and" && lower != "or" && lower != "unless" {
                    i = skip_to(j, ')');
                }
            } else if !called {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="b c", y=~"$v"}[$__rate_interval])))
           / on (instance) group_left b_total unless c > 1e3"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_bucket", "b_total", "c"]
    );
}

/// A node with two GPUs and two containers, one of them blocked by the monitor.
#[derive(Debug)]
struct Realistic;

impl SnapshotSource for Realistic {
    fn snapshot(&self) -> Snapshot {
        let gpu = |index: u32, uuid: &str| GpuSample {
            index,
            uuid: uuid.into(),
            memory_used_bytes: Some(3 << 30),
            memory_total_bytes: 80 << 30,
            utilization_percent: Some(40),
            healthy: true,
            vgpus_allocated: 2,
        };
        let container = |pod: &str, blocked: bool| ContainerSample {
            namespace: "ml".into(),
            pod: pod.into(),
            container: "cuda".into(),
            gpu_uuid: "GPU-b".into(),
            gpu_index: 1,
            memory_used_bytes: 1 << 30,
            memory_context_bytes: 300 << 20,
            memory_data_bytes: 724 << 20,
            memory_limit_bytes: 4 << 30,
            sm_utilization_percent: 20,
            sm_limit_percent: 30,
            allocations_refused: 2,
            last_kernel_unix: Some(1_790_000_000),
            priority: i32::from(blocked),
            launches_blocked: blocked,
            sm_limit_enforced: true,
            ..Default::default()
        };
        Snapshot {
            gpus: vec![gpu(0, "GPU-a"), gpu(1, "GPU-b")],
            containers: vec![container("train", false), container("batch", true)],
            observed: vec![ObservedSample {
                namespace: "ml".into(),
                pod: "train".into(),
                container: "cuda".into(),
                gpu_uuid: "GPU-a".into(),
                gpu_index: 0,
                memory_observed_bytes: 3 << 30,
            }],
            unaccounted: vec![UnaccountedSample {
                gpu_uuid: "GPU-b".into(),
                gpu_index: 1,
                memory_bytes: 1 << 30,
            }],
            mig_devices: vec![MigDeviceSample {
                gpu_uuid: "GPU-a".into(),
                gpu_index: 0,
                mig_uuid: "MIG-a-0".into(),
                profile: "3g.40gb".into(),
                memory_used_bytes: Some(1 << 30),
                memory_total_bytes: Some(40192 << 20),
                healthy: true,
            }],
            now_unix: 1_790_000_005,
        }
    }
}

/// `/metrics` from the exporter on loopback, as Prometheus asks for it.
async fn real_exposition() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(AgentMetrics::new("0.1.0"));
    metrics.allocate("volcano.sh/vgpu-number", AllocateResult::handed_off, 0.003);
    metrics.region_read_error();
    metrics.node_write();
    metrics.memory_violation(("ml", "train", "cuda"), ("GPU-a", 0), "report");
    let (_ready_tx, ready) = watch::channel(Ok(()));
    let server = tokio::spawn(vgpu_metrics::serve(
        listener,
        metrics,
        Arc::new(Realistic),
        ready,
        std::future::pending(),
    ));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\
              Connection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    server.abort();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_in_a_real_exposition() {
    let d = dashboard();
    let body = real_exposition().await;
    let exposed: HashSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut used = BTreeSet::new();
    for q in queries(&d) {
        let names = metric_names(&q);
        assert!(!names.is_empty(), "no metric in {q}");
        for name in names {
            assert!(
                exposed.contains(name.as_str()),
                "the dashboard queries {name} ({q}), which the exporter does not expose"
            );
            used.insert(name);
        }
    }
    // Clean series for the agent's nodes, and the legacy ones for nodes still on Volcano's monitor.
    for name in [
        "vgpu_gpu_memory_used_bytes",
        "vgpu_container_memory_used_bytes",
        "vgpu_container_memory_limit_bytes",
        "vgpu_container_sm_utilization_ratio",
        "vgpu_container_launches_blocked",
        "HostGPUMemoryUsage",
        "vGPU_device_memory_usage_in_bytes",
        "vgpu_container_memory_observed_bytes",
        "vgpu_container_memory_violations_total",
        "vgpu_unaccounted_memory_bytes",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

#[test]
fn the_dashboard_has_the_structure_grafana_needs_and_per_gpu_and_per_pod_panels() {
    let d = dashboard();
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let panels = d["panels"].as_array().unwrap();
    let mut ids = HashSet::new();
    let (mut per_gpu, mut per_pod) = (0, 0);
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        let g = &p["gridPos"];
        assert!(
            g["w"].as_u64().unwrap() + g["x"].as_u64().unwrap() <= 24,
            "{p}"
        );
        assert!(g["h"].as_u64().unwrap() >= 1 && g["y"].as_u64().is_some());
        if p["type"] == "row" {
            continue;
        }
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        let mut refs = HashSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap()));
            let expr = t["expr"].as_str().unwrap();
            // Balanced brackets: a cheap syntax check (the Prometheus test runs every query for real).
            for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
                assert_eq!(
                    expr.matches(open).count(),
                    expr.matches(close).count(),
                    "{expr}"
                );
            }
            per_gpu += usize::from(expr.contains("gpu_uuid=~\"$gpu\""));
            per_pod += usize::from(expr.contains("pod=~\"$pod\""));
        }
    }
    assert!(per_gpu >= 4, "per-GPU queries: {per_gpu}");
    assert!(per_pod >= 6, "per-pod queries: {per_pod}");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "gpu", "namespace", "pod"]);
}
