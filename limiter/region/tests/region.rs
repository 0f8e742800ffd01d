//! The writer: create/open/reopen, refusals, accounting across processes, the SIGKILL-safe lock, reaping,
//! and the reader reading what the writer wrote.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use vgpu_region::layout::{
    MULTIPROCESS_SHARED_REGION_MAGIC_FLAG, RECENT_KERNEL_ACTIVE, REGION_FILE_SIZE, REGION_SIZE, v0,
};
use vgpu_region::{
    Acquired, LaunchGate, LayoutVersion, MemoryKind, Region, RegionConfig, RegionError,
    RegionReader, region_path_from_env,
};

const MIB: u64 = 1 << 20;
const CHILD_ROLE_ENV: &str = "VGPU_REGION_TEST_CHILD";
const CHILD_PATH_ENV: &str = "VGPU_REGION_TEST_PATH";
const CHILD_BYTES_ENV: &str = "VGPU_REGION_TEST_BYTES";
/// The stress test's shared counter of bytes held (a file of 8 bytes every process maps).
const CHILD_HELD_ENV: &str = "VGPU_REGION_TEST_HELD";

fn config(limit0: u64) -> RegionConfig {
    let mut c = RegionConfig::default();
    c.limits[0] = limit0;
    c.limits[1] = 2 * limit0;
    c.sm_limits[0] = 50;
    c
}

fn region_file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("cudevshr.cache")
}

// ---------------------------------------------------------------------------------------------------------
// Child processes: this test binary re-executed, filtered to `child_entry`, with a role in the environment.

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE_ENV) else {
        return;
    };
    let path = PathBuf::from(std::env::var(CHILD_PATH_ENV).expect("child needs a region path"));
    let region = Region::open_or_create(&path, &config(1 << 30)).expect("child opens the region");
    let mut out = std::io::stdout();
    match role.as_str() {
        "account" => {
            let slot = region.register_current_process().expect("child registers");
            region
                .add_usage(0, MemoryKind::Data, 100 * MIB)
                .expect("add");
            region.add_usage(1, MemoryKind::Context, MIB).expect("add");
            writeln!(out, "READY slot={slot}").expect("stdout");
            out.flush().expect("flush");
            // Hold the slot until the parent closes our stdin, then exit cleanly (Drop releases the slot).
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        }
        "hold-lock" => {
            let _lock = region.lock(Duration::from_secs(5)).expect("child locks");
            writeln!(out, "READY locked").expect("stdout");
            out.flush().expect("flush");
            std::thread::sleep(Duration::from_secs(60));
        }
        "register-and-hang" => {
            let slot = region.register_current_process().expect("child registers");
            region.add_usage(0, MemoryKind::Data, 123).expect("add");
            writeln!(out, "READY slot={slot}").expect("stdout");
            out.flush().expect("flush");
            std::thread::sleep(Duration::from_secs(60));
        }
        "charge" => {
            // Charges `VGPU_REGION_TEST_BYTES` at the test's 100 MiB limit and says whether it fitted.
            let bytes: u64 = std::env::var(CHILD_BYTES_ENV)
                .expect("child needs a size")
                .parse()
                .expect("size");
            region.register_current_process().expect("child registers");
            let got = region
                .charge(0, MemoryKind::Data, bytes, 100 * MIB)
                .expect("charge");
            writeln!(
                out,
                "READY {}",
                if got.is_ok() { "charged" } else { "refused" }
            )
            .expect("stdout");
            out.flush().expect("flush");
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        }
        "stress" => stress_child(&region),
        "revoke-rounds" => revoke_rounds_child(&region),
        other => panic!("unknown child role {other}"),
    }
}

/// The limit the stress children charge against.
const STRESS_LIMIT: u64 = 64 * MIB;

/// Two threads charging and freeing sizes from 1 MiB to a third of [`STRESS_LIMIT`] through the whole
/// protocol (grants, full checks, revocations), keeping the bytes they hold in a counter every process
/// maps: added after a charge is admitted, taken away before the credit, so it never counts less than
/// what the processes hold. Exits 3 if it ever exceeds the limit.
fn stress_child(region: &Region) {
    let held = &map_words(
        &std::env::var(CHILD_HELD_ENV).expect("child needs the counter file"),
        1,
    )[0];
    region.register_current_process().expect("child registers");
    let (mut admitted, mut refused) = (0u64, 0u64);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    let mut x = u64::from(std::process::id()) * 0x9E37_79B9 + t + 1;
                    let (mut ok, mut no) = (0u64, 0u64);
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_millis(1500) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let bytes = MIB + x % (STRESS_LIMIT / 3);
                        match region.charge(0, MemoryKind::Data, bytes, STRESS_LIMIT) {
                            Ok(Ok(())) => {
                                let now = held
                                    .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst)
                                    + bytes;
                                if now > STRESS_LIMIT {
                                    eprintln!("over the limit: {now} > {STRESS_LIMIT}");
                                    std::process::exit(3);
                                }
                                std::thread::yield_now();
                                held.fetch_sub(bytes, std::sync::atomic::Ordering::SeqCst);
                                region.credit(0, MemoryKind::Data, bytes).expect("credit");
                                ok += 1;
                            }
                            Ok(Err(_)) => no += 1,
                            Err(e) => panic!("charge: {e}"),
                        }
                    }
                    (ok, no)
                })
            })
            .collect();
        for w in workers {
            let (ok, no) = w.join().expect("worker");
            admitted += ok;
            refused += no;
        }
    });
    let mut out = std::io::stdout();
    writeln!(out, "READY admitted={admitted} refused={refused}").expect("stdout");
    out.flush().expect("flush");
}

