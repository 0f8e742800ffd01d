//! A hostile tenant against the shared region and the budget (issue 12): arithmetic on absurd sizes,
//! who sets the limit, how the region file is opened, stale holders of slots and of the lock, the
//! allocation table's capacity, context teardown, tampering with the region, and a multi-process,
//! multi-thread hammer. Every process is `tests/c/hostile_region.c` on the gpu-sim fake driver (one
//! A100 80GB, 300 MiB contexts) under `LD_PRELOAD=libvgpu.so`; where the three ways of reaching the
//! driver (direct link, `dlopen` + `dlsym`, `cuGetProcAddress`) take different code, each is run.
//!
//! The test plays the tenant's other processes too: it edits the region file with `pwrite` at the
//! offsets of `vgpu_region::layout`, as any process of the container can.

#![allow(clippy::unwrap_used)]

mod common;

use common::{compile, libvgpu};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::io::{BufRead, BufReader, Write};
use std::mem::offset_of;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use vgpu_region::layout::{DeviceMemory, ProcSlot, SharedRegion};
use vgpu_region::{Region, RegionConfig, RegionReader};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// gpu-sim's default context size, which the limiter measures and charges per process.
const CTX: u64 = 300 * MIB;
const CHUNK: u64 = 256 * MIB;
const PATHS: [&str; 3] = ["direct", "dlsym", "procaddr"];

/// Chunks of 256 MiB that fit next to one context under `cap`.
fn chunks_under(cap: u64) -> u64 {
    (cap - CTX) / CHUNK
}

struct Tenant {
    node: SimNode,
    prog: PathBuf,
    /// The region file every process of this container is given.
    region: PathBuf,
    _bin: tempfile::TempDir,
}

impl Tenant {
    fn new() -> Self {
        let bin = tempfile::tempdir().unwrap();
        let lib_dir = gpu_sim::cuda_library()
            .parent()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let include = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/gpu-sim/csrc")
            .to_string_lossy()
            .into_owned();
        let prog = compile(
            bin.path(),
            "hostile_region",
            &["-I", &include, "-L", &lib_dir, "-lcuda", "-pthread"],
        );
        let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap();
        let region = node.dir().join("cudevshr.cache");
        Self {
            node,
            prog,
            region,
            _bin: bin,
        }
    }

    /// A process of the container: `args` after the program name, `cap` as
    /// `CUDA_DEVICE_MEMORY_LIMIT` (None: unset).
    fn command(&self, args: &[&str], cap: Option<&str>) -> Command {
        let mut cmd = Command::new(&self.prog);
        let (k, v) = gpu_sim::library_path_env();
        cmd.args(args)
            .envs(self.node.env())
            .env(k, v)
            .env_remove("CUDA_DEVICE_MEMORY_LIMIT")
            .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &self.region)
            .env("LD_PRELOAD", libvgpu());
        if let Some(cap) = cap {
            cmd.env("CUDA_DEVICE_MEMORY_LIMIT", cap);
        }
        cmd
    }

    /// Runs to completion; the process must exit 0. Returns (stdout, stderr).
    fn run(&self, args: &[&str], cap: Option<&str>) -> (String, String) {
        let (code, stdout, stderr) = self.run_any(args, cap);
        assert_eq!(code, 0, "{args:?} failed: {stdout}{stderr}");
        (stdout, stderr)
    }

    /// Runs to completion; the process must exit (any code), not die of a signal. Returns (exit code,
    /// stdout, stderr).
    fn run_any(&self, args: &[&str], cap: Option<&str>) -> (i32, String, String) {
        let out = self
            .command(args, cap)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let code = out
            .status
            .code()
            .unwrap_or_else(|| panic!("{args:?} crashed: {:?}: {stdout}{stderr}", out.status));
        (code, stdout, stderr)
    }

    /// A process that must fail closed: even its context is refused (the program prints "no
    /// context" and exits 1), with one error line naming `why`.
    fn refused_entirely(&self, why: &str, env: &[(&str, &Path)]) {
        let out = self
            .command(&["direct", "fill"], Some("2g"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            (out.status.code(), stdout.trim()),
            (Some(1), "no context"),
            "{stdout}{stderr}"
        );
        assert!(stderr.contains(why), "no {why:?} in {stderr}");
    }

    fn spawn(&self, args: &[&str], cap: &str) -> Proc {
        let mut child = self
            .command(args, Some(cap))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Proc { child, out }
    }

    fn file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.region)
            .unwrap()
    }

    /// The slot index holding `pid`.
    fn slot_of(&self, pid: u32) -> usize {
        let snap = RegionReader::read_snapshot(&self.region).unwrap();
        snap.processes
            .iter()
            .find(|p| p.pid == pid as i32)
            .unwrap_or_else(|| panic!("no slot for {pid}: {snap:?}"))
            .slot
    }

    fn limit(&self) -> u64 {
        RegionReader::read_snapshot(&self.region).unwrap().limits[0]
    }
}

