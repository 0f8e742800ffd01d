//! Issue 12, the tenant's own processes: ordinary programs doing awkward things inside a capped
//! container must neither crash, hang, nor get out of the cap, on the gpu-sim (one A100 80GB)
//! and without any driver.
//!
//! * `dlsym` of a hooked name the driver lacks: NULL **and** a `dlerror()` message (Python's
//!   `ctypes` probe crashed on a NULL message); `RTLD_NEXT` as without the preload.
//! * `fork()` while another thread is inside its first CUDA/NVML calls: every child finishes.
//! * A driver that calls our exports from inside a hook (a wrapper `libcuda.so.1`,
//!   `tests/c/reenter_driver.c`): no deadlock, the cap still holds, on all three access paths.
//! * NVML memory info adds up under a cap (v1 and v2).
//! * Refusals: at most one stderr line per second, with the count left out;
//!   `LIBCUDA_LOG_LEVEL` silences them.
//! * Environment: decimal sizes, blanks, an SM limit above 100 and a per-device index the
//!   container lacks are refused loudly and fail closed.

mod common;

use common::{compile, libvgpu};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

fn node() -> SimNode {
    SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).expect("sim node")
}

fn driver_dir() -> String {
    gpu_sim::cuda_library()
        .parent()
        .expect("fake driver dir")
        .to_string_lossy()
        .into_owned()
}

/// `tests/c/hostile.c`, linked against the fake driver and NVML.
fn hostile(dir: &Path) -> PathBuf {
    let lib = driver_dir();
    compile(
        dir,
        "hostile",
        &["-L", &lib, "-lcuda", "-lnvidia-ml", "-lpthread"],
    )
}

/// A command on the simulated node with a private shared region, the library preloaded.
fn on_node(prog: &Path, node: &SimNode, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(prog);
    let (k, v) = gpu_sim::library_path_env();
    cmd.env_remove("LD_PRELOAD")
        .env("LD_PRELOAD", libvgpu())
        .env(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            node.dir().join("cudevshr.cache"),
        )
        .envs(node.env())
        .env(k, v)
        .envs(env.iter().copied());
    cmd
}

/// What a finished run printed.
#[derive(Debug)]
struct Out {
    stdout: String,
    stderr: String,
    code: Option<i32>,
}

/// Runs `cmd`, killing it after `limit` (a hang is a failure, not a stuck test run).
fn run_within(mut cmd: Command, limit: Duration) -> Out {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {limit:?} (deadlock?); stderr so far:\n{}",
                err_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        code: status.code(),
    }
}

fn value_after(stdout: &str, prefix: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} number in:\n{stdout}"))
}

// ------------------------------------------------------------------------------------------
// dlsym and dlerror
// ------------------------------------------------------------------------------------------

/// Python's `ctypes` probe for the driver on a machine without one: `hasattr` asks `dlsym`, gets
/// NULL, and passes `dlerror()` to `strlen` — a NULL message crashed the interpreter.
#[test]
fn python_ctypes_probe_without_a_driver_answers_false() {
    let python = Command::new("python3").arg("-V").output();
    assert!(
        python.is_ok_and(|o| o.status.success()),
        "python3 is needed (plain interpreter, no packages): install it with tests/prereqs/install.sh"
    );
    let empty = tempfile::tempdir().expect("tempdir");
    let probe = |preload: bool| {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import ctypes\n\
             lib = ctypes.CDLL(None)\n\
             print(hasattr(lib, 'cuInit'), hasattr(lib, 'cuMemAlloc_v2'), \
             hasattr(lib, 'nvmlInit_v2'), hasattr(lib, 'printf'))",
        ])
        .env("LD_LIBRARY_PATH", empty.path())
        .env("CUDA_DEVICE_MEMORY_LIMIT", "1g")
        .env_remove("LD_PRELOAD");
        if preload {
            cmd.env("LD_PRELOAD", libvgpu());
        }
        run_within(cmd, Duration::from_secs(60))
    };
    let plain = probe(false);
    assert_eq!(plain.stdout, "False False False True\n", "{plain:?}");
    let preloaded = probe(true);
    assert_eq!(
        (
            preloaded.code,
            preloaded.stdout.as_str(),
            preloaded.stderr.as_str()
        ),
        (Some(0), plain.stdout.as_str(), ""),
        "under the preload (a crash shows as code None, signal 11): {preloaded:?}"
    );
}

fn lookup(prog: &Path, handle: &str, name: &str, env: &[(&str, &str)], preload: bool) -> Out {
    let mut cmd = Command::new(prog);
    cmd.args([handle, name])
        .env_remove("LD_PRELOAD")
        .envs(env.iter().copied());
    if preload {
        cmd.env("LD_PRELOAD", libvgpu());
    }
    run_within(cmd, Duration::from_secs(30))
}

