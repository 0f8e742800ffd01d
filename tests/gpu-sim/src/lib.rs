//! A simulated GPU node for tests of the node agent, on a machine without GPUs.
//!
//! # What this crate owns
//!
//! * **A fake `libnvidia-ml.so.1`**, written in C (`csrc/`) with NVML's real C ABI and built by
//!   `build.rs`. Anything that loads NVML — the node agent through `nvml-wrapper`, a Go program
//!   through go-nvml, `dlopen` — can load it instead of the driver's library: [`nvml_library`]
//!   gives its path. It exports only NVML entry points (the list is in `csrc/nvml_api.h`).
//! * **A fake `libcuda.so.1`** (the CUDA driver API), also C with the driver's real ABI (legacy and
//!   versioned symbol names, `cuGetProcAddress`, struct layouts, `CUresult` codes), on the same
//!   node: [`cuda_library`] gives its path. Its device memory is shared by every process of the
//!   node through a state file next to the node file ([`SimNode::cuda_state`] reads it), so two
//!   processes on one simulated GPU see each other's usage and a killed process's memory is
//!   reclaimed; the fake NVML reports the same usage.
//! * **The node file**: a small INI-like text file describing the node (driver and CUDA versions,
//!   one `[gpu]` section per device). [`NodeSpec`] and [`GpuSpec`] write it; the fake reads the
//!   file named by `$GPU_SIM_NODE` when NVML is initialised.
//! * **The control log**: an append-only text file of fault-injection commands (`xid`, `fail`,
//!   `recover`, `ecc-dbe`, `ecc-sbe`) shared by every process on the simulated node. The fake
//!   reads new lines lazily, so an XID appended by a test reaches `nvmlEventSetWait` in the agent,
//!   and a GPU failed before a process starts is already lost for that process. [`ControlLog`]
//!   appends to it.
//! * **[`SimNode`]**: a temporary directory holding both files, the environment a child process
//!   needs ([`SimNode::env`]) and the fault-injection calls.
//! * **The kernel time model**: kernels launched through the fake driver take a modelled time
//!   (waves of the grid × a per-function cost chosen by the kernel's name) on one timeline per GPU
//!   shared by every process of the node, where processes time-slice; launches are asynchronous
//!   with a bounded queue and synchronisation waits. The fake NVML computes `nvmlDeviceGetUtilizationRates` and
//!   `nvmlDeviceGetProcessUtilization` (with host pids) from it, and [`SimNode::timeline`] reads
//!   the model's exact accounting ([`Timeline`]) for tests and benchmarks.
//!
//! Both file formats, and where the fake deliberately mimics real NVML behaviour, are documented
//! in `tests/gpu-sim/README.md`.
//!
//! # Where to start
//!
//! ```no_run
//! use gpu_sim::{GpuSpec, NodeSpec, SimNode};
//! use std::process::Command;
//!
//! # fn main() -> std::io::Result<()> {
//! let node = SimNode::new(NodeSpec::uniform(2, GpuSpec::a100_80gb))?;
//! let mut agent = Command::new("path/to/vgpu-device-plugin")
//!     .envs(node.env()) // GPU_SIM_NODE and GPU_SIM_CONTROL
//!     .env("NVML_LIB", gpu_sim::nvml_library()) // the agent's --nvml-lib
//!     .spawn()?;
//! node.inject_xid(&node.spec().gpus[1].uuid, 79)?; // the agent sees an XID 79 event on GPU 1
//! node.fail_gpu(&node.spec().gpus[0].uuid)?; // GPU 0 now answers NVML_ERROR_GPU_IS_LOST
//! # agent.kill()?;
//! # Ok(())
//! # }
//! ```
//!
//! The fake reads its environment when NVML is initialised, and tests cannot set environment
//! variables in their own process (`std::env::set_var` is `unsafe` and the workspace forbids
//! `unsafe`). So the normal use is a **child process** started with
//! `Command::envs(node.env())`: the node agent binary, or the test binary re-running itself (see
//! `tests/nvml_wrapper.rs` for that pattern). Inside such a child, [`ControlLog::from_env`] finds
//! the control log again.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

mod proc_root;
mod state_layout;
mod timeline;
pub use proc_root::{
    CgroupLayout, ProcRoot, Qos, Runtime, cgroup_file, container_cgroup_path, host_cgroup_file,
};
pub use timeline::{
    DeviceTimeline, PeriodProcess, PeriodRecord, TIMELINE_SUFFIX, Timeline, TimelineProcess,
};

/// Environment variable naming the node file; read by the fake at `nvmlInit`.
pub const ENV_NODE: &str = "GPU_SIM_NODE";
/// Environment variable naming the control log; defaults to the node file path plus `.control`.
pub const ENV_CONTROL: &str = "GPU_SIM_CONTROL";
/// What the fake appends to the node file path when `GPU_SIM_CONTROL` is unset.
pub const CONTROL_SUFFIX: &str = ".control";
/// What the fake `libcuda.so.1` appends to the node file path for the node's shared device state.
pub const CUDA_STATE_SUFFIX: &str = ".cuda-state";
pub use state_layout::MAX_GPUS;
use state_layout::{u32_at, u64_at};

/// Path of the fake `libnvidia-ml.so.1` built from `csrc/` (inside Cargo's `OUT_DIR`).
///
/// Load it with `Nvml::builder().lib_path(gpu_sim::nvml_library().as_os_str()).init()`.
/// A `libnvidia-ml.so` symlink sits next to it, see [`nvml_library_dir`].
pub fn nvml_library() -> &'static Path {
    Path::new(env!("GPU_SIM_NVML_LIB"))
}

/// Path of the fake `libcuda.so.1` (the CUDA driver API) built from `csrc/`, next to
/// [`nvml_library`] with a `libcuda.so` symlink. Link C programs with `-L<dir> -lcuda` and run
/// them with [`library_path_env`], or `dlopen` this path.
pub fn cuda_library() -> &'static Path {
    Path::new(env!("GPU_SIM_CUDA_LIB"))
}