struct Proc {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Proc {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "child ended early");
        l.trim_end().to_owned()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin and waits; the process must exit 0 (no crash).
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        for l in (&mut self.out).lines() {
            rest.push_str(&l.unwrap());
            rest.push('\n');
        }
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "exit status {status:?}: {rest}");
        rest
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The number after `key` in a line of `name key value ...` fields.
fn field(line: &str, key: &str) -> u64 {
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f
        .iter()
        .position(|x| *x == key)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    f[i + 1].parse().unwrap()
}

fn line_of<'a>(stdout: &'a str, first: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no {first:?} line in {stdout}"))
}

/// Byte offset of `used[dev].<field>` of slot `slot`.
fn used_offset(slot: usize, dev: usize, field: usize) -> u64 {
    (offset_of!(SharedRegion, procs)
        + slot * size_of::<ProcSlot>()
        + offset_of!(ProcSlot, used)
        + dev * size_of::<DeviceMemory>()
        + field) as u64
}

/// Byte offset of slot `slot`'s grant word on device 0.
fn grant_offset(slot: usize) -> u64 {
    used_offset(
        slot,
        0,
        offset_of!(DeviceMemory, unused) + 8 * vgpu_region::layout::DEVICE_GRANT_WORD,
    )
}

/// What a tenant does to hide a slot from the others: its status and PID cleared.
fn hide_slot(f: &std::fs::File, slot: usize) {
    for field in [offset_of!(ProcSlot, status), offset_of!(ProcSlot, pid)] {
        f.write_all_at(&0i32.to_ne_bytes(), slot_offset(slot, field))
            .unwrap();
    }
}