/// Without a driver, every way of asking for a hooked name answers as without the preload: NULL
/// and a message naming the symbol.
#[test]
fn dlsym_of_a_hook_without_a_driver_is_null_with_a_dlerror_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(dir.path(), "dlerror", &[]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let empty = empty.to_string_lossy().into_owned();
    let env = [("LD_LIBRARY_PATH", empty.as_str())];
    for handle in ["default", "self", "next"] {
        for name in ["cuInit", "cuMemAlloc_v2", "cuGetProcAddress", "nvmlInit_v2"] {
            let plain = lookup(&prog, handle, name, &env, false);
            let ours = lookup(&prog, handle, name, &env, true);
            assert_eq!(plain.code, Some(0), "{plain:?}");
            assert!(
                plain.stdout.starts_with(&format!("{name}: NULL\n")),
                "{plain:?}"
            );
            assert_eq!(ours.code, Some(0), "{handle} {name}: {ours:?}");
            assert!(
                ours.stdout.starts_with(&format!("{name}: NULL\n")),
                "{handle} {name} under the preload: {}",
                ours.stdout
            );
            assert_eq!(
                ours.stdout.matches(&format!("{name}: NULL\n")).count(),
                2,
                "{handle} {name}: {}",
                ours.stdout
            );
            assert_eq!(
                ours.stdout
                    .lines()
                    .filter(|l| l.starts_with("dlerror: ")
                        && l.contains(&format!("undefined symbol: {name}")))
                    .count(),
                2,
                "{handle} {name}: both lookups must leave a dlerror message naming the symbol, \
                 as glibc does: {}",
                ours.stdout
            );
        }
    }
}

/// Builds `tests/c/reenter_driver.c` as `libcuda.so.1` in `dir`.
fn reenter_driver(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/reenter_driver.c");
    let lib_dir = dir.join("reenter");
    std::fs::create_dir_all(&lib_dir).expect("mkdir");
    let out = lib_dir.join("libcuda.so.1");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args([
            "-std=gnu11",
            "-O1",
            "-Wall",
            "-Werror",
            "-shared",
            "-fPIC",
            "-Wl,-Bsymbolic",
            "-Wl,-soname,libcuda.so.1",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(status.success(), "compiling {} failed", src.display());
    lib_dir
}

/// The driver in place (a wrapper `libcuda.so.1` that lacks most functions): a hooked name it
/// lacks is NULL with a message, one it has is found, for `RTLD_DEFAULT` and `dlopen(NULL)`.
#[test]
fn dlsym_of_a_hook_the_driver_lacks_is_null_with_a_dlerror_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(dir.path(), "dlerror", &["-ldl"]);
    let wrapper = reenter_driver(dir.path());
    // The wrapper is found as libcuda.so.1 (it lacks cuArrayCreate and cuMemAlloc), the fake NVML
    // after it.
    let path = format!("{}:{}", wrapper.display(), driver_dir());
    let real = gpu_sim::cuda_library().to_string_lossy().into_owned();
    let env = [
        ("LD_LIBRARY_PATH", path.as_str()),
        ("REENTER_REAL_CUDA", real.as_str()),
    ];
    for handle in ["default", "self"] {
        for name in ["cuArrayCreate", "cuMemAlloc"] {
            let ours = lookup(&prog, handle, name, &env, true);
            let expected = format!("{name}: NULL\ndlerror: {{}}undefined symbol: {name}\n");
            let lines: Vec<&str> = ours.stdout.lines().collect();
            assert!(
                lines.len() == 4
                    && lines
                        .iter()
                        .step_by(2)
                        .all(|l| *l == format!("{name}: NULL"))
                    && lines.iter().skip(1).step_by(2).all(|l| {
                        l.starts_with("dlerror: ")
                            && l.ends_with(&format!("undefined symbol: {name}"))
                    }),
                "{handle} {name}: expected twice {expected:?}, got {ours:?}"
            );
        }
    }
    // The program does not load libcuda.so.1 itself: a hook is found only once the driver is
    // there, which it is for `cuMemAlloc_v2` once libvgpu has loaded it.
    let found = lookup(&prog, "default", "cuMemAlloc_v2", &env, true);
    assert!(
        found.stdout.starts_with("cuMemAlloc_v2: found\n"),
        "{found:?}"
    );
}

// ------------------------------------------------------------------------------------------
// fork at any moment
// ------------------------------------------------------------------------------------------

/// Hundreds of processes fork while their second thread is inside its first CUDA and NVML calls
/// (a random moment 0-4 ms in); each child makes the same calls and must exit within 5 s. A child
/// still running then prints its stack and is classified by the code it is stuck in. Before the
/// fix, children spun for ever in libvgpu's initialisation and budget slow paths, waiting for a
/// thread the fork did not copy. None may now; children stuck in the fake driver's own mutex
/// (held by the uncopied thread inside its `cuInit`, before the driver registered its fork
/// handler) are the driver's business and only counted.
#[test]
fn fork_during_the_first_calls_leaves_a_working_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = hostile(dir.path());
    let mut in_driver = 0;
    for path in ["direct", "dlsym", "procaddr"] {
        let node = node();
        let mut cmd = on_node(
            &prog,
            &node,
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("CUDA_DEVICE_SM_LIMIT", "50"),
                ("LIBCUDA_LOG_LEVEL", "0"),
            ],
        );
        cmd.args(["forkinit", "100", path]);
        let out = run_within(cmd, Duration::from_secs(600));
        assert_eq!(out.code, Some(0), "{path}: {out:?}");
        let ok = value_after(&out.stdout, "ok ");
        let ours = value_after(&out.stdout, "hung in libvgpu ");
        let driver = value_after(&out.stdout, "hung in the driver ");
        let other = value_after(&out.stdout, "other failures ");
        assert_eq!(
            (ours, other),
            (0, 0),
            "{path}: children hung in libvgpu or crashed:\n{}\ntheir stacks:\n{}",
            out.stdout,
            out.stderr
        );
        assert_eq!(ok + driver, 100, "{path}: {}", out.stdout);
        in_driver += driver;
    }
    eprintln!("children stuck in the fake driver's own lock: {in_driver} of 300");
}