/// Path of `gpu-sim-bypass`, a C program built from `csrc/bypass.c` that allocates device memory
/// without any limiter: `gpu-sim-bypass <cuda-library-path> <device-ordinal> <bytes> [<bytes>...]`
/// `dlopen`s that library, calls `cuInit`, makes a context on the device (`cuCtxCreate_v2`), allocates
/// each size with `cuMemAlloc_v2` printing `alloc <bytes> <CUresult>` per size, then prints
/// `ready <getpid()>` (flushed) and sleeps until killed; SIGTERM or SIGINT end it normally (exit 0,
/// the fake driver's exit handler returns its memory). Setup failures print one line and exit 1; bad
/// arguments exit 2. Run it with [`SimNode::env`].
pub fn bypass_program() -> PathBuf {
    PathBuf::from(env!("GPU_SIM_BYPASS"))
}

/// A running [`bypass_program`], killed and reaped when dropped (also when its start fails: it is
/// owned by this guard before anything it prints is read).
#[derive(Debug)]
pub struct Bypass {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// The pid it printed (its own `getpid()`).
    pub pid: u32,
    /// The `CUresult` of each allocation, in order.
    pub results: Vec<i32>,
}

impl Drop for Bypass {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bypass {
    /// The process itself (to signal it or wait for its status).
    pub fn child(&mut self) -> &mut std::process::Child {
        &mut self.child
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl SimNode {
    /// Starts [`bypass_program`] on this node allocating each of `sizes` on CUDA device `ordinal`
    /// (with `extra` environment on top of [`SimNode::env`]), and returns it once it printed `ready`.
    pub fn bypass(&self, ordinal: u32, sizes: &[u64], extra: &[(&str, &str)]) -> Bypass {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(bypass_program())
            .arg(cuda_library())
            .arg(ordinal.to_string())
            .args(sizes.iter().map(u64::to_string))
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("LD_PRELOAD")
            .envs(self.env())
            .envs(extra.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn gpu-sim-bypass");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut b = Bypass {
            child,
            stdout,
            pid: 0,
            results: Vec::new(),
        };
        let mut printed = String::new();
        loop {
            let mut line = String::new();
            let n = b.stdout.read_line(&mut line).expect("read bypass stdout");
            assert!(n > 0, "gpu-sim-bypass ended before ready:\n{printed}");
            printed.push_str(&line);
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["alloc", bytes, code] => {
                    assert_eq!(bytes.parse::<u64>().ok(), Some(sizes[b.results.len()]));
                    b.results.push(code.parse().expect("CUresult"));
                }
                ["ready", pid] => {
                    b.pid = pid.parse().expect("pid");
                    assert_eq!(b.pid, b.child.id(), "ready prints getpid()");
                    assert_eq!(b.results.len(), sizes.len(), "{printed}");
                    return b;
                }
                _ => panic!("unexpected line from gpu-sim-bypass: {line:?} after:\n{printed}"),
            }
        }
    }

    /// [`SimNode::bypass`] with one allocation of `bytes`, which must succeed.
    pub fn hold(&self, ordinal: u32, bytes: u64) -> Bypass {
        let b = self.bypass(ordinal, &[bytes], &[]);
        assert_eq!(
            b.results,
            [0],
            "gpu-sim-bypass could not allocate {bytes} bytes"
        );
        b
    }
}

/// Directory holding `libnvidia-ml.so.1`, `libcuda.so.1` and their unversioned symlinks, for
/// programs that `dlopen` NVML or CUDA by name (put it on `LD_LIBRARY_PATH`, see [`library_path_env`]).
pub fn nvml_library_dir() -> &'static Path {
    nvml_library().parent().unwrap_or(Path::new("/"))
}

/// `("LD_LIBRARY_PATH", ...)` with [`nvml_library_dir`] first, then the current value, for a child
/// that loads `libnvidia-ml.so.1` or `libcuda.so.1` by name.
pub fn library_path_env() -> (String, String) {
    let mut value = nvml_library_dir().to_string_lossy().into_owned();
    if let Some(current) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        value.push(':');
        value.push_str(&current.to_string_lossy());
    }
    ("LD_LIBRARY_PATH".to_owned(), value)
}

// ---------------------------------------------------------------------------------------------
// Node description
// ---------------------------------------------------------------------------------------------

