//! The CUDA and NVML client libraries real GPU containers use, unmodified, on the gpu-sim: NVIDIA's
//! `nvidia-ml-py` (pynvml), `nvitop -1`, `gpustat --json`, `numba.cuda` (ctypes driver binding)
//! and NVIDIA's `cuda-bindings` (every entry point through `cuGetProcAddress`). Each runs in
//! three modes: without the preload, with `LD_PRELOAD=libvgpu.so` and no limit, and with a
//! 3000 MiB memory cap and a 30 % SM cap, and the test checks what a user inside the container
//! would: the library works, sees total = cap and its own usage, gets its own out-of-memory error
//! past the cap, its kernels hold the SM cap, and nothing extra is printed.
//!
//! The packages come from PyPI, pinned in `tests/prereqs/requirements.txt`, in the venv
//! `<workspace>/target/test-venv` that `tests/prereqs/install.sh` creates; a missing or
//! differently pinned one fails the test with that command. The Python side
//! (`tests/python/*.py`) only drives the library and prints what it saw as JSON; every
//! expectation is here, computed from the node's spec and the caps, not from a previous run.
//! Tests of this file run one at a time: the SM measurement needs the machine's two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod sm_support;

use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use sm_support::{Outcome, achieved};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The simulated GPU: an A100 80GB with a round reserved figure, so expectations are exact.
const TOTAL_MIB: u64 = 81_920;
const RESERVED_MIB: u64 = 512;
/// gpu-sim's default device memory per CUDA context (`cuda_context_mib`).
const CONTEXT_MIB: u64 = 300;
const CAP_MIB: u64 = 3000;
const SM_CAP: f64 = 30.0;
/// As in `tests/sm_cap.rs`: ±10 points on a loaded 2-core box, after 2 s of settling.
const SM_TOLERANCE: f64 = 10.0;
const SM_SETTLE: Duration = Duration::from_secs(2);
const CAPPED_RUN_S: &str = "5";
/// Uncapped, a synchronised 1 ms kernel loop keeps the GPU mostly busy; Python's launch overhead
/// and a busy CI box keep it below 100 %.
const UNCAPPED_RUN_S: &str = "2";
const UNCAPPED_SETTLE: Duration = Duration::from_millis(500);
const UNCAPPED_FLOOR: f64 = 50.0;

/// Exactly these versions are tested (the lines of `tests/prereqs/requirements.txt`).
const PACKAGES: [&str; 7] = [
    "nvidia-ml-py",
    "nvitop",
    "gpustat",
    "numba",
    "llvmlite",
    "numpy",
    "cuda-bindings",
];

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// No `LD_PRELOAD`: the library on the bare gpu-sim.
    Bare,
    /// `LD_PRELOAD=libvgpu.so` without any limit.
    Preloaded,
    /// `LD_PRELOAD=libvgpu.so`, `CUDA_DEVICE_MEMORY_LIMIT=3000m`, `CUDA_DEVICE_SM_LIMIT=30`.
    Capped,
}

const MODES: [Mode; 3] = [Mode::Bare, Mode::Preloaded, Mode::Capped];

impl Mode {
    /// What the container is told its device has.
    fn total(self) -> u64 {
        match self {
            Mode::Capped => CAP_MIB * MIB,
            _ => TOTAL_MIB * MIB,
        }
    }

    /// `cuMemGetInfo`'s free bytes right after the primary context was created.
    fn free_at_start(self) -> u64 {
        match self {
            Mode::Capped => (CAP_MIB - CONTEXT_MIB) * MIB,
            _ => (TOTAL_MIB - RESERVED_MIB - CONTEXT_MIB) * MIB,
        }
    }

