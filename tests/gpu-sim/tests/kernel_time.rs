//! The kernel time model (README "Kernel time model"): kernels take the modelled time on a
//! timeline shared by every process of the node, launches are asynchronous with a bounded queue,
//! synchronisation waits, and the fake NVML's utilisation and per-process samples come from the
//! same accounting.
//!
//! `ctests/kernel_time.c` (linked with `-lcuda -lnvidia-ml`) runs one scenario per invocation
//! and prints `key=value` lines with `CLOCK_REALTIME` times; the assertions compare them with the
//! model's own accounting read through [`gpu_sim::Timeline`] (busy nanoseconds are exact), and
//! only use wall-clock bounds the model guarantees (a wait never ends early; a queue holds at
//! most so much), never "this took less than".
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use gpu_sim::{GpuSpec, NodeSpec, SimNode, Timeline};

const MS: u64 = 1_000_000;

fn program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        common::compile_ctest(
            "kernel_time.c",
            "kernel-time",
            &["-pthread"],
            &["-lcuda", "-lnvidia-ml"],
        )
    })
}

fn command(node: &SimNode, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(program());
    cmd.env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("GPU_SIM_WAVE_NS")
        .env_remove("GPU_SIM_GRAPH_NS")
        .env_remove("GPU_SIM_HOST_PID_OFFSET")
        .envs([gpu_sim::library_path_env()])
        .envs(node.env())
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null());
    cmd
}

type Values = HashMap<String, Vec<String>>;

fn parse(stdout: &str) -> Values {
    let mut values = Values::new();
    for (k, v) in stdout.lines().filter_map(|l| l.split_once('=')) {
        values.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    values
}

fn num(values: &Values, key: &str) -> u64 {
    values
        .get(key)
        .and_then(|v| v.first())
        .unwrap_or_else(|| panic!("no {key} in {values:?}"))
        .parse()
        .unwrap()
}

/// Runs a scenario to completion; it must succeed and end with "ok".
fn run(node: &SimNode, args: &[&str], env: &[(&str, &str)]) -> Values {
    let output = command(node, args, env).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.lines().last() == Some("ok"),
        "{args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse(&stdout)
}

/// A scenario that waits on stdin (`wait`, `hold`).
struct Interactive {
    child: Child,
    out: BufReader<ChildStdout>,
    seen: String,
}

impl Interactive {
    fn start(node: &SimNode, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = command(node, args, env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            out,
            seen: String::new(),
        }
    }

    /// Reads until a line starting with `prefix`; returns everything seen so far.
    fn until(&mut self, prefix: &str) -> Values {
        loop {
            let mut line = String::new();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "child ended before {prefix:?}:\n{}", self.seen);
            self.seen.push_str(&line);
            if line.starts_with(prefix) {
                return parse(&self.seen);
            }
        }
    }

    fn proceed(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    fn finish(mut self) -> Values {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).unwrap();
        self.seen.push_str(&rest);
        let status = self.child.wait().unwrap();
        assert!(
            status.success() && self.seen.lines().last() == Some("ok"),
            "child failed ({status}):\n{}",
            self.seen
        );
        parse(&self.seen)
    }
}

fn a100_node() -> SimNode {
    SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap()
}

/// One A100 with 10 ms sample periods (to locate work finely; a horizon of 640 ms).
fn a100_node_10ms_periods() -> SimNode {
    SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb).with_utilization_period_us(10_000))
        .unwrap()
}

fn timeline(node: &SimNode) -> Timeline {
    node.timeline()
        .unwrap()
        .expect("a CUDA process created the timeline")
}

fn ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Asserts the invariant of a time-sliced GPU: no period is busier than it is long.
fn assert_no_overlap(tl: &Timeline) {
    for p in &tl.device(0).periods {
        assert!(
            p.busy_ns <= tl.period_ns(),
            "period {} busy {} ns > {} ns",
            p.index,
            p.busy_ns,
            tl.period_ns()
        );
        let sum: u64 = p.processes.iter().map(|q| q.busy_ns).sum();
        assert_eq!(sum, p.busy_ns, "per-process split of period {}", p.index);
    }
}

