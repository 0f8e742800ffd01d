//! The cap is per container: processes that share one region file (`CUDA_DEVICE_MEMORY_SHARED_CACHE`)
//! share one cap, against the gpu-sim fake driver (one A100 80GB, device memory shared between
//! processes through its state file). `tests/c/shared.c` is one such process.
//!
//! Each process's context is charged too: the node's contexts cost [`CTX`] (one chunk), so a
//! process holding `k` chunks uses `CTX + k × CHUNK` of the cap.

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
/// The simulated context size (`cuda_context_mib`), which the limiter measures and charges.
const CTX: u64 = 256 * MIB;

struct Container {
    node: SimNode,
    prog: PathBuf,
    region: PathBuf,
    cap: &'static str,
    env: Vec<(&'static str, &'static str)>,
    _bin: tempfile::TempDir,
}

impl Container {
    /// One A100 80GB with [`CTX`] contexts, a 1 GiB cap.
    fn new() -> Self {
        let spec = NodeSpec::uniform(1, GpuSpec::a100_80gb).with_cuda_context_mib(CTX / MIB);
        Self::with(spec, "1g", &[])
    }

    fn with(spec: NodeSpec, cap: &'static str, env: &[(&'static str, &'static str)]) -> Self {
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
        let node = SimNode::new(spec).expect("sim node");
        let region = node.dir().join("cudevshr.cache");
        Self {
            node,
            prog,
            region,
            cap,
            env: env.to_vec(),
            _bin: bin,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.prog);
        let (k, v) = gpu_sim::library_path_env();
        cmd.args(args)
            .envs(self.node.env())
            .env(k, v)
            .env("CUDA_DEVICE_MEMORY_LIMIT", self.cap)
            .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &self.region)
            .envs(self.env.iter().copied())
            .env("LD_PRELOAD", libvgpu())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    }

    fn spawn(&self, args: &[&str]) -> Proc {
        self.spawn_from(self.command(args))
    }

    /// Like [`Container::spawn`], without the program's stderr (one OOM line per refusal).
    fn spawn_quiet(&self, args: &[&str]) -> Proc {
        let mut cmd = self.command(args);
        cmd.stderr(Stdio::null());
        self.spawn_from(cmd)
    }

    fn spawn_from(&self, mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("spawn");
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

impl Drop for Proc {
    /// A failing test leaves no process behind (a no-op for one already waited for).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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

/// Two processes create their first contexts at the same moment, each taking 200 ms as real
/// drivers take hundreds: each measured its context as NVML's `used` growing across its creation,
/// saw the other's appear too, and charged both (3 or 4 contexts for two). Measured one at a time
/// in the container, each is charged exactly one.
#[test]
fn processes_creating_their_first_contexts_at_once_are_charged_one_each() {
    let spec = NodeSpec::uniform(1, GpuSpec::a100_80gb)
        .with_cuda_context_mib(CTX / MIB)
        .with_cuda_context_create_ms(200);
    let c = Container::with(spec, "1g", &[]);
    let mut a = c.spawn(&["hold", "0"]);
    let mut b = c.spawn(&["hold", "0"]);
    assert_eq!(a.line(), "held 0 rc 0");
    assert_eq!(b.line(), "held 0 rc 0");
    let snap = c.snapshot();
    assert_eq!(usage_of(&snap, a.pid()), CTX);
    assert_eq!(usage_of(&snap, b.pid()), CTX);
    assert_eq!(snap.device_usage(0).context, 2 * CTX);
    a.finish();
    b.finish();
}

#[test]
fn second_process_is_refused_while_the_first_holds_the_cap_and_served_after_it_exits() {
    let c = Container::new();
    let mut first = c.spawn(&["hold", "2"]);
    assert_eq!(first.line(), "held 2 rc 0");
    let mut second = c.spawn(&["hold", "1"]);
    assert_eq!(
        second.line(),
        "held 0 rc 2",
        "the container's cap is used up (by both contexts and the first's chunks)"
    );

    // A HAMi-monitor-style reader sees both processes, the limit and the refusal.
    let snap = c.snapshot();
    assert_eq!(snap.limits[0], GIB);
    assert_eq!(usage_of(&snap, first.pid()), CTX + 2 * CHUNK);
    assert_eq!(usage_of(&snap, second.pid()), CTX);
    assert_eq!(snap.device_usage(0).total, GIB);
    assert_eq!(snap.device_usage(0).context, 2 * CTX);
    assert_eq!(snap.device_usage(0).data, 2 * CHUNK);
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
    // Freed by the processes themselves (their atexit handler), before anybody could reap them.
    let left = c.snapshot();
    assert!(
        left.processes.is_empty() && left.device_usage(0).total == 0,
        "slots left after a normal exit: {left:?}"
    );
    assert_eq!(c.run(&["hold", "1"]), "held 1 rc 0\n");
    assert_eq!(c.snapshot().device_usage(0).total, 0, "slots freed at exit");
}

#[test]
fn memory_queries_in_another_process_see_the_containers_usage() {
    let c = Container::new();
    let mut holder = c.spawn(&["hold", "1"]);
    assert_eq!(holder.line(), "held 1 rc 0");
    let info = c.run(&["info"]);
    // Both processes' contexts and the holder's chunk.
    let used = 2 * CTX + CHUNK;
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
    let mut victim = c.spawn(&["hold", "3"]);
    assert_eq!(victim.line(), "held 3 rc 0");
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
    for p in &mut ps {
        assert_eq!(p.line(), "READY");
    }
    for p in &mut ps {
        p.send_line();
    }
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
        let usage = c.snapshot().device_usage(0);
        assert!(usage.total <= GIB, "burst {b}: {usage:?} over the cap");
        assert_eq!(usage.data, held_sum, "burst {b}: region and programs agree");
        assert_eq!(
            usage.context,
            procs as u64 * CTX,
            "burst {b}: one context each"
        );
        assert_eq!(usage.total, usage.data + usage.context, "burst {b}");
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
    assert_eq!(snap.device_usage(0).data, 0, "everything given back");
    assert_eq!(
        snap.device_usage(0).total,
        procs as u64 * CTX,
        "the contexts remain"
    );
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
    // Not even a context is admitted.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no context\n");
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

/// `CUDA_OVERSUBSCRIBE=true` (memory scaling > 1) on a 2 GiB GPU with an 8 GiB cap: allocations
/// the cap allows but the GPU cannot hold succeed as managed memory (the gpu-sim, like the
/// driver, lets managed memory exceed the device), are counted in the region like any other, are
/// freed by `cuMemFree`, and the region ends with only the context. Without the variable the
/// driver's `CUDA_ERROR_OUT_OF_MEMORY` (2) reaches the program at the physical limit.
#[test]
fn oversubscribed_allocations_spill_to_managed_memory_and_are_counted() {
    let gpu = GpuSpec::new("NVIDIA A100-SXM4-80GB", 2048, 0);
    let physical = (gpu.memory_mib - gpu.effective_reserved_mib()) * MIB;
    let spec = || NodeSpec::new(vec![gpu.clone()]).with_cuda_context_mib(CTX / MIB);

    let c = Container::with(spec(), "8g", &[("CUDA_OVERSUBSCRIBE", "true")]);
    let mut p = c.spawn(&["cycle", "64"]);
    let fit = (8 * GIB - CTX) / CHUNK;
    assert_eq!(
        p.line(),
        format!("held {fit} rc 2"),
        "refused exactly at the cap"
    );
    let usage = c.snapshot().device_usage(0);
    assert_eq!(usage.data, fit * CHUNK, "the reader sees every chunk");
    assert_eq!(usage.context, CTX);
    let dev = c
        .node
        .cuda_state()
        .expect("state")
        .expect("state file")
        .devices[0];
    let on_device = (physical - CTX) / CHUNK * CHUNK;
    assert_eq!(dev.used_bytes, CTX + on_device, "the GPU is full");
    assert_eq!(
        dev.managed_bytes,
        fit * CHUNK - on_device,
        "the rest spilled"
    );
    assert!(
        fit * CHUNK > physical,
        "more than the GPU holds was allocated"
    );
    p.send_line();
    assert_eq!(p.line(), format!("freed {fit}"));
    let usage = c.snapshot().device_usage(0);
    assert_eq!(
        (usage.data, usage.total),
        (0, CTX),
        "only the context is left"
    );
    let dev = c
        .node
        .cuda_state()
        .expect("state")
        .expect("state file")
        .devices[0];
    assert_eq!((dev.used_bytes, dev.managed_bytes), (CTX, 0));
    p.finish();

    let plain = Container::with(spec(), "8g", &[]);
    let mut p = plain.spawn(&["cycle", "64"]);
    let physical_chunks = (physical - CTX) / CHUNK;
    assert_eq!(
        p.line(),
        format!("held {physical_chunks} rc 2"),
        "the driver's OOM"
    );
    assert_eq!(
        plain.snapshot().device_usage(0).data,
        physical_chunks * CHUNK
    );
    p.send_line();
    assert_eq!(p.line(), format!("freed {physical_chunks}"));
    p.finish();
}

/// Serialises the two stress tests: each saturates the machine's cores, and the stall bound of
/// the second must not measure the first's load.
static STRESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The numbers of a line `<prefix> k1 v1 k2 v2 ...`.
fn fields(line: &str, prefix: &str) -> std::collections::HashMap<String, i64> {
    let rest = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected {line:?}"));
    let words: Vec<&str> = rest.split_whitespace().collect();
    words
        .chunks(2)
        .map(|kv| (kv[0].to_owned(), kv[1].parse().expect("number")))
        .collect()
}

/// 16 threads × 100,000 alloc/free pairs of 64 MiB against a cap with room for four at a time
/// (512 MiB, one 256 MiB context): the bytes the program held at once never exceed what the cap
/// leaves, every pair is either served or refused with OOM, and the region ends at the context.
#[test]
fn sixteen_threads_times_100000_pairs_never_exceed_the_cap_and_end_at_zero() {
    let _alone = STRESS.lock().unwrap_or_else(|e| e.into_inner());
    let spec = NodeSpec::uniform(1, GpuSpec::a100_80gb).with_cuda_context_mib(CTX / MIB);
    let c = Container::with(spec, "512m", &[]);
    let mut p = c.spawn_quiet(&["pairs", "16", "100000"]);
    let f = fields(&p.line(), "pairs ");
    assert_eq!(f["ok"] + f["refused"], 1_600_000, "{f:?}");
    assert!(f["ok"] > 0, "{f:?}");
    let room = (512 * MIB - CTX) as i64;
    assert!(
        f["max_held"] <= room,
        "held {} > {room}: {f:?}",
        f["max_held"]
    );
    let usage = c.snapshot().device_usage(0);
    assert_eq!((usage.data, usage.total), (0, CTX), "{usage:?}");
    p.finish();
}

/// 200 processes SIGKILLed at random moments while allocating and freeing (some inside the
/// limiter's accounting, some inside the driver), eight at a time, while two other processes
/// keep allocating: no allocation or free of those two ever takes a second (timed inside the C
/// program: a stall bound, not a speed goal), and afterwards the region is consistent: a new
/// process gets the whole cap (dead slots reaped) and the container ends at zero.
#[test]
fn two_hundred_processes_killed_mid_allocation_never_stall_the_others() {
    let _alone = STRESS.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = 16 * MIB;
    let spec = NodeSpec::uniform(1, GpuSpec::a100_80gb).with_cuda_context_mib(ctx / MIB);
    let c = Container::with(spec, "4g", &[]);
    let mut steady: Vec<Proc> = (0..2).map(|_| c.spawn_quiet(&["steady"])).collect();
    for p in &mut steady {
        assert_eq!(p.line(), "steady");
    }
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut killed = 0;
    while killed < 200 {
        let mut batch: Vec<Proc> = (0..8).map(|_| c.spawn(&["churn"])).collect();
        for v in &mut batch {
            assert_eq!(v.line(), "churning");
        }
        for mut v in batch {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(std::time::Duration::from_micros(seed % 3000));
            v.child.kill().expect("SIGKILL");
            v.child.wait().expect("reap the zombie");
            killed += 1;
        }
    }
    for mut p in steady {
        drop(p.child.stdin.take());
        let f = fields(&p.line(), "steady ");
        assert!(f["pairs"] > 0, "{f:?}");
        assert!(f["max_ns"] < 1_000_000_000, "a call stalled: {f:?}");
        p.finish();
    }
    // A newcomer gets the whole cap: everything the dead held is reaped.
    let whole = (4 * GIB - ctx) / CHUNK;
    assert_eq!(c.run(&["hold", "64"]), format!("held {whole} rc 2\n"));
    let snap = c.snapshot();
    assert_eq!(snap.device_usage(0).total, 0, "{:?}", snap.device_usage(0));
}
