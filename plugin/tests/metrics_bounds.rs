//! The metrics port cannot take the agent down: 2,000 connections that never send a request leave the agent
//! answering the kubelet (Allocate), holding a bounded number of descriptors, and serving `/metrics` again once
//! the idle ones are closed.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};
const IDLE: usize = 2_000;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_metrics_connections_leave_allocate_working_and_descriptors_bounded() {
    let port = free_port();
    let c = cluster(NodeSpec::uniform(1, GpuSpec::t4))
        .env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"))
        .start()
        .await;
    let agent = &c.agent;
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
    let gpu = c.uuid(0);
    let queue = format!("{gpu},NVIDIA,1000,0:");
    c.bind(
        "p1",
        BindStyle::PatchThenBind,
        &[("cuda", Some(1), Some(1000), None)],
        &queue,
        "1787220000",
    )
    .await;
    let response = c
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
