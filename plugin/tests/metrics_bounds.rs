//! The metrics port cannot take the agent down: 2,000 connections that never send a request leave the agent
//! answering the kubelet (Allocate), holding a bounded number of descriptors, and serving `/metrics` again once
//! the idle ones are closed.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const IDLE: usize = 2_000;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_metrics_connections_leave_allocate_working_and_descriptors_bounded() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), NODE).await;
    let client = plane.client().await;
    let port = free_port();
    let mut cmd = plane.agent_command(&sim, dir.path(), NODE);
    cmd.env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"));
    let agent = Agent::spawn(cmd);
    plane
        .kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let baseline = open_fds(agent.pid());

    // 2,000 connections that send nothing (and keep them open).
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = open_fds(agent.pid());
    assert!(
        held <= baseline + vgpu_metrics::MAX_CONNECTIONS + 16,
        "the agent holds {held} descriptors with {IDLE} idle metrics connections (baseline {baseline}, cap {})",
        vgpu_metrics::MAX_CONNECTIONS
    );

    // The kubelet's Allocate still works meanwhile.
    let gpu = sim.spec().gpus[0].uuid.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p1", "namespace": "default"},
        "spec": {"schedulerName": "volcano", "containers": [{"name": "cuda", "image": "cuda", "resources": {"limits": {
            "volcano.sh/vgpu-number": "1", "volcano.sh/vgpu-memory": "1000"}}}]},
        "status": {"phase": "Pending"}
    });
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();
    let queue = format!("{gpu},NVIDIA,1000,0:");
    let patch = json!({"metadata": {"annotations": {
        "volcano.sh/vgpu-node": NODE, "volcano.sh/vgpu-time": "1787220000", "volcano.sh/bind-time": "1787220000",
        "volcano.sh/bind-phase": "allocating", "volcano.sh/vgpu-ids-new": queue,
        "volcano.sh/devices-to-allocate": queue}}});
    pods.patch("p1", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p1"},
                         "target": {"kind": "Node", "name": NODE}});
    pods.create_subresource::<Value, Value>("binding", "p1", &PostParams::default(), &binding)
        .await
        .unwrap();
    let response = plane
        .kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .unwrap_or_else(|s| panic!("Allocate failed: {}\n{}", s.message(), agent.log_text()));
    assert_eq!(
        response.container_responses[0].envs["CUDA_DEVICE_MEMORY_LIMIT_0"],
        "1000m"
    );

    // The idle connections are closed by the agent after the header-read timeout, and /metrics answers again
    // while the 2,000 sockets are still open on this side.
    let deadline = Instant::now() + vgpu_metrics::HEADER_READ_TIMEOUT + Duration::from_secs(10);
    let mut closed = 0;
    for mut stream in idle.iter() {
        stream
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        // A 408 response before the close is fine; the close is what counts.
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, IDLE, "every idle connection is closed by the agent");
    let (status, body) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("vgpu_agent_build"), "{body}");
    drop(idle);
}
