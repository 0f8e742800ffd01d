//! The agent under faults, through the real binary: an apiserver that hangs, resets, answers 500 or is slow
//! (at start and while the agent serves), watches that go silent, a kubelet that deletes our sockets while we
//! start them, SIGTERM in the middle of an Allocate, and configuration that contradicts itself.
//!
//! The agent runs with `--apiserver-timeout 1s` (hidden; 10 s in production), so its bounds are: a request
//! fails after 1 s without an answer, watches ask for 6 s and are given up after 7 s of silence, and a write
//! that failed is retried at most 5 s later. Every recovery below is asserted within those bounds plus a
//! stated margin for the 2-core test machine.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use harness::apiserver::FakeApiServer;
use serde_json::json;

const NODE: &str = "node-a";
const REGISTER: &str = "volcano.sh/node-vgpu-register";
/// The agent's request bound in these tests.
const REQUEST: Duration = Duration::from_secs(1);
/// What the agent derives from it: the longest silence a watch gets (6 × request + request).
const WATCH_SILENCE: Duration = Duration::from_secs(7);
/// The longest pause between retries of a failed write or start-up read.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Scheduling noise on a shared 2-core machine (process start, NVML discovery, the kubelet's dial-back).
const SLACK: Duration = Duration::from_secs(4);

/// The fixture's cluster: a control plane and an agent bound to `NODE`.
type Node = Cluster;

/// The agent started with `args` after `setup` prepared the apiserver, not waited for.
async fn spawn(gpus: u32, args: &[&str], setup: impl FnOnce(&FakeApiServer, &Path)) -> Node {
    spawn_with_timeout(gpus, "1s", args, setup).await
}

/// With `--apiserver-timeout` at `timeout` (10s is production's).
async fn spawn_with_timeout(
    gpus: u32,
    timeout: &str,
    args: &[&str],
    setup: impl FnOnce(&FakeApiServer, &Path),
) -> Node {
    cluster(NodeSpec::uniform(gpus, GpuSpec::t4))
        .args(["--apiserver-timeout", timeout])
        .args(args)
        .ready(Ready::Spawned)
        .start_with(setup)
        .await
}

/// What these tests read of a node.
trait NodeExt {
    /// The register annotation as stored (read in-process: the HTTP side may be hung on purpose).
    fn register(&self) -> Option<String>;
    fn gpu_healthy_in_register(&self, gpu: usize) -> Option<bool>;
    fn alive(&mut self) -> bool;
}

impl NodeExt for Node {
    fn register(&self) -> Option<String> {
        self.api
            .get_object("nodes", None, NODE)?
            .pointer("/metadata/annotations")?
            .get(REGISTER)?
            .as_str()
            .map(str::to_owned)
    }

    fn gpu_healthy_in_register(&self, gpu: usize) -> Option<bool> {
        let uuid = &self.sim.spec().gpus[gpu].uuid;
        let register = self.register()?;
        let entry = register.split(':').find(|e| e.starts_with(uuid.as_str()))?;
        entry.split(',').nth(4).map(|h| h == "true")
    }

    fn alive(&mut self) -> bool {
        self.agent.try_status().is_none()
    }
}

/// A device config map in `kube-system` holding `yaml`.
fn device_config(api: &FakeApiServer, yaml: &str) {
    api.create(
        "/api/v1/namespaces/kube-system/configmaps",
        json!({"metadata": {"name": "volcano-vgpu-device-config", "namespace": "kube-system"},
               "data": {"device-config.yaml": yaml}}),
    )
    .unwrap();
}