/// Maps the first `n` u64 words of the file at `path` (shared between the test and its children).
fn map_words(path: &str, n: usize) -> &'static [std::sync::atomic::AtomicU64] {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("words file");
    // SAFETY: maps n*8 bytes of a file at least that long, shared; never unmapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap the words");
    // SAFETY: n mapped, page-aligned words, only ever accessed atomically.
    unsafe { std::slice::from_raw_parts(p.cast::<std::sync::atomic::AtomicU64>(), n) }
}

/// The revoker of `attack_trimming_a_grant_after_another_process_revoked_it_reinstates_it`: per round
/// (words[0], written by the test), after a varying delay, one `revoke_grants(0)` — exactly what a
/// process about to be refused does; words[2] = the round if it took a grant, then words[1] = the round.
fn revoke_rounds_child(region: &Region) {
    use std::sync::atomic::Ordering::SeqCst;
    let w = map_words(&std::env::var(CHILD_HELD_ENV).expect("words file"), 3);
    let mut x = u64::from(std::process::id()) * 0x9E37_79B9 + 1;
    let mut last = 0;
    let mut out = std::io::stdout();
    writeln!(out, "READY revoker").expect("stdout");
    out.flush().expect("flush");
    loop {
        let r = w[0].load(SeqCst);
        if r == u64::MAX {
            return;
        }
        if r == last {
            std::hint::spin_loop();
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for _ in 0..(x % 3000) {
            std::hint::spin_loop();
        }
        if region.revoke_grants(0).expect("revoke") > 0 {
            w[2].store(r, SeqCst);
        }
        w[1].store(r, SeqCst);
        last = r;
    }
}

struct ChildProc {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl ChildProc {
    fn spawn(role: &str, path: &Path) -> Self {
        Self::spawn_with(role, path, &[])
    }

    fn spawn_with(role: &str, path: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD_ROLE_ENV, role)
            .env(CHILD_PATH_ENV, path)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdout }
    }

    /// Reads the child's output until its `READY …` line and returns the rest of that line.
    fn wait_ready(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).expect("read child stdout");
            assert!(n > 0, "child exited before it was ready");
            // libtest prints "test child_entry ... " without a newline before the test's own output.
            if let Some(at) = line.find("READY ") {
                return line[at + "READY ".len()..].trim_end().to_owned();
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------------

#[test]
fn path_comes_from_env_value_or_hami_default() {
    assert_eq!(
        region_path_from_env(None),
        PathBuf::from("/tmp/cudevshr.cache")
    );
    assert_eq!(
        region_path_from_env(Some("".as_ref())),
        PathBuf::from("/tmp/cudevshr.cache")
    );
    assert_eq!(
        region_path_from_env(Some("/x/y.cache".as_ref())),
        PathBuf::from("/x/y.cache")
    );
}

#[test]
fn creates_a_region_file_like_hami_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let mut cfg = config(4 << 30);
    cfg.priority = 0;
    let region = Region::open_or_create(&path, &cfg).expect("create");
    assert!(region.open_report().initialized_here);
    assert_eq!(region.open_report().limit_mismatch, None);

    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.len(), REGION_FILE_SIZE, "HAMi-core's sizeof + 1");
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);

    let snap = RegionReader::open(&path)
        .expect("reader")
        .snapshot()
        .expect("snapshot");
    assert_eq!(snap.version, LayoutVersion::V1 { minor: 2 });
    assert_eq!(snap.limits, cfg.limits);
    assert_eq!(snap.sm_limits, cfg.sm_limits);
    assert_eq!(snap.priority, 0);
    assert_eq!(snap.recent_kernel, RECENT_KERNEL_ACTIVE);
    assert_eq!(snap.utilization_switch, 1);
    assert_eq!(snap.proc_num, 0);
    assert!(snap.last_kernel_time.is_some_and(|t| t > 1_700_000_000));
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(
        i32::from_ne_bytes(bytes[0..4].try_into().expect("4")),
        MULTIPROCESS_SHARED_REGION_MAGIC_FLAG
    );
}