#[test]
fn kernel_duration_follows_waves_or_a_fixed_per_kernel_cost() {
    let node = a100_node();
    let v = run(&node, &["shapes"], &[]);
    let tl = timeline(&node);
    let dev = tl.device(0);
    // 10 blocks x 1 ms/wave, 13,200 blocks x 62.5 us/wave (16 waves), a fixed 1 ms kernel at
    // both sizes, 216 blocks with 100 KB shared memory (1 block per SM: 2 waves of 1 ms), a
    // cooperative 864-block launch and the same through cuLaunchKernelEx (1 ms each); "plain"
    // and the refused launches take nothing.
    assert_eq!(dev.busy_total_ns, 8 * MS);
    assert_eq!(dev.kernels, 7);
    assert_eq!(tl.device_busy_ns(0, 0..u64::MAX), 8 * MS);
    let state = node.cuda_state().unwrap().unwrap();
    assert_eq!(
        state.devices[0].launches, 8,
        "the no-cost launch is counted too"
    );
    // cuCtxSynchronize returned only once the last kernel had ended.
    assert!(num(&v, "t_synced") >= dev.last_end_ns);
    assert!(dev.last_end_ns - num(&v, "t_start") >= 8 * MS);
    assert_no_overlap(&tl);
}

#[test]
fn launches_return_before_the_kernel_ends_and_synchronize_waits_for_it() {
    for stream in ["legacy", "ptds", "stream"] {
        let node = a100_node();
        let mut args = vec!["paced", "300000000", "0", "1"];
        if stream != "legacy" {
            args.push(stream);
        }
        let v = run(&node, &args, &[]);
        let end = timeline(&node).device(0).last_end_ns;
        assert!(
            num(&v, "t_launched") < end,
            "{stream}: the launch waited for the 300 ms kernel: {v:?}, end {end}"
        );
        assert!(
            num(&v, "t_synced") >= end,
            "{stream}: synchronize returned before the kernel ended: {v:?}, end {end}"
        );
        assert!(end - num(&v, "t_start") >= 300 * MS);
    }
}

#[test]
fn kernels_of_two_processes_on_one_gpu_never_overlap() {
    let node = a100_node();
    let args = ["paced", "10000000", "0", "20", "wait"];
    let mut a = Interactive::start(&node, &args, &[]);
    let mut b = Interactive::start(&node, &args, &[]);
    let pid_a = num(&a.until("pid="), "pid") as u32;
    let pid_b = num(&b.until("pid="), "pid") as u32;
    a.proceed();
    b.proceed();
    let (va, vb) = (a.finish(), b.finish());
    let tl = timeline(&node);
    assert_eq!(tl.device_busy_total_ns(0), 400 * MS);
    assert_eq!(tl.process_busy_total_ns(pid_a, 0), 200 * MS);
    assert_eq!(tl.process_busy_total_ns(pid_b, 0), 200 * MS);
    assert_eq!(tl.process_busy_ns(0, pid_a, 0..u64::MAX), 200 * MS);
    assert_eq!(tl.process_busy_ns(0, pid_b, 0..u64::MAX), 200 * MS);
    assert_eq!(
        tl.processes_busy_ns(0, 0..u64::MAX),
        [(pid_a, 200 * MS), (pid_b, 200 * MS)].into()
    );
    // 400 ms of kernels, one at a time: whichever started first, the last one to finish waited
    // for all of them.
    let start = num(&va, "t_start").min(num(&vb, "t_start"));
    let done = num(&va, "t_synced").max(num(&vb, "t_synced"));
    assert!(done - start >= 400 * MS, "{va:?} {vb:?}");
    assert!(done >= tl.device(0).last_end_ns);
    assert_no_overlap(&tl);
}

#[test]
fn a_full_launch_queue_blocks_the_launcher() {
    let node = a100_node();
    // 1,100 back-to-back 1 ms kernels: launch 1,025 must wait for kernel 1 to end, launch
    // 1,100 for kernel 76.
    let v = run(&node, &["paced", "1000000", "0", "1100"], &[]);
    let tl = timeline(&node);
    let launched = num(&v, "t_launched");
    assert!(
        launched - num(&v, "t_start") >= 76 * MS,
        "the loop did not block: {v:?}"
    );
    // When the last launch returned at most 1,024 kernels (1,024 ms) were pending, and the
    // process had the GPU to itself.
    assert!(tl.device(0).last_end_ns <= launched + 1024 * MS);
    assert_eq!(tl.device_busy_total_ns(0), 1100 * MS);
}

