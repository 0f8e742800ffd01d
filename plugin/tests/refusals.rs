//! Bad input at start: each case ends with one clear error line and a non-zero exit, never a panic.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};

fn assert_one_error(status: std::process::ExitStatus, log: &[String], needles: &[&str]) {
    assert!(
        !status.success(),
        "must exit non-zero; log:\n{}",
        log.join("\n")
    );
    assert_ne!(status.code(), None, "must exit, not die from a signal");
    let errors: Vec<&String> = log.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line; log:\n{}",
        log.join("\n")
    );
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "{needle:?} missing from {:?}",
            errors[0]
        );
    }
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "{}",
        log.join("\n")
    );
}

#[test]
fn missing_nvml_library() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = agent_command(&sim, &dir.path().join("kubelet.sock"));
    cmd.env("NVML_LIB", dir.path().join("libnvidia-ml.so.1"))
        .arg("--fail-on-init-error");
    let (status, log) = run_to_exit(cmd);
    assert_one_error(status, &log, &["NVML", "libnvidia-ml.so.1", "driver"]);
}

#[test]
fn zero_gpus() {
    let sim = SimNode::new(NodeSpec::new(vec![])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (status, log) = run_to_exit(agent_command(&sim, &dir.path().join("kubelet.sock")));
    assert_one_error(status, &log, &["no GPU"]);
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing was served"
    );
}

#[test]
fn split_count_of_zero() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = agent_command(&sim, &dir.path().join("kubelet.sock"));
    cmd.args(["--device-split-count", "0"]);
    let (status, log) = run_to_exit(cmd);
    // Refused by the flag parser, before anything starts: clap's usage error (exit 2) names the flag,
    // the value and the accepted range, and nothing is served.
    assert_eq!(status.code(), Some(2), "log:\n{}", log.join("\n"));
    let errors: Vec<&String> = log.iter().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line; log:\n{}",
        log.join("\n")
    );
    for needle in ["'0'", "--device-split-count", "1 to 1000"] {
        assert!(
            errors[0].contains(needle),
            "{needle:?} missing from {:?}",
            errors[0]
        );
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing was served"
    );
}

#[test]
fn memory_factor_that_overflows_the_kubelet_message_names_the_factor_that_fits() {
    let sim = SimNode::new(NodeSpec::uniform(8, GpuSpec::a100_80gb)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (status, log) = run_to_exit(agent_command(&sim, &dir.path().join("kubelet.sock")));
    assert_one_error(status, &log, &["vgpu-memory", "4194304", "gpuMemoryFactor"]);
    let line = log.iter().find(|l| l.contains("ERROR")).unwrap();
    let factor: u32 = line
        .split("gpuMemoryFactor (--gpu-memory-factor) to ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no factor in {line}"));
    assert!(factor > 1);
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing was served"
    );

    // And that factor is indeed accepted.
    let mut cmd = agent_command(&sim, &dir.path().join("kubelet.sock"));
    cmd.args(["--gpu-memory-factor", &factor.to_string()]);
    let mut agent = Agent::spawn(cmd);
    let deadline = std::time::Instant::now() + PATIENCE;
    while sockets_in(dir.path()).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "not serving:\n{}",
            agent.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    agent.signal(15);
    assert!(agent.wait_exit(PATIENCE).success());
}

#[test]
fn malformed_flag_values_are_usage_errors() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--gpu-memory-factor", "ten"],
        vec!["--device-cores-scaling=-2"],
        vec!["--health-recovery-period", "5 fortnights"],
    ] {
        let mut cmd = agent_command(&sim, &dir.path().join("kubelet.sock"));
        cmd.args(&args);
        let (status, log) = run_to_exit(cmd);
        assert!(!status.success(), "{args:?}");
        let text = log.join("\n");
        let flag = args[0].split('=').next().unwrap();
        assert!(text.contains(flag), "{args:?} not named: {text}");
        assert!(!text.contains("panicked"), "{text}");
    }
}