#[test]
fn reopening_keeps_the_files_limits_and_reports_a_disagreement() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    drop(Region::open_or_create(&path, &config(MIB)).expect("create"));

    let same = Region::open_or_create(&path, &config(MIB)).expect("reopen");
    assert!(!same.open_report().initialized_here);
    assert_eq!(same.open_report().limit_mismatch, None);
    drop(same);

    let other = Region::open_or_create(&path, &config(7 * MIB)).expect("reopen with other limits");
    let mismatch = other
        .open_report()
        .limit_mismatch
        .clone()
        .expect("mismatch reported");
    assert_eq!(mismatch.file_limits[0], MIB);
    assert_eq!(mismatch.requested_limits[0], 7 * MIB);
    assert_eq!(other.limit(0).expect("limit"), MIB, "the file's limits win");
    assert_eq!(other.sm_limit(0).expect("sm"), 50);
}

#[test]
fn accepts_a_file_of_exactly_the_layout_size_and_a_blank_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    drop(Region::open_or_create(&path, &config(MIB)).expect("create"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(REGION_SIZE as u64)
        .expect("trim");
    let region = Region::open_or_create(&path, &config(MIB)).expect("sizeof-sized file");
    assert!(!region.open_report().initialized_here);
    drop(region);

    let blank = dir.path().join("blank.cache");
    std::fs::write(&blank, vec![0u8; REGION_FILE_SIZE as usize]).expect("write");
    let region =
        Region::open_or_create(&blank, &config(3 * MIB)).expect("blank file is initialised");
    assert!(region.open_report().initialized_here);
    assert_eq!(region.limit(0).expect("limit"), 3 * MIB);
}

#[test]
fn refuses_truncated_oversized_foreign_and_unknown_version_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(&str, Vec<u8>)> = {
        let mut foreign = vec![0u8; REGION_FILE_SIZE as usize];
        foreign[..4].copy_from_slice(&0x1234_5678i32.to_ne_bytes());
        let mut v2 = vec![0u8; REGION_FILE_SIZE as usize];
        v2[..4].copy_from_slice(&MULTIPROCESS_SHARED_REGION_MAGIC_FLAG.to_ne_bytes());
        v2[4..8].copy_from_slice(&2u32.to_ne_bytes());
        let mut v1_1 = v2.clone();
        v1_1[4..8].copy_from_slice(&1u32.to_ne_bytes());
        v1_1[8..12].copy_from_slice(&1u32.to_ne_bytes());
        let mut v0_file = vec![0u8; v0::REGION_FILE_SIZE as usize];
        v0_file[..4].copy_from_slice(&MULTIPROCESS_SHARED_REGION_MAGIC_FLAG.to_ne_bytes());
        vec![
            ("truncated", vec![0u8; 1000]),
            ("one byte short", vec![0u8; REGION_SIZE - 1]),
            ("oversized", vec![0u8; REGION_FILE_SIZE as usize + 1]),
            ("foreign", foreign),
            ("major 2", v2),
            ("v1.1", v1_1),
            ("v0", v0_file),
        ]
    };
    for (name, content) in cases {
        let path = dir.path().join(format!("{name}.cache"));
        std::fs::write(&path, &content).expect("write");
        let err = Region::open_or_create(&path, &config(MIB)).expect_err(name);
        match (name, &err) {
            ("truncated" | "one byte short", RegionError::Truncated { .. })
            | ("oversized", RegionError::Oversized { .. })
            | ("foreign", RegionError::BadMagic { .. })
            | ("major 2" | "v1.1", RegionError::UnsupportedVersion { .. })
            | ("v0", RegionError::UnsupportedVersion { major: 0, .. }) => {}
            _ => panic!("{name}: unexpected error {err}"),
        }
        assert_eq!(
            std::fs::read(&path).expect("read"),
            content,
            "{name}: a refused file is left untouched"
        );
    }
}

