//! The memory backstop end to end: the real agent on the gpu-sim with a fake `/proc` (`--host-proc-root`),
//! a container handed its vGPU through Allocate (so the node's record holds its cap), and `gpu-sim-bypass`
//! processes that allocate through the fake libcuda without any limiter, as a static binary or a process
//! that unset `ld.so.preload` would. NVML reports their host PIDs and memory; their cgroups (v1 and v2
//! formats, as the kernel prints them) name the pods.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{BindStyle, Cluster, Ctr, PATIENCE, cluster, free_port, http_get};
use gpu_sim::{
    CgroupLayout, GpuSpec, NodeSpec, ProcRoot, Qos, Runtime, cgroup_file, host_cgroup_file,
};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const PERIOD: &str = "200ms";

/// Puts `pid` under the fake proc root with `cgroup` and its real `stat` (the start time the agent checks).
fn place(proc: &ProcRoot, pid: u32, cgroup: &str) {
    proc.add(pid, cgroup).unwrap();
    let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
    std::fs::write(proc.path().join(pid.to_string()).join("stat"), stat).unwrap();
}

/// A 64-hex container ID.
fn container_id(n: u8) -> String {
    format!("{:064x}", u128::from(n) * 0x1111_1111_1111_1111)
}

struct Node {
    c: Cluster,
    proc: ProcRoot,
    _proc_dir: tempfile::TempDir,
    port: u16,
}

async fn start(mode: &str, grace: &str) -> Node {
    start_env(mode, grace, &[]).await
}

async fn start_env(mode: &str, grace: &str, env: &[(&str, &str)]) -> Node {
    let proc_dir = tempfile::tempdir().unwrap();
    let proc = ProcRoot::new(proc_dir.path().join("proc")).unwrap();
    let port = free_port();
    let mut builder = cluster(NodeSpec::uniform(2, GpuSpec::t4));
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    let c = builder
        .env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"))
        .args([
            "--memory-backstop",
            mode,
            "--memory-backstop-period",
            PERIOD,
            "--memory-backstop-grace",
            grace,
            "--memory-backstop-tolerance",
            "64Mi",
            "--host-proc-root",
            proc.path().to_str().unwrap(),
        ])
        .start()
        .await;
    Node {
        c,
        proc,
        _proc_dir: proc_dir,
        port,
    }
}

/// Binds pod `name` (one container `cuda`, 1 vGPU of `mib` MiB on GPU 0), admits it (the record is written),
/// and sets its container's runtime ID in the pod's status, as the kubelet does once it runs. Returns the UID and
/// the region file's name Allocate handed out.
async fn run_pod_region(n: &Node, name: &str, mib: u64, id: &str, time: u64) -> (String, String) {
    let c = &n.c;
    let containers: &[Ctr<'_>] = &[("cuda", Some(1), Some(mib), None)];
    let queue = format!("{},NVIDIA,{mib},0:", c.uuid(0));
    c.bind(
        name,
        BindStyle::PatchThenBind,
        containers,
        &queue,
        &time.to_string(),
    )
    .await;
    let response = c.admit(1).await;
    let region = response.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    c.api
        .patch_object(
            "pods",
            Some("default"),
            name,
            json!({"status": {"phase": "Running", "containerStatuses": [{
                "name": "cuda", "image": "cuda", "imageID": "", "ready": true, "restartCount": 0,
                "containerID": format!("containerd://{id}"),
            }]}}),
        )
        .unwrap();
    (c.pod(name).await.metadata.uid.unwrap(), region)
}

async fn run_pod(n: &Node, name: &str, mib: u64, id: &str, time: u64) -> String {
    run_pod_region(n, name, mib, id, time).await.0
}

fn metrics(n: &Node) -> String {
    http_get(n.port, "/metrics").1
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    vgpu_metrics::find_value(text, name, labels)
}

/// The backstop's Events on pod `pod`, as `(reason, action, note)`.
fn events(c: &Cluster, pod: &str) -> Vec<(String, String, String)> {
    c.api
        .events()
        .into_iter()
        .filter(|e| {
            let regarding = &e["regarding"];
            let involved = &e["involvedObject"];
            regarding["name"] == pod || involved["name"] == pod
        })
        .map(|e: Value| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (
                s("reason"),
                s("action"),
                if e["note"].is_null() {
                    s("message")
                } else {
                    s("note")
                },
            )
        })
        .collect()
}

