//! Flags and paths that cannot work are reported at start (issue 13), with the flag, the value and what is wrong,
//! before any endpoint is registered: a node name the apiserver does not know, and a hook path or cache root
//! that cannot be created. Flag values out of range are refused by the parser itself (unit tests in `cli.rs`);
//! here, that the real binary refuses them before anything starts.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};

/// The one ERROR line of an agent that must have exited non-zero, without registering anything.
fn refusal(status: std::process::ExitStatus, log: &[String], plane: &ControlPlane) -> String {
    assert!(!status.success(), "must exit non-zero:\n{}", log.join("\n"));
    assert!(
        plane.kubelet.registrations().is_empty(),
        "nothing registered before the refusal:\n{}",
        log.join("\n")
    );
    let errors: Vec<&String> = log.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", log.join("\n"));
    errors[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_name_the_apiserver_does_not_know_is_refused_at_start() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), "gpu-node-1").await;
    let cmd = plane.agent_command(&sim, dir.path(), "gpu-node-l");
    let (status, log) = tokio::task::spawn_blocking(move || run_to_exit(cmd))
        .await
        .unwrap();
    let error = refusal(status, &log, &plane);
    for needle in ["--node-name", "\"gpu-node-l\"", "no Node of that name"] {
        assert!(error.contains(needle), "{needle:?} missing from {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_path_that_cannot_be_created_is_refused_at_start_with_the_os_error() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), "gpu-node-1").await;
    // A regular file where the hook directory must be (`agent_command` puts it at <dir>/hook): even root
    // cannot create the directory.
    let hook = dir.path().join("hook");
    std::fs::write(&hook, "").unwrap();
    let cmd = plane.agent_command(&sim, dir.path(), "gpu-node-1");
    let (status, log) = tokio::task::spawn_blocking(move || run_to_exit(cmd))
        .await
        .unwrap();
    let error = refusal(status, &log, &plane);
    for needle in ["--hook-path", hook.to_str().unwrap(), "File exists"] {
        assert!(error.contains(needle), "{needle:?} missing from {error}");
    }
}

#[test]
fn an_out_of_range_flag_is_refused_before_the_metrics_listener_starts() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = agent_command(&sim, &dir.path().join("kubelet.sock"));
    cmd.env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"))
        .args(["--device-split-count", "0"]);
    let (status, log) = run_to_exit(cmd);
    assert_eq!(status.code(), Some(2), "a usage error:\n{}", log.join("\n"));
    let text = log.join("\n");
    for needle in ["--device-split-count", "'0'", "from 1 to"] {
        assert!(text.contains(needle), "{needle:?} missing from {text}");
    }
    assert!(
        !text.contains("serving /metrics"),
        "nothing started before the refusal:\n{text}"
    );
}