/// A simulated node: driver versions and its GPUs, in NVML index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// `nvmlSystemGetDriverVersion`, e.g. `550.54.15`.
    pub driver_version: String,
    /// `nvmlSystemGetCudaDriverVersion`: `1000 * major + 10 * minor`, e.g. 12040 for CUDA 12.4.
    pub cuda_driver_version: u32,
    /// `nvmlSystemGetNVMLVersion`; `None` derives `"<CUDA major>.<driver version>"` as NVML does.
    pub nvml_version: Option<String>,
    /// Device memory each CUDA context costs in the fake `libcuda.so.1`, in MiB; `None` leaves
    /// the fake's default ([`NodeSpec::DEFAULT_CUDA_CONTEXT_MIB`]).
    pub cuda_context_mib: Option<u64>,
    /// The kernel timeline's NVML sample period in µs (`utilization_period_us`, 10,000 to
    /// 1,000,000); `None` leaves the fake's default, 1/6 s (see [`Timeline`]).
    pub utilization_period_us: Option<u64>,
    /// How late each NVML process sample is recorded after its period ends, at most, in µs
    /// (`utilization_jitter_us`, up to a quarter of the period): 0..=this, fixed per (GPU, period)
    /// and the same in every process, so successive sample timestamps are not exactly a period
    /// apart, as on a real driver. `None`: 0.
    pub utilization_jitter_us: Option<u64>,
    /// Junk entries appended to every `nvmlDeviceGetProcessUtilization` answer, as a real driver
    /// does next to zombie processes (`utilization_junk_entries`, 0 to 100): one with a pid nobody
    /// has, `smUtil` 37,100 and a stamp long past, the rest all zero. `None`: 0.
    pub utilization_junk_entries: Option<u32>,
    /// How long creating a CUDA context takes once its memory is in use
    /// (`cuda_context_create_ms`, 0 to 10,000; real drivers take hundreds of ms). `None`: 0.
    pub cuda_context_create_ms: Option<u64>,
    /// One entry per GPU; the NVML index is the position here, whatever the minor numbers.
    pub gpus: Vec<GpuSpec>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl NodeSpec {
    /// Driver version used unless set otherwise.
    pub const DEFAULT_DRIVER_VERSION: &'static str = "550.54.15";
    /// CUDA driver version used unless set otherwise (CUDA 12.4, what driver 550 ships).
    pub const DEFAULT_CUDA_DRIVER_VERSION: u32 = 12040;
    /// Device memory a CUDA context costs unless set otherwise, in MiB.
    pub const DEFAULT_CUDA_CONTEXT_MIB: u64 = 300;

    /// A node with these GPUs and the default driver (550.54.15, CUDA 12.4).
    pub fn new(gpus: Vec<GpuSpec>) -> Self {
        Self {
            driver_version: Self::DEFAULT_DRIVER_VERSION.to_owned(),
            cuda_driver_version: Self::DEFAULT_CUDA_DRIVER_VERSION,
            nvml_version: None,
            cuda_context_mib: None,
            utilization_period_us: None,
            utilization_jitter_us: None,
            utilization_junk_entries: None,
            cuda_context_create_ms: None,
            gpus,
        }
    }

    /// `count` GPUs made by `gpu(minor)` for minors `0..count`, e.g.
    /// `NodeSpec::uniform(8, GpuSpec::a100_80gb)`.
    pub fn uniform(count: u32, gpu: impl Fn(u32) -> GpuSpec) -> Self {
        Self::new((0..count).map(gpu).collect())
    }

    /// Sets the device memory a CUDA context costs (`cuda_context_mib` in the node file).
    pub fn with_cuda_context_mib(mut self, mib: u64) -> Self {
        self.cuda_context_mib = Some(mib);
        self
    }

    /// Sets the kernel timeline's NVML sample period (`utilization_period_us` in the node file).
    pub fn with_utilization_period_us(mut self, us: u64) -> Self {
        self.utilization_period_us = Some(us);
        self
    }

    /// Sets how late NVML's process samples are recorded, at most (`utilization_jitter_us`).
    pub fn with_utilization_jitter_us(mut self, us: u64) -> Self {
        self.utilization_jitter_us = Some(us);
        self
    }

    /// Appends junk entries to NVML's process-utilisation answers (`utilization_junk_entries`).
    pub fn with_utilization_junk_entries(mut self, n: u32) -> Self {
        self.utilization_junk_entries = Some(n);
        self
    }

    /// Makes creating a CUDA context take `ms` milliseconds (`cuda_context_create_ms`).
    pub fn with_cuda_context_create_ms(mut self, ms: u64) -> Self {
        self.cuda_context_create_ms = Some(ms);
        self
    }

    /// Replaces the driver and CUDA driver versions.
    pub fn with_driver(mut self, driver_version: &str, cuda_driver_version: u32) -> Self {
        self.driver_version = driver_version.to_owned();
        self.cuda_driver_version = cuda_driver_version;
        self
    }

    /// The NVML version the fake reports: the explicit one, or `"<CUDA major>.<driver version>"`.
    pub fn effective_nvml_version(&self) -> String {
        match &self.nvml_version {
            Some(v) => v.clone(),
            None => format!(
                "{}.{}",
                self.cuda_driver_version / 1000,
                self.driver_version
            ),
        }
    }

    /// The UUIDs of the GPUs, in NVML index order.
    pub fn uuids(&self) -> Vec<&str> {
        self.gpus.iter().map(|g| g.uuid.as_str()).collect()
    }

    /// The node file text. Fails (`InvalidInput`) on values the format cannot carry: empty
    /// strings, or text containing `#` or a line break.
    pub fn render(&self) -> io::Result<String> {
        let mut out = String::from("# gpu-sim node v1\n");
        let mut kv = |key: &str, value: &dyn std::fmt::Display| -> io::Result<()> {
            let value = value.to_string();
            check_value(key, &value)?;
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{key} = {value}");
            Ok(())
        };
        kv("driver_version", &self.driver_version)?;
        kv("cuda_driver_version", &self.cuda_driver_version)?;
        if let Some(v) = &self.nvml_version {
            kv("nvml_version", v)?;
        }
        if let Some(mib) = self.cuda_context_mib {
            kv("cuda_context_mib", &mib)?;
        }
        if let Some(us) = self.utilization_period_us {
            kv("utilization_period_us", &us)?;
        }
        if let Some(us) = self.utilization_jitter_us {
            kv("utilization_jitter_us", &us)?;
        }
        if let Some(n) = self.utilization_junk_entries {
            kv("utilization_junk_entries", &n)?;
        }
        if let Some(ms) = self.cuda_context_create_ms {
            kv("cuda_context_create_ms", &ms)?;
        }
        for gpu in &self.gpus {
            out.push_str("\n[gpu]\n");
            gpu.render_into(&mut out)?;
        }
        Ok(out)
    }

    /// Writes the node file to `path` (replacing it).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        fs::write(path, self.render()?)
    }
}

/// MIG capability and mode of a GPU, as `nvmlDeviceGetMigMode` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mig {
    /// Not MIG-capable: `nvmlDeviceGetMigMode` answers `NVML_ERROR_NOT_SUPPORTED` (T4, V100).
    #[default]
    Unsupported,
    /// MIG-capable with MIG mode off (A100/H100 out of the box).
    Disabled,
    /// MIG mode on. No GPU/compute instances are modelled; utilisation becomes unsupported.
    Enabled,
}

impl Mig {
    fn as_str(self) -> &'static str {
        match self {
            Mig::Unsupported => "unsupported",
            Mig::Disabled => "disabled",
            Mig::Enabled => "enabled",
        }
    }
}

/// A process with a compute context on a GPU (`nvmlDeviceGetComputeRunningProcesses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    /// Process id (need not exist on the host).
    pub pid: u32,
    /// Device memory the process holds, in MiB; counts as used memory.
    pub used_mib: u64,
}