fn slot_offset(slot: usize, field: usize) -> u64 {
    (offset_of!(SharedRegion, procs) + slot * size_of::<ProcSlot>() + field) as u64
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Arithmetic

#[test]
fn absurd_sizes_in_every_family_are_refused_and_change_no_counter() {
    let t = Tenant::new();
    for path in PATHS {
        let _ = std::fs::remove_file(&t.region);
        let (out, _) = t.run(&[path, "absurd"], Some("2g"));
        let first = line_of(&out, "first");
        assert_eq!(field(first, "rc"), 0, "{path}: {out}");
        let held = field(first, "used");
        assert_eq!(held, CTX + CHUNK, "{path}: {out}");
        let mut absurd = 0;
        for l in out
            .lines()
            .filter(|l| !l.starts_with("first") && !l.starts_with("fill"))
        {
            absurd += 1;
            assert_eq!(field(l, "rc"), 2, "{path}: refused with OOM: {l}");
            assert_eq!(
                field(l, "used"),
                held,
                "{path}: a refused request changed the usage: {l}\n{out}"
            );
        }
        assert_eq!(absurd, 3 * 15, "{path}: every family, three rounds: {out}");
        let fill = line_of(&out, "fill");
        assert_eq!(
            field(fill, "fill"),
            chunks_under(2 * GIB) - 1,
            "{path}: after the rounds the cap is what it was: {out}"
        );
        assert_eq!(field(fill, "rc"), 2, "{path}: {out}");
    }
}

/// A counter that would wrap is refused without being written: a reader never sees a wrapped value
/// and the usage is exactly what it was (old code: `fetch_add` wrapped it, the rollback cleared it).
#[test]
fn no_reader_ever_observes_a_wrapped_counter() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.cache");
    let region = Region::open_or_create(&path, &RegionConfig::default()).unwrap();
    region.register_current_process().unwrap();
    region
        .add_usage(0, vgpu_region::MemoryKind::Data, 100)
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut bad = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let seen = RegionReader::read_snapshot(&path).unwrap().processes[0].used[0].total;
                bad += u64::from(seen != 100);
            }
            bad
        });
        // Limit u64::MAX so the early "larger than the limit" refusal does not apply: only the
        // checked add stands between a request of more than 2^64 − 100 bytes and a wrapped word.
        let admitted = (0..2000u64)
            .filter(|i| {
                region
                    .try_add_usage(
                        0,
                        vgpu_region::MemoryKind::Data,
                        u64::MAX - i % 100,
                        u64::MAX,
                    )
                    .unwrap()
                    .is_ok()
            })
            .count();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(admitted, 0);
        assert_eq!(
            reader.join().unwrap(),
            0,
            "a reader saw a value other than 100"
        );
    });
    assert_eq!(region.device_usage(0).unwrap(), 100);
}

// ---------------------------------------------------------------------------------------------------
// Who sets the limit

#[test]
fn a_first_process_with_a_malformed_limit_does_not_uncap_the_container() {
    let t = Tenant::new();
    let (code, out, err) = t.run_any(&["direct", "fill"], Some("1gb"));
    assert_eq!(
        (code, out.trim()),
        (1, "no context"),
        "fails closed itself: {err}"
    );
    assert_eq!(t.limit(), 0, "it created the region without a limit");
    let (out, _) = t.run(&["direct", "fill"], Some("2g"));
    assert_eq!(
        field(line_of(&out, "fill"), "fill"),
        chunks_under(2 * GIB),
        "the next process with a valid limit is capped by it: {out}"
    );
    assert_eq!(t.limit(), 2 * GIB, "and the region is repaired");
}

#[test]
fn a_region_recorded_without_or_with_a_looser_limit_is_tightened_never_loosened() {
    let t = Tenant::new();
    // What a first process with only an SM cap records: memory limit 0 = unlimited.
    let mut sm_only = RegionConfig::default();
    sm_only.sm_limits[0] = 50;
    drop(Region::open_or_create(&t.region, &sm_only).unwrap());
    let (out, _) = t.run(&["direct", "fill"], Some("2g"));
    assert_eq!(
        field(line_of(&out, "fill"), "fill"),
        chunks_under(2 * GIB),
        "{out}"
    );
    assert_eq!(t.limit(), 2 * GIB);
    // A process asking for more gets the region's stricter limit, and the region keeps it.
    let (out, _) = t.run(&["direct", "fill"], Some("8g"));
    assert_eq!(
        field(line_of(&out, "fill"), "fill"),
        chunks_under(2 * GIB),
        "{out}"
    );
    assert_eq!(t.limit(), 2 * GIB, "never loosened");
    // A region that records more than the process's valid limit is lowered to it.
    let _ = std::fs::remove_file(&t.region);
    let mut loose = RegionConfig::default();
    loose.limits[0] = 4 * GIB;
    drop(Region::open_or_create(&t.region, &loose).unwrap());
    let (out, _) = t.run(&["direct", "fill"], Some("1g"));
    assert_eq!(
        field(line_of(&out, "fill"), "fill"),
        chunks_under(GIB),
        "{out}"
    );
    assert_eq!(t.limit(), GIB);
}

