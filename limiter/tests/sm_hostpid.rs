//! Host PIDs for the SM cap: NVML reports host PIDs, a container process sees its own. The
//! gpu-sim simulates a container PID namespace with `GPU_SIM_HOST_PID_OFFSET` (NVML reports
//! `getpid() + offset`); the node agent's broker (crate `vgpu-hostpid`'s server, served here
//! in-process on a private lock directory) is given the same view through its injectable PID map,
//! as the kernel's `SO_PEERCRED` translation gives it on a real node.
//!
//! * Two pods starting at the same moment on one GPU each end up with their own host PID in their
//!   region slot (HAMi-core's before/after NVML diff can swap them), and each is capped from its
//!   own NVML samples.
//! * Without a broker, in a real PID namespace (`unshare --pid`, root only), the limiter knows it
//!   cannot tell its host PID and caps on the device's whole utilisation: the cap still holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod sm_support;

use sm_support::{Load, achieved, node, region};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use vgpu_region::RegionReader;

/// The simulated namespace offset of a process, as the sim reads it (its environment).
fn sim_host_pid(pid: i32) -> Option<i32> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let offset = environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"GPU_SIM_HOST_PID_OFFSET="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i32>().ok())
        .unwrap_or(0);
    Some(pid + offset)
}

#[test]
fn two_pods_starting_together_each_get_their_own_host_pid_from_the_broker() {
    let node = node(1);
    let lock_dir = node.dir().join("vgpulock");
    let listener = vgpu_hostpid::bind(&lock_dir).unwrap();
    let stop = vgpu_hostpid::Stop::new();
    let server = std::thread::spawn({
        let stop = stop.clone();
        move || vgpu_hostpid::serve(listener, Arc::new(sim_host_pid), &stop, |_| {})
    });
    let socket = vgpu_hostpid::socket_path(&lock_dir);

    let pods = [("pod-a", 100_000), ("pod-b", 200_000)];
    let loads: Vec<Load<'_>> = pods
        .iter()
        .map(|&(name, offset)| {
            Load::new(region(&node, name), 4.0)
                .capped(50)
                .sync_every(16)
                .env("GPU_SIM_HOST_PID_OFFSET", &offset.to_string())
                .env("VGPU_HOSTPID_SOCKET", socket.to_str().unwrap())
        })
        .collect();
    let children: Vec<_> = loads.iter().map(|l| l.spawn(&node)).collect();
    let pids: Vec<u32> = children.iter().map(std::process::Child::id).collect();

    // Mid-run, each region's slot carries its own process's NVML-visible PID.
    std::thread::sleep(Duration::from_millis(2500));
    for ((name, offset), pid) in pods.iter().zip(&pids) {
        let snap = RegionReader::open(&region(&node, name))
            .unwrap()
            .snapshot()
            .unwrap();
        let slot = snap
            .processes
            .iter()
            .find(|p| p.pid == *pid as i32)
            .unwrap_or_else(|| panic!("{name}: no slot for pid {pid}: {snap:?}"));
        assert_eq!(slot.hostpid, *pid as i32 + offset, "{name}'s host PID");
        assert!(slot.sm_util[0] > 0, "{name}: no SM utilisation recorded");
    }

    let outcomes: Vec<_> = children.into_iter().map(sm_support::finish).collect();
    for ((name, offset), o) in pods.iter().zip(&outcomes) {
        let host_pid = o.pid + *offset as u32;
        let got = achieved(&node, 0, host_pid, o, Duration::from_millis(1500));
        eprintln!("{name}: achieved {got:.1} %");
        assert!(
            (got - 50.0).abs() <= 10.0,
            "{name}: achieved {got:.1} %, cap 50 %"
        );
    }
    stop.stop();
    server.join().unwrap();
}

#[test]
fn without_a_broker_in_a_pid_namespace_the_cap_holds_on_the_whole_devices_utilisation() {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "`unshare --pid --fork true` failed: this test needs util-linux's unshare (tests/prereqs/install.sh \
         installs it) and root or CAP_SYS_ADMIN to make a PID namespace; run tests/run as root"
    );
    let node = node(1);
    let load = Load::new(region(&node, "ns"), 4.0)
        .capped(30)
        .sync_every(16)
        // Inside the namespace the process is PID 1; the sim reports it as 1 + offset.
        .env("GPU_SIM_HOST_PID_OFFSET", "700000")
        .env("LIBCUDA_LOG_LEVEL", "2");
    let mut cmd = load.command(&node);
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    let mut wrapped = Command::new("unshare");
    wrapped
        .args(["--pid", "--fork", "--"])
        .arg(program)
        .args(args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    cmd = wrapped;
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = sm_support::finish(child);
    assert_eq!(o.pid, 1, "expected to run as PID 1 of a new namespace");
    assert!(
        o.stderr.contains("host PID unknown"),
        "the fallback was not announced: {}",
        o.stderr
    );
    let got = achieved(&node, 0, 700_001, &o, Duration::from_millis(1500));
    eprintln!("in a PID namespace without broker: achieved {got:.1} %");
    assert!((got - 30.0).abs() <= 10.0, "achieved {got:.1} %, cap 30 %");
}
