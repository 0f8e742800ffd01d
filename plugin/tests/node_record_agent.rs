//! The node's record end to end: the real agent on the gpu-sim with a fake kubelet and apiserver. Allocate
//! records a container's limits; a tenant that lifts them in its region has them written back within a monitor
//! round, and is reported in the log (pod and container named), in `vgpu_agent_region_tampering_total` and as a
//! Kubernetes Event on its pod; the record outlives an agent restart; the cache directory is sticky.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};
use serde_json::{Value, json};
use vgpu_region::layout::SharedRegion;
use vgpu_region::{Region, RegionConfig, RegionReader};

const NODE: &str = "node-a";
const NS: &str = "default";
const MIB: u64 = 1 << 20;
/// One monitor round is 5 s; two rounds and slack.
const ROUND_PATIENCE: Duration = Duration::from_secs(15);

/// A pod with one container `cuda` asking 1 vGPU of 3000 MiB at 30 % of the SMs, bound to this node by
/// Volcano (patch-style bind) with `queue`, and the priority annotation.
async fn bind(c: &Cluster, name: &str, queue: &str, priority: &str) -> String {
    let mut pod = pod_json(name, &[("cuda", Some(1), Some(3000), Some(30))]);
    pod["metadata"]["annotations"] = json!({"volcano.sh/vgpu-task-priority": priority});
    let created = c.create_pod(pod).await;
    c.bind_pod(
        name,
        BindStyle::PatchThenBind,
        bind_annotations(NODE, queue, "1787220000"),
    )
    .await;
    created.metadata.uid.unwrap()
}

fn poke(path: &Path, offset: usize, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset as u64).unwrap();
}

