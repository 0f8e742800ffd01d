//! The memory backstop's cost per round at 8 GPUs × 100 processes: a figure, not a test.
//!
//! `cargo run --release -p vgpu-device-plugin --example backstop_bench [rounds]`
//!
//! NVML is replaced at the sample boundary ([`ProcessSource`]) by a fixed list of 800 processes; everything
//! after it is the agent's code: the `stat` read per process, the cgroup cache (a fake proc root with 800
//! `<pid>/stat` and `<pid>/cgroup` files in the kernel's v2 systemd format), the records beside a cache root
//! (800 containers), the pod index rebuilt from 800 pods each round, attribution, the policy (a tenth of the
//! containers over their caps, report mode) and the metrics view. CPU time is the process's user + system
//! time from `/proc/self/stat` (the workspace forbids the unsafe `getrusage` call).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use vgpu_device_plugin::config::{BackstopMode, BackstopSettings};
use vgpu_device_plugin::gpu::processes::{GpuProcess, ProcessError};
use vgpu_device_plugin::handoff::record::{ContainerRecord, RecordStore, RecordedGpu};
use vgpu_device_plugin::monitor::backstop::{Backstop, BackstopView, ProcessSource, pod_infos};

const GPUS: u32 = 8;
const PER_GPU: u32 = 100;
const MIB: u64 = 1 << 20;

struct Fake(Vec<Vec<GpuProcess>>);

impl ProcessSource for Fake {
    fn gpus(&self) -> Vec<(String, u32)> {
        (0..GPUS).map(|i| (uuid(i), i)).collect()
    }

    fn list(&mut self, i: usize, out: &mut Vec<GpuProcess>) -> Result<(), ProcessError> {
        out.clear();
        out.extend_from_slice(&self.0[i]);
        Ok(())
    }
}

fn uuid(i: u32) -> String {
    format!("GPU-{i:08x}-0000-4000-8000-000000000000")
}

fn pod_uid(n: u32) -> String {
    format!("{n:08x}-1111-4222-8333-444444444444")
}