#[test]
fn accounts_per_device_and_kind_and_saturates_on_removal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let region = Region::open_or_create(&path, &config(MIB)).expect("create");
    assert!(matches!(
        region.add_usage(0, MemoryKind::Data, 1),
        Err(RegionError::NotRegistered { .. })
    ));

    let slot = region.register_current_process().expect("register");
    assert_eq!(
        region.register_current_process().expect("again"),
        slot,
        "idempotent"
    );
    region
        .add_usage(0, MemoryKind::Context, 10 * MIB)
        .expect("ctx");
    region
        .add_usage(0, MemoryKind::Data, 5 * MIB)
        .expect("data");
    region
        .add_usage(3, MemoryKind::Module, MIB)
        .expect("module");
    region
        .remove_usage(0, MemoryKind::Data, 2 * MIB)
        .expect("rm");
    assert_eq!(region.device_usage(0).expect("usage"), 13 * MIB);
    assert_eq!(region.process_usage(3).expect("usage"), MIB);
    assert!(matches!(
        region.add_usage(16, MemoryKind::Data, 1),
        Err(RegionError::DeviceOutOfRange { device: 16 })
    ));

    // Removing more than recorded clamps at zero instead of wrapping to 16 EiB (HAMi-core#200).
    region
        .remove_usage(3, MemoryKind::Module, 5 * MIB)
        .expect("rm");
    assert_eq!(region.device_usage(3).expect("usage"), 0);

    region
        .set_device_info(&["GPU-11111111-2222-3333-4444-555555555555", "GPU-b"])
        .expect("uuids");
    let snap = RegionReader::open(&path)
        .expect("reader")
        .snapshot()
        .expect("snapshot");
    assert_eq!(snap.device_num, 2);
    assert_eq!(
        snap.uuid(0),
        Some("GPU-11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(
        snap.uuid_label(0),
        Some("GPU-11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(snap.uuid(1), Some("GPU-b"));
    assert_eq!(snap.uuid(2), None);
    assert_eq!(snap.processes.len(), 1);
    let me = &snap.processes[0];
    assert_eq!(
        (me.slot, me.pid, me.hostpid, me.status),
        (slot, std::process::id() as i32, 0, 1)
    );
    let usage = snap.device_usage(0);
    assert_eq!(
        (usage.context, usage.module, usage.data, usage.total),
        (10 * MIB, 0, 3 * MIB, 13 * MIB)
    );
    assert_eq!(snap.limit(0), Some(MIB));
    assert_eq!(snap.sm_limit(0), Some(50));

    region.unregister();
    assert_eq!(
        region.device_usage(0).expect("usage"),
        0,
        "an exited slot no longer counts"
    );
    let snap = RegionReader::open(&path)
        .expect("reader")
        .snapshot()
        .expect("snapshot");
    assert!(snap.processes.is_empty());
}

#[test]
fn kernel_launches_follow_the_monitors_write_backs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let region = Region::open_or_create(&path, &config(MIB)).expect("create");
    let monitor = RegionReader::open_writable(&path).expect("monitor");

    // The monitor's round: 2 → 1 → 0, and it stays at 0.
    assert_eq!(monitor.decay_recent_kernel().expect("decay"), 1);
    assert_eq!(monitor.decay_recent_kernel().expect("decay"), 0);
    assert_eq!(monitor.decay_recent_kernel().expect("decay"), 0);
    assert_eq!(
        region.record_kernel_launch(2_000_000_000),
        LaunchGate::Proceed
    );
    assert_eq!(region.recent_kernel(), RECENT_KERNEL_ACTIVE);
    assert_eq!(region.last_kernel_time(), 2_000_000_000);

    monitor.set_recent_kernel(-1).expect("block");
    assert_eq!(
        region.record_kernel_launch(2_000_000_001),
        LaunchGate::Blocked
    );
    assert_eq!(
        region.recent_kernel(),
        -1,
        "a blocked launch does not overwrite the monitor's −1"
    );
    monitor.set_recent_kernel(0).expect("unblock");
    assert_eq!(
        region.record_kernel_launch(2_000_000_001),
        LaunchGate::Proceed
    );
    assert_eq!(region.last_kernel_time(), 2_000_000_001);

    monitor.set_utilization_switch(0).expect("switch");
    assert_eq!(region.utilization_switch(), 0);
    let snap = monitor.snapshot().expect("snapshot");
    assert_eq!((snap.utilization_switch, snap.recent_kernel), (0, 2));

    let read_only = RegionReader::open(&path).expect("reader");
    assert!(matches!(
        read_only.set_utilization_switch(1),
        Err(RegionError::ReadOnly { .. })
    ));
}

#[test]
fn two_processes_account_into_one_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let region = Region::open_or_create(&path, &config(1 << 30)).expect("create");
    region.register_current_process().expect("register");
    region
        .add_usage(0, MemoryKind::Data, 50 * MIB)
        .expect("add");

    let mut child = ChildProc::spawn("account", &path);
    let ready = child.wait_ready();
    assert_eq!(ready, "slot=1");
    assert_eq!(region.device_usage(0).expect("usage"), 150 * MIB);
    assert_eq!(region.device_usage(1).expect("usage"), MIB);

    let snap = RegionReader::open(&path)
        .expect("reader")
        .snapshot()
        .expect("snapshot");
    let mut pids: Vec<i32> = snap.processes.iter().map(|p| p.pid).collect();
    pids.sort_unstable();
    let mut expected = vec![std::process::id() as i32, child.pid()];
    expected.sort_unstable();
    assert_eq!(pids, expected);
    assert_eq!(snap.device_usage(0).data, 150 * MIB);

    // Closing the child's stdin lets it exit normally; its slot is released on the way out.
    drop(child.child.stdin.take());
    let status = child.child.wait().expect("wait");
    assert!(status.success(), "child failed: {status}");
    assert_eq!(region.device_usage(0).expect("usage"), 50 * MIB);
    assert_eq!(region.device_usage(1).expect("usage"), 0);
}

