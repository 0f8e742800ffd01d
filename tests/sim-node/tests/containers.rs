//! The node in a real container engine (see `sim_node::containers`): the shipped image built from
//! `docker/Dockerfile`, the DaemonSet's init and agent containers run as the manifest describes them, and
//! workload containers that get the limiter only through Allocate's mounts. The run happens once per test
//! binary; each test checks one promise of it.
//!
//! These tests need Docker, root and the images `docker/e2e.sh` builds, so they are ignored by a plain
//! `cargo test`; `docker/e2e.sh` (which `tests/run` and CI call) runs them with `--ignored`. Run alone
//! without that script they fail, naming it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use sim_node::containers::{self, E2eOptions, E2eReport, WorkloadRun};

/// The example's limits (volcano-config/examples/pod-one-vgpu.yaml).
const MEMORY_MIB: f64 = 3000.0;
const SM_LIMIT: f64 = 30.0;

fn report() -> &'static E2eReport {
    static REPORT: OnceLock<Result<E2eReport, String>> = OnceLock::new();
    let result = REPORT.get_or_init(|| {
        let opts = E2eOptions::from_env().map_err(|e| format!("{e:#}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime
            .block_on(containers::run(&opts))
            .map_err(|e| format!("{e:#}"))
    });
    match result {
        Ok(report) => report,
        Err(message) => panic!("the container run failed: {message}"),
    }
}

fn value(run: &WorkloadRun, step: &str, key: &str) -> f64 {
    run.report
        .get(step)
        .and_then(|f| f.get(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the program in {} reported no {step}.{key}: {:?}",
                run.image, run.report
            )
        })
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn init_container_installs_then_leaves_an_identical_library_alone() {
    let r = report();
    assert!(
        r.init[0].output.contains("libvgpu.so: installed"),
        "first run: {}",
        r.init[0].output
    );
    assert!(
        r.init[1].output.contains("libvgpu.so: up to date")
            && r.init[1].output.contains("ld.so.preload: up to date"),
        "second run: {}",
        r.init[1].output
    );
    assert_eq!(
        r.init[0].libvgpu_inode, r.init[1].libvgpu_inode,
        "a second install must not replace an identical library"
    );
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn agent_container_runs_as_the_manifest_says() {
    let r = report();
    let i = &r.agent_inspect;
    assert_eq!(i["ReadonlyRootfs"], true, "{i}");
    assert_eq!(i["Privileged"], false, "{i}");
    assert_eq!(i["PidMode"], "host", "{i}");
    assert_eq!(i["User"], "0", "{i}");
    assert_eq!(i["CapAdd"], serde_json::json!(["DAC_OVERRIDE"]), "{i}");
    assert_eq!(i["CapDrop"], serde_json::json!(["ALL"]), "{i}");
    let err = r
        .agent_root_write
        .as_ref()
        .expect_err("writing to the agent's root filesystem must fail");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(
        r.sockets_while_running.len(),
        3,
        "three endpoints: {:?}",
        r.sockets_while_running
    );
    eprintln!(
        "containerised agent: docker run to three resources registered in {} ms",
        r.start_to_registered.as_millis()
    );
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn the_pod_is_allocated_through_the_containerised_agent() {
    let r = report();
    assert_eq!(r.bind_phase.as_deref(), Some("success"));
    let a = &r.allocated[0];
    assert!(
        a.mounts.iter().any(|(c, _, _)| c == "/etc/ld.so.preload"),
        "{:?}",
        a.mounts
    );
    assert!(!a.envs.contains_key("LD_PRELOAD"));
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn workloads_are_refused_at_the_memory_cap_in_every_base_image() {
    let r = report();
    assert!(!r.workloads.is_empty());
    for w in &r.workloads {
        assert_eq!(value(w, "device", "total_mib"), MEMORY_MIB, "{}", w.image);
        assert_eq!(
            value(w, "alloc", "rc"),
            2.0,
            "{}: CUDA_ERROR_OUT_OF_MEMORY",
            w.image
        );
        let held = value(w, "alloc", "held_mib");
        assert!(held > 0.0 && held <= MEMORY_MIB, "{}: held {held}", w.image);
    }
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn workloads_are_paced_at_the_sm_cap() {
    let r = report();
    for w in &r.workloads {
        let pct = value(w, "kernels", "nvml_gpu_pct");
        assert!(
            pct > 0.0 && pct <= SM_LIMIT + 10.0,
            "{}: {pct} % over the last second under a {SM_LIMIT} % cap",
            w.image
        );
    }
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn the_broker_records_the_host_pid_across_a_real_pid_namespace() {
    let r = report();
    for w in &r.workloads {
        let host_pid = w.host_pid.expect("docker reports the workload's pid");
        assert!(
            w.region_pids.contains(&1),
            "{}: inside its PID namespace the program is PID 1: {:?}",
            w.image,
            w.region_pids
        );
        assert!(
            w.region_host_pids.contains(&host_pid),
            "{}: the region records host PIDs {:?}, the program's is {host_pid}",
            w.image,
            w.region_host_pids
        );
    }
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn metrics_show_the_workloads_pod() {
    let r = report();
    let w = &r.workloads[0];
    assert!(
        w.metrics
            .iter()
            .any(|l| l.contains("pod=\"") && !l.starts_with('#')),
        "{:?}",
        w.metrics
    );
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn a_second_process_of_the_container_shares_the_cap() {
    let r = report();
    let first = &r.workloads[0];
    let second = first.second.as_deref().expect("a second process ran");
    // The first holds the cap; the second process finds nothing left, not even for its context.
    let error = second.report.get("error");
    assert_eq!(
        error.and_then(|e| e.get("name")).map(String::as_str),
        Some("CUDA_ERROR_OUT_OF_MEMORY"),
        "the second process: {:?}",
        second.report
    );
    let held = value(first, "alloc", "held_mib");
    assert!(held > 0.0);
    // NVML in the container sees the memory the first holds.
    let nvml = r.nvml_client.as_ref().expect("the pynvml check ran");
    let used_mib = nvml["used"].as_u64().unwrap() as f64 / (1024.0 * 1024.0);
    assert!(
        used_mib >= held,
        "pynvml in the container: {used_mib} MiB used while the program held {held} MiB"
    );
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn a_restarted_container_gets_the_whole_cap_back() {
    let r = report();
    let first = &r.workloads[0];
    let restarted = first
        .restarted
        .as_deref()
        .expect("the container was restarted");
    assert_eq!(
        value(restarted, "device", "free_mib"),
        value(first, "device", "free_mib"),
        "a restarted container must not be charged for the dead one's memory: {:?}",
        restarted.report
    );
    assert_eq!(
        value(restarted, "alloc", "held_mib"),
        value(first, "alloc", "held_mib")
    );
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn cuda_disable_control_turns_the_limiter_off() {
    let r = report();
    let total = value(&r.uncontrolled, "device", "total_mib");
    assert_eq!(
        total, r.gpu.memory_mib as f64,
        "with CUDA_DISABLE_CONTROL=true the program sees the whole GPU"
    );
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn nvml_clients_in_the_workload_see_the_cap() {
    let r = report();
    let nvml = r
        .nvml_client
        .as_ref()
        .expect("VGPU_E2E_PYNVML names nvidia-ml-py's pynvml (docker/e2e.sh sets it)");
    assert_eq!(
        nvml["total"].as_u64(),
        Some(3000 * 1024 * 1024),
        "pynvml's nvmlDeviceGetMemoryInfo: {nvml}"
    );
    assert!(
        r.nvml_client_stderr.trim().is_empty(),
        "pynvml printed on stderr: {}",
        r.nvml_client_stderr
    );
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn stopping_the_agent_container_removes_its_sockets() {
    let r = report();
    assert!(
        r.sockets_after_stop.is_empty(),
        "left behind: {:?}",
        r.sockets_after_stop
    );
    assert_eq!(r.agent_exit_code, "0", "the agent exits cleanly on SIGTERM");
}

/// The probe's `key=value` lines.
fn probe_fields(stdout: &str) -> std::collections::BTreeMap<&str, &str> {
    stdout.lines().filter_map(|l| l.split_once('=')).collect()
}

/// Whether a glibc version string (`2.31`) is older than 2.34, where libpthread and libdl merged into libc.
fn before_2_34(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap()) < (2, 34)
}

#[test]
#[ignore = "needs Docker and the images docker/e2e.sh builds: run docker/e2e.sh"]
fn processes_that_load_neither_libpthread_nor_libdl_run_as_without_the_limiter() {
    let r = report();
    let mut old_glibc_images = 0;
    for image in r.workloads.iter().map(|w| w.image.as_str()) {
        let run = |suffix: &str| {
            r.tools
                .iter()
                .find(|t| t.image == image && t.command.ends_with(suffix))
                .unwrap_or_else(|| panic!("{image}: no run of {suffix}"))
        };
        for (suffix, stdout) in [
            ("/bin/true", ""),
            ("echo sh ok", "/\nsh ok\n"),
            ("/plain", "plain ok\n"),
        ] {
            let t = run(suffix);
            assert_eq!(t.exit_code, Some(0), "{image}: {}: {}", t.command, t.stderr);
            assert_eq!(t.stdout, stdout, "{image}: {}", t.command);
            assert_eq!(t.stderr, "", "{image}: {} wrote to stderr", t.command);
        }
        let probe = run("/probe");
        assert_eq!(
            probe.exit_code,
            Some(0),
            "{image}: the probe: {}{}",
            probe.stdout,
            probe.stderr
        );
        let f = probe_fields(&probe.stdout);
        let glibc = f.get("glibc").copied().unwrap_or_default();
        // The forked child ran (no signal) and got CUDA_ERROR_NOT_INITIALIZED: without a driver on the old
        // glibc, and from a driver that does not survive a fork (the gpu-sim, like NVIDIA's) on the new one.
        assert_eq!(f.get("fork_child_cuInit"), Some(&"3"), "{image}: {f:?}");
        if before_2_34(glibc) {
            old_glibc_images += 1;
            // No dlvsym: no real dlsym to find; our dlsym answers NULL for everything (the stub's 0x57ab
            // would mean it was not interposed), and the driver cannot be opened: not initialised (3),
            // never a call into a NULL import.
            assert_eq!(f.get("dlsym_printf"), Some(&"null"), "{image}: {f:?}");
            assert_eq!(f.get("dlsym_cuInit"), Some(&"null"), "{image}: {f:?}");
            assert_eq!(f.get("cuInit"), Some(&"3"), "{image}: {f:?}");
            assert_eq!(f.get("cuMemAlloc"), Some(&"3"), "{image}: {f:?}");
        } else {
            // libc.so.6 has everything: the usual answers, the gpu-sim driver initialises.
            assert_eq!(f.get("dlsym_printf"), Some(&"set"), "{image}: {f:?}");
            assert_eq!(f.get("dlsym_cuInit"), Some(&"set"), "{image}: {f:?}");
            assert_eq!(f.get("cuInit"), Some(&"0"), "{image}: {f:?}");
        }
    }
    assert!(
        old_glibc_images > 0,
        "no workload image has a glibc before 2.34: nothing was proven (docker/e2e.sh adds bullseye)"
    );
}
