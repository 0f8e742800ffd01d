//! The cap is per container: processes that share one region file (`CUDA_DEVICE_MEMORY_SHARED_CACHE`)
//! share one cap, against the gpu-sim fake driver (one A100 80GB, device memory shared between
//! processes through its state file). `tests/c/shared.c` is one such process.

mod common;

use common::{compile, libvgpu};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use vgpu_region::{RegionReader, RegionSnapshot};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CHUNK: u64 = 256 * MIB;

struct Container {
    node: SimNode,
    prog: PathBuf,
    region: PathBuf,
    _bin: tempfile::TempDir,
}

impl Container {
    fn new() -> Self {
        let bin = tempfile::tempdir().expect("tempdir");
        let lib_dir = gpu_sim::cuda_library()
            .parent()
            .expect("fake driver dir")
            .to_string_lossy()
            .into_owned();
        let prog = compile(
            bin.path(),
            "shared",
            &["-L", &lib_dir, "-lcuda", "-pthread"],
        );
        let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).expect("sim node");
        let region = node.dir().join("cudevshr.cache");
        Self {
            node,
            prog,
            region,
            _bin: bin,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.prog);
        let (k, v) = gpu_sim::library_path_env();
        cmd.args(args)
            .envs(self.node.env())
            .env(k, v)
            .env("CUDA_DEVICE_MEMORY_LIMIT", "1g")
            .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &self.region)
            .env("LD_PRELOAD", libvgpu())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    }

    fn spawn(&self, args: &[&str]) -> Proc {
        let mut child = self.command(args).spawn().expect("spawn");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Proc { child, out }
    }

    /// Runs to completion (stdin closed at once) and returns stdout.
    fn run(&self, args: &[&str]) -> String {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null());
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn snapshot(&self) -> RegionSnapshot {
        RegionReader::open(&self.region)
            .expect("open region")
            .snapshot()
            .expect("snapshot")
    }
}

struct Proc {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Proc {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read");
        assert!(!l.is_empty(), "child ended early");
        l.trim_end().to_owned()
    }

    fn send_line(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("write");
        stdin.flush().expect("flush");
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{status:?}");
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

fn usage_of(snapshot: &RegionSnapshot, pid: i32) -> u64 {
    snapshot
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .map_or(0, |p| p.used[0].total)
}

#[test]
fn second_process_is_refused_while_the_first_holds_the_cap_and_served_after_it_exits() {
    let c = Container::new();
    let mut first = c.spawn(&["hold", "4"]);
    assert_eq!(first.line(), "held 4 rc 0");
    let mut second = c.spawn(&["hold", "1"]);
    assert_eq!(
        second.line(),
        "held 0 rc 2",
        "the container's cap is used up"
    );

    // A HAMi-monitor-style reader sees both processes, the limit and the refusal.
    let snap = c.snapshot();
    assert_eq!(snap.limits[0], GIB);
    assert_eq!(usage_of(&snap, first.pid()), GIB);
    assert_eq!(snap.device_usage(0).total, GIB);
    let refused = |pid| {
        snap.processes
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| p.refused)
    };
    assert_eq!(refused(second.pid()), Some(1));
    assert_eq!(refused(first.pid()), Some(0));
    assert!(
        snap.uuid_label(0).is_some_and(|u| u.starts_with("GPU-")),
        "{:?}",
        snap.uuid_label(0)
    );

    first.finish();
    second.finish();
    assert_eq!(c.run(&["hold", "1"]), "held 1 rc 0\n");
    assert_eq!(c.snapshot().device_usage(0).total, 0, "slots freed at exit");
}

#[test]
fn memory_queries_in_another_process_see_the_containers_usage() {
    let c = Container::new();
    let mut holder = c.spawn(&["hold", "3"]);
    assert_eq!(holder.line(), "held 3 rc 0");
    let info = c.run(&["info"]);
    let used = 3 * CHUNK;
    assert!(
        info.contains(&format!("cuda free {} total {GIB}\n", GIB - used)),
        "{info}"
    );
    assert!(info.contains(&format!("device total {GIB}\n")), "{info}");
    assert!(
        info.contains(&format!(
            "nvml total {GIB} used {used} free {}\n",
            GIB - used
        )),
        "{info}"
    );
    holder.finish();
}

#[test]
fn a_sigkilled_holders_memory_is_reaped_by_the_next_allocation() {
    let c = Container::new();
    let mut victim = c.spawn(&["hold", "4"]);
    assert_eq!(victim.line(), "held 4 rc 0");
    let pid = victim.pid();
    victim.child.kill().expect("SIGKILL");
    victim.child.wait().expect("reap the zombie");
    assert_eq!(usage_of(&c.snapshot(), pid), GIB, "not reaped yet");
    assert_eq!(c.run(&["hold", "2"]), "held 2 rc 0\n");
    let snap = c.snapshot();
    assert!(snap.processes.iter().all(|p| p.pid != pid), "slot reaped");
}

/// Drives `procs` bursting processes to the end, checking the region at every pause.
fn bursts(c: &Container, procs: usize, threads: usize, bursts: usize, pairs: usize) {
    let args = [
        "burst".to_owned(),
        threads.to_string(),
        bursts.to_string(),
        pairs.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut ps: Vec<Proc> = (0..procs).map(|_| c.spawn(&args)).collect();
    for b in 0..bursts {
        let mut held_sum = 0;
        for p in &mut ps {
            let line = p.line();
            let held: u64 = line
                .strip_prefix(&format!("BURST {b} held "))
                .and_then(|h| h.parse().ok())
                .unwrap_or_else(|| panic!("unexpected {line:?}"));
            held_sum += held;
        }
        // Every process is paused holding its grab: nothing is in flight.
        let total = c.snapshot().device_usage(0).total;
        assert!(total <= GIB, "burst {b}: {total} over the cap");
        assert_eq!(total, held_sum, "burst {b}: region and programs agree");
        assert!(held_sum > 0, "burst {b}: somebody got memory");
        for p in &mut ps {
            p.send_line();
        }
    }
    let mut refused_sum = 0;
    for p in &mut ps {
        let line = p.line();
        let refused: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("unexpected {line:?}"));
        refused_sum += refused;
    }
    let snap = c.snapshot();
    assert_eq!(snap.device_usage(0).total, 0, "everything given back");
    let counted: u64 = snap.processes.iter().map(|p| p.refused).sum();
    assert_eq!(
        counted, refused_sum,
        "the refused counter matches the programs"
    );
    for p in ps {
        p.finish();
    }
}

#[test]
fn sixteen_threads_never_exceed_the_cap_and_end_at_zero() {
    let c = Container::new();
    bursts(&c, 1, 16, 4, 40);
}

#[test]
fn two_processes_racing_never_exceed_the_cap_together() {
    let c = Container::new();
    bursts(&c, 2, 8, 4, 40);
}

#[test]
fn without_a_region_file_nothing_is_created_for_uncapped_processes() {
    let c = Container::new();
    let mut cmd = c.command(&["info"]);
    cmd.env_remove("CUDA_DEVICE_MEMORY_LIMIT")
        .stdin(Stdio::null());
    let out = cmd.output().expect("run");
    assert!(out.status.success());
    assert!(!Path::new(&c.region).exists(), "no cap, no region file");
}

#[test]
fn an_unusable_region_is_reported_once_and_fails_closed() {
    let c = Container::new();
    std::fs::write(&c.region, b"not a region").expect("write foreign file");
    let mut cmd = c.command(&["hold", "2"]);
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    let out = cmd.output().expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "held 0 rc 2\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("cannot use the shared region"))
            .count(),
        1,
        "{stderr}"
    );
}