#[test]
fn lock_held_by_a_sigkilled_process_is_taken_over_within_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let region = Region::open_or_create(&path, &config(MIB)).expect("create");
    let mut child = ChildProc::spawn("hold-lock", &path);
    child.wait_ready();
    let child_pid = child.pid();
    assert!(
        matches!(region.lock(Duration::from_millis(200)), Err(RegionError::LockTimeout { owner_pid, .. }) if owner_pid == child_pid),
        "a live holder keeps the lock"
    );

    // SIGKILL, and deliberately do not reap yet: the holder is a zombie, which still answers kill(pid, 0).
    child.child.kill().expect("SIGKILL");
    let started = Instant::now();
    let lock = region
        .lock(Duration::from_secs(1))
        .expect("lock after the holder died");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(lock.acquired(), Acquired::FromDeadOwner(child_pid));
    drop(lock);
    assert_eq!(
        region
            .lock(Duration::from_millis(100))
            .expect("free again")
            .acquired(),
        Acquired::Free
    );
}

#[test]
fn dead_processes_slots_are_reaped_and_live_slots_never_move() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let region = Region::open_or_create(&path, &config(MIB)).expect("create");
    assert_eq!(region.register_current_process().expect("register"), 0);
    region.add_usage(0, MemoryKind::Data, 1000).expect("add");

    let mut doomed = ChildProc::spawn("register-and-hang", &path);
    assert_eq!(doomed.wait_ready(), "slot=1");
    let mut survivor = ChildProc::spawn("register-and-hang", &path);
    assert_eq!(survivor.wait_ready(), "slot=2");
    assert_eq!(region.device_usage(0).expect("usage"), 1000 + 123 + 123);

    doomed.child.kill().expect("SIGKILL");
    doomed.child.wait().expect("reap the child process");
    assert_eq!(
        region.device_usage(0).expect("usage"),
        1000 + 246,
        "not reaped yet"
    );
    assert_eq!(region.reap_dead_slots().expect("reap"), 1);
    assert_eq!(region.device_usage(0).expect("usage"), 1000 + 123);
    assert_eq!(
        region.proc_num(),
        3,
        "the survivor in slot 2 keeps its place"
    );
    let snap = RegionReader::open(&path)
        .expect("reader")
        .snapshot()
        .expect("snapshot");
    let slots: Vec<(usize, i32)> = snap.processes.iter().map(|p| (p.slot, p.pid)).collect();
    assert_eq!(
        slots,
        vec![(0, std::process::id() as i32), (2, survivor.pid())]
    );

    // The hole is reused by the next registration; killing the survivor lets proc_num shrink.
    survivor.child.kill().expect("SIGKILL");
    survivor.child.wait().expect("reap");
    assert_eq!(region.reap_dead_slots().expect("reap"), 1);
    assert_eq!(region.proc_num(), 1);
    assert_eq!(region.device_usage(0).expect("usage"), 1000);
}

#[test]
fn admission_never_exceeds_the_limit_and_refusals_are_counted_for_readers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let region = Region::open_or_create(&path, &config(10 * MIB)).expect("create");
    region.register_current_process().expect("register");
    assert_eq!(
        region
            .try_add_usage(0, MemoryKind::Data, 10 * MIB, 10 * MIB)
            .expect("charge"),
        Ok(10 * MIB)
    );
    assert_eq!(
        region
            .try_add_usage(0, MemoryKind::Data, 1, 10 * MIB)
            .expect("charge"),
        Err(10 * MIB),
        "one byte over is refused and nothing changes"
    );
    assert_eq!(region.device_usage(0).expect("usage"), 10 * MIB);
    region
        .remove_usage(0, MemoryKind::Data, 10 * MIB)
        .expect("remove");

    // 8 threads race 3 MiB charges against a 10 MiB limit; the held total never passes it.
    let held = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..500 {
                    if let Ok(Ok(_)) = region.try_add_usage(0, MemoryKind::Data, 3 * MIB, 10 * MIB)
                    {
                        let now = held.fetch_add(3 * MIB, std::sync::atomic::Ordering::SeqCst);
                        assert!(now + 3 * MIB <= 10 * MIB, "over the limit: {now}");
                        held.fetch_sub(3 * MIB, std::sync::atomic::Ordering::SeqCst);
                        region
                            .remove_usage(0, MemoryKind::Data, 3 * MIB)
                            .expect("remove");
                    } else {
                        region.add_refused().expect("refused");
                    }
                }
            });
        }
    });
    assert_eq!(region.device_usage(0).expect("usage"), 0);
    let refused = region.refused().expect("refused");
    let snapshot = RegionReader::open(&path)
        .expect("reader")
        .snapshot()
        .expect("snapshot");
    let me = snapshot
        .processes
        .iter()
        .find(|p| p.pid == std::process::id() as i32)
        .expect("our slot");
    assert_eq!(me.refused, refused);
    assert_eq!(snapshot.device_usage(0).total, 0);
}