// ------------------------------------------------------------------------------------------
// Re-entry
// ------------------------------------------------------------------------------------------

/// A driver that calls back into the exported API from inside `cuDeviceGetCount` (where libvgpu
/// builds its device map), `cuDevicePrimaryCtxRetain` (under libvgpu's context lock) and
/// `cuMemAlloc_v2`: the nested calls get the real functions, nothing deadlocks, and the cap still
/// holds exactly — through direct linking, `dlopen`+`dlsym` and `cuGetProcAddress`.
#[test]
fn a_driver_calling_back_into_hooks_gets_the_real_function() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wrapper = reenter_driver(dir.path());
    let memcap = compile(dir.path(), "memcap", &["-L", &driver_dir(), "-lcuda"]);
    let real = gpu_sim::cuda_library().to_string_lossy().into_owned();
    for mode in ["direct", "dlsym", "procaddr"] {
        let node = node();
        let mut cmd = on_node(
            &memcap,
            &node,
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("REENTER_REAL_CUDA", real.as_str()),
            ],
        );
        let path = format!("{}:{}", wrapper.display(), driver_dir());
        cmd.arg(mode).env("LD_LIBRARY_PATH", path);
        let out = run_within(cmd, Duration::from_secs(60));
        assert_eq!(out.code, Some(0), "{mode}: {out:?}");
        let callbacks = out
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("reenter: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        assert!(
            callbacks >= 3,
            "{mode}: the wrapper did not call back: {out:?}"
        );
        // 300 MiB context + 2 × 256 MiB fit under 1 GiB, the third is refused: the callbacks
        // (which allocate nothing) changed nothing in the accounting.
        assert!(
            out.stdout.contains("allocated 2 chunks, then rc 2\n"),
            "{mode}: {}",
            out.stdout
        );
    }
}

// ------------------------------------------------------------------------------------------
// NVML memory info
// ------------------------------------------------------------------------------------------