fn container_id(n: u32) -> String {
    format!("{:064x}", u128::from(n) * 0x1_0000_0001)
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command; clock ticks of 1/100 s.
    let ticks: u64 =
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn main() {
    let rounds: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let proc_root = dir.path().join("proc");
    let cache_root = dir.path().join("containers");
    std::fs::create_dir_all(&cache_root).expect("cache root");
    let store = RecordStore::beside(&cache_root);
    let mut listed = vec![Vec::new(); GPUS as usize];
    let mut pods = Vec::new();
    for n in 0..GPUS * PER_GPU {
        let pid = 100_000 + n;
        let gpu = n / PER_GPU;
        let (uid, id) = (pod_uid(n), container_id(n));
        let piddir = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&piddir).expect("pid dir");
        std::fs::write(
            piddir.join("stat"),
            format!("{pid} (python3) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 10 2 0 0 20 0 8 0 {} 1000000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n", 5_000_000 + n),
        )
        .expect("stat");
        std::fs::write(
            piddir.join("cgroup"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope\n",
                uid.replace('-', "_")
            ),
        )
        .expect("cgroup");
        let record = ContainerRecord {
            namespace: "bench".into(),
            pod: format!("pod-{n}"),
            pod_uid: uid.clone(),
            container: "cuda".into(),
            cache_file: "x.cache".into(),
            gpus: vec![RecordedGpu {
                uuid: uuid(gpu),
                memory_limit_bytes: 400 * MIB,
            }],
            sm_limit_percent: 100,
            priority: 1,
        };
        store
            .write(&format!("{uid}_cuda"), &record)
            .expect("record");
        // A tenth of the containers hold more than their cap.
        let used = if n % 10 == 0 { 2000 * MIB } else { 300 * MIB };
        listed[gpu as usize].push(GpuProcess {
            pid,
            used_bytes: Some(used),
        });
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("pod-{n}"), "namespace": "bench", "uid": uid},
            "status": {"containerStatuses": [{"name": "cuda", "image": "cuda", "imageID": "", "ready": true,
                "restartCount": 0, "containerID": format!("containerd://{id}")}]}
        }))
        .expect("a pod");
        pods.push(Arc::new(pod));
    }
    let settings = BackstopSettings {
        mode: BackstopMode::Report,
        proc_root,
        ..BackstopSettings::default()
    };
    let mut backstop = Backstop::new(settings, &cache_root);
    let mut source = Fake(listed);
    let view = BackstopView::default();
    // The first round reads every cgroup and record; the steady state is what runs every second.
    let first = Instant::now();
    let report = backstop.round(&mut source, &pod_infos(&pods), &view, Instant::now());
    let first = first.elapsed();
    assert_eq!(report.processes, (GPUS * PER_GPU) as usize);
    let reads = backstop.cgroup_reads();
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    for _ in 0..rounds {
        let infos = pod_infos(&pods);
        backstop.round(&mut source, &infos, &view, Instant::now());
    }
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let per_round_cpu = cpu / rounds;
    // Of which: the pod index the agent rebuilds from the pod cache each round.
    let index0 = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(pod_infos(&pods));
    }
    let index = index0.elapsed() / rounds;
    println!(
        "memory backstop, {GPUS} GPUs x {PER_GPU} processes ({} containers, a tenth over their caps), {rounds} rounds",
        GPUS * PER_GPU
    );
    println!("  first round (cold: every cgroup and record read): {first:?}");
    println!(
        "  steady round: {:?} wall, {per_round_cpu:?} CPU (user+system)",
        wall / rounds
    );
    println!("    of which the pod index (800 pods): {index:?}");
    println!(
        "  at a 1 s period: {:.2} ms CPU per second ({:.3}% of one core)",
        per_round_cpu.as_secs_f64() * 1e3,
        per_round_cpu.as_secs_f64() * 100.0
    );
    println!(
        "  cgroup files read: {reads} in the first round, {} in the {rounds} steady rounds",
        backstop.cgroup_reads() - reads
    );
    let (observed, _) = view.samples();
    println!("  observed series: {}", observed.len());
    idle_rss();
}

/// The agent's idle RSS on an 8-GPU gpu-sim node (standalone, no kubelet to register with), with the backstop
/// off and on: `target/release/vgpu-device-plugin` next to this example's directory (build it first with
/// `cargo build --release -p vgpu-device-plugin`).
fn idle_rss() {
    let exe = std::env::current_exe().expect("this example");
    let Some(agent) = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("vgpu-device-plugin"))
        .filter(|a| a.exists())
    else {
        println!("  idle RSS: skipped (build the agent binary first)");
        return;
    };
    let sim = gpu_sim::SimNode::new(gpu_sim::NodeSpec::uniform(8, gpu_sim::GpuSpec::a100_80gb))
        .expect("a gpu-sim node");
    for mode in ["off", "report"] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut child = std::process::Command::new(&agent)
            .envs(sim.env())
            .env("NVML_LIB", gpu_sim::nvml_library())
            .env("KUBELET_SOCKET", dir.path().join("kubelet.sock"))
            .env("VGPU_LOCK_DIR", dir.path().join("lock"))
            .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
            .env_remove("NODE_NAME")
            .args([
                "--hook-path",
                dir.path().join("hook").to_str().unwrap_or("/tmp"),
            ])
            .args(["--memory-backstop", mode, "--gpu-memory-factor", "10"])
            .stderr(std::fs::File::create(dir.path().join("agent.log")).expect("a log file"))
            .spawn()
            .expect("the agent");
        std::thread::sleep(Duration::from_secs(8));
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
                format!("? (the agent exited: {})", log.lines().last().unwrap_or(""))
            });
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        let running = log.contains("memory backstop: comparing");
        println!(
            "  idle agent, 8 GPUs, --memory-backstop={mode}: {} (backstop loop running: {running})",
            rss.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