#[test]
fn a_stricter_opener_lowers_the_files_limits_and_a_looser_one_never_raises_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    // The creator had no memory limit (malformed, or only an SM cap): 0 = unlimited in the file.
    let mut none = RegionConfig::default();
    none.sm_limits[0] = 100;
    drop(Region::open_or_create(&path, &none).expect("create"));
    let strict = Region::open_or_create(&path, &config(64 * MIB)).expect("reopen");
    assert_eq!(strict.open_report().memory_limits_tightened, vec![0, 1]);
    assert_eq!(strict.open_report().sm_limits_tightened, vec![0]);
    assert_eq!(strict.limit(0).expect("limit"), 64 * MIB);
    assert_eq!(strict.sm_limit(0).expect("sm"), 50);
    drop(strict);
    let loose = Region::open_or_create(&path, &config(GIB_FOR_TESTS)).expect("reopen");
    assert!(loose.open_report().memory_limits_tightened.is_empty());
    assert_eq!(loose.limit(0).expect("limit"), 64 * MIB, "never raised");
    assert!(
        !loose.tighten_limit(0, 0).expect("tighten"),
        "0 asks for nothing"
    );
    assert!(loose.tighten_limit(0, MIB).expect("tighten"));
    assert_eq!(loose.limit(0).expect("limit"), MIB);
}

const GIB_FOR_TESTS: u64 = 1 << 30;

#[test]
fn region_files_are_created_exclusively_and_never_opened_through_a_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    drop(Region::open_or_create(&path, &config(MIB)).expect("create"));
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o666, "every uid of the container may write it");

    let link = dir.path().join("link.cache");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    assert!(matches!(
        Region::open_or_create(&link, &config(MIB)),
        Err(RegionError::Symlink { .. })
    ));
    let dangling = dir.path().join("dangling.cache");
    let target = dir.path().join("target");
    std::os::unix::fs::symlink(&target, &dangling).expect("symlink");
    assert!(matches!(
        Region::open_or_create(&dangling, &config(MIB)),
        Err(RegionError::Symlink { .. })
    ));
    assert!(!target.exists(), "nothing created through the link");

    let sub = dir.path().join("open");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(matches!(
        Region::open_or_create(&sub.join("r.cache"), &config(MIB)),
        Err(RegionError::UnsafeDirectory { mode: 0o777, .. })
    ));
}

// ---------------------------------------------------------------------------------------------------------
// Grants: charges within a process's grant skip the sum; nobody's unused grant ever refuses anybody.

/// The limit the grant tests charge against.
const GRANT_TEST_LIMIT: u64 = 100 * MIB;

/// A fresh region file (cap 1 GiB on device 0) with this process registered: the directory (keep it),
/// the file, the region and the slot.
fn registered_region() -> (tempfile::TempDir, PathBuf, Region, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let region = Region::open_or_create(&path, &config(1 << 30)).expect("create");
    let me = region.register_current_process().expect("register");
    (dir, path, region, me)
}

/// `bytes` of data on device 0 under [`GRANT_TEST_LIMIT`], which must be admitted.
fn charge_ok(region: &Region, bytes: u64) {
    assert_eq!(
        region
            .charge(0, MemoryKind::Data, bytes, GRANT_TEST_LIMIT)
            .expect("charge"),
        Ok(()),
        "{bytes} bytes"
    );
}

/// The slot's grant word on device 0 of the slot at `index`, read and written as raw file bytes (what a
/// tenant can do): slot base + `used[0]` + the grant's offset in `device_memory_t`.
fn grant_word(region: &Region, index: usize) -> &std::sync::atomic::AtomicU64 {
    &region.layout().procs[index].used[0].unused[vgpu_region::layout::DEVICE_GRANT_WORD]
}

#[test]
fn a_grant_is_counted_by_the_others_and_taken_back_before_it_refuses_anyone() {
    let (_dir, path, region, me) = registered_region();
    let limit = GRANT_TEST_LIMIT;

    // The first charge is checked in full and takes a grant of a sixteenth of the cap beyond it.
    charge_ok(&region, 10 * MIB);
    let slack = vgpu_region::grant_slack(limit);
    assert_eq!(region.grant(0).expect("grant"), 10 * MIB + slack);
    assert_eq!(
        grant_word(&region, me).load(std::sync::atomic::Ordering::SeqCst),
        10 * MIB + slack
    );
    // Within it: charged (usage is exact: the grant is not usage).
    assert_eq!(
        region
            .charge(0, MemoryKind::Data, MIB, limit)
            .expect("charge"),
        Ok(())
    );
    assert_eq!(region.device_usage(0).expect("usage"), 11 * MIB);
    assert_eq!(
        region.grant(0).expect("grant"),
        10 * MIB + slack,
        "no new grant was needed"
    );

    // Another process asks for everything that is left: it fits only if our unused grant is taken
    // back, and it is.
    let rest = (limit - 11 * MIB).to_string();
    let mut other = ChildProc::spawn_with("charge", &path, &[(CHILD_BYTES_ENV, &rest)]);
    assert_eq!(other.wait_ready(), "charged");
    assert_eq!(region.device_usage(0).expect("usage"), limit);
    assert_eq!(
        grant_word(&region, me).load(std::sync::atomic::Ordering::SeqCst),
        0,
        "revoked"
    );
    // Our own count says the grant still covers a MiB, but the word is gone: the charge takes the full
    // check and is refused, and nothing changed.
    assert_eq!(
        region
            .charge(0, MemoryKind::Data, MIB, limit)
            .expect("charge"),
        Err(limit)
    );
    assert_eq!(region.device_usage(0).expect("usage"), limit);
    drop(other);
    // The other process is gone (SIGKILLed): its slot is reaped before a refusal, and ours fits again.
    assert_eq!(
        region
            .charge(0, MemoryKind::Data, MIB, limit)
            .expect("charge"),
        Ok(())
    );
    assert_eq!(region.device_usage(0).expect("usage"), 12 * MIB);
    for _ in 0..12 {
        region.credit(0, MemoryKind::Data, MIB).expect("credit");
    }
    assert_eq!(region.device_usage(0).expect("usage"), 0);
    assert_eq!(region.process_usage(0).expect("own"), 0);
}

