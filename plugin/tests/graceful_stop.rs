//! The agent's stop (issue #17): on SIGTERM every task it runs ends by itself within the stop bound, nothing is
//! aborted or reported as dying, and no socket of the agent is left behind.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_task_in_time_and_leaves_no_socket_behind() {
    // Hand-off on and CDI on: every task the agent has is running.
    let mut c = cluster(NodeSpec::uniform(2, GpuSpec::t4))
        .args([
            "--device-list-strategy",
            "envvar,cdi-annotations",
            "--cdi-spec-dir",
            "{root}/cdi",
        ])
        .start()
        .await;
    c.wait_registered(PATIENCE).await;
    c.wait_watching().await;
    let broker = c.root().join("vgpulock/hostpid/broker.sock");
    let deadline = std::time::Instant::now() + PATIENCE;
    while !broker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the host-PID broker never served:\n{}",
            c.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        sockets_in(&c.root().join("device-plugins")).len(),
        4,
        "kubelet.sock and our three"
    );

    c.agent.signal(15);
    let status = c.agent.wait_exit(PATIENCE);
    let log = c.log_text();
    assert!(status.success(), "exit {status:?}; log:\n{log}");

    let stopped = log
        .lines()
        .find(|l| l.contains("agent tasks stopped"))
        .unwrap_or_else(|| panic!("no summary of the stop:\n{log}"));
    // metrics, gpu-health, pid-broker, feedback, memory-backstop, cdi-spec, pod-watch, cache-cleanup,
    // node-annotations and kubelet-endpoints.
    assert!(
        stopped.contains("stopped=10") && stopped.contains("aborted=0"),
        "{stopped}\n{log}"
    );
    for bad in [
        "still running at the stop bound",
        "ended on its own",
        "panicked",
        "failed while stopping",
    ] {
        assert!(!log.contains(bad), "{bad:?} in the log:\n{log}");
    }
    assert_eq!(
        sockets_in(&c.root().join("device-plugins")),
        vec![c.kubelet.socket().to_path_buf()],
        "only the kubelet's socket is left"
    );
    assert!(!broker.exists(), "the host-PID broker's socket is left");
}