#[test]
fn a_limit_the_node_lowers_takes_effect_in_a_running_process() {
    let t = Tenant::new();
    let mut p = t.spawn(&["direct", "hold", "2"], "2g");
    let held = p.line();
    assert_eq!(field(&held, "held"), 2, "{held}");
    // The node rewrites the region's limit to 1 GiB (e.g. its record from Allocate).
    t.file()
        .write_all_at(&GIB.to_ne_bytes(), (offset_of!(SharedRegion, limit)) as u64)
        .unwrap();
    p.send("more");
    let more = p.line();
    assert_eq!(
        field(&more, "more"),
        0,
        "812 MiB held under a 1 GiB limit: {more}"
    );
    p.finish();
}

// ---------------------------------------------------------------------------------------------------
// Tampering with the region

#[test]
fn zeroed_usage_words_do_not_lift_the_cap_of_the_process_holding_the_memory() {
    let t = Tenant::new();
    let mut p = t.spawn(&["direct", "hold", "3"], "2g");
    assert_eq!(field(&p.line(), "held"), 3);
    let slot = t.slot_of(p.child.id());
    let f = t.file();
    for field in [
        offset_of!(DeviceMemory, total),
        offset_of!(DeviceMemory, data_size),
        offset_of!(DeviceMemory, context_size),
    ] {
        f.write_all_at(&0u64.to_ne_bytes(), used_offset(slot, 0, field))
            .unwrap();
    }
    p.send("more");
    let more = p.line();
    let held = CTX + 3 * CHUNK;
    assert_eq!(
        field(&more, "more"),
        (2 * GIB - held) / CHUNK,
        "the process still counts what it holds: {more}"
    );
    assert_eq!(field(&more, "rc"), 2);
    p.finish();
}

#[test]
fn a_cleared_slot_is_taken_back_and_counted_again() {
    let t = Tenant::new();
    let mut p = t.spawn(&["direct", "hold", "3"], "2g");
    assert_eq!(field(&p.line(), "held"), 3);
    let pid = p.child.id();
    let slot = t.slot_of(pid);
    let f = t.file();
    hide_slot(&f, slot);
    p.send("more");
    let more = p.line();
    assert_eq!(
        field(&more, "more"),
        (2 * GIB - CTX - 3 * CHUNK) / CHUNK,
        "{more}"
    );
    // The other processes see it again, with everything it holds.
    let snap = RegionReader::read_snapshot(&t.region).unwrap();
    let me = snap
        .processes
        .iter()
        .find(|s| s.pid == pid as i32)
        .unwrap_or_else(|| panic!("slot not taken back: {snap:?}"));
    assert_eq!(me.used[0].total, CTX + 6 * CHUNK, "{snap:?}");
    p.finish();
}

#[test]
fn a_truncated_or_deleted_region_fails_closed_and_crashes_nobody() {
    let t = Tenant::new();
    // Truncated between processes: the next one refuses (one line on stderr) and exits normally.
    t.run(&["direct", "fill"], Some("2g"));
    t.file().set_len(4096).unwrap();
    t.refused_entirely("truncated", &[]);
    // Deleted under a running process: it keeps its mapping and its own view of the cap.
    std::fs::remove_file(&t.region).unwrap();
    let mut p = t.spawn(&["direct", "hold", "2"], "2g");
    assert_eq!(field(&p.line(), "held"), 2);
    std::fs::remove_file(&t.region).unwrap();
    p.send("more");
    let more = p.line();
    assert_eq!(field(&more, "more"), chunks_under(2 * GIB) - 2, "{more}");
    assert!(p.finish().contains("freed 6"));
}

// ---------------------------------------------------------------------------------------------------
// Files