#[test]
fn a_tampered_grant_word_never_lets_its_process_past_the_cap() {
    let (_dir, _path, region, me) = registered_region();
    let limit = GRANT_TEST_LIMIT;
    charge_ok(&region, 90 * MIB);
    let word = grant_word(&region, me);
    // A tenant raises the word to the whole cap and beyond; zeroes the usage words too.
    for forged in [limit, u64::MAX, 0] {
        word.store(forged, std::sync::atomic::Ordering::SeqCst);
        region.layout().procs[me].used[0]
            .total
            .store(0, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            region
                .charge(0, MemoryKind::Data, 11 * MIB, limit)
                .expect("charge"),
            Err(90 * MIB),
            "forged grant {forged:#x}: 90 + 11 MiB does not fit 100"
        );
    }
    // Up to the cap it still charges.
    charge_ok(&region, 10 * MIB);
    assert!(
        region
            .charge(0, MemoryKind::Data, 1, limit)
            .expect("charge")
            .is_err()
    );
}

#[test]
fn processes_racing_through_grants_and_revocations_never_hold_more_than_the_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let _creator = Region::open_or_create(&path, &config(1 << 30)).expect("create");
    let held = dir.path().join("held");
    std::fs::write(&held, [0u8; 8]).expect("counter file");
    let held_s = held.to_str().expect("utf-8 path");
    let mut children: Vec<ChildProc> = (0..4)
        .map(|_| ChildProc::spawn_with("stress", &path, &[(CHILD_HELD_ENV, held_s)]))
        .collect();
    let (mut admitted, mut refused) = (0u64, 0u64);
    for c in &mut children {
        let line = c.wait_ready();
        let mut words = line.split_whitespace().map(|w| {
            w.split_once('=')
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .expect("admitted=N refused=N")
        });
        admitted += words.next().expect("admitted");
        refused += words.next().expect("refused");
        let status = c.child.wait().expect("wait");
        assert!(
            status.success(),
            "a child held more than the cap (or failed): {status}"
        );
    }
    // Enough of both to have exercised grants, full checks and revocations.
    assert!(
        admitted > 1000 && refused > 100,
        "admitted {admitted}, refused {refused}"
    );
    let reader = RegionReader::open(&path).expect("reader");
    assert_eq!(
        reader.snapshot().expect("snapshot").device_usage(0).total,
        0
    );
}

// ---------------------------------------------------------------------------------------------------------
// Attacks on the grant protocol (an attacker's review; the first three failed before their fixes).

/// A tenant writes a revoked grant word back to the value its process remembers. With only words the
/// tenant can write, the process cannot tell "never revoked" from "revoked and written back", so it
/// charges within the grant once more: like a tenant lowering another process's `total` (which the
/// full check trusts as much), this lets the container pass the cap — by at most that one grant's
/// slack, because the grant was admitted by a sum and beyond it the full check counts everybody. The
/// node's record is the backstop (README, "What only the node guarantees"). This pins the bound.
#[test]
fn a_grant_word_restored_after_its_revocation_buys_at_most_its_slack() {
    use std::sync::atomic::Ordering::SeqCst;
    let (_dir, path, region, me) = registered_region();
    let limit = GRANT_TEST_LIMIT;
    charge_ok(&region, 10 * MIB);
    let slack = vgpu_region::grant_slack(limit);
    let grant = region.grant(0).expect("grant");
    assert_eq!(grant, 10 * MIB + slack);
    // Another process takes everything that is left: our unused grant is revoked.
    let rest = (limit - 10 * MIB).to_string();
    let mut other = ChildProc::spawn_with("charge", &path, &[(CHILD_BYTES_ENV, &rest)]);
    assert_eq!(other.wait_ready(), "charged");
    assert_eq!(region.device_usage(0).expect("usage"), limit);
    assert_eq!(grant_word(&region, me).load(SeqCst), 0, "revoked");
    // The tenant writes the word back, and again after every charge: what the process can take is
    // what remained of its grant, nothing more.
    let mut admitted = 0;
    for _ in 0..64 {
        grant_word(&region, me).store(grant, SeqCst);
        if region
            .charge(0, MemoryKind::Data, MIB, limit)
            .expect("charge")
            .is_ok()
        {
            admitted += MIB;
        }
    }
    assert!(
        admitted <= slack,
        "{admitted} bytes admitted, slack {slack}"
    );
    assert!(region.device_usage(0).expect("usage") <= limit + slack);
    grant_word(&region, me).store(grant, SeqCst);
    assert!(
        region
            .charge(0, MemoryKind::Data, MIB, limit)
            .expect("charge")
            .is_err(),
        "beyond the grant the full check counts the other process"
    );
}