#[test]
fn the_queue_never_reaches_past_the_horizon() {
    // 10 ms periods: the queue may reach 64 periods = 640 ms ahead.
    let node = a100_node_10ms_periods();
    let v = run(&node, &["paced", "10000000", "0", "100"], &[]);
    let tl = timeline(&node);
    assert_eq!(tl.horizon_ns(), 640 * MS);
    let launched = num(&v, "t_launched");
    assert!(launched - num(&v, "t_start") >= 360 * MS, "{v:?}");
    assert!(tl.device(0).last_end_ns <= launched + 640 * MS);
    assert_eq!(tl.device_busy_total_ns(0), 1000 * MS);
    assert_eq!(tl.device(0).pending_ns, 0);
    assert_no_overlap(&tl);
}

#[test]
fn nvml_utilization_of_a_duty_cycled_launcher() {
    let node = a100_node();
    // A 2 ms kernel every 4 ms for 1.2 s: 50 %.
    let v = run(&node, &["paced", "2000000", "4000000", "300"], &[]);
    let tl = timeline(&node);
    let start = num(&v, "t_start");
    let end = tl.device(0).last_end_ns;
    assert_eq!(tl.device_busy_total_ns(0), 600 * MS);
    // Late launches (a loaded machine) catch up back to back, so the average stays near 50 %
    // and can only drop if the launcher fell far behind.
    let achieved = 600.0 * MS as f64 * 100.0 / (end - start) as f64;
    assert!(
        (35.0..=50.2).contains(&achieved),
        "achieved {achieved:.1} %"
    );

    // Right after the load, NVML reports exactly the model's busy share of the last completed
    // periods covering one second (6 of 1/6 s), rounded down.
    loop {
        let n = run(&node, &["nvml", "0", "0"], &[]);
        let period = tl.period_ns();
        let (before, after) = (
            num(&n, "util_before") / period,
            num(&n, "util_after") / period,
        );
        if before != after {
            continue; // the query straddled a period boundary: ask again
        }
        let tl = timeline(&node);
        let busy = tl.device_busy_ns(0, before - 6..before);
        assert_eq!(num(&n, "util_gpu"), busy * 100 / (6 * period), "{n:?}");
        break;
    }
    let tl = timeline(&node);
    let inner = tl.period_at(SystemTime::UNIX_EPOCH + Duration::from_nanos(start)) + 1
        ..tl.period_at(SystemTime::UNIX_EPOCH + Duration::from_nanos(end));
    let util = tl.utilization(0, inner.clone());
    assert!((30.0..=70.0).contains(&util), "{util:.1} % over {inner:?}");
}