async fn eventually(what: &str, c: &Cluster, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + PATIENCE;
    while Instant::now() < until {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {PATIENCE:?}: {what}\n{}", c.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_names_a_bypassing_container_over_its_cap_and_counts_what_nvml_sees() {
    let n = start("report", "0s").await;
    let c = &n.c;
    // p1 (cgroup v2, systemd) goes over its 1000 MiB; p2 (cgroup v1, cgroupfs) stays within its 1000 MiB.
    let (id1, id2) = (container_id(1), container_id(2));
    let (uid1, region1) = run_pod_region(&n, "p1", 1000, &id1, 1_787_220_000).await;
    let uid2 = run_pod(&n, "p2", 1000, &id2, 1_787_220_001).await;
    // p1's region, as its limiter would keep it, with a usage the tenant lowered to 100 MiB.
    let gpu = c.uuid(0);
    let file = c
        .root()
        .join(format!("hook/vgpu/containers/{uid1}_cuda/{region1}"));
    let mut config = vgpu_region::RegionConfig::default();
    config.limits[0] = 1000 * MIB;
    let region = vgpu_region::Region::open_or_create(&file, &config).unwrap();
    region.set_device_info(&[&gpu]).unwrap();
    region.register_current_process().unwrap();
    region
        .add_usage(0, vgpu_region::MemoryKind::Data, 100 * MIB)
        .unwrap();
    // The slot outlives `region` (dropping it would free the slot): the usage stays in the file.
    std::mem::forget(region);
    let mut over = c.sim.hold(0, 2000 * MIB);
    let mut within = c.sim.hold(0, 200 * MIB);
    place(
        &n.proc,
        over.pid,
        &cgroup_file(
            CgroupLayout::V2Systemd,
            Runtime::Containerd,
            Qos::Burstable,
            &uid1,
            &id1,
        ),
    );
    place(
        &n.proc,
        within.pid,
        &cgroup_file(
            CgroupLayout::V1Cgroupfs,
            Runtime::Containerd,
            Qos::Guaranteed,
            &uid2,
            &id2,
        ),
    );

    let labels = |pod: &'static str| {
        [
            ("namespace", "default"),
            ("pod", pod),
            ("container", "cuda"),
            ("gpu_uuid", gpu.as_str()),
        ]
    };
    eventually("the over-limit Event on p1", c, || {
        events(c, "p1")
            .iter()
            .any(|(reason, _, _)| reason == "VGPUMemoryOverLimit")
    })
    .await;
    let (_, action, note) = events(c, "p1")
        .into_iter()
        .find(|(reason, _, _)| reason == "VGPUMemoryOverLimit")
        .unwrap();
    assert_eq!(action, "Report");
    assert!(
        note.contains("container cuda uses") && note.contains(&gpu),
        "{note}"
    );
    assert!(note.contains("limit of 1000 MiB"), "{note}");

    let mut text = String::new();
    eventually(
        "the observed bytes of both containers in the metrics",
        c,
        || {
            text = metrics(&n);
            value(&text, "vgpu_container_memory_observed_bytes", &labels("p1"))
                .is_some_and(|v| v >= (2000 * MIB) as f64)
                && value(&text, "vgpu_container_memory_observed_bytes", &labels("p2"))
                    .is_some_and(|v| v >= (200 * MIB) as f64)
        },
    )
    .await;
    let mut report = labels("p1").to_vec();
    report.push(("action", "report"));
    assert_eq!(
        value(&text, "vgpu_container_memory_violations_total", &report),
        Some(1.0),
        "{text}"
    );
    let p2_observed = value(&text, "vgpu_container_memory_observed_bytes", &labels("p2")).unwrap();
    assert!(
        p2_observed < (1000 * MIB) as f64,
        "p2 stays within its cap: {p2_observed}"
    );
    // The limiter was bypassed, so the region says nothing of p1's 2000 MiB; NVML's figure is there anyway.
    assert!(
        value(&text, "vgpu_container_memory_used_bytes", &labels("p1")).unwrap_or(0.0)
            < (2000 * MIB) as f64,
        "{text}"
    );
    assert!(
        events(c, "p2").is_empty(),
        "nothing about the well-behaved pod"
    );
    // Report never kills.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(over.alive() && within.alive());
    assert_eq!(
        events(c, "p1")
            .iter()
            .filter(|(r, _, _)| r == "VGPUMemoryOverLimit")
            .count(),
        1,
        "one Event per state change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_the_offender_after_the_grace_and_touches_nothing_else() {
    let n = start("kill", "400ms").await;
    let c = &n.c;
    let (id1, id2) = (container_id(1), container_id(2));
    let uid1 = run_pod(&n, "p1", 1000, &id1, 1_787_220_000).await;
    let uid2 = run_pod(&n, "p2", 1000, &id2, 1_787_220_001).await;
    let mut within = c.sim.hold(0, 300 * MIB);
    place(
        &n.proc,
        within.pid,
        &cgroup_file(
            CgroupLayout::V2Cgroupfs,
            Runtime::CriO,
            Qos::BestEffort,
            &uid2,
            &id2,
        ),
    );
    // A pod that got the GPU without the device plugin (no record), and a host process: unaccounted.
    let mut rogue = c.sim.hold(0, 1500 * MIB);
    place(
        &n.proc,
        rogue.pid,
        &cgroup_file(
            CgroupLayout::V2Systemd,
            Runtime::Containerd,
            Qos::Burstable,
            "0b7e6a8c-0000-4000-8000-000000000001",
            &container_id(3),
        ),
    );
    let mut host = c.sim.hold(1, 100 * MIB);
    place(
        &n.proc,
        host.pid,
        &host_cgroup_file(CgroupLayout::V2Systemd, "sshd.service"),
    );
    let gpu0 = c.uuid(0);
    eventually("the unaccounted memory of GPU 0 in the metrics", c, || {
        value(
            &metrics(&n),
            "vgpu_unaccounted_memory_bytes",
            &[("gpu_uuid", gpu0.as_str())],
        )
        .is_some_and(|v| v >= (1500 * MIB) as f64)
    })
    .await;

    let mut over = c.sim.hold(0, 2000 * MIB);
    place(
        &n.proc,
        over.pid,
        &cgroup_file(
            CgroupLayout::V1Systemd,
            Runtime::Containerd,
            Qos::Burstable,
            &uid1,
            &id1,
        ),
    );
    eventually("the offender is killed", c, || !over.alive()).await;
    eventually("the kill Event on p1", c, || {
        events(c, "p1")
            .iter()
            .any(|(r, a, _)| r == "VGPUMemoryOverLimit" && a == "Kill")
    })
    .await;
    let kill = events(c, "p1")
        .into_iter()
        .find(|(_, a, _)| a == "Kill")
        .unwrap();
    assert!(
        kill.2.contains(&format!("killed PIDs [{}]", over.pid)),
        "{}",
        kill.2
    );
    let text = metrics(&n);
    let labels = [
        ("pod", "p1"),
        ("gpu_uuid", gpu0.as_str()),
        ("action", "kill"),
    ];
    assert_eq!(
        value(&text, "vgpu_container_memory_violations_total", &labels),
        Some(1.0),
        "{text}"
    );

    // A few more periods: nobody else is touched.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(within.alive(), "the well-behaved container next to it");
    assert!(rogue.alive(), "unaccounted processes are never killed");
    assert!(host.alive(), "host processes are never killed");
    assert!(events(c, "p2").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_confirmed_container_id_is_killed_and_a_sidecar_is_unaccounted() {
    let n = start("kill", "0s").await;
    let c = &n.c;
    let id1 = container_id(1);
    let uid1 = run_pod(&n, "p1", 100, &id1, 1_787_220_000).await;
    // The pod also runs a sidecar the agent did not hand a GPU (it got one some other way).
    let sidecar_id = container_id(9);
    c.api
        .patch_object(
            "pods",
            Some("default"),
            "p1",
            json!({"status": {"containerStatuses": [
                {"name": "cuda", "image": "cuda", "imageID": "", "ready": true, "restartCount": 0,
                 "containerID": format!("containerd://{id1}")},
                {"name": "sidecar", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
                 "containerID": format!("cri-o://{sidecar_id}")},
            ]}}),
        )
        .unwrap();
    let mut sidecar = c.sim.hold(0, 1000 * MIB);
    place(
        &n.proc,
        sidecar.pid,
        &cgroup_file(
            CgroupLayout::V2Systemd,
            Runtime::CriO,
            Qos::Burstable,
            &uid1,
            &sidecar_id,
        ),
    );
    let gpu0 = c.uuid(0);
    eventually("the sidecar's memory is unaccounted", c, || {
        value(
            &metrics(&n),
            "vgpu_unaccounted_memory_bytes",
            &[("gpu_uuid", gpu0.as_str())],
        )
        .is_some_and(|v| v >= (1000 * MIB) as f64)
    })
    .await;
    eventually("an unaccounted-memory Event on the pod", c, || {
        events(c, "p1")
            .iter()
            .any(|(r, _, n)| r == "VGPUUnaccountedMemory" && n.contains("container sidecar"))
    })
    .await;
    // A process whose container ID the pod's status does not carry (yet): counted for the pod's only vGPU
    // container and reported, but never killed without a positive match.
    let mut unconfirmed = c.sim.hold(0, 500 * MIB);
    place(
        &n.proc,
        unconfirmed.pid,
        &cgroup_file(
            CgroupLayout::V2Systemd,
            Runtime::Containerd,
            Qos::Burstable,
            &uid1,
            &container_id(8),
        ),
    );
    eventually("the over-limit Event saying it is not killed", c, || {
        events(c, "p1")
            .iter()
            .any(|(r, _, n)| r == "VGPUMemoryOverLimit" && n.contains("not killed"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(sidecar.alive());
    assert!(unconfirmed.alive());
    assert!(!events(c, "p1").iter().any(|(_, a, _)| a == "Kill"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_without_the_v3_listing_is_read_through_v2() {
    // GPU_SIM_NVML_NO_V3=1: the _v3 process queries answer FUNCTION_NOT_FOUND, as on a driver before R470.
    let n = start_env("report", "0s", &[("GPU_SIM_NVML_NO_V3", "1")]).await;
    let c = &n.c;
    let id1 = container_id(1);
    let uid1 = run_pod(&n, "p1", 500, &id1, 1_787_220_000).await;
    let _over = c.sim.hold(0, 1000 * MIB);
    place(
        &n.proc,
        _over.pid,
        &cgroup_file(
            CgroupLayout::HybridSystemd,
            Runtime::Docker,
            Qos::Guaranteed,
            &uid1,
            &id1,
        ),
    );
    eventually("the over-limit Event through the v2 listing", c, || {
        events(c, "p1")
            .iter()
            .any(|(r, _, _)| r == "VGPUMemoryOverLimit")
    })
    .await;
    let log = c.log_text();
    assert!(
        log.contains("nvmlDeviceGetComputeRunningProcesses_v2"),
        "the fallback is logged: {log}"
    );
}