/// No tampering at all: a process trimming its grant (after a large free) used to store the trimmed
/// value into the grant word without checking that the word still held its grant. If another process
/// revoked it in between (it then counts only our `total`), the trim re-instated a grant no sum
/// admitted. Detected exactly: the revoker took a grant in this round (and this round our process
/// only frees, it never raises), yet the word is non-zero afterwards.
#[test]
fn trimming_a_grant_never_reinstates_one_another_process_revoked() {
    use std::sync::atomic::Ordering::SeqCst;
    let (dir, path, region, me) = registered_region();
    let limit = GRANT_TEST_LIMIT;
    let words = dir.path().join("words");
    std::fs::write(&words, [0u8; 24]).expect("words file");
    let words_s = words.to_str().expect("utf-8");
    let w = map_words(words_s, 3);
    let mut revoker = ChildProc::spawn_with("revoke-rounds", &path, &[(CHILD_HELD_ENV, words_s)]);
    assert_eq!(revoker.wait_ready(), "revoker");
    let x = 20 * MIB;
    let (mut reinstated, mut revoked_rounds) = (0u64, 0u64);
    let start = Instant::now();
    let mut r = 0;
    while start.elapsed() < Duration::from_secs(6) && reinstated == 0 {
        r += 1;
        assert_eq!(
            region
                .charge(0, MemoryKind::Data, x, limit)
                .expect("charge"),
            Ok(())
        );
        assert_eq!(
            region.grant(0).expect("grant"),
            x + vgpu_region::grant_slack(limit)
        );
        w[0].store(r, SeqCst);
        region.credit(0, MemoryKind::Data, x).expect("credit");
        while w[1].load(SeqCst) != r {
            std::hint::spin_loop();
        }
        if w[2].load(SeqCst) == r {
            revoked_rounds += 1;
            if grant_word(&region, me).load(SeqCst) != 0 {
                reinstated += 1;
            }
        }
    }
    w[0].store(u64::MAX, SeqCst);
    let _ = revoker.child.wait();
    assert_eq!(
        reinstated, 0,
        "a grant revoked by another process was written back by the trim ({reinstated} of \
         {revoked_rounds} revoked rounds, {r} rounds)"
    );
}

/// Under a cap near 2^64 (the environment accepts up to u64::MAX - 1), the own count's
/// `fetch_add(bytes) + bytes` in a charge within the grant overflowed: a panic in a debug build, a
/// wrapped count (and an admitted charge) in a release build.
#[test]
fn a_charge_within_a_grant_under_a_huge_cap_does_not_overflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = region_file(&dir);
    let limit = u64::MAX - 1;
    // The file says "no limit" (0): the environment's huge cap is the one in force.
    let region = Region::open_or_create(&path, &RegionConfig::default()).expect("create");
    region.register_current_process().expect("register");
    assert_eq!(
        region
            .charge(0, MemoryKind::Data, 1 << 63, limit)
            .expect("charge"),
        Ok(())
    );
    assert_eq!(region.grant(0).expect("grant"), (1 << 63) + (1 << 30));
    let got = std::panic::catch_unwind(|| region.charge(0, MemoryKind::Data, 1 << 63, limit));
    assert!(
        matches!(got, Ok(Ok(Err(_)))),
        "2^63 + 2^63 bytes under a cap of 2^64 - 2: {got:?}"
    );
}

/// README (threat model, Arithmetic): "Every region word is updated saturating (never wrapping), so no
/// process ever reads a wrapped value." A charge within a grant added to `total` and `data_size` with a
/// plain `fetch_add`: a tenant who left the grant word alone and raised `total` near 2^64 got it
/// wrapped to a small value by the process's own next charge.
#[test]
fn a_charge_within_a_grant_never_wraps_a_tampered_total() {
    use std::sync::atomic::Ordering::SeqCst;
    let (_dir, _path, region, me) = registered_region();
    let limit = GRANT_TEST_LIMIT;
    charge_ok(&region, 10 * MIB);
    assert!(region.grant(0).expect("grant") > 10 * MIB);
    let total = &region.layout().procs[me].used[0].total;
    total.store(u64::MAX - MIB / 2, SeqCst);
    let _ = region
        .charge(0, MemoryKind::Data, MIB, limit)
        .expect("charge");
    let after = total.load(SeqCst);
    assert!(
        after >= u64::MAX - MIB / 2,
        "the slot's total wrapped: {after:#x}"
    );
}