/// One GPU of a [`NodeSpec`]: every value the fake reports for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSpec {
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase hex.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA A100-SXM4-80GB`.
    pub name: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// Memory the driver reserves, in MiB; `None` lets the fake use `memory_mib / 200` (~0.5%).
    pub memory_reserved_mib: Option<u64>,
    /// Memory allocated outside the listed processes, in MiB.
    pub memory_used_mib: u64,
    /// Minor number (`/dev/nvidia<minor>`), 0 to 254, unique on the node.
    pub minor: u32,
    /// NUMA node; `None` makes `nvmlDeviceGetNumaNodeId` answer `NVML_ERROR_NOT_SUPPORTED`.
    pub numa_node: Option<u32>,
    /// PCI address as NVML prints it, e.g. `00000000:07:00.0`.
    pub pci_bus_id: String,
    /// `(device id << 16) | 0x10DE`.
    pub pci_device_id: u32,
    /// `(subsystem id << 16) | subsystem vendor id`.
    pub pci_subsystem_id: u32,
    /// Event support; `false` makes `nvmlDeviceRegisterEvents` answer `NVML_ERROR_NOT_SUPPORTED`.
    pub events: bool,
    /// ECC enabled; `false` removes the ECC event types from the supported ones.
    pub ecc: bool,
    /// MIG capability and mode (current = pending at start).
    pub mig: Mig,
    /// Initial MIG layout, one `mig_instance` node-file line each: `<profile>@<start>` (a GPU
    /// instance of that profile name at that placement start, with one compute instance spanning
    /// it, as `nvidia-smi mig -cgi <profile> -C` makes) or `<profile>@<start> gi-only`. Needs
    /// `mig: Mig::Enabled` and a profile of this board (e.g. `3g.40gb@4` on an A100 80GB).
    pub mig_instances: Vec<String>,
    /// `nvmlDeviceGetUtilizationRates().gpu`, percent.
    pub utilization_gpu: u32,
    /// `nvmlDeviceGetUtilizationRates().memory`, percent.
    pub utilization_memory: u32,
    /// Running compute processes.
    pub processes: Vec<GpuProcess>,
}

/// PCI buses of the eight GPUs of a DGX/HGX board, in minor order.
const HGX_PCI_BUSES: [u32; 8] = [0x07, 0x0F, 0x47, 0x4E, 0x87, 0x90, 0xB7, 0xBD];

impl GpuSpec {
    /// A GPU with the given product name and memory and everything else derived from `minor`:
    /// a deterministic UUID ([`GpuSpec::uuid_for`]), an HGX-style PCI address
    /// ([`GpuSpec::pci_bus_id_for`]), the NUMA node of that address (0 below bus 0x80, else 1),
    /// events and ECC on, not MIG-capable, idle, no processes.
    pub fn new(name: &str, memory_mib: u64, minor: u32) -> Self {
        let bus = HGX_PCI_BUSES[(minor % 8) as usize];
        Self {
            uuid: Self::uuid_for(name, minor),
            name: name.to_owned(),
            memory_mib,
            memory_reserved_mib: None,
            memory_used_mib: 0,
            minor,
            numa_node: Some(if bus < 0x80 { 0 } else { 1 }),
            pci_bus_id: Self::pci_bus_id_for(minor),
            pci_device_id: 0x0000_10DE,
            pci_subsystem_id: 0x0000_10DE,
            events: true,
            ecc: true,
            mig: Mig::Unsupported,
            mig_instances: Vec::new(),
            utilization_gpu: 0,
            utilization_memory: 0,
            processes: Vec::new(),
        }
    }

    /// NVIDIA A100-SXM4-80GB: 81920 MiB, MIG-capable (MIG off).
    pub fn a100_80gb(minor: u32) -> Self {
        Self {
            pci_device_id: 0x20B2_10DE,
            pci_subsystem_id: 0x1463_10DE,
            mig: Mig::Disabled,
            ..Self::new("NVIDIA A100-SXM4-80GB", 81920, minor)
        }
    }

    /// NVIDIA A100-SXM4-40GB: 40960 MiB, MIG-capable (MIG off).
    pub fn a100_40gb(minor: u32) -> Self {
        Self {
            pci_device_id: 0x20B0_10DE,
            pci_subsystem_id: 0x134F_10DE,
            mig: Mig::Disabled,
            ..Self::new("NVIDIA A100-SXM4-40GB", 40960, minor)
        }
    }

    /// NVIDIA H100 80GB HBM3 (SXM5): 81559 MiB as NVML reports it, MIG-capable (MIG off).
    pub fn h100_80gb(minor: u32) -> Self {
        Self {
            pci_device_id: 0x2330_10DE,
            pci_subsystem_id: 0x16C1_10DE,
            mig: Mig::Disabled,
            ..Self::new("NVIDIA H100 80GB HBM3", 81559, minor)
        }
    }

    /// Tesla T4: 15360 MiB, not MIG-capable.
    pub fn t4(minor: u32) -> Self {
        Self {
            pci_device_id: 0x1EB8_10DE,
            pci_subsystem_id: 0x12A2_10DE,
            ..Self::new("Tesla T4", 15360, minor)
        }
    }

    /// A deterministic, realistic-looking UUID for GPU `minor` of product `name`: the same inputs
    /// always give the same UUID, different models or minors give different ones.
    pub fn uuid_for(name: &str, minor: u32) -> String {
        // FNV-1a over the inputs, then two splitmix64 rounds for 128 well-mixed bits.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes().chain([0u8]).chain(minor.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let hi = splitmix64(&mut h);
        let lo = splitmix64(&mut h);
        format!(
            "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        )
    }

    /// The PCI address of GPU `minor` on an HGX-style board: buses 07, 0F, 47, 4E, 87, 90, B7, BD
    /// for minors 0-7, then the same buses in PCI domain `minor / 8`.
    pub fn pci_bus_id_for(minor: u32) -> String {
        format!(
            "{:08X}:{:02X}:00.0",
            minor / 8,
            HGX_PCI_BUSES[(minor % 8) as usize]
        )
    }

    /// Total memory in bytes, as NVML reports it.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib * MIB
    }

    /// Reserved memory in MiB as the fake will report it (the default is `memory_mib / 200`).
    pub fn effective_reserved_mib(&self) -> u64 {
        self.memory_reserved_mib.unwrap_or(self.memory_mib / 200)
    }

    /// Allocated memory in MiB: `memory_used_mib` plus every process (NVML v2 `used`).
    pub fn allocated_mib(&self) -> u64 {
        self.memory_used_mib + self.processes.iter().map(|p| p.used_mib).sum::<u64>()
    }

    /// Replaces the UUID.
    pub fn with_uuid(mut self, uuid: &str) -> Self {
        self.uuid = uuid.to_owned();
        self
    }

    /// Replaces the PCI address (`00000000:07:00.0`).
    pub fn with_pci_bus_id(mut self, pci_bus_id: &str) -> Self {
        self.pci_bus_id = pci_bus_id.to_owned();
        self
    }

    /// Sets the NUMA node; `None` means NVML reports none (`NOT_SUPPORTED`).
    pub fn with_numa_node(mut self, numa_node: Option<u32>) -> Self {
        self.numa_node = numa_node;
        self
    }

    /// Turns event support on or off.
    pub fn with_events(mut self, events: bool) -> Self {
        self.events = events;
        self
    }

    /// Turns ECC (and with it the ECC event types) on or off.
    pub fn with_ecc(mut self, ecc: bool) -> Self {
        self.ecc = ecc;
        self
    }

    /// Adds a `mig_instance` line (see [`GpuSpec::mig_instances`]).
    pub fn with_mig_instance(mut self, spec: &str) -> Self {
        self.mig_instances.push(spec.to_owned());
        self
    }

    /// Sets the MIG capability and mode.
    pub fn with_mig(mut self, mig: Mig) -> Self {
        self.mig = mig;
        self
    }

    /// Sets the memory the driver reserves, in MiB.
    pub fn with_memory_reserved_mib(mut self, mib: u64) -> Self {
        self.memory_reserved_mib = Some(mib);
        self
    }

    /// Sets memory allocated outside the listed processes, in MiB.
    pub fn with_memory_used_mib(mut self, mib: u64) -> Self {
        self.memory_used_mib = mib;
        self
    }

    /// Sets the utilisation percentages.
    pub fn with_utilization(mut self, gpu: u32, memory: u32) -> Self {
        self.utilization_gpu = gpu;
        self.utilization_memory = memory;
        self
    }

    /// Adds a running compute process holding `used_mib` MiB.
    pub fn with_process(mut self, pid: u32, used_mib: u64) -> Self {
        self.processes.push(GpuProcess { pid, used_mib });
        self
    }

    fn render_into(&self, out: &mut String) -> io::Result<()> {
        let mut kv = |key: &str, value: &dyn std::fmt::Display| -> io::Result<()> {
            let value = value.to_string();
            check_value(key, &value)?;
            let _ = writeln!(out, "{key} = {value}");
            Ok(())
        };
        kv("uuid", &self.uuid)?;
        kv("name", &self.name)?;
        kv("memory_mib", &self.memory_mib)?;
        if let Some(reserved) = self.memory_reserved_mib {
            kv("memory_reserved_mib", &reserved)?;
        }
        if self.memory_used_mib != 0 {
            kv("memory_used_mib", &self.memory_used_mib)?;
        }
        kv("minor", &self.minor)?;
        match self.numa_node {
            Some(node) => kv("numa_node", &node)?,
            None => kv("numa_node", &-1)?,
        }
        kv("pci_bus_id", &self.pci_bus_id)?;
        kv(
            "pci_device_id",
            &format_args!("0x{:08X}", self.pci_device_id),
        )?;
        kv(
            "pci_subsystem_id",
            &format_args!("0x{:08X}", self.pci_subsystem_id),
        )?;
        kv("events", &self.events)?;
        kv("ecc", &self.ecc)?;
        kv("mig", &self.mig.as_str())?;
        for spec in &self.mig_instances {
            kv("mig_instance", spec)?;
        }
        kv("utilization_gpu", &self.utilization_gpu)?;
        kv("utilization_memory", &self.utilization_memory)?;
        for p in &self.processes {
            kv("process", &format_args!("{} {}", p.pid, p.used_mib))?;
        }
        Ok(())
    }
}

const MIB: u64 = 1024 * 1024;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn check_value(key: &str, value: &str) -> io::Result<()> {
    if value.is_empty() || value.contains(['#', '\n', '\r']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "node file value for {key:?} must be non-empty without '#' or line breaks: {value:?}"
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Control log
// ---------------------------------------------------------------------------------------------

/// Appends fault-injection commands to a control log. Every process using the fake on that
/// node sees them; see the README for the commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlLog {
    path: PathBuf,
}

impl ControlLog {
    /// A control log at `path` (created on the first append if missing).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The control log the fake in this process uses: `$GPU_SIM_CONTROL`, or `$GPU_SIM_NODE`
    /// plus `.control`. `None` if neither is set. Meant for child processes started with
    /// [`SimNode::env`].
    pub fn from_env() -> Option<Self> {
        if let Some(path) = std::env::var_os(ENV_CONTROL).filter(|p| !p.is_empty()) {
            return Some(Self::new(path));
        }
        let mut node = std::env::var_os(ENV_NODE).filter(|p| !p.is_empty())?;
        node.push(CONTROL_SUFFIX);
        Some(Self::new(node))
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one command line (without its newline) with a single `O_APPEND` write, so lines
    /// from concurrent writers never interleave.
    pub fn append(&self, line: &str) -> io::Result<()> {
        if line.contains(['\n', '\r']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a control command is one line: {line:?}"),
            ));
        }
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)?;
        file.write_all(format!("{line}\n").as_bytes())
    }

    /// `xid <uuid> <code>`: an XID critical error event (`nvmlEventTypeXidCriticalError`,
    /// `eventData` = `xid`) for every event set registered for it on that GPU.
    pub fn inject_xid(&self, uuid: &str, xid: u64) -> io::Result<()> {
        self.append(&format!("xid {} {xid}", checked_uuid(uuid)?))
    }

    /// `ecc-dbe <uuid>`: a double-bit ECC error event (`nvmlEventTypeDoubleBitEccError`).
    pub fn inject_ecc_dbe(&self, uuid: &str) -> io::Result<()> {
        self.append(&format!("ecc-dbe {}", checked_uuid(uuid)?))
    }

    /// `ecc-sbe <uuid>`: a single-bit ECC error event (`nvmlEventTypeSingleBitEccError`).
    pub fn inject_ecc_sbe(&self, uuid: &str) -> io::Result<()> {
        self.append(&format!("ecc-sbe {}", checked_uuid(uuid)?))
    }

    /// `fail <uuid>`: the GPU falls off the bus; its queries answer `NVML_ERROR_GPU_IS_LOST`.
    pub fn fail_gpu(&self, uuid: &str) -> io::Result<()> {
        self.append(&format!("fail {}", checked_uuid(uuid)?))
    }

    /// `recover <uuid>`: the GPU answers again.
    pub fn recover_gpu(&self, uuid: &str) -> io::Result<()> {
        self.append(&format!("recover {}", checked_uuid(uuid)?))
    }

    /// `reset-pending <uuid>`: a memory repair waits for a GPU reset (a row remap on Ampere and
    /// later, a page retirement before; `nvmlDeviceGetRemappedRows` /
    /// `nvmlDeviceGetRetiredPagesPendingStatus` report it pending), as after an uncorrectable ECC
    /// error. The GPU keeps answering NVML.
    pub fn set_reset_pending(&self, uuid: &str) -> io::Result<()> {
        self.append(&format!("reset-pending {}", checked_uuid(uuid)?))
    }

    /// `reset <uuid>`: the GPU was reset; nothing is pending any more.
    pub fn reset_gpu(&self, uuid: &str) -> io::Result<()> {
        self.append(&format!("reset {}", checked_uuid(uuid)?))
    }

    /// `mig-fail <uuid> <count> <code>`: the next `count` GPU- or compute-instance creations on
    /// that GPU, by any process, fail with NVML error `code` (e.g. 23,
    /// `NVML_ERROR_INSUFFICIENT_RESOURCES`) and create nothing. A later line replaces an earlier
    /// one; `count` 0 disarms.
    pub fn fail_mig_creations(&self, uuid: &str, count: u32, code: u32) -> io::Result<()> {
        if code == 0 || code > 999 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an NVML error code: {code}"),
            ));
        }
        self.append(&format!("mig-fail {} {count} {code}", checked_uuid(uuid)?))
    }
}

fn checked_uuid(uuid: &str) -> io::Result<&str> {
    if uuid.is_empty() || uuid.contains(|c: char| c.is_whitespace() || c == '#') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a GPU uuid: {uuid:?}"),
        ));
    }
    Ok(uuid)
}

// ---------------------------------------------------------------------------------------------
// CUDA device state
// ---------------------------------------------------------------------------------------------

/// Counters of one GPU in the CUDA device state (index = position in the node file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaDeviceState {
    /// Device memory all live processes hold through the fake driver, in bytes (contexts
    /// included; the node file's reserved/used/process memory is not).
    pub used_bytes: u64,
    /// Kernel launches (`cuLaunchKernel*`, `cuLaunchKernelEx*`, `cuLaunchCooperativeKernel*`).
    pub launches: u64,
    /// Thread blocks of those launches (grid x·y·z summed).
    pub blocks: u64,
    /// `cuGraphLaunch*` calls.
    pub graph_launches: u64,
    /// Managed memory (`cuMemAllocManaged`) live on this GPU, in bytes: host-backed until the
    /// device touches it, so not part of `used_bytes` (not reaped when a process dies).
    pub managed_bytes: u64,
}

/// A process holding a slot in the CUDA device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaProcessState {
    /// Its pid (negative while another process reclaims it after it died).
    pub pid: i32,
    /// Bytes it holds on each GPU (index = position in the node file; [`MAX_GPUS`] entries).
    pub used_bytes: Vec<u64>,
}

/// A snapshot of the node-wide CUDA device state file (layout in `csrc/sim_state.h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaState {
    /// One entry per possible GPU ([`MAX_GPUS`]).
    pub devices: Vec<CudaDeviceState>,
    /// Occupied process slots.
    pub processes: Vec<CudaProcessState>,
}