#[test]
fn nvml_memory_info_adds_up_under_a_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = hostile(dir.path());
    for path in ["direct", "dlsym"] {
        let node = node();
        let mut cmd = on_node(&prog, &node, &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")]);
        cmd.args(["nvml", path]);
        let out = run_within(cmd, Duration::from_secs(60));
        assert_eq!(out.code, Some(0), "{path}: {out:?}");
        assert!(
            out.stdout.contains("alloc rc 0\n"),
            "{path}: {}",
            out.stdout
        );
        let line = |prefix: &str| -> Vec<u64> {
            out.stdout
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{path}: no {prefix} line: {}", out.stdout))
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        };
        let v1 = line("v1 total");
        let v2 = line("v2 total");
        let (total, used, free) = (v1[0], v1[1], v1[2]);
        assert_eq!(total, GIB, "{path}: the cap is the total");
        assert!(used >= 256 << 20, "{path}: the allocation is used: {used}");
        assert_eq!(used + free, total, "{path}: v1 must add up: {v1:?}");
        let (total2, reserved, used2, free2) = (v2[0], v2[1], v2[2], v2[3]);
        assert_eq!((total2, used2), (total, used), "{path}: v1 and v2 agree");
        assert_eq!(
            reserved + used2 + free2,
            total2,
            "{path}: v2 must add up: {v2:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Refusal logs
// ------------------------------------------------------------------------------------------

/// 3000 refusals in a burst, a pause past one second, one more: two lines, the second counting
/// the ones left out; the program itself saw every refusal.
#[test]
fn refusals_are_logged_at_most_once_per_second_with_a_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = hostile(dir.path());
    let node = node();
    let mut cmd = on_node(&prog, &node, &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")]);
    cmd.args(["refusals", "3000", "1100"]);
    let started = Instant::now();
    let out = run_within(cmd, Duration::from_secs(120));
    let elapsed = started.elapsed();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(value_after(&out.stdout, "refused "), 3001, "{}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.contains(" OOM")).collect();
    let left_out: u64 = lines
        .iter()
        .filter_map(|l| l.split(" (").nth(1))
        .filter_map(|tail| tail.split_whitespace().next())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert!(
        lines.len() >= 2 && lines.len() as u64 <= 1 + elapsed.as_secs() + 1,
        "at most one line per second ({elapsed:?}): {}",
        out.stderr
    );
    assert_eq!(
        lines.len() as u64 + left_out,
        3001,
        "every refusal is either shown or counted: {}",
        out.stderr
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("more refusals not shown")),
        "{}",
        out.stderr
    );
}

#[test]
fn libcuda_log_level_below_2_silences_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = hostile(dir.path());
    for level in ["0", "1"] {
        let node = node();
        let mut cmd = on_node(
            &prog,
            &node,
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("LIBCUDA_LOG_LEVEL", level),
            ],
        );
        cmd.args(["refusals", "50", "0"]);
        let out = run_within(cmd, Duration::from_secs(60));
        assert_eq!(value_after(&out.stdout, "refused "), 51, "{out:?}");
        assert_eq!(out.stderr, "", "LIBCUDA_LOG_LEVEL={level}");
    }
}

// ------------------------------------------------------------------------------------------
// Environment
// ------------------------------------------------------------------------------------------

fn total_under(env: &[(&str, &str)]) -> (u64, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = hostile(dir.path());
    let node = node();
    let mut cmd = on_node(&prog, &node, env);
    cmd.arg("total");
    let out = run_within(cmd, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("total rc 0\n"), "{out:?}");
    (value_after(&out.stdout, "bytes "), out.stderr)
}

#[test]
fn memory_limits_are_decimal_and_blanks_around_them_are_ignored() {
    for (value, expected) in [
        (" 010g ", 10 * GIB),
        ("0100m\n", 100 << 20),
        ("\t2g", 2 * GIB),
    ] {
        let (total, stderr) = total_under(&[("CUDA_DEVICE_MEMORY_LIMIT", value)]);
        assert_eq!(total, expected, "{value:?}: {stderr}");
        assert_eq!(stderr, "", "{value:?} is valid");
    }
}

#[test]
fn an_sm_limit_above_100_is_rejected_and_fails_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = hostile(dir.path());
    let node = node();
    let region = node.dir().join("cudevshr.cache");
    let mut cmd = on_node(
        &prog,
        &node,
        &[
            ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ("CUDA_DEVICE_SM_LIMIT", "150"),
        ],
    );
    cmd.args(["nvml", "direct"]);
    let out = run_within(cmd, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", out.stderr);
    for needle in ["CUDA_DEVICE_SM_LIMIT", "\"150\"", "0-100", "1%"] {
        assert!(lines[0].contains(needle), "{needle} in {}", lines[0]);
    }
    let snap = vgpu_region::RegionReader::open(&region)
        .and_then(|r| r.snapshot())
        .expect("region");
    assert_eq!(snap.sm_limits[0], 1, "the strictest share, never uncapped");
}

#[test]
fn a_per_device_limit_for_a_device_the_container_lacks_caps_every_device() {
    let (total, stderr) = total_under(&[("CUDA_DEVICE_MEMORY_LIMIT_1", "2g")]);
    assert_eq!(total, 2 * GIB, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    for needle in ["CUDA_DEVICE_MEMORY_LIMIT_1", "\"2g\"", "device 1", "0 to 0"] {
        assert!(lines[0].contains(needle), "{needle} in {}", lines[0]);
    }
    // A per-device limit for a device that exists is not reported.
    let (total, stderr) = total_under(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "3g")]);
    assert_eq!((total, stderr.as_str()), (3 * GIB, ""));
}