fn wait_until(what: &str, log: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + ROUND_PATIENCE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} within {ROUND_PATIENCE:?}; agent log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(port: u16, kind: &str) -> f64 {
    let (_, body) = http_get(port, "/metrics");
    vgpu_metrics::find_value(
        &body,
        "vgpu_agent_region_tampering_total",
        &[("kind", kind)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_limits_are_written_back_reported_and_still_enforced_after_a_restart() {
    let port = free_port();
    let mut c = cluster(NodeSpec::uniform(1, GpuSpec::t4))
        .env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"))
        .start()
        .await;
    let (dir, agent) = (&c.dir, &c.agent);
    let gpu = c.uuid(0);
    let uid = bind(&c, "pod-a", &format!("{gpu},NVIDIA,3000,30:"), "high").await;
    let response = c
        .kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .unwrap_or_else(|s| panic!("Allocate failed: {}\n{}", s.message(), agent.log_text()));
    let envs = &response.container_responses[0].envs;
    let file_name = envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
        .strip_prefix("/tmp/vgpu/")
        .unwrap()
        .to_owned();

    // The cache directory: every uid in the container may create its file, none may remove another's.
    let cache_root = dir.path().join("hook/vgpu/containers");
    let cache_dir = cache_root.join(format!("{uid}_cuda"));
    let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "cache directory mode {mode:o}");
    // The record, the agent's own.
    let record_path: PathBuf = dir
        .path()
        .join(format!("hook/vgpu/containers.records/{uid}_cuda.json"));
    let record: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    assert_eq!(record["priority"], 0, "from the pod's annotation: {record}");
    assert_eq!(record["gpus"][0]["memory_limit_bytes"], 3000 * MIB);
    assert_eq!(record["cache_file"], file_name.as_str());

    // The container's first CUDA process creates the region from its environment.
    let region_path = cache_dir.join(&file_name);
    let mut config = RegionConfig::default();
    config.limits[0] = 3000 * MIB;
    config.sm_limits[0] = 30;
    let region = Region::open_or_create(&region_path, &config).unwrap();
    region.set_device_info(&[gpu.as_str()]).unwrap();

    // The tenant lifts its memory cap.
    let limit_at = std::mem::offset_of!(SharedRegion, limit);
    poke(&region_path, limit_at, &0u64.to_ne_bytes());
    wait_until(
        "the memory cap written back",
        || agent.log_text(),
        || region.limit(0).unwrap() == 3000 * MIB,
    );
    wait_until(
        "the change logged with its pod and container",
        || agent.log_text(),
        || {
            agent.log().iter().any(|l| {
                l.contains("against the node's record")
                    && l.contains("default/pod-a")
                    && l.contains("cuda")
            })
        },
    );
    wait_until(
        "the change counted",
        || agent.log_text(),
        || metric(port, "limits") >= 1.0,
    );
    let api = &c.api;
    let deadline = Instant::now() + ROUND_PATIENCE;
    while !api
        .events()
        .iter()
        .any(|e| e["reason"] == "VGPURegionTampered" && e.to_string().contains("pod-a"))
    {
        assert!(
            Instant::now() < deadline,
            "no Event: {:?}\n{}",
            api.events(),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reported once per change: another round without a change adds nothing.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(metric(port, "limits"), 1.0);

    // The agent restarts; the record is still in force.
    c.restart_agent();
    let agent = &c.agent;
    let sm_at = std::mem::offset_of!(SharedRegion, sm_limit);
    poke(&region_path, sm_at, &100u64.to_ne_bytes());
    poke(&region_path, limit_at, &(u64::MAX).to_ne_bytes());
    wait_until(
        "the caps written back after a restart",
        || agent.log_text(),
        || region.limit(0).unwrap() == 3000 * MIB && region.sm_limit(0).unwrap() == 30,
    );
    let snapshot = RegionReader::read_snapshot(&region_path).unwrap();
    assert_eq!(
        snapshot.priority, 0,
        "the pod's priority, written into the region"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_goes_with_its_pod() {
    let c = cluster(NodeSpec::uniform(1, GpuSpec::t4))
        .args(["--cache-grace-period", "1s"])
        .start()
        .await;
    let (dir, agent) = (&c.dir, &c.agent);
    let gpu = c.uuid(0);
    let uid = bind(&c, "gone", &format!("{gpu},NVIDIA,3000,30:"), "low").await;
    c.kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .unwrap_or_else(|s| panic!("Allocate failed: {}\n{}", s.message(), agent.log_text()));
    let record = dir
        .path()
        .join(format!("hook/vgpu/containers.records/{uid}_cuda.json"));
    let recorded: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(recorded["priority"], 1, "low: {recorded}");
    assert!(c.api.delete_object("pods", Some(NS), "gone").is_some());
    wait_until(
        "the record removed with the pod's cache directory",
        || agent.log_text(),
        || !record.exists(),
    );
}

/// The per-container metrics take the GPU and the caps from the node's record, not from the region the
/// tenant writes: a region that names another container's GPU and drops its cap shows neither on the
/// dashboards, also before the monitor's next round writes the region back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_label_a_container_with_its_recorded_gpu_and_caps_whatever_its_region_says() {
    let port = free_port();
    let c = cluster(NodeSpec::uniform(2, GpuSpec::t4))
        .env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"))
        .start()
        .await;
    let (mine, other) = (c.uuid(0), c.uuid(1));
    let uid = bind(&c, "pod-a", &format!("{mine},NVIDIA,3000,30:"), "low").await;
    let response = c.admit(1).await;
    let file_name = response.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
        .strip_prefix("/tmp/vgpu/")
        .unwrap()
        .to_owned();
    let region_path = c
        .dir
        .path()
        .join(format!("hook/vgpu/containers/{uid}_cuda/{file_name}"));
    let mut config = RegionConfig::default();
    config.limits[0] = 3000 * MIB;
    config.sm_limits[0] = 30;
    let region = Region::open_or_create(&region_path, &config).unwrap();
    region.set_device_info(&[mine.as_str()]).unwrap();
    let limit = |uuid: &str| {
        let (_, body) = http_get(port, "/metrics");
        vgpu_metrics::find_value(
            &body,
            "vgpu_container_memory_limit_bytes",
            &[("pod", "pod-a"), ("gpu_uuid", uuid)],
        )
    };
    wait_until(
        "the container in the metrics",
        || c.agent.log_text(),
        || limit(&mine) == Some((3000 * MIB) as f64),
    );

    // The tenant lifts its cap: the metrics still show the recorded one.
    poke(
        &region_path,
        std::mem::offset_of!(SharedRegion, limit),
        &0u64.to_ne_bytes(),
    );
    assert_eq!(limit(&mine), Some((3000 * MIB) as f64));
    // A slot holding only "GPU-" matches no GPU: no sample with that label.
    poke(
        &region_path,
        std::mem::offset_of!(SharedRegion, uuids),
        b"GPU-\0",
    );
    assert_eq!(limit("GPU-"), None, "{}", http_get(port, "/metrics").1);
    // It names the other GPU: no sample of this container lands on that GPU.
    poke(
        &region_path,
        std::mem::offset_of!(SharedRegion, uuids),
        other.as_bytes(),
    );
    assert_eq!(limit(&other), None, "{}", http_get(port, "/metrics").1);
}