// ---- never a hang: start-up ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_a_hung_apiserver_says_so_and_recovers() {
    let mut node = spawn(1, &["--apiserver-wait", "60s"], |api, _| api.set_hung(true)).await;
    // Nothing is answered: the agent must say what it waits for, and keep waiting.
    node.wait_for(
        REQUEST + SLACK,
        "a log line saying what start-up waits for",
        |n| {
            n.agent.log().iter().any(|l| {
                l.contains("waiting for the apiserver") && l.contains("volcano-vgpu-device-config")
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(node.alive(), "gave up early:\n{}", node.agent.log_text());
    assert!(node.kubelet.registrations().is_empty());

    node.api.set_hung(false);
    let answered = Instant::now();
    // A read caught in the hang fails within one request bound; the next try is at most RETRY_MAX later.
    node.wait_registered(REQUEST + RETRY_MAX + SLACK).await;
    eprintln!(
        "registered {:?} after the apiserver answered again",
        answered.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_gives_up_after_apiserver_wait_and_says_on_what() {
    let mut node = spawn(1, &["--apiserver-wait", "3s"], |api, _| api.set_hung(true)).await;
    let started = Instant::now();
    let status = node
        .agent
        .wait_exit(Duration::from_secs(3) + REQUEST + SLACK);
    assert!(!status.success());
    eprintln!("gave up after {:?}", started.elapsed());
    let log = node.agent.log_text();
    assert!(
        log.contains("--apiserver-wait")
            && log.contains("config map kube-system/volcano-vgpu-device-config"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_rides_out_a_reset_a_500_a_hang_and_a_slow_apiserver() {
    let node = spawn(1, &["--apiserver-wait", "60s"], |api, _| {
        api.reset_next("GET", "/configmaps/volcano-vgpu-device-config");
        api.fail_next("GET", "/configmaps/volcano-vgpu-device-config", 500);
        api.hang_next("GET", "/configmaps/volcano-vgpu-device-config");
        api.set_latency(Duration::from_millis(300));
    })
    .await;
    // Three failed reads: a reset and a 500 at once, a hang after one request bound, with backoff between.
    node.wait_registered(REQUEST + Duration::from_secs(2) + SLACK * 2)
        .await;
    let log = node.agent.log_text();
    assert!(
        log.matches("waiting for the apiserver").count() >= 3,
        "{log}"
    );
}

// ---- never a hang: while serving ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_change_during_a_hang_reaches_the_node_once_the_apiserver_answers() {
    let node = spawn(2, &["--health-recovery-period", "1h"], |_, _| {}).await;
    node.wait_registered(PATIENCE).await;
    node.wait_for(PATIENCE, "the register annotation", |n| {
        n.gpu_healthy_in_register(1) == Some(true)
    })
    .await;
    while node.api.active_watches() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    node.api.set_hung(true);
    node.sim
        .inject_xid(&node.sim.spec().gpus[1].uuid, 79)
        .unwrap();
    // Longer than a watch's own timeout: the open watches are caught in the hang too.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        node.gpu_healthy_in_register(1),
        Some(true),
        "nothing can be written while the apiserver hangs"
    );
    let requests_before = node.api.requests().len();
    node.api.set_hung(false);
    let answered = Instant::now();

    node.wait_for(
        REQUEST + RETRY_MAX + SLACK,
        "GPU 1 unhealthy in the register annotation",
        |n| n.gpu_healthy_in_register(1) == Some(false),
    )
    .await;
    eprintln!(
        "register right {:?} after the hang ended",
        answered.elapsed()
    );
    // The pod watch was caught in the hang: it is given up and started again.
    node.wait_for(
        WATCH_SILENCE + RETRY_MAX + SLACK,
        "a new pod watch after the hang",
        |n| {
            n.api.requests()[requests_before..]
                .iter()
                .any(|r| r.is_watch() && r.path == "/api/v1/pods")
        },
    )
    .await;
    eprintln!(
        "pod watch restarted {:?} after the hang ended",
        answered.elapsed()
    );
}

/// The case with the production bounds: a 20 s hang while a GPU fails. The register annotation is
/// right within one 10 s request and one 5 s retry pause of the apiserver answering again (it was over four
/// minutes before the bounds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_s_hang_during_an_xid_with_production_bounds_is_repaired_within_15_s() {
    let node = spawn_with_timeout(2, "10s", &["--health-recovery-period", "1h"], |_, _| {}).await;
    node.wait_registered(PATIENCE).await;
    node.wait_for(PATIENCE, "the register annotation", |n| {
        n.gpu_healthy_in_register(1) == Some(true)
    })
    .await;
    node.api.set_hung(true);
    node.sim
        .inject_xid(&node.sim.spec().gpus[1].uuid, 79)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    node.api.set_hung(false);
    let answered = Instant::now();
    node.wait_for(
        Duration::from_secs(10) + RETRY_MAX + SLACK,
        "GPU 1 unhealthy in the register annotation",
        |n| n.gpu_healthy_in_register(1) == Some(false),
    )
    .await;
    eprintln!(
        "production bounds: register right {:?} after a 20 s hang ended",
        answered.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_watch_is_given_up_and_a_change_behind_it_is_repaired() {
    let node = spawn(1, &[], |_, _| {}).await;
    node.wait_registered(PATIENCE).await;
    node.wait_for(PATIENCE, "the register annotation", |n| {
        n.register().is_some()
    })
    .await;
    while node.api.active_watches() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = node.register().unwrap();
    // A proxy loses the streams: the connections stay up, nothing more arrives.
    node.api.silence_watches();
    node.api
        .patch_object(
            "nodes",
            None,
            NODE,
            json!({"metadata": {"annotations": {REGISTER: "overwritten"}}}),
        )
        .unwrap();
    let changed = Instant::now();
    node.wait_for(
        WATCH_SILENCE + RETRY_MAX + SLACK,
        "the register annotation written again",
        |n| n.register().as_deref() == Some(written.as_str()),
    )
    .await;
    eprintln!("repaired {:?} after the change", changed.elapsed());
}

// ---- never an avoidable exit ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_deleted_while_the_endpoints_start_100_times_never_stop_the_agent() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let (_dir, mut kubelet) = kubelet().await;
    let mut agent = Agent::spawn(agent_command(&sim, kubelet.socket()));
    kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));

    // A second party (a kubelet still cleaning up) deletes our number socket the moment it appears, once per
    // round: often between the agent's bind and its self-check.
    let socket = kubelet.dir().join("nvidia-vgpu-number.sock");
    let armed = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = {
        let (armed, deleted, stop) = (armed.clone(), deleted.clone(), stop.clone());
        std::thread::spawn(move || {
            // Armed: first see the restart remove the old socket, then delete the new one as it appears.
            let mut seen_gone = false;
            while !stop.load(Ordering::Relaxed) {
                if !armed.load(Ordering::Acquire) {
                    seen_gone = false;
                } else if !seen_gone {
                    seen_gone = std::fs::symlink_metadata(&socket).is_err();
                } else if std::fs::remove_file(&socket).is_ok() {
                    armed.store(false, Ordering::Release);
                    deleted.fetch_add(1, Ordering::Relaxed);
                }
                std::hint::spin_loop();
            }
        })
    };
    let rounds = 100;
    let started = Instant::now();
    for round in 0..rounds {
        armed.store(true, Ordering::Release);
        // The fake's restart fails when a socket it listed is gone before it removes it (the agent may be
        // re-serving after an earlier deletion); a second restart finishes the job, as the real kubelet, which
        // ignores such errors, would have.
        if kubelet.restart().await.is_err() {
            kubelet.restart().await.unwrap();
        }
        let result = kubelet.wait_for_resources(&ALL, PATIENCE).await;
        assert!(
            agent.try_status().is_none(),
            "the agent exited in round {round}:\n{}",
            agent.log_text()
        );
        result.unwrap_or_else(|e| panic!("round {round}: {e}\n{}", agent.log_text()));
    }
    stop.store(true, Ordering::Relaxed);
    deleter.join().unwrap();
    let log = agent.log_text();
    let retried = log.matches("cannot serve the endpoints yet").count();
    eprintln!(
        "{rounds} rounds in {:?}; {} sockets deleted behind the agent, {retried} self-checks failed and retried",
        started.elapsed(),
        deleted.load(Ordering::Relaxed)
    );
    // Without a self-check that failed, the race was never hit and this test would prove nothing.
    assert!(
        retried > 0,
        "no self-check failed in {rounds} rounds:\n{log}"
    );
    // Settled: all three sockets there, and the agent still up.
    kubelet
        .wait_until(PATIENCE, "the agent serving after the rounds", |_| {
            sockets_in(kubelet.dir()).len() == 4
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert!(agent.try_status().is_none(), "{log}");
}

/// A pod Volcano has bound to `NODE` for one container with 1 vGPU of 1000 MiB on `uuid`.
async fn bind_one_vgpu(node: &Node, name: &str, uuid: &str) {
    let queue = format!("{uuid},NVIDIA,1000,0:");
    node.bind(
        name,
        BindStyle::PatchThenBind,
        &[("cuda", Some(1), Some(1000), None)],
        &queue,
        "1787220000",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_allocate_finishes_it_before_stopping() {
    let mut node = spawn(1, &[], |_, _| {}).await;
    node.wait_registered(PATIENCE).await;
    let uuid = node.sim.spec().gpus[0].uuid.clone();
    bind_one_vgpu(&node, "p1", &uuid).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every apiserver answer now takes 800 ms: the Allocate is several of them long.
    node.api.set_latency(Duration::from_millis(800));
    let id = format!("{uuid}-0");
    let ids = [id.as_str()];
    let allocate = node.kubelet.allocate(NUMBER, &ids);
    let signal = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        node.agent.signal(15);
        Instant::now()
    };
    let (answer, signalled) = tokio::join!(allocate, signal);
    let answer = answer.unwrap().unwrap_or_else(|s| {
        panic!(
            "the kubelet's Allocate failed: {}\n{}",
            s.message(),
            node.agent.log_text()
        )
    });
    eprintln!("Allocate answered {:?} after SIGTERM", signalled.elapsed());
    let envs = &answer.container_responses[0].envs;
    assert_eq!(
        envs.get("CUDA_DEVICE_MEMORY_LIMIT_0").map(String::as_str),
        Some("1000m")
    );
    let status = node.agent.wait_exit(PATIENCE);
    assert!(status.success(), "{}", node.agent.log_text());
    node.api.set_latency(Duration::ZERO);
    let pod = node.api.get_object("pods", Some("default"), "p1").unwrap();
    assert_eq!(
        pod.pointer("/metadata/annotations/volcano.sh~1bind-phase"),
        Some(&json!("success")),
        "the kubelet and the pod's annotations agree"
    );
}

// ---- configuration that contradicts itself ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_values_are_refused_by_key_and_the_good_keys_still_apply() {
    let yaml = "nvidia:\n  deviceSplitCount: 100000\n  deviceCoreScaling: 1000\n  deviceMemoryScaling: 2\n";
    let mut node = spawn(2, &[], |api, _| device_config(api, yaml)).await;
    let views = node
        .kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.agent.log_text()));
    assert!(node.alive());
    assert_eq!(
        views[NUMBER].devices.len(),
        2 * 10,
        "split back at its default"
    );
    assert_eq!(
        views[CORES].devices.len(),
        2 * 100,
        "scaling back at its default"
    );
    assert_eq!(
        views[MEMORY].devices.len(),
        2 * 2 * 15360,
        "the good key of the same document applies"
    );
    let log = node.agent.log_text();
    for key in ["nvidia.deviceSplitCount", "nvidia.deviceCoreScaling"] {
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains(key) && l.contains("expected")),
            "{key}: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_ends_of_the_ranges_are_served() {
    let yaml = "nvidia:\n  deviceSplitCount: 1000\n  deviceCoreScaling: 10\n";
    let mut node = spawn(8, &[], |api, _| device_config(api, yaml)).await;
    let views = node
        .kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.agent.log_text()));
    assert!(node.alive());
    assert_eq!(views[NUMBER].devices.len(), 8 * 1000);
    assert_eq!(views[CORES].devices.len(), 8 * 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resources_under_one_name_are_refused_and_the_defaults_served() {
    let yaml = "nvidia:\n  resourceMemoryName: volcano.sh/vgpu-number\n";
    let mut node = spawn(1, &[], |api, _| device_config(api, yaml)).await;
    node.wait_registered(PATIENCE).await;
    assert!(node.alive());
    assert_eq!(node.kubelet.resource(MEMORY).unwrap().devices.len(), 15360);
    let log = node.agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("nvidia.resourceMemoryName")
            && l.contains("nvidia.resourceCountName")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factor_that_leaves_a_gpu_without_memory_is_refused_at_start() {
    let mut node = spawn(1, &[], |api, _| {
        device_config(api, "nvidia:\n  gpuMemoryFactor: 20000\n")
    })
    .await;
    let status = node.agent.wait_exit(PATIENCE);
    assert!(!status.success());
    let log = node.agent.log_text();
    assert!(
        log.contains("gpuMemoryFactor") && log.contains("20000") && log.contains("smallest GPU"),
        "{log}"
    );
    assert!(node.kubelet.registrations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factor_flag_that_contradicts_the_config_map_is_refused_and_the_scheduler_s_factor_served()
 {
    let mut node = spawn(1, &["--gpu-memory-factor", "5"], |api, _| {
        device_config(api, "nvidia:\n  gpuMemoryFactor: 10\n")
    })
    .await;
    node.wait_registered(PATIENCE).await;
    assert!(node.alive());
    assert_eq!(
        node.kubelet.resource(MEMORY).unwrap().devices.len(),
        15360 / 10,
        "memory in the config map's units, which pods ask in"
    );
    let log = node.agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("--gpu-memory-factor")
            && l.contains("gpuMemoryFactor is 10")),
        "{log}"
    );
}