#[test]
fn process_samples_carry_the_host_pid_and_respect_last_seen() {
    let node = a100_node();
    let offset = 100_000;
    let mut child = Interactive::start(
        &node,
        &["paced", "50000000", "0", "4", "hold"],
        &[("GPU_SIM_HOST_PID_OFFSET", "100000")],
    );
    let held = child.until("holding=");
    let host_pid = num(&held, "pid") as u32 + offset;
    // Wait for the period holding the end of the work to be complete.
    let tl = timeline(&node);
    let done = tl.period_at(tl.last_end(0)) + 1;
    let wait = ns(tl.period_start(done)).saturating_sub(ns(SystemTime::now()));
    std::thread::sleep(Duration::from_nanos(wait + 5 * MS));

    let all = run(&node, &["nvml", "0", "0"], &[]);
    let tl = timeline(&node);
    assert!(
        all["process"].contains(&host_pid.to_string()),
        "compute processes list the host pid: {all:?}"
    );
    assert!(!all["process"].contains(&(host_pid - offset).to_string()));
    let samples = parse_samples(&all["sample"]);
    let mine: Vec<_> = samples.iter().filter(|s| s.0 == host_pid).collect();
    assert_eq!(
        mine.len(),
        1,
        "one entry per process, as real drivers answer: {samples:?}"
    );
    let (_, stamp, sm) = *mine[0];
    // The 200 ms of work spans at least 2 periods; the entry is stamped with the newest period it
    // ran in (its end in microseconds) and carries the mean of its periods' shares.
    let period = tl.period_ns();
    let ran: Vec<u64> = (tl.period_at(tl.last_end(0)).saturating_sub(10)..done)
        .filter(|&i| tl.process_busy_ns(0, host_pid, i..i + 1) > 0)
        .collect();
    assert!(ran.len() >= 2, "{ran:?}");
    assert_eq!(stamp, (ran.last().unwrap() + 1) * period / 1000);
    let pct = |i: u64| (tl.process_busy_ns(0, host_pid, i..i + 1) * 100 + period / 2) / period;
    let sum: u64 = ran.iter().map(|&i| pct(i)).sum();
    let n = ran.len() as u64;
    assert_eq!(sm, (sum + n / 2) / n, "the mean over the periods it ran in");
    let busy: u64 = ran
        .iter()
        .map(|&i| tl.process_busy_ns(0, host_pid, i..i + 1))
        .sum();
    assert_eq!(
        busy,
        200 * MS,
        "every busy ns of the process is in those periods"
    );

    // Newer than lastSeenTimeStamp only: from the first period's end, the mean of the others.
    let first_end = (ran[0] + 1) * period / 1000;
    let newer = run(&node, &["nvml", "0", &first_end.to_string()], &[]);
    let newer = parse_samples(&newer["sample"]);
    let rest: u64 = ran[1..].iter().map(|&i| pct(i)).sum();
    let m = n - 1;
    assert_eq!(newer, vec![(host_pid, stamp, (rest + m / 2) / m)]);
    let none = run(&node, &["nvml", "0", &stamp.to_string()], &[]);
    assert_eq!(none["samples"], vec!["none".to_owned()]);
    child.finish();
}

/// `sample=pid,stamp,smUtil` lines of the C helper.
fn parse_samples(lines: &[String]) -> Vec<(u32, u64, u64)> {
    lines
        .iter()
        .map(|s| {
            let f: Vec<u64> = s.split(',').map(|x| x.parse().unwrap()).collect();
            (f[0] as u32, f[1], f[2])
        })
        .collect()
}