#[test]
fn a_region_path_that_is_a_symlink_is_never_followed() {
    let t = Tenant::new();
    // Another container's region, with a process holding 1 GiB in it.
    let other_dir = tempfile::tempdir().unwrap();
    let other = other_dir.path().join("other.cache");
    let mut cfg = RegionConfig::default();
    cfg.limits[0] = 80 * GIB;
    let victim = Region::open_or_create(&other, &cfg).unwrap();
    victim.register_current_process().unwrap();
    victim
        .add_usage(0, vgpu_region::MemoryKind::Data, GIB)
        .unwrap();
    let before = RegionReader::read_snapshot(&other).unwrap();
    std::os::unix::fs::symlink(&other, &t.region).unwrap();
    t.refused_entirely("symbolic link", &[]);
    assert_eq!(
        RegionReader::read_snapshot(&other).unwrap(),
        before,
        "the other container's region is untouched"
    );

    // A dangling link: its target is never created (a root process would make it 0666).
    std::fs::remove_file(&t.region).unwrap();
    let target = other_dir.path().join("planted");
    std::os::unix::fs::symlink(&target, &t.region).unwrap();
    t.refused_entirely("symbolic link", &[]);
    assert!(!target.exists(), "created through a dangling link");
}

#[test]
fn a_region_directory_others_can_write_without_the_sticky_bit_is_refused() {
    let t = Tenant::new();
    let dir = tempfile::tempdir().unwrap();
    let cmd_region = dir.path().join("c.cache");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let env = [("CUDA_DEVICE_MEMORY_SHARED_CACHE", cmd_region.as_path())];
    t.refused_entirely("mode 0777", &env);
    assert!(!cmd_region.exists());
    // Sticky (like /tmp): fine.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = t
        .command(&["direct", "fill"], Some("2g"))
        .envs(env)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        field(line_of(&out, "fill"), "fill"),
        chunks_under(2 * GIB),
        "{out}{err}"
    );
    // Created exclusively and made 0666 through its descriptor.
    let mode = std::fs::metadata(&cmd_region).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o666);
}

// ---------------------------------------------------------------------------------------------------
// Stale holders

/// A `sleep` child that lives for the test.
struct Sleeper(Child);

