//! NVML that is not there at start (issue #8): the agent says which library it tried, NVML's error and the
//! usual causes, reports not-ready with a metric saying why, retries with backoff, and when NVML appears it
//! registers with the kubelet without a restart.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};

fn wait_until(what: &str, agent: &Agent, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics");
    vgpu_metrics::find_value(&body, name, labels)
}

/// While NVML is missing: the diagnosis is logged, /readyz is 503, the metrics say why, nothing registered.
fn assert_waiting(
    agent: &Agent,
    kubelet: &harness::FakeKubelet,
    port: u16,
    reason: &str,
    library: &str,
) {
    wait_until("the NVML diagnosis is logged", agent, || {
        agent.log_text().contains("cannot initialise NVML")
    });
    let log = agent.log_text();
    for needle in [
        library,
        "driver is not installed",
        "\"default-runtime\": \"nvidia\"",
        "default_runtime_name = \"nvidia\"",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} missing from the log:\n{log}"
        );
    }
    wait_until("the metrics say why", agent, || {
        metric(
            port,
            "vgpu_agent_nvml_error",
            &[("reason", reason), ("library", library)],
        ) == Some(1.0)
    });
    assert_eq!(metric(port, "vgpu_agent_nvml_up", &[]), Some(0.0));
    let (status, body) = http_get(port, "/readyz");
    assert!(status.contains("503"), "{status}");
    assert!(
        body.contains("NVML unavailable") && body.contains(reason),
        "{body}"
    );
    assert!(
        http_get(port, "/healthz").0.contains("200"),
        "alive while waiting"
    );
    assert!(
        kubelet.registrations().is_empty(),
        "nothing registered without NVML"
    );
}

/// After NVML appears: registered, ready, the error metric gone, and the same process.
async fn assert_recovered(agent: &mut Agent, kubelet: &harness::FakeKubelet, port: u16, pid: u32) {
    kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert_eq!(agent.pid(), pid);
    assert!(
        agent.log_text().contains("NVML is available now"),
        "{}",
        agent.log_text()
    );
    wait_until("ready once registered", agent, || {
        http_get(port, "/readyz").0.contains("200")
    });
    let (_, body) = http_get(port, "/metrics");
    assert_eq!(
        vgpu_metrics::find_value(&body, "vgpu_agent_nvml_up", &[]),
        Some(1.0)
    );
    assert!(!body.contains("vgpu_agent_nvml_error{"), "{body}");
    // Still one process: it did not exit and get restarted.
    agent.signal(15);
    assert!(agent.wait_exit(PATIENCE).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_nvml_library_is_diagnosed_then_picked_up_without_a_restart() {
    let sim = SimNode::new(NodeSpec::uniform(2, GpuSpec::t4)).unwrap();
    let (dir, kubelet) = kubelet().await;
    let lib_dir = dir.path().join("driver/lib64");
    let lib = lib_dir.join("libnvidia-ml.so.1");
    let port = free_port();
    let mut cmd = agent_command(&sim, kubelet.socket());
    cmd.env("NVML_LIB", &lib)
        .env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"));
    let mut agent = Agent::spawn(cmd);
    let pid = agent.pid();
    let library = lib.display().to_string();
    assert_waiting(&agent, &kubelet, port, "library_not_loadable", &library);

    // The driver gets installed (e.g. by the GPU operator) while the agent waits.
    std::fs::create_dir_all(&lib_dir).unwrap();
    std::os::unix::fs::symlink(gpu_sim::nvml_library(), &lib).unwrap();
    assert_recovered(&mut agent, &kubelet, port, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_is_not_loaded_is_diagnosed_then_picked_up_without_a_restart() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let (dir, kubelet) = kubelet().await;
    // The gpu-sim answers DRIVER_NOT_LOADED while its node file cannot be opened, like NVML on a node whose
    // kernel module is not loaded yet.
    let node_file = dir.path().join("later.node");
    let port = free_port();
    let mut cmd = agent_command(&sim, kubelet.socket());
    cmd.env("GPU_SIM_NODE", &node_file)
        .env("GPU_SIM_CONTROL", sim.control_file())
        .env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"));
    let mut agent = Agent::spawn(cmd);
    let pid = agent.pid();
    let library = gpu_sim::nvml_library().display().to_string();
    assert_waiting(&agent, &kubelet, port, "driver_not_loaded", &library);
    assert!(agent.log_text().contains("kernel driver is not loaded"));

    std::fs::copy(sim.node_file(), &node_file).unwrap();
    assert_recovered(&mut agent, &kubelet, port, pid).await;
}
