//! The Volcano hand-off end to end: a fake apiserver (real HTTP, reached through a kubeconfig), a fake
//! kubelet, the real agent binary on the gpu-sim, and a simulated Volcano bind written the way each scheduler
//! generation writes it. Allocate must hand each container its own GPUs and limits, advance the pod's queue
//! exactly as the contract re-encodes it, and finish the bind phase.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};
use harness::apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const NODE: &str = "node-a";
const NS: &str = "default";
const DONE: &str = "18446744073709551615";

/// One simulated node with its fakes and the agent: the fixture's cluster, and what these tests add.
struct Cluster(common::Cluster);

impl Deref for Cluster {
    type Target = common::Cluster;

    fn deref(&self) -> &common::Cluster {
        &self.0
    }
}

impl Cluster {
    async fn start(spec: NodeSpec, args: &[&str]) -> Self {
        Self::start_with(spec, args, |_, _| {}).await
    }

    async fn start_with(
        spec: NodeSpec,
        args: &[&str],
        setup: impl FnOnce(&FakeApiServer, &std::path::Path),
    ) -> Self {
        Self(cluster(spec).args(args).start_with(setup).await)
    }

    fn cache_root(&self) -> PathBuf {
        self.dir.path().join("hook/vgpu/containers")
    }
}