impl CudaState {
    const MAGIC: &'static [u8; 8] = b"GPUSIMST";
    const HEADER: usize = 64;
    const DEVICE: usize = 64;
    const SLOTS: usize = 256;
    const SLOT: usize = 16 + 8 * MAX_GPUS;
    const SIZE: usize = Self::HEADER + Self::DEVICE * MAX_GPUS + Self::SLOT * Self::SLOTS;

    /// Parses the bytes of a state file.
    pub fn parse(bytes: &[u8]) -> io::Result<Self> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
        if bytes.len() != Self::SIZE {
            return Err(bad("CUDA state file has the wrong size"));
        }
        if &bytes[..8] != Self::MAGIC || u32_at(bytes, 8) != 1 {
            return Err(bad("not a version 1 CUDA state file"));
        }
        let devices = (0..MAX_GPUS)
            .map(|g| {
                let at = Self::HEADER + g * Self::DEVICE;
                CudaDeviceState {
                    used_bytes: u64_at(bytes, at),
                    launches: u64_at(bytes, at + 8),
                    blocks: u64_at(bytes, at + 16),
                    graph_launches: u64_at(bytes, at + 24),
                    managed_bytes: u64_at(bytes, at + 32),
                }
            })
            .collect();
        let slots = Self::HEADER + Self::DEVICE * MAX_GPUS;
        let processes = (0..Self::SLOTS)
            .filter_map(|s| {
                let at = slots + s * Self::SLOT;
                let pid =
                    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                (pid != 0).then(|| CudaProcessState {
                    pid,
                    used_bytes: (0..MAX_GPUS)
                        .map(|g| u64_at(bytes, at + 16 + 8 * g))
                        .collect(),
                })
            })
            .collect();
        Ok(Self { devices, processes })
    }

    /// The process with this pid, if it holds a slot.
    pub fn process(&self, pid: u32) -> Option<&CudaProcessState> {
        self.processes
            .iter()
            .find(|p| i64::from(p.pid) == i64::from(pid))
    }
}