impl Sleeper {
    fn new() -> Self {
        Self(
            Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("sleep (coreutils) missing: run tests/prereqs/install.sh"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        // A stopped process cannot die of SIGKILL before it is continued on every kernel we run on.
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Within a grant (charges that do not sum the container) a hidden slot is still noticed at the
/// next charge, and a forged grant word buys nothing: the tenant clears the slot's PID and status,
/// then forges the grant word (to the cap, to 2^64 − 1), and the process allocates 512 KiB at a
/// time until refused.
#[test]
fn within_a_grant_a_hidden_slot_is_made_visible_and_a_forged_grant_buys_nothing() {
    let t = Tenant::new();
    let mut p = t.spawn(&["direct", "hold", "3"], "2g");
    assert_eq!(field(&p.line(), "held"), 3);
    let pid = p.child.id();
    let slot = t.slot_of(pid);
    let f = t.file();
    let grant_at = grant_offset(slot);
    let mut word = [0u8; 8];
    f.read_exact_at(&mut word, grant_at).unwrap();
    assert!(u64::from_ne_bytes(word) > 0, "the process holds a grant");
    // Hidden: PID and status cleared, the grant word left alone.
    hide_slot(&f, slot);
    // The very next charge (one that fits the grant) shows the process to the others again.
    p.send("small 1");
    assert_eq!(field(&p.line(), "small"), 1);
    let held = CTX + 3 * CHUNK + (512 << 10);
    let snap = RegionReader::read_snapshot(&t.region).unwrap();
    let me = snap
        .processes
        .iter()
        .find(|s| s.pid == pid as i32)
        .unwrap_or_else(|| panic!("slot not taken back at the next charge: {snap:?}"));
    assert_eq!(me.used[0].total, held, "{snap:?}");
    p.send("small");
    let small = p.line();
    assert_eq!(
        field(&small, "small"),
        (2 * GIB - held) / (512 << 10),
        "exactly what fits: {small}"
    );
    // Forged grants: the process is at the cap; no word makes it allocate more.
    let slot = t.slot_of(pid);
    let grant_at = grant_offset(slot);
    for forged in [2 * GIB, u64::MAX] {
        f.write_all_at(&forged.to_ne_bytes(), grant_at).unwrap();
        p.send("small");
        let small = p.line();
        assert_eq!(field(&small, "small"), 0, "grant word {forged:#x}: {small}");
        assert_eq!(field(&small, "rc"), 2, "{small}");
    }
    p.finish();
}

#[test]
fn a_slot_whose_pid_now_belongs_to_another_process_is_reaped() {
    let t = Tenant::new();
    let mut cfg = RegionConfig::default();
    cfg.limits[0] = 2 * GIB;
    drop(Region::open_or_create(&t.region, &cfg).unwrap());
    // A dead process's slot holding 1.5 GiB, whose PID a live process (the sleeper) now has.
    let sleeper = Sleeper::new();
    let f = t.file();
    let wrong_start = start_time(sleeper.pid()) + 7;
    f.write_all_at(
        &(sleeper.pid() as i32).to_ne_bytes(),
        slot_offset(0, offset_of!(ProcSlot, pid)),
    )
    .unwrap();
    f.write_all_at(
        &wrong_start.to_ne_bytes(),
        slot_offset(0, offset_of!(ProcSlot, unused) + 8),
    )
    .unwrap();
    f.write_all_at(
        &(1536 * MIB).to_ne_bytes(),
        used_offset(0, 0, offset_of!(DeviceMemory, total)),
    )
    .unwrap();
    f.write_all_at(
        &1i32.to_ne_bytes(),
        slot_offset(0, offset_of!(ProcSlot, status)),
    )
    .unwrap();
    f.write_all_at(
        &1i32.to_ne_bytes(),
        offset_of!(SharedRegion, proc_num) as u64,
    )
    .unwrap();
    let (out, _) = t.run(&["direct", "fill"], Some("2g"));
    assert_eq!(
        field(line_of(&out, "fill"), "fill"),
        chunks_under(2 * GIB),
        "the reused PID's old usage is not charged: {out}"
    );
}

#[test]
fn a_stopped_process_holding_the_region_lock_delays_nobody() {
    let t = Tenant::new();
    let mut cfg = RegionConfig::default();
    cfg.limits[0] = 2 * GIB;
    drop(Region::open_or_create(&t.region, &cfg).unwrap());
    // A live process that took the lock and stopped: its owner word with the right start time.
    let sleeper = Sleeper::new();
    assert!(
        Command::new("kill")
            .args(["-STOP", &sleeper.pid().to_string()])
            .status()
            .expect("kill (procps) missing: run tests/prereqs/install.sh")
            .success()
    );
    let word = u64::from(sleeper.pid()) | (u64::from(start_time(sleeper.pid()) as u32) << 32);
    t.file()
        .write_all_at(
            &word.to_ne_bytes(),
            offset_of!(SharedRegion, owner_pid) as u64,
        )
        .unwrap();
    let started = Instant::now();
    let (out, _) = t.run(&["direct", "fill"], Some("2g"));
    let took = started.elapsed();
    let fill = line_of(&out, "fill");
    assert_eq!(field(fill, "fill"), chunks_under(2 * GIB), "{out}");
    assert!(
        field(fill, "max_ms") < 1000,
        "an allocation waited for the lock: {fill}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

// ---------------------------------------------------------------------------------------------------
// Capacity and teardown

#[test]
fn allocations_are_not_refused_by_a_fixed_table_far_below_the_cap() {
    let t = Tenant::new();
    for path in PATHS {
        let _ = std::fs::remove_file(&t.region);
        let (out, _) = t.run(&[path, "small", "40000"], Some("4g"));
        let small = line_of(&out, "small");
        assert_eq!(field(small, "ok"), 40_000, "{path}: {out}");
        assert_eq!(field(small, "used"), CTX + 40_000 * 4096, "{path}: {out}");
        let freed = line_of(&out, "freed");
        assert_eq!(field(freed, "freed"), 40_000, "{path}: {out}");
        assert_eq!(field(freed, "used"), CTX, "{path}: {out}");
    }
}

#[test]
fn resetting_the_primary_context_gives_its_memory_back() {
    let t = Tenant::new();
    for path in PATHS {
        let _ = std::fs::remove_file(&t.region);
        let (out, _) = t.run(&[path, "teardown"], Some("3000m"));
        let first = line_of(&out, "first");
        assert_eq!(field(first, "rc"), 0, "{path}: {out}");
        assert_eq!(field(first, "used"), CTX + 2000 * MIB, "{path}: {out}");
        // (No context is current after the reset, so the "used" the program prints there is the
        // driver's refusal; the second allocation tells.)
        assert_eq!(field(line_of(&out, "reset"), "rc"), 0, "{path}: {out}");
        let second = line_of(&out, "second");
        assert_eq!(
            (field(second, "rc"), field(second, "used")),
            (0, CTX + 2000 * MIB),
            "{path}: no false OOM: {out}"
        );
    }
}

#[test]
fn destroying_a_created_context_gives_back_what_was_allocated_in_it() {
    let t = Tenant::new();
    let (out, _) = t.run(&["direct", "ctxdestroy"], Some("3000m"));
    assert_eq!(
        field(line_of(&out, "created"), "used"),
        2 * CTX + 1600 * MIB,
        "{out}"
    );
    let destroyed = line_of(&out, "destroyed");
    assert_eq!(
        (field(destroyed, "rc"), field(destroyed, "used")),
        (0, CTX + 100 * MIB),
        "the created context and its 1500 MiB are given back, the primary's 100 MiB stay: {out}"
    );
    let after = line_of(&out, "after");
    assert_eq!(
        (field(after, "rc"), field(after, "used")),
        (0, CTX + 2100 * MIB),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------------
// The hammer

/// Four processes of eight threads allocate and free 2..64 MiB at random, every seventh operation
/// an absurd request; after every successful allocation a process adds up what all of them hold
/// (published in a shared file) and checks it against the cap minus the four contexts.
#[test]
fn hammer_many_processes_and_threads_never_exceed_the_cap() {
    let t = Tenant::new();
    let procs = 4u64;
    let cap = 2 * GIB;
    let budget = cap - procs * CTX;
    let dir = tempfile::tempdir().unwrap();
    let held = dir.path().join("held");
    std::fs::write(&held, [0u8; 4096]).unwrap();
    let held_s = held.to_string_lossy().into_owned();
    let budget_s = budget.to_string();
    // One at a time up to their contexts (each measured on a quiet GPU), then all at once.
    let mut children: Vec<Proc> = Vec::new();
    for i in 0..procs {
        let index = i.to_string();
        let mut p = t.spawn(
            &["direct", "hammer", &held_s, &index, "8", "3000", &budget_s],
            "2g",
        );
        let ready = p.line();
        assert_eq!(field(&ready, "used"), (i + 1) * CTX, "{ready}");
        children.push(p);
    }
    for p in &mut children {
        p.send("go");
    }
    let (mut ok, mut refused) = (0, 0);
    let lines: Vec<String> = children.iter_mut().map(Proc::line).collect();
    for p in children {
        p.finish();
    }
    for line in &lines {
        assert!(line.starts_with("hammer"), "{line}");
        assert_eq!(field(line, "violations"), 0, "over the cap: {line}");
        assert_eq!(field(line, "absurd_granted"), 0, "{line}");
        assert!(field(line, "max") <= budget, "{line}");
        ok += field(line, "ok");
        refused += field(line, "refused");
    }
    assert!(
        ok > 1000 && refused > 100,
        "no contention: ok {ok} refused {refused}"
    );
    let snap = RegionReader::read_snapshot(&t.region).unwrap();
    assert_eq!(snap.device_usage(0).total, 0, "{snap:?}");
}

// ---------------------------------------------------------------------------------------------------
// Fork (issue 20: the charge takes the slot itself, `NotRegistered`, instead of checking it first)

/// A process holding memory forks; each child fills the cap in the parent's context. After a
/// `fork()` the driver refuses the child (as CUDA does: its state does not survive a fork), also
/// when the fork came while another thread's charges were in flight; the child's charges (taken
/// out of line, `NotRegistered`, in a fresh slot) are given back, and nothing of them stays in
/// the region. A raw `clone` runs no atfork handler, neither the driver's (gpu-sim then lets the
/// child allocate) nor ours: the child keeps the parent's slot and its copy of the parent's own
/// count, so parent and child together still never pass the cap; and its exit leaves the parent's
/// slot alone (before: the child's atexit freed it, and the region showed the parent holding
/// nothing until its next charge).
#[test]
fn a_fork_child_and_its_parent_together_stay_under_the_cap() {
    let t = Tenant::new();
    let cap = 3 * GIB;
    let held = 4;
    let room = (cap - CTX - held * CHUNK) / CHUNK;
    for how in ["fork", "thread", "raw"] {
        let (out, _) = t.run(&["direct", "fork", &held.to_string(), how], Some("3g"));
        assert!(!out.contains("child died"), "{how}: {out}");
        let children: Vec<&str> = out.lines().filter(|l| l.starts_with("child ")).collect();
        assert_eq!(children.len(), 8, "{how}: {out}");
        for c in children {
            let (k, rc) = (field(c, "child"), field(c, "rc"));
            if how == "raw" {
                assert_eq!((k, rc), (room, 2), "{how}: beside {held} chunks: {c}");
                assert!(field(c, "used") <= cap, "{how}: {c}");
            } else {
                assert_eq!(
                    (k, rc),
                    (0, 3),
                    "{how}: the driver refuses a fork child: {c}"
                );
            }
        }
        let parent = line_of(&out, "parent");
        assert_eq!(field(parent, "used"), CTX + held * CHUNK, "{how}: {out}");
        let snap = RegionReader::read_snapshot(&t.region).unwrap();
        assert!(snap.processes.is_empty(), "{how}: slots left: {snap:?}");
    }
}

/// A `vfork()` child that calls `exit()` (not `_exit`) runs the atexit handlers in its parent's
/// memory, the limiter's slot release among them: it freed the parent's slot and made the parent
/// forget it, and the parent's next charge took a fresh slot without what it held — for good, so a
/// second process could fill the whole cap again (4.3 GiB held under a 3 GiB cap). Only the process
/// that took a slot frees it, and a slot taken again carries the process's own counts.
#[test]
fn a_vfork_child_calling_exit_does_not_erase_its_parents_charges() {
    let t = Tenant::new();
    let mut p = t.spawn(&["direct", "vfork", "4"], "3g");
    let parent = p.line();
    assert_eq!(field(&parent, "used"), CTX + 4 * CHUNK, "{parent}");
    p.send("one");
    let one = p.line();
    assert_eq!(field(&one, "rc"), 0, "{one}");
    assert_eq!(field(&one, "used"), CTX + 5 * CHUNK, "{one}");
    let (out, _) = t.run(&["direct", "fill"], Some("3g"));
    let fill = line_of(&out, "fill");
    assert_eq!(
        field(fill, "fill"),
        (3 * GIB - 2 * CTX - 5 * CHUNK) / CHUNK,
        "beside the parent's context and 5 chunks: {fill}"
    );
    p.finish();
}