    /// One request larger than the device or the cap.
    fn too_big_mib(self) -> u64 {
        match self {
            Mode::Capped => CAP_MIB + 1000,
            _ => TOTAL_MIB + 20_000,
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn venv_bin(name: &str) -> PathBuf {
    workspace().join("target/test-venv/bin").join(name)
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

const INSTALL: &str = "run tests/prereqs/install.sh (it installs tests/prereqs/requirements.txt \
                       into target/test-venv)";

/// The venv's interpreter, after checking every package is installed at its pinned version.
fn python() -> PathBuf {
    static CHECKED: OnceLock<PathBuf> = OnceLock::new();
    CHECKED.get_or_init(check_prerequisites).clone()
}

fn check_prerequisites() -> PathBuf {
    let python = venv_bin("python");
    assert!(
        python.is_file(),
        "{} is missing: {INSTALL}",
        python.display()
    );
    let requirements = std::fs::read_to_string(workspace().join("tests/prereqs/requirements.txt"))
        .expect("read tests/prereqs/requirements.txt");
    let pinned: BTreeMap<&str, &str> = requirements
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once("=="))
        .map(|(name, version)| (name.trim(), version.trim()))
        .collect();
    let query = "import importlib.metadata as m, sys\n\
                 for n in sys.argv[1:]:\n\
                 \x20   try: print(n, m.version(n))\n\
                 \x20   except m.PackageNotFoundError: print(n, 'missing')\n";
    let out = Command::new(&python)
        .arg("-c")
        .arg(query)
        .args(PACKAGES)
        .output()
        .expect("run the venv's python");
    assert!(
        out.status.success(),
        "{} failed: {INSTALL}",
        python.display()
    );
    let installed = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in installed.lines() {
        let (name, version) = line.split_once(' ').expect("name version");
        let want = pinned.get(name).unwrap_or_else(|| {
            panic!(
                "{name} is not pinned in tests/prereqs/requirements.txt (want `{name}==<version>`)"
            )
        });
        assert_eq!(
            version, *want,
            "{name} in target/test-venv is {version}, tests/prereqs/requirements.txt pins {want}: {INSTALL}"
        );
    }
    for tool in ["nvitop", "gpustat"] {
        assert!(
            venv_bin(tool).is_file(),
            "{} is missing: {INSTALL}",
            venv_bin(tool).display()
        );
    }
    python
}

/// One simulated node with one A100 80GB, 100 ms NVML sample periods (for the SM measurement).
fn node() -> SimNode {
    let mut spec = NodeSpec::uniform(1, GpuSpec::a100_80gb).with_utilization_period_us(100_000);
    spec.gpus[0].memory_reserved_mib = Some(RESERVED_MIB);
    assert_eq!(spec.gpus[0].memory_mib, TOTAL_MIB);
    SimNode::new(spec).expect("sim node")
}

/// A process of one container on `node` in `mode` (its own region file, as a pod has).
fn command(node: &SimNode, mode: Mode, program: &Path) -> Command {
    let (k, v) = gpu_sim::library_path_env();
    let mut cmd = Command::new(program);
    cmd.env_remove("LD_PRELOAD")
        .env_remove("CUDA_DEVICE_MEMORY_LIMIT")
        .env_remove("CUDA_DEVICE_SM_LIMIT")
        .env_remove("GPU_CORE_UTILIZATION_POLICY")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .envs(node.env())
        .env(k, v)
        .env(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            node.dir().join("pod.cache"),
        )
        // No broker here: this machine's PID namespace is the host's, which the limiter detects.
        .env("VGPU_HOSTPID_SOCKET", "off")
        // Keep the source tree clean (no __pycache__ next to the scripts).
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if mode != Mode::Bare {
        cmd.env("LD_PRELOAD", common::libvgpu());
    }
    if mode == Mode::Capped {
        cmd.env("CUDA_DEVICE_MEMORY_LIMIT", format!("{CAP_MIB}m"))
            .env("CUDA_DEVICE_SM_LIMIT", format!("{SM_CAP}"));
    }
    cmd
}

/// Runs a script of `tests/python` with the venv's interpreter; its stdout and stderr.
fn run_script(node: &SimNode, mode: Mode, name: &str, args: &[String]) -> (String, String) {
    let mut cmd = command(node, mode, &python());
    cmd.arg(script(name)).args(args);
    finish(&format!("{name} ({mode:?})"), cmd)
}

fn finish(what: &str, mut cmd: Command) -> (String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    succeeded(what, &out)
}

/// A finished process's stdout and stderr, after checking that it exited successfully.
fn succeeded(what: &str, out: &std::process::Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what} exited with {}:\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// The JSON a script printed, as `path -> value` (see `tests/python/flatten.py`).
fn flatten(what: &str, json: &str) -> BTreeMap<String, String> {
    let mut child = Command::new(python())
        .arg(script("flatten.py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flatten.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(json.as_bytes())
        .expect("write flatten.py's input");
    let out = child.wait_with_output().expect("flatten.py");
    assert!(
        out.status.success(),
        "{what} did not print one JSON document:\n{json}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

struct Report {
    what: String,
    fields: BTreeMap<String, String>,
}

impl Report {
    fn new(what: String, json: &str) -> Self {
        let fields = flatten(&what, json);
        Self { what, fields }
    }

    fn str(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("{}: no {key} in {:#?}", self.what, self.fields))
    }

    fn u64(&self, key: &str) -> u64 {
        let v = self.str(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{}: {key} = {v:?}, want an integer", self.what))
    }

    fn eq(&self, key: &str, want: impl std::fmt::Display) {
        assert_eq!(self.str(key), want.to_string(), "{}: {key}", self.what);
    }

    fn bytes(&self, key: &str, want: u64) {
        let got = self.u64(key);
        assert_eq!(
            got,
            want,
            "{}: {key} = {got} ({} MiB), want {want} ({} MiB)",
            self.what,
            got as f64 / MIB as f64,
            want as f64 / MIB as f64
        );
    }
}

/// Nothing but the library's own output: no warnings, no tracebacks. The one exception is the
/// limiter's own line when it refuses an allocation past the cap (HAMi-core prints it too).
fn assert_quiet(what: &str, mode: Mode, stderr: &str) {
    for line in stderr.lines() {
        let limiter_oom = line.starts_with("[vgpu-limiter WARN(") && line.contains(" OOM: ");
        assert!(
            mode == Mode::Capped && limiter_oom,
            "{what} printed on stderr:\n{stderr}"
        );
    }
}

/// Holds `mib` MiB in a process of the container until dropped.
struct Holder {
    child: std::process::Child,
    pid: u32,
}

impl Holder {
    fn start(node: &SimNode, mode: Mode, mib: u64) -> Self {
        let mut child = command(node, mode, &python())
            .arg(script("holder.py"))
            .arg(mib.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start holder.py");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read holder.py");
        let pid = line
            .strip_prefix("pid ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("holder.py ({mode:?}) printed {line:?}, want `pid <n>`"));
        Self { child, pid }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // EOF: it exits
        let _ = self.child.wait();
    }
}

#[test]
fn pynvml_sees_the_device_the_cap_and_its_own_usage() {
    let _serial = serial();
    const HELD_MIB: u64 = 512;
    for mode in MODES {
        let node = node();
        let gpu = &node.spec().gpus[0];
        let (stdout, stderr) = run_script(&node, mode, "pynvml_check.py", &[HELD_MIB.to_string()]);
        let what = format!("pynvml ({mode:?})");
        assert_quiet(&what, mode, &stderr);
        let r = Report::new(what, &stdout);
        let own = (CONTEXT_MIB + HELD_MIB) * MIB;
        let total = mode.total();
        // The driver's own reserve is the device's business: a capped container sees none.
        let reserved = if mode == Mode::Capped {
            0
        } else {
            RESERVED_MIB * MIB
        };
        r.eq("count", 1);
        r.eq("devices.0.name", &gpu.name);
        r.eq("devices.0.uuid", &gpu.uuid);
        r.bytes("devices.0.v1.total", total);
        r.bytes("devices.0.v1.used", reserved + own);
        r.bytes("devices.0.v1.free", total - reserved - own);
        r.bytes("devices.0.v2.total", total);
        r.bytes("devices.0.v2.reserved", reserved);
        r.bytes("devices.0.v2.used", own);
        r.bytes("devices.0.v2.free", total - reserved - own);
        r.eq("devices.0.processes.len", 1);
        r.eq("devices.0.processes.0.pid", r.str("pid"));
        r.bytes("devices.0.processes.0.used", own);
        assert!(r.u64("devices.0.util.gpu") <= 100, "{}", r.what);
    }
}

/// The text nvitop shows for a memory figure (its `bytes2human`) in the two ranges used here:
/// whole MiB from 1000 MiB to 20 GiB, GiB with two decimals from 20 to 100 GiB.
fn nvitop_bytes(bytes: u64) -> String {
    const GIB: u64 = 1024 * MIB;
    assert!((1000 * MIB..100 * GIB).contains(&bytes), "{bytes} B");
    if bytes < 20 * GIB {
        format!("{}MiB", (bytes + MIB / 2) / MIB)
    } else {
        format!("{:.2}GiB", bytes as f64 / GIB as f64)
    }
}

#[test]
fn nvitop_once_shows_used_over_the_cap_and_the_process() {
    let _serial = serial();
    const HELD_MIB: u64 = 1024;
    for mode in MODES {
        let node = node();
        let holder = Holder::start(&node, mode, HELD_MIB);
        let holder_pid = holder.pid;
        let mut cmd = command(&node, mode, &venv_bin("nvitop"));
        cmd.arg("-1").env_remove("TERM").env_remove("COLUMNS");
        let what = format!("nvitop -1 ({mode:?})");
        let (stdout, stderr) = finish(&what, cmd);
        drop(holder);
        assert!(stderr.is_empty(), "{what} printed on stderr:\n{stderr}");
        let used = (CONTEXT_MIB + HELD_MIB) * MIB;
        let memory = format!("{} / {}", nvitop_bytes(used), nvitop_bytes(mode.total()));
        assert!(
            stdout.contains(&memory),
            "{what}: no `{memory}` in\n{stdout}"
        );
        // The fields nvitop fills from NVML's monitoring queries, as on an A100: persistence
        // on, no display, ECC errors 0, no fan, temperature, P0, power draw / limit, compute mode.
        for field in [
            " On │ ",
            " Off │ ",
            " 0 │",
            "N/A   30C   P0     60W / 400W",
            "Default │",
        ] {
            assert!(stdout.contains(field), "{what}: no `{field}` in\n{stdout}");
        }
        let row = stdout
            .lines()
            .find(|l| l.contains(&format!(" {holder_pid} C ")))
            .unwrap_or_else(|| panic!("{what}: no compute process {holder_pid} in\n{stdout}"));
        assert!(
            row.contains(&nvitop_bytes(used)),
            "{what}: process row without its {} MiB: {row}",
            used / MIB
        );
    }
}

#[test]
fn gpustat_json_shows_used_over_the_cap_and_the_process() {
    let _serial = serial();
    const HELD_MIB: u64 = 1024;
    for mode in MODES {
        let node = node();
        let holder = Holder::start(&node, mode, HELD_MIB);
        let holder_pid = holder.pid;
        let mut cmd = command(&node, mode, &venv_bin("gpustat"));
        cmd.arg("--json");
        let what = format!("gpustat --json ({mode:?})");
        let (stdout, stderr) = finish(&what, cmd);
        drop(holder);
        assert!(stderr.is_empty(), "{what} printed on stderr:\n{stderr}");
        let r = Report::new(what, &stdout);
        r.eq("gpus.len", 1);
        r.eq("gpus.0.uuid", &node.spec().gpus[0].uuid);
        r.eq("gpus.0.memory.total", mode.total() / MIB);
        r.eq("gpus.0.memory.used", CONTEXT_MIB + HELD_MIB);
        r.eq("gpus.0.processes.len", 1);
        r.eq("gpus.0.processes.0.pid", holder_pid);
        r.eq(
            "gpus.0.processes.0.gpu_memory_usage",
            CONTEXT_MIB + HELD_MIB,
        );
        r.eq("gpus.0.fan.speed", "null");
        r.eq("gpus.0.enforced.power.limit", 400);
    }
}

#[test]
fn numba_cuda_detects_copies_runs_out_of_memory_at_the_cap_and_closes() {
    let _serial = serial();
    const CHUNK_MIB: u64 = 256;
    for mode in MODES {
        let node = node();
        let args = [mode.too_big_mib().to_string(), CHUNK_MIB.to_string()];
        let (stdout, stderr) = run_script(&node, mode, "numba_check.py", &args);
        let what = format!("numba ({mode:?})");
        assert_quiet(&what, mode, &stderr);
        let r = Report::new(what, &stdout);
        r.eq("detect", true);
        for text in ["[SUPPORTED]", "1/1 devices are supported"] {
            assert!(
                r.str("detect_text").contains(text),
                "{}: cuda.detect() printed {}",
                r.what,
                r.str("detect_text")
            );
        }
        r.bytes("start.total", mode.total());
        r.bytes("start.free", mode.free_at_start());
        r.eq("roundtrip", true);
        r.eq("device_array", true);
        // A 4 MiB and a 2 MiB array: each its own 2 MiB pages.
        let with_arrays = mode.free_at_start() - 6 * MIB;
        r.bytes("with_arrays.free", with_arrays);
        r.eq("too_big", 2); // CUDA_ERROR_OUT_OF_MEMORY, as numba's CudaAPIError.code
        r.eq("chunk_error", 2);
        let chunks = with_arrays / (CHUNK_MIB * MIB);
        r.eq("chunks", chunks);
        r.bytes("full.free", with_arrays - chunks * CHUNK_MIB * MIB);
        r.eq("closed", true);
    }
}

#[test]
fn cuda_bindings_allocate_map_create_contexts_and_launch_under_the_caps() {
    let _serial = serial();
    for mode in MODES {
        let node = node();
        let seconds = if mode == Mode::Capped {
            CAPPED_RUN_S
        } else {
            UNCAPPED_RUN_S
        };
        let args = [mode.too_big_mib().to_string(), seconds.to_owned()];
        let mut load = command(&node, mode, &python());
        load.arg(script("cuda_bindings_check.py"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let load = load.spawn().expect("run cuda_bindings_check.py");
        // While it launches under the cap: what a node-side monitor (nvitop's API, reading
        // NVML's per-process samples) shows for each process, once the cap has settled.
        let monitor = (mode == Mode::Capped).then(|| {
            std::thread::sleep(SM_SETTLE + Duration::from_secs(1));
            let mut cmd = command(&node, Mode::Bare, &python());
            cmd.arg(script("nvitop_sm.py")).args(["4", "0.3"]);
            finish("nvitop_sm.py", cmd).0
        });
        let out = load
            .wait_with_output()
            .expect("wait cuda_bindings_check.py");
        let (stdout, stderr) = succeeded(&format!("cuda_bindings_check.py ({mode:?})"), &out);
        let what = format!("cuda-bindings ({mode:?})");
        assert_quiet(&what, mode, &stderr);
        let r = Report::new(what, &stdout);
        let free = mode.free_at_start();
        r.eq("driver_version", node.spec().cuda_driver_version);
        r.bytes("device_total", mode.total());
        r.bytes("start.total", mode.total());
        r.bytes("start.free", free);
        r.eq("roundtrip", true);
        r.bytes("after_alloc.free", free - 64 * MIB);
        r.bytes("after_async.free", free - 256 * MIB);
        r.eq("vmm", 0);
        r.bytes("after_vmm.free", free - 512 * MIB);
        for v in ["v2", "v3", "v4"] {
            r.bytes(&format!("ctx_create.{v}.free"), free - CONTEXT_MIB * MIB);
        }
        for call in ["cuMemAlloc", "cuMemAllocAsync", "cuMemCreate"] {
            r.eq(&format!("too_big.{call}"), 2); // CUDA_ERROR_OUT_OF_MEMORY
        }
        r.bytes("end.free", free);

        let run = Outcome {
            pid: r.u64("pid") as u32,
            launches: r.u64("launches"),
            start_ns: r.u64("start_ns"),
            end_ns: r.u64("end_ns"),
            via: String::new(),
            stderr,
        };
        assert!(run.launches > 0, "{}: no launch", r.what);
        if mode == Mode::Capped {
            let share = achieved(&node, 0, run.pid, &run, SM_SETTLE);
            eprintln!("{}: {share:.1} % of the GPU (cap {SM_CAP} %)", r.what);
            assert!(
                (share - SM_CAP).abs() <= SM_TOLERANCE,
                "{}: kernels used {share:.1} % of the GPU, cap {SM_CAP} % (±{SM_TOLERANCE})",
                r.what
            );
            // nvitop shows the process at its cap too (NVML's per-process samples as a real
            // consumer reads them: one entry per process, its share over the last second).
            let json = monitor.expect("capped runs are monitored");
            let flat = flatten("nvitop_sm.py", &json);
            let shown: Vec<f64> = flat
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("readings.") && k.ends_with(&format!(".{}", run.pid))
                })
                .filter_map(|(_, v)| v.parse().ok())
                .collect();
            eprintln!("{}: nvitop shows {shown:?} % SM", r.what);
            assert!(shown.len() >= 3, "nvitop saw the process: {json}");
            for sm in &shown {
                assert!(
                    (sm - SM_CAP).abs() <= SM_TOLERANCE,
                    "{}: nvitop shows {sm} % SM for the process, cap {SM_CAP} %: {json}",
                    r.what
                );
            }
        } else {
            let share = achieved(&node, 0, run.pid, &run, UNCAPPED_SETTLE);
            eprintln!("{}: {share:.1} % of the GPU (no cap)", r.what);
            assert!(
                share >= UNCAPPED_FLOOR,
                "{}: kernels used only {share:.1} % of the GPU without a cap",
                r.what
            );
        }
    }
}