/// The pod most tests bind: one container `cuda` with 1 vGPU of 1000 MiB.
const ONE_VGPU: &[Ctr<'static>] = &[("cuda", Some(1), Some(1000), None)];

/// Volcano up to v1.15: PATCH the annotations, then bind.
async fn bind_v115(c: &Cluster, name: &str, containers: &[Ctr<'_>], queue: &str, time: u64) {
    c.bind(
        name,
        BindStyle::PatchThenBind,
        containers,
        queue,
        &time.to_string(),
    )
    .await;
}

/// Volcano master: the annotations travel inside the Binding.
async fn bind_master(c: &Cluster, name: &str, containers: &[Ctr<'_>], queue: &str, time: u64) {
    c.bind(
        name,
        BindStyle::InBinding,
        containers,
        queue,
        &time.to_string(),
    )
    .await;
}

fn dev(uuid: &str, mem: u64, cores: u64) -> String {
    format!("{uuid},NVIDIA,{mem},{cores}:")
}

fn envs(r: &kubelet_api::v1beta1::ContainerAllocateResponse) -> &HashMap<String, String> {
    &r.envs
}

async fn admit_ok(
    c: &Cluster,
    resource: &str,
    size: usize,
) -> kubelet_api::v1beta1::ContainerAllocateResponse {
    let response = c
        .kubelet
        .admit(resource, size)
        .await
        .unwrap()
        .unwrap_or_else(|s| panic!("Allocate failed: {}\n{}", s.message(), c.agent.log_text()));
    assert_eq!(response.container_responses.len(), 1);
    response.container_responses.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_container_patch_style_bind_gets_its_gpu_limits_and_mounts() {
    let c = Cluster::start(NodeSpec::uniform(2, GpuSpec::t4), &[]).await;
    let b = c.uuid(1);
    bind_v115(
        &c,
        "p1",
        &[("cuda", Some(1), Some(3000), Some(30))],
        &dev(&b, 3000, 30),
        1_787_220_000,
    )
    .await;

    let r = admit_ok(&c, NUMBER, 1).await;
    let e = envs(&r);
    assert_eq!(e["NVIDIA_VISIBLE_DEVICES"], b);
    assert_eq!(e["CUDA_DEVICE_MEMORY_LIMIT_0"], "3000m");
    assert_eq!(e["CUDA_DEVICE_SM_LIMIT"], "30");
    let cache = &e["CUDA_DEVICE_MEMORY_SHARED_CACHE"];
    assert!(
        cache.starts_with("/tmp/vgpu/") && cache.ends_with(".cache"),
        "{cache}"
    );
    assert!(!e.contains_key("CUDA_OVERSUBSCRIBE"));

    let uid = c.pod("p1").await.metadata.uid.unwrap();
    let mounts: HashMap<&str, (&str, bool)> = r
        .mounts
        .iter()
        .map(|m| {
            (
                m.container_path.as_str(),
                (m.host_path.as_str(), m.read_only),
            )
        })
        .collect();
    let hook = c.dir.path().join("hook");
    assert_eq!(
        mounts["/usr/local/vgpu/libvgpu.so"],
        (hook.join("libvgpu.so").to_str().unwrap(), true)
    );
    assert_eq!(
        mounts["/etc/ld.so.preload"],
        (hook.join("ld.so.preload").to_str().unwrap(), true)
    );
    let cache_dir = c.cache_root().join(format!("{uid}_cuda"));
    assert_eq!(mounts["/tmp/vgpu"], (cache_dir.to_str().unwrap(), false));
    assert!(!mounts["/tmp/vgpulock"].1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cache_dir).unwrap().permissions().mode() & 0o777,
        0o777
    );

    assert_eq!(
        c.annotation("p1", "volcano.sh/devices-to-allocate")
            .await
            .as_deref(),
        Some("")
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("success")
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/vgpu-time").await.as_deref(),
        Some(DONE)
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/vgpu-ids-new").await,
        Some(dev(&b, 3000, 30)),
        "the record stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_style_bind_of_volcano_master_is_allocated_too() {
    let c = Cluster::start(NodeSpec::uniform(2, GpuSpec::t4), &[]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    let queue = format!("{}{}", dev(&b, 2000, 50), dev(&a, 2000, 50));
    bind_master(
        &c,
        "p1",
        &[("cuda", Some(2), Some(2000), Some(50))],
        &queue,
        1_787_220_000,
    )
    .await;
    let r = admit_ok(&c, NUMBER, 2).await;
    assert_eq!(envs(&r)["NVIDIA_VISIBLE_DEVICES"], format!("{b},{a}"));
    assert_eq!(envs(&r)["CUDA_DEVICE_MEMORY_LIMIT_1"], "2000m");
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("success")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_before_two_gpu_containers_each_get_their_own_segment() {
    let c = Cluster::start(NodeSpec::uniform(2, GpuSpec::t4), &[]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    let queue = format!("{};{}", dev(&a, 1000, 0), dev(&b, 2000, 0));
    let containers = [
        ("sidecar", None, None, None),
        ("trainer", Some(1), Some(1000), None),
        ("eval", Some(1), Some(2000), None),
    ];
    bind_v115(&c, "p1", &containers, &queue, 1_787_220_000).await;

    let first = admit_ok(&c, NUMBER, 1).await;
    assert_eq!(envs(&first)["NVIDIA_VISIBLE_DEVICES"], a);
    assert_eq!(envs(&first)["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
    assert_eq!(
        c.annotation("p1", "volcano.sh/devices-to-allocate").await,
        Some(format!(";{}", dev(&b, 2000, 0)))
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("allocating")
    );
    let uid = c.pod("p1").await.metadata.uid.unwrap();
    assert!(
        c.cache_root().join(format!("{uid}_trainer")).is_dir(),
        "named for the GPU container, not the sidecar"
    );

    let second = admit_ok(&c, NUMBER, 1).await;
    assert_eq!(envs(&second)["NVIDIA_VISIBLE_DEVICES"], b);
    assert_eq!(envs(&second)["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m");
    assert_eq!(
        c.annotation("p1", "volcano.sh/devices-to-allocate")
            .await
            .as_deref(),
        Some(";")
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("success")
    );
    assert!(c.cache_root().join(format!("{uid}_eval")).is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_only_container_is_handed_off_by_the_memory_endpoint_once() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    bind_v115(
        &c,
        "p1",
        &[("cuda", None, Some(4000), None)],
        &dev(&a, 4000, 0),
        1_787_220_000,
    )
    .await;
    // The kubelet calls only the memory endpoint for this container.
    let r = admit_ok(&c, MEMORY, 4000).await;
    assert_eq!(envs(&r)["NVIDIA_VISIBLE_DEVICES"], a);
    assert_eq!(envs(&r)["CUDA_DEVICE_MEMORY_LIMIT_0"], "4000m");
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("success")
    );

    // A container with a count and memory: the memory endpoint answers empty, the number endpoint works.
    bind_v115(&c, "p2", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_001).await;
    let empty = admit_ok(&c, MEMORY, 1000).await;
    assert!(empty.envs.is_empty() && empty.mounts.is_empty());
    assert_eq!(
        c.annotation("p2", "volcano.sh/bind-phase").await.as_deref(),
        Some("allocating")
    );
    let r = admit_ok(&c, NUMBER, 1).await;
    assert_eq!(envs(&r)["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_bound_in_the_same_second_each_get_their_own_devices() {
    let c = Cluster::start(NodeSpec::uniform(2, GpuSpec::t4), &[]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    bind_v115(&c, "first", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct creation timestamps
    bind_v115(
        &c,
        "second",
        &[("cuda", Some(1), Some(2000), None)],
        &dev(&b, 2000, 0),
        1_787_220_000,
    )
    .await;
    let r1 = admit_ok(&c, NUMBER, 1).await;
    let r2 = admit_ok(&c, NUMBER, 1).await;
    assert_eq!(
        envs(&r1)["NVIDIA_VISIBLE_DEVICES"],
        a,
        "the older pod first, like the kubelet admits"
    );
    assert_eq!(envs(&r2)["NVIDIA_VISIBLE_DEVICES"], b);
    for p in ["first", "second"] {
        assert_eq!(
            c.annotation(p, "volcano.sh/bind-phase").await.as_deref(),
            Some("success")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_names_the_scheduler_s_gpu() {
    let c = Cluster::start(NodeSpec::uniform(4, GpuSpec::t4), &[]).await;
    let d = c.uuid(3);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&d, 1000, 0), 1_787_220_000).await;
    let view = c.kubelet.resource(NUMBER).unwrap();
    assert!(view.options.unwrap().get_preferred_allocation_available);
    let available: Vec<String> = view.devices.iter().map(|d| d.id.clone()).collect();
    let ids = c
        .kubelet
        .preferred(NUMBER, &available, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids.len(), 1);
    assert!(ids[0].starts_with(&d), "{ids:?} should be on {d}");
    // Preferring changes nothing on the pod.
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("allocating")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pending_pod_is_a_clear_error_and_the_agent_keeps_serving() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let status = c
        .kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .expect_err("nothing to allocate");
    assert!(
        status.message().contains(NODE) && status.message().contains("no pending pod"),
        "{}",
        status.message()
    );
    let a = c.uuid(0);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    admit_ok(&c, NUMBER, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queue_fails_the_pod_with_an_event_and_others_still_allocate() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    bind_v115(
        &c,
        "bad",
        ONE_VGPU,
        &format!("{a},NVIDIA,-1,0:"),
        1_787_220_000,
    )
    .await;
    let status = c
        .kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .expect_err("malformed");
    // The kubelet's error names the pod it failed and the field, not the generic "no pending pod".
    assert!(
        status.message().contains("pod default/bad")
            && status.message().contains("used memory")
            && !status.message().contains("no pending pod"),
        "{}",
        status.message()
    );
    assert_eq!(
        c.annotation("bad", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("failed")
    );
    // The Event is published after the kubelet's answer, off the Allocate lock.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let events = c.api.events();
        if events
            .iter()
            .any(|e| e.to_string().contains("VGPUAllocateFailed") && e.to_string().contains("bad"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bind_v115(&c, "good", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_001).await;
    admit_ok(&c, NUMBER, 1).await;
    assert_eq!(
        c.annotation("good", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("success")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_register_annotation_is_written_once_and_follows_health() {
    let c = Cluster::start(
        NodeSpec::uniform(2, GpuSpec::t4),
        &["--health-recovery-period", "1h"],
    )
    .await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    let expected = |healthy1: bool| {
        format!(
            "{},10,15360,NVIDIA-Tesla T4,true,hami-core:{},10,15360,NVIDIA-Tesla T4,{healthy1},hami-core:",
            c.uuid(0),
            c.uuid(1)
        )
    };
    let read = || async {
        nodes
            .get(NODE)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
            .get("volcano.sh/node-vgpu-register")
            .cloned()
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    while read().await != Some(expected(true)) {
        assert!(
            std::time::Instant::now() < deadline,
            "register never written:\n{}",
            c.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At rest: no more node writes.
    let writes = || {
        c.api
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.contains("/nodes/"))
            .count()
    };
    let before = writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(writes(), before, "no node writes at rest");

    c.sim.inject_xid(&c.uuid(1), 79).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while read().await != Some(expected(false)) {
        assert!(
            std::time::Instant::now() < deadline,
            "health not published:\n{}",
            c.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_scheduler_s_handshake_is_answered_only_when_it_asks() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    let handshake = || async {
        nodes
            .get(NODE)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
            .get("volcano.sh/node-vgpu-handshake")
            .cloned()
    };
    // Missing at start: answered once.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !handshake()
        .await
        .is_some_and(|v| v.starts_with("Reported "))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            c.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old scheduler acknowledges: no answer needed.
    let ack = json!({"metadata": {"annotations": {"volcano.sh/node-vgpu-handshake": "Requesting_2026.08.20 10:00:00"}}});
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&ack))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        handshake().await.as_deref(),
        Some("Requesting_2026.08.20 10:00:00")
    );
    // It marks the node stale: answered at once.
    let stale = json!({"metadata": {"annotations": {"volcano.sh/node-vgpu-handshake": "Deleted_2026.08.20 10:01:01"}}});
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !handshake()
        .await
        .is_some_and(|v| v.starts_with("Reported "))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            c.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_config_map_sets_the_counts_and_the_limiter_settings() {
    let yaml = "nvidia:\n  deviceSplitCount: 4\n  gpuMemoryFactor: 10\n  deviceMemoryScaling: 2\n  disableCoreLimit: true\n";
    let c = Cluster::start_with(NodeSpec::uniform(1, GpuSpec::t4), &[], |api, _| {
        api.create(
            "/api/v1/namespaces/kube-system/configmaps",
            json!({"metadata": {"name": "volcano-vgpu-device-config", "namespace": "kube-system"}, "data": {"device-config.yaml": yaml}}),
        )
        .unwrap();
    })
    .await;
    let number = c.kubelet.resource(NUMBER).unwrap();
    let memory = c.kubelet.resource(MEMORY).unwrap();
    assert_eq!(number.devices.len(), 4);
    assert_eq!(
        memory.devices.len(),
        15360 * 2 / 10,
        "scaled memory in factor units"
    );
    let a = c.uuid(0);
    bind_v115(
        &c,
        "p1",
        &[("cuda", Some(1), Some(300), None)],
        &dev(&a, 300, 0),
        1_787_220_000,
    )
    .await;
    let r = admit_ok(&c, NUMBER, 1).await;
    assert_eq!(
        envs(&r)["CUDA_DEVICE_MEMORY_LIMIT_0"],
        "3000m",
        "units × factor"
    );
    assert_eq!(envs(&r)["CUDA_OVERSUBSCRIBE"], "true");
    assert_eq!(envs(&r)["GPU_CORE_UTILIZATION_POLICY"], "disable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_map_is_reported_by_key_and_the_agent_serves_defaults() {
    let c = Cluster::start_with(NodeSpec::uniform(1, GpuSpec::t4), &[], |api, _| {
        api.create(
            "/api/v1/namespaces/kube-system/configmaps",
            json!({"metadata": {"name": "volcano-vgpu-device-config", "namespace": "kube-system"},
                   "data": {"device-config.yaml": "nvidia:\n  gpuMemoryFactor: 0\n"}}),
        )
        .unwrap();
    })
    .await;
    assert_eq!(c.kubelet.resource(NUMBER).unwrap().devices.len(), 10);
    let log = c.agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("nvidia.gpuMemoryFactor")
            && l.contains("expected")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_that_is_down_fails_allocate_clearly_and_recovers() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    c.api.set_down(true).await;
    let status = c
        .kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .expect_err("apiserver down");
    assert!(
        status.message().contains("apiserver") || status.message().contains("no pending pod"),
        "{}",
        status.message()
    );
    c.api.set_down(false).await;
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    admit_ok(&c, NUMBER, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_never_lists_every_pod_in_the_cluster() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    admit_ok(&c, NUMBER, 1).await;
    for r in c.api.requests() {
        if r.method == "GET" && r.path.ends_with("/pods") {
            assert!(
                r.query.contains("fieldSelector"),
                "unscoped pod list: {} {}",
                r.path,
                r.query
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_container_advances_the_queue_and_marks_the_pod_done_in_one_write() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    c.api.clear_requests();
    admit_ok(&c, NUMBER, 1).await;
    let pod_writes: Vec<String> = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/pods/p1"))
        .map(|r| format!("{} {}", r.path, r.query))
        .collect();
    assert_eq!(pod_writes.len(), 1, "{pod_writes:#?}");
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("success")
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/vgpu-time").await.as_deref(),
        Some(DONE)
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/devices-to-allocate")
            .await
            .as_deref(),
        Some("")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_s_node_lock_is_released_after_allocation() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    let lock = json!({"metadata": {"annotations": {"hamivgpu": "2026-08-20T10:00:00Z"}}});
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&lock))
        .await
        .unwrap();
    let a = c.uuid(0);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    admit_ok(&c, NUMBER, 1).await;
    // Released after the kubelet has its answer, off the Allocate lock: within one apiserver round trip or two.
    let deadline = std::time::Instant::now() + PATIENCE;
    let annotations = loop {
        let annotations = nodes
            .get(NODE)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default();
        if !annotations.contains_key("hamivgpu") {
            break annotations;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never released: {annotations:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        annotations.contains_key("volcano.sh/node-vgpu-register"),
        "only the lock is removed"
    );
}

/// The release is guarded: a lock taken again after the agent read it (the scheduler locking the node for
/// another pod) is not removed; the one read is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lock_taken_again_since_it_was_read_is_not_released() {
    use vgpu_device_plugin::handoff::node_annotations::lock_removal;
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    let lock_at = |t: &str| json!({"metadata": {"annotations": {"hamivgpu": t}}});
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(&lock_at("2026-08-20T10:00:05Z")),
        )
        .await
        .unwrap();
    let stale = nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Json::<()>(lock_removal("2026-08-20T10:00:00Z")),
        )
        .await;
    assert!(
        matches!(&stale, Err(kube::Error::Api(s)) if s.code == 422),
        "{stale:?}"
    );
    let lock = |n: Node| {
        n.metadata
            .annotations
            .unwrap_or_default()
            .get("hamivgpu")
            .cloned()
    };
    assert_eq!(
        lock(nodes.get(NODE).await.unwrap()).as_deref(),
        Some("2026-08-20T10:00:05Z")
    );
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Json::<()>(lock_removal("2026-08-20T10:00:05Z")),
        )
        .await
        .unwrap();
    assert_eq!(lock(nodes.get(NODE).await.unwrap()), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_map_in_volcano_system_and_node_config_filters_are_honoured() {
    let c = Cluster::start_with(NodeSpec::uniform(3, GpuSpec::t4), &[], |api, dir| {
        api.create(
            "/api/v1/namespaces/volcano-system/configmaps",
            json!({"metadata": {"name": "volcano-vgpu-device-config", "namespace": "volcano-system"},
                   "data": {"device-config.yaml": "nvidia:\n  deviceSplitCount: 3\n"}}),
        )
        .unwrap();
        let hidden = GpuSpec::t4(1).uuid;
        let node_config = json!({"nodeconfig": [{"name": NODE, "devicesplitcount": 5, "filterdevices": {"uuid": [hidden], "index": []}}]});
        std::fs::write(dir.join("node-config.json"), node_config.to_string()).unwrap();
    })
    .await;
    let number = c.kubelet.resource(NUMBER).unwrap();
    assert_eq!(
        number.devices.len(),
        2 * 5,
        "two GPUs left, split 5 from the node entry over 3 from the config map"
    );
    assert!(number.devices.iter().all(|d| !d.id.starts_with(&c.uuid(1))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_apiserver_only_slows_allocate_down() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    c.api.set_latency(Duration::from_millis(300));
    let started = std::time::Instant::now();
    admit_ok(&c, NUMBER, 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the latency was really applied"
    );
    c.api.set_latency(Duration::ZERO);
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("success")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_allocates_of_one_pod_do_not_trust_a_lagging_watch() {
    let c = Cluster::start(NodeSpec::uniform(4, GpuSpec::t4), &[]).await;
    let uuids: Vec<String> = (0..4).map(|i| c.uuid(i)).collect();
    let queue = uuids
        .iter()
        .map(|u| dev(u, 1000, 0))
        .collect::<Vec<_>>()
        .join(";");
    let containers: Vec<Ctr<'_>> = ["c0", "c1", "c2", "c3"]
        .iter()
        .map(|n| (*n, Some(1), Some(1000), None))
        .collect();
    bind_v115(&c, "p1", &containers, &queue, 1_787_220_000).await;
    let id = c.kubelet.resource(NUMBER).unwrap().devices[0].id.clone();
    // Let the agent's cache see the pod, then make its watch lag: every watch reconnect now waits 300 ms.
    c.wait_until_watched().await;
    c.api.set_latency(Duration::from_millis(300));
    c.api.close_watches();
    // No pause between the calls: the kubelet allocates a pod's containers one right after the other.
    for (i, uuid) in uuids.iter().enumerate() {
        let r = c
            .kubelet
            .allocate(NUMBER, &[id.as_str()])
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("container {i}: {}\n{}", s.message(), c.agent.log_text()));
        assert_eq!(
            r.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], *uuid,
            "container {i}"
        );
    }
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("success")
    );
    assert_eq!(
        c.annotation("p1", "volcano.sh/devices-to-allocate")
            .await
            .as_deref(),
        Some(";;;")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_apiserver_times_allocate_out_and_changes_nothing() {
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    c.wait_until_watched().await;
    c.api.set_latency(Duration::from_secs(30));
    let id = c.kubelet.resource(NUMBER).unwrap().devices[0].id.clone();
    let status = c
        .kubelet
        .allocate(NUMBER, &[id.as_str()])
        .await
        .unwrap()
        .expect_err("hung apiserver");
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("did not answer"),
        "{}",
        status.message()
    );
    c.api.set_latency(Duration::ZERO);
    assert_eq!(
        c.annotation("p1", "volcano.sh/bind-phase").await.as_deref(),
        Some("allocating"),
        "nothing changed"
    );
    admit_ok(&c, NUMBER, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_apiserver_bounds_get_preferred_allocation_too() {
    // The kubelet calls GetPreferredAllocation before Allocate, without a deadline, and it shares Allocate's
    // lock: unbounded, a hung apiserver would hold every later container behind it.
    let c = Cluster::start(NodeSpec::uniform(1, GpuSpec::t4), &[]).await;
    let a = c.uuid(0);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    c.wait_until_watched().await;
    let available: Vec<String> = c
        .kubelet
        .resource(NUMBER)
        .unwrap()
        .devices
        .iter()
        .map(|d| d.id.clone())
        .collect();
    c.api.set_latency(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let ids = tokio::time::timeout(
        Duration::from_secs(20),
        c.kubelet.preferred(NUMBER, &available, 1),
    )
    .await
    .expect("GetPreferredAllocation waited on the hung apiserver")
    .unwrap()
    .expect("falls back to the kubelet's choice");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(available.contains(&ids[0]), "{ids:?}");
    c.api.set_latency(Duration::ZERO);
    admit_ok(&c, NUMBER, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_gpus_the_allocations_and_readiness() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let c = Cluster::start(
        NodeSpec::uniform(2, GpuSpec::t4),
        &["--metrics-bind-address", &address],
    )
    .await;
    let b = c.uuid(1);
    bind_v115(&c, "p1", ONE_VGPU, &dev(&b, 1000, 0), 1_787_220_000).await;
    let handed = admit_ok(&c, NUMBER, 1).await;
    // The region file the container's limiter opens: the one Allocate named (and recorded for the monitor).
    let region_file = handed.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();

    let (status, _) = tokio::task::spawn_blocking(move || http_get(port, "/readyz"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    let value = |name: &str, labels: &[(&str, &str)]| vgpu_metrics::find_value(&body, name, labels);
    assert_eq!(
        value(
            "vgpu_agent_allocations_total",
            &[("endpoint", NUMBER), ("result", "handed_off")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            "vgpu_gpu_vgpus_allocated",
            &[("gpu_uuid", &b), ("gpu_index", "1")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value("vgpu_gpu_vgpus_allocated", &[("gpu_index", "0")]),
        Some(0.0)
    );
    assert_eq!(
        value("vgpu_gpu_memory_total_bytes", &[("gpu_index", "0")]),
        Some((15360u64 << 20) as f64)
    );
    assert!(
        value(
            "HostGPUMemoryUsage",
            &[("deviceidx", "1"), ("deviceuuid", &b), ("zone", "vGPU")]
        )
        .is_some()
    );
    assert!(value("vgpu_agent_node_writes_total", &[]).is_some_and(|w| w >= 1.0));

    // The container's limiter writes its shared region into the cache directory Allocate created.
    let uid = c.pod("p1").await.metadata.uid.unwrap();
    let dir = c.cache_root().join(format!("{uid}_cuda"));
    let mut config = vgpu_region::RegionConfig::default();
    config.limits[0] = 1000 << 20;
    let region = vgpu_region::Region::open_or_create(&dir.join(&region_file), &config).unwrap();
    region.set_device_info(&[&b]).unwrap();
    region.register_current_process().unwrap();
    region
        .add_usage(0, vgpu_region::MemoryKind::Data, 300 << 20)
        .unwrap();
    region.add_refused().unwrap();
    // A foreign file in another pod's directory is never a crash.
    let stray = c.cache_root().join(format!("{uid}_other"));
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("y.cache"), b"garbage").unwrap();

    let (_, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| vgpu_metrics::find_value(&body, name, labels);
    let legacy = [
        ("podnamespace", NS),
        ("podname", "p1"),
        ("ctrname", "cuda"),
        ("vdeviceid", "1"),
        ("deviceuuid", &b),
        ("zone", "vGPU"),
    ];
    assert_eq!(
        value("vGPU_device_memory_usage_in_bytes", &legacy),
        Some((300u64 << 20) as f64),
        "{body}"
    );
    assert_eq!(
        value("vGPU_device_memory_limit_in_bytes", &legacy),
        Some((1000u64 << 20) as f64)
    );
    let clean = [
        ("namespace", NS),
        ("pod", "p1"),
        ("container", "cuda"),
        ("gpu_uuid", &b),
        ("gpu_index", "1"),
    ];
    assert_eq!(
        value("vgpu_container_memory_used_bytes", &clean),
        Some((300u64 << 20) as f64)
    );
    assert_eq!(
        value("vgpu_container_memory_limit_bytes", &clean),
        Some((1000u64 << 20) as f64)
    );
    assert_eq!(
        value("vgpu_container_allocations_refused_total", &clean[..3]),
        Some(1.0)
    );
    assert_eq!(
        value("vgpu_agent_region_read_errors_total", &[]),
        Some(1.0),
        "the garbage file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_directories_of_pods_that_are_gone_are_removed_after_the_grace_period() {
    let c = Cluster::start(
        NodeSpec::uniform(2, GpuSpec::t4),
        &["--cache-grace-period", "1s"],
    )
    .await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    bind_v115(&c, "gone", ONE_VGPU, &dev(&a, 1000, 0), 1_787_220_000).await;
    admit_ok(&c, NUMBER, 1).await;
    bind_v115(&c, "stays", ONE_VGPU, &dev(&b, 1000, 0), 1_787_220_001).await;
    admit_ok(&c, NUMBER, 1).await;
    let gone_dir = c.cache_root().join(format!(
        "{}_cuda",
        c.pod("gone").await.metadata.uid.unwrap()
    ));
    let stays_dir = c.cache_root().join(format!(
        "{}_cuda",
        c.pod("stays").await.metadata.uid.unwrap()
    ));
    assert!(gone_dir.is_dir() && stays_dir.is_dir());

    assert!(c.api.delete_object("pods", Some(NS), "gone").is_some());
    let deadline = std::time::Instant::now() + PATIENCE;
    while gone_dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "never removed:\n{}",
            c.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several more sweeps: the live pod's directory is never touched.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(stays_dir.is_dir(), "a running pod's directory must stay");
}