// ---------------------------------------------------------------------------------------------
// SimNode
// ---------------------------------------------------------------------------------------------

/// A simulated node on disk: a temporary directory with the node file (`node`) and an empty
/// control log (`node.control`), removed when dropped.
#[derive(Debug)]
pub struct SimNode {
    dir: tempfile::TempDir,
    node_file: PathBuf,
    control: ControlLog,
    spec: NodeSpec,
}

impl SimNode {
    /// Writes `spec` into a new temporary directory.
    pub fn new(spec: NodeSpec) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("gpu-sim-").tempdir()?;
        let node_file = dir.path().join("node");
        spec.write(&node_file)?;
        let mut control_file = node_file.clone().into_os_string();
        control_file.push(CONTROL_SUFFIX);
        // Created up front so that "the log as it was when the event set was created" is a
        // well-defined point for every process.
        fs::write(&control_file, "")?;
        Ok(Self {
            dir,
            node_file,
            control: ControlLog::new(control_file),
            spec,
        })
    }

    /// The node this was written from.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// The temporary directory (free for a test's other files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node file (`GPU_SIM_NODE`).
    pub fn node_file(&self) -> &Path {
        &self.node_file
    }

    /// The control log (`GPU_SIM_CONTROL`).
    pub fn control_file(&self) -> &Path {
        self.control.path()
    }

    /// The control log, for injecting faults.
    pub fn control(&self) -> &ControlLog {
        &self.control
    }

    /// The node's CUDA device state file (`<node file>.cuda-state`), created by the first process
    /// that runs `cuInit` against the fake `libcuda.so.1`.
    pub fn cuda_state_file(&self) -> PathBuf {
        let mut path = self.node_file.clone().into_os_string();
        path.push(CUDA_STATE_SUFFIX);
        PathBuf::from(path)
    }

    /// A snapshot of the CUDA device state; `None` before any process initialised CUDA.
    pub fn cuda_state(&self) -> io::Result<Option<CudaState>> {
        match fs::read(self.cuda_state_file()) {
            Ok(bytes) => CudaState::parse(&bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The node's kernel timeline file (`<node file>.timeline`), created by the first process
    /// that runs `cuInit` against the fake `libcuda.so.1`.
    pub fn timeline_file(&self) -> PathBuf {
        let mut path = self.node_file.clone().into_os_string();
        path.push(TIMELINE_SUFFIX);
        PathBuf::from(path)
    }

    /// A consistent snapshot of the kernel timelines (README "Kernel time model"); `None` before
    /// any process initialised CUDA.
    pub fn timeline(&self) -> io::Result<Option<Timeline>> {
        match Timeline::read(&self.timeline_file()) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The environment a process needs to see this node: `GPU_SIM_NODE` and `GPU_SIM_CONTROL`.
    /// Use with `Command::envs`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                ENV_NODE.to_owned(),
                self.node_file.to_string_lossy().into_owned(),
            ),
            (
                ENV_CONTROL.to_owned(),
                self.control.path().to_string_lossy().into_owned(),
            ),
        ]
    }

    /// See [`ControlLog::inject_xid`].
    pub fn inject_xid(&self, uuid: &str, xid: u64) -> io::Result<()> {
        self.control.inject_xid(uuid, xid)
    }

    /// See [`ControlLog::inject_ecc_dbe`].
    pub fn inject_ecc_dbe(&self, uuid: &str) -> io::Result<()> {
        self.control.inject_ecc_dbe(uuid)
    }

    /// See [`ControlLog::fail_gpu`].
    pub fn fail_gpu(&self, uuid: &str) -> io::Result<()> {
        self.control.fail_gpu(uuid)
    }

    /// See [`ControlLog::recover_gpu`].
    pub fn recover_gpu(&self, uuid: &str) -> io::Result<()> {
        self.control.recover_gpu(uuid)
    }

    /// See [`ControlLog::set_reset_pending`].
    pub fn set_reset_pending(&self, uuid: &str) -> io::Result<()> {
        self.control.set_reset_pending(uuid)
    }

    /// See [`ControlLog::reset_gpu`].
    pub fn reset_gpu(&self, uuid: &str) -> io::Result<()> {
        self.control.reset_gpu(uuid)
    }

    /// See [`ControlLog::fail_mig_creations`].
    pub fn fail_mig_creations(&self, uuid: &str, count: u32, code: u32) -> io::Result<()> {
        self.control.fail_mig_creations(uuid, count, code)
    }

    /// `<node file>.mig`: the node's MIG modes and instances, shared by every NVML process
    /// (created by the first `nvmlInit*` from the node file's `mig` and `mig_instance` keys).
    pub fn mig_state_file(&self) -> PathBuf {
        let mut path = self.node_file().as_os_str().to_owned();
        path.push(".mig");
        PathBuf::from(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_nvml_uuid(s: &str) -> bool {
        let Some(rest) = s.strip_prefix("GPU-") else {
            return false;
        };
        let groups: Vec<&str> = rest.split('-').collect();
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups.iter().all(|g| {
                g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
    }

    #[test]
    fn uuids_are_well_formed_deterministic_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for make in [
            GpuSpec::a100_80gb,
            GpuSpec::a100_40gb,
            GpuSpec::h100_80gb,
            GpuSpec::t4,
        ] {
            for minor in 0..64 {
                let gpu = make(minor);
                assert!(is_nvml_uuid(&gpu.uuid), "{}", gpu.uuid);
                assert_eq!(gpu.uuid, make(minor).uuid);
                assert!(seen.insert(gpu.uuid.clone()), "duplicate {}", gpu.uuid);
            }
        }
    }

    #[test]
    fn pci_addresses_are_unique_and_nvml_formatted() {
        let ids: Vec<String> = (0..64).map(GpuSpec::pci_bus_id_for).collect();
        assert_eq!(ids[0], "00000000:07:00.0");
        assert_eq!(ids[7], "00000000:BD:00.0");
        assert_eq!(ids[8], "00000001:07:00.0");
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn render_writes_every_field() {
        let gpu = GpuSpec::t4(3)
            .with_numa_node(None)
            .with_events(false)
            .with_memory_reserved_mib(100)
            .with_memory_used_mib(5)
            .with_utilization(12, 34)
            .with_process(77, 256);
        let text = NodeSpec::new(vec![gpu.clone()])
            .with_driver("535.161.08", 12020)
            .render()
            .unwrap();
        for line in [
            "driver_version = 535.161.08",
            "cuda_driver_version = 12020",
            "[gpu]",
            &format!("uuid = {}", gpu.uuid),
            "name = Tesla T4",
            "memory_mib = 15360",
            "memory_reserved_mib = 100",
            "memory_used_mib = 5",
            "minor = 3",
            "numa_node = -1",
            "pci_bus_id = 00000000:4E:00.0",
            "pci_device_id = 0x1EB810DE",
            "pci_subsystem_id = 0x12A210DE",
            "events = false",
            "ecc = true",
            "mig = unsupported",
            "utilization_gpu = 12",
            "utilization_memory = 34",
            "process = 77 256",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("nvml_version"));
    }

    #[test]
    fn render_rejects_values_the_format_cannot_carry() {
        let spec = NodeSpec::new(vec![GpuSpec::t4(0).with_uuid("GPU-1#2")]);
        assert_eq!(
            spec.render().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let spec = NodeSpec::default().with_driver("550\n", 12040);
        assert_eq!(
            spec.render().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn nvml_version_is_derived_from_cuda_major_and_driver() {
        assert_eq!(NodeSpec::default().effective_nvml_version(), "12.550.54.15");
        assert_eq!(
            NodeSpec::default()
                .with_driver("470.82.01", 11040)
                .effective_nvml_version(),
            "11.470.82.01"
        );
    }

    #[test]
    fn sim_node_writes_files_and_appends_commands() {
        let node = SimNode::new(NodeSpec::uniform(2, GpuSpec::a100_80gb)).unwrap();
        let uuid = node.spec().gpus[1].uuid.clone();
        assert_eq!(
            fs::read_to_string(node.node_file()).unwrap(),
            node.spec().render().unwrap()
        );
        assert_eq!(fs::read_to_string(node.control_file()).unwrap(), "");
        assert_eq!(
            node.control_file().to_str().unwrap(),
            format!("{}.control", node.node_file().display())
        );
        let env = node.env();
        assert_eq!(
            env[0],
            (ENV_NODE.to_owned(), node.node_file().display().to_string())
        );
        assert_eq!(
            env[1],
            (
                ENV_CONTROL.to_owned(),
                node.control_file().display().to_string()
            )
        );

        node.inject_xid(&uuid, 79).unwrap();
        node.fail_gpu(&uuid).unwrap();
        node.recover_gpu(&uuid).unwrap();
        node.inject_ecc_dbe(&uuid).unwrap();
        node.control().inject_ecc_sbe(&uuid).unwrap();
        assert_eq!(
            fs::read_to_string(node.control_file()).unwrap(),
            format!("xid {uuid} 79\nfail {uuid}\nrecover {uuid}\necc-dbe {uuid}\necc-sbe {uuid}\n")
        );
        assert!(node.fail_gpu("two words").is_err());
        assert!(node.control().append("xid a 1\nfail a").is_err());

        let dir = node.dir().to_path_buf();
        drop(node);
        assert!(!dir.exists());
    }

    #[test]
    fn cuda_library_is_built_next_to_nvml() {
        let lib = cuda_library();
        assert!(lib.is_file(), "{}", lib.display());
        assert_eq!(lib.file_name().unwrap(), "libcuda.so.1");
        assert_eq!(lib.parent().unwrap(), nvml_library_dir());
        assert_eq!(
            fs::read_link(nvml_library_dir().join("libcuda.so")).unwrap(),
            Path::new("libcuda.so.1")
        );
    }

    #[test]
    fn cuda_context_overhead_is_rendered_only_when_set() {
        let spec = NodeSpec::uniform(1, GpuSpec::t4);
        assert!(!spec.render().unwrap().contains("cuda_context_mib"));
        assert!(!spec.render().unwrap().contains("cuda_context_create_ms"));
        let text = spec
            .with_cuda_context_mib(64)
            .with_cuda_context_create_ms(200)
            .render()
            .unwrap();
        assert!(text.lines().any(|l| l == "cuda_context_mib = 64"), "{text}");
        assert!(
            text.lines().any(|l| l == "cuda_context_create_ms = 200"),
            "{text}"
        );
    }

    #[test]
    fn cuda_state_parser_rejects_other_files() {
        assert!(CudaState::parse(b"short").is_err());
        let mut bytes = vec![0u8; CudaState::SIZE];
        assert!(CudaState::parse(&bytes).is_err());
        bytes[..8].copy_from_slice(b"GPUSIMST");
        bytes[8] = 1;
        let state = CudaState::parse(&bytes).unwrap();
        assert_eq!(state.devices.len(), MAX_GPUS);
        assert!(state.processes.is_empty());
    }

    #[test]
    fn library_is_built_with_the_real_soname() {
        let lib = nvml_library();
        assert!(lib.is_file(), "{}", lib.display());
        assert_eq!(lib.file_name().unwrap(), "libnvidia-ml.so.1");
        assert_eq!(
            fs::read_link(nvml_library_dir().join("libnvidia-ml.so")).unwrap(),
            Path::new("libnvidia-ml.so.1")
        );
        assert!(
            library_path_env()
                .1
                .starts_with(nvml_library_dir().to_str().unwrap())
        );
    }
}