#[test]
fn process_samples_are_recorded_late_by_the_jitter() {
    // 20 ms periods recorded up to 5 ms late: each entry's stamp is its period's end plus a delay
    // in 0..=5 ms that is not always 0, and is the same for every process that asks.
    let node = SimNode::new(
        NodeSpec::uniform(1, GpuSpec::a100_80gb)
            .with_utilization_period_us(20_000)
            .with_utilization_jitter_us(5_000),
    )
    .unwrap();
    let mut delays = Vec::new();
    for _ in 0..6 {
        run(&node, &["paced", "1000000", "0", "5"], &[]);
        let tl = timeline(&node);
        let period = tl.period_ns();
        let last = tl.period_at(tl.last_end(0));
        std::thread::sleep(Duration::from_nanos(
            ns(tl.period_start(last + 1)).saturating_sub(ns(SystemTime::now())) + 6 * MS,
        ));
        let a = parse_samples(&run(&node, &["nvml", "0", "0"], &[])["sample"]);
        let b = parse_samples(&run(&node, &["nvml", "0", "0"], &[])["sample"]);
        assert_eq!(a, b, "the same stamps for every caller");
        let newest = a.iter().map(|s| s.1).max().unwrap();
        let end_us = (last + 1) * period / 1000;
        assert!(
            (end_us..=end_us + 5_000).contains(&newest),
            "stamp {newest} for a period ending at {end_us}"
        );
        delays.push(newest - end_us);
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(delays.iter().any(|&d| d > 0), "{delays:?}");
    // More than a quarter of the period: the node file is refused, naming the key.
    let bad = SimNode::new(
        NodeSpec::uniform(1, GpuSpec::a100_80gb)
            .with_utilization_period_us(20_000)
            .with_utilization_jitter_us(5_001),
    )
    .unwrap();
    let out = command(&bad, &["env-error"], &[]).output().unwrap();
    assert!(out.status.success(), "cuInit accepted a 5,001 us jitter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("utilization_jitter_us") && stderr.contains("quarter"),
        "{stderr}"
    );
}

#[test]
fn a_graph_costs_its_captured_kernels() {
    let node = a100_node();
    run(&node, &["graph"], &[("GPU_SIM_GRAPH_NS", "1000000")]);
    let tl = timeline(&node);
    // Three launches of two captured 3 ms kernels plus 1 ms per graph, and a handle that is
    // not an instantiated graph (1 ms); the captured launches themselves ran nothing.
    assert_eq!(tl.device_busy_total_ns(0), 22 * MS);
    assert_eq!(tl.device(0).kernels, 4);
    assert_eq!(
        node.cuda_state().unwrap().unwrap().devices[0].graph_launches,
        4
    );
}

#[test]
fn malformed_time_settings_fail_cuinit_naming_the_setting() {
    let node = a100_node();
    for (var, value) in [
        ("GPU_SIM_WAVE_NS", "1ms"),
        ("GPU_SIM_GRAPH_NS", "-1"),
        ("GPU_SIM_HOST_PID_OFFSET", "5000000000"),
    ] {
        let out = command(&node, &["env-error"], &[(var, value)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{var}={value}: cuInit did not fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
    let bad = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb).with_utilization_period_us(5))
        .unwrap();
    let out = command(&bad, &["env-error"], &[]).output().unwrap();
    assert!(out.status.success(), "cuInit accepted a 5 us period");
    assert!(String::from_utf8_lossy(&out.stderr).contains("utilization_period_us"));
}

#[test]
fn a_process_killed_holding_a_gpu_lock_does_not_wedge_the_others() {
    let node = a100_node();
    let mut holder = Interactive::start(&node, &["die-holding-the-lock"], &[]);
    holder.until("locked=");
    holder.child.kill().unwrap(); // SIGKILL, mid-update
    holder.child.wait().unwrap();
    let v = run(&node, &["paced", "1000000", "0", "10"], &[]);
    let tl = timeline(&node);
    assert_eq!(tl.device_busy_total_ns(0), 10 * MS);
    assert!(num(&v, "t_synced") >= tl.device(0).last_end_ns);
    // NVML takes the same lock.
    let n = run(&node, &["nvml", "0", "0"], &[]);
    assert!(n.contains_key("util_gpu"));
}

#[test]
fn a_process_gets_time_slices_beside_one_with_a_deep_queue() {
    // 10 ms sample periods, to locate the work finely.
    let node = a100_node_10ms_periods();
    // A queues 2 s of 10 ms kernels (as deep as the 640 ms horizon lets it).
    let mut a = Interactive::start(&node, &["paced", "10000000", "0", "200"], &[]);
    let pid_a = num(&a.until("t_start="), "pid") as u32;
    std::thread::sleep(Duration::from_millis(50));
    // B's one 10 ms kernel does not wait behind A's queue: the GPU alternates 2 ms slices, so
    // it completes within 2 + 5 x 2 + 4 x 2 ms of its launch.
    let b = run(&node, &["paced", "10000000", "0", "1"], &[]);
    let pid_b = num(&b, "pid") as u32;
    a.finish();
    let tl = timeline(&node);
    assert_eq!(tl.slice_ns(), 2 * MS);
    let at = |t: u64| tl.period_at(SystemTime::UNIX_EPOCH + Duration::from_nanos(t));
    let window = at(num(&b, "t_start"))..at(num(&b, "t_launched") + 21 * MS) + 1;
    assert_eq!(
        tl.process_busy_ns(0, pid_b, window.clone()),
        10 * MS,
        "B's kernel ran right away"
    );
    assert!(
        tl.process_busy_ns(0, pid_a, window.clone()) > 0,
        "A kept running beside it"
    );
    assert_eq!(tl.process_busy_total_ns(pid_a, 0), 2000 * MS);
    assert_no_overlap(&tl);
}

#[test]
fn another_process_s_full_queue_never_blocks_a_launch() {
    // 10 ms sample periods: a horizon of 640 ms.
    let node = a100_node_10ms_periods();
    // A keeps 640 ms of 1 ms kernels queued (its horizon), refilling as they run, for 1.5 s.
    let mut a = Interactive::start(&node, &["paced", "1000000", "0", "1500"], &[]);
    a.until("t_start=");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(timeline(&node).horizon_ns(), 640 * MS);
    assert!(
        timeline(&node).device(0).pending_ns > 500 * MS,
        "A's queue is not full yet"
    );
    // B's 100 ms kernel goes into its own queue at once (with a GPU-wide horizon it waited until
    // A had no more to launch and its queue had fallen to 540 ms: about a second), and runs in
    // time slices beside A's.
    let b = run(&node, &["paced", "100000000", "0", "1"], &[]);
    let va = a.finish();
    let blocked = num(&b, "t_launched") - num(&b, "t_start");
    assert!(blocked < 50 * MS, "B's launch blocked {blocked} ns");
    let tl = timeline(&node);
    let pid_b = num(&b, "pid") as u32;
    assert_eq!(tl.process_busy_total_ns(pid_b, 0), 100 * MS);
    assert_eq!(
        tl.process_busy_total_ns(num(&va, "pid") as u32, 0),
        1500 * MS
    );
    assert_no_overlap(&tl);
}

#[test]
fn a_snapshot_plays_the_schedule_to_now_as_the_driver_does() {
    let node = a100_node();
    // Two processes leave 3 x 100 ms and 2 x 100 ms pending and exit without synchronising:
    // nobody plays the schedule on the C side any more.
    let a = Interactive::start(&node, &["paced", "100000000", "0", "3", "nosync"], &[]);
    let b = Interactive::start(&node, &["paced", "100000000", "0", "2", "nosync"], &[]);
    let (va, vb) = (a.finish(), b.finish());
    let launched = num(&va, "t_launched").max(num(&vb, "t_launched"));
    let wait = (launched + 520 * MS).saturating_sub(ns(SystemTime::now()));
    std::thread::sleep(Duration::from_nanos(wait));
    let played = timeline(&node);
    assert_eq!(played.device_busy_total_ns(0), 500 * MS);
    assert_eq!(played.device(0).pending_ns, 0);
    let (pa, pb) = (num(&va, "pid") as u32, num(&vb, "pid") as u32);
    assert_eq!(played.process_busy_ns(0, pa, 0..u64::MAX), 300 * MS);
    assert_eq!(played.process_busy_ns(0, pb, 0..u64::MAX), 200 * MS);
    // An NVML query makes the C side play it: the same periods, the same split.
    run(&node, &["nvml", "0", "0"], &[]);
    let driver = timeline(&node);
    assert_eq!(driver.device(0).periods, played.device(0).periods);
    assert_eq!(driver.device(0).last_end_ns, played.device(0).last_end_ns);
    assert_no_overlap(&driver);
}

#[test]
fn nvml_wrapper_reads_utilisation_and_process_samples() {
    const NAME: &str = "nvml_wrapper_reads_utilisation_and_process_samples";
    const CHILD: &str = "GPU_SIM_TEST_CHILD";
    if std::env::var(CHILD).is_ok_and(|v| v == NAME) {
        // In the child, through the crate the node agent uses.
        let host_pid: u32 = std::env::var("EXPECT_HOST_PID").unwrap().parse().unwrap();
        let nvml = nvml_wrapper::Nvml::builder()
            .lib_path(gpu_sim::nvml_library().as_os_str())
            .init()
            .unwrap();
        let dev = nvml.device_by_index(0).unwrap();
        let samples = dev.process_utilization_stats(0).unwrap();
        let mine: Vec<_> = samples.iter().filter(|s| s.pid == host_pid).collect();
        assert_eq!(mine.len(), 1, "one entry per process: {samples:?}");
        // 200 ms of work in 1/6 s periods: two periods at least, so a mean of 40..100 %.
        assert!((40..=100).contains(&mine[0].sm_util), "{mine:?}");
        let last = samples.iter().map(|s| s.timestamp).max().unwrap();
        assert!(matches!(
            dev.process_utilization_stats(last),
            Err(nvml_wrapper::error::NvmlError::NotFound)
        ));
        assert!(dev.utilization_rates().unwrap().gpu <= 100);
        return;
    }
    let node = a100_node();
    let v = run(
        &node,
        &["paced", "50000000", "0", "4"],
        &[("GPU_SIM_HOST_PID_OFFSET", "100000")],
    );
    let tl = timeline(&node);
    let done = tl.period_at(tl.last_end(0)) + 1;
    let wait = ns(tl.period_start(done)).saturating_sub(ns(SystemTime::now()));
    std::thread::sleep(Duration::from_nanos(wait + 5 * MS));
    let output = Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, NAME)
        .env("EXPECT_HOST_PID", (num(&v, "pid") + 100_000).to_string())
        .envs(node.env())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
