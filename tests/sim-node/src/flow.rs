//! The whole flow on simulated GPUs, for one pod: what a GPU node of a Volcano cluster does between the
//! scheduler's bind and a CUDA program running under its caps.
//!
//! 1. The host: a gpu-sim node; a temporary directory stands for the host's root, and every host path of
//!    the shipped DaemonSet (`volcano-config/vgpu-device-plugin.yaml`) lives under it.
//! 2. The DaemonSet's init step (`docker/install-hook.sh`, the image's `vgpu-install-hook`) installs
//!    `libvgpu.so` and `ld.so.preload` into the hook path.
//! 3. The agent runs with the DaemonSet's flags and environment, a stand-in kubelet (`harness::FakeKubelet`)
//!    and apiserver (`harness::FakeApiServer`, holding the shipped `volcano-vgpu-device-config`; the per-node
//!    `config.json` is where the DaemonSet mounts it).
//! 4. A shipped example pod (`volcano-config/examples/`) is bound as Volcano v1.15 binds it: the scheduler
//!    reads the node's `volcano.sh/node-vgpu-register`, places each GPU container (binpack), PATCHes the six
//!    annotations, then POSTs the Binding.
//! 5. The kubelet admits the pod: `Allocate` on every resource of every GPU container.
//! 6. A small CUDA program (`csrc/vgpu_demo.c`, linked against the gpu-sim's `libcuda.so.1`) runs with
//!    exactly the environment and mounts Allocate returned, translated to this host: the library
//!    `/etc/ld.so.preload` names becomes `LD_PRELOAD`, container paths become their mounts' host paths, and
//!    `NVIDIA_VISIBLE_DEVICES` (which the NVIDIA runtime turns into the GPUs the container sees) becomes
//!    `CUDA_VISIBLE_DEVICES`. It is refused at its memory cap, then launches kernels under its SM cap.
//! 7. The pod's series are scraped from the agent's metrics endpoint while the program holds its memory.
//!
//! One simplification: the gpu-sim's NVML lists every GPU of the node, where a container's NVML lists only
//! its own, so `libvgpu.so` maps a `CUDA_VISIBLE_DEVICES` UUID to its index on the node. The binpack bind puts
//! a container's first device on GPU 0, where the two indices agree; a program run for a container placed on
//! other GPUs would see its limits at the wrong indices.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use harness::{FakeApiServer, FakeKubelet, RecordedRequest};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vgpu_device_plugin::config::ResourceNames;
use vgpu_device_plugin::handoff::pod_cache::pod_view;
use vgpu_device_plugin::handoff::selection::ContainerLimits;
use vgpu_device_plugin::volcano::DEVICE_TYPE_NVIDIA;
use vgpu_device_plugin::volcano::node_register::decode_node_register;
use vgpu_device_plugin::volcano::pod_devices::{ContainerDevice, PodDevices};

use crate::agent::{AgentBinary, ChildGuard, agent_command, wait_exit};
use crate::manifests::{self, AgentDaemonSet};

/// The simulated node's name.
pub const NODE: &str = "sim-gpu-node";
/// The three resources, in the order the output lists them.
pub const RESOURCES: [&str; 3] = [
    "volcano.sh/vgpu-number",
    "volcano.sh/vgpu-memory",
    "volcano.sh/vgpu-cores",
];
pub(crate) const NAMESPACE: &str = "default";
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct FlowOptions {
    /// Simulated GPUs.
    pub gpus: u32,
    /// Their model.
    pub model: fn(u32) -> GpuSpec,
    /// The agent's executable.
    pub agent: AgentBinary,
    /// The example pod, a file of `volcano-config/examples/`.
    pub example: String,
    /// A `libvgpu.so` to use; `None` builds it (nested `cargo build -p vgpu-limiter`).
    pub libvgpu: Option<PathBuf>,
    /// Build `libvgpu.so` in release (when it is built here).
    pub release_limiter: bool,
    /// Modelled duration of each kernel the program launches.
    pub kernel_ns: u64,
    /// How long the program launches kernels.
    pub run_ms: u64,
    /// The agent's log on stderr instead of a file.
    pub verbose: bool,
    /// Extra flags for the agent, after the DaemonSet's.
    pub extra_agent_args: Vec<String>,
}

impl FlowOptions {
    /// The defaults of `sim-node run`.
    pub fn new(agent: AgentBinary) -> Self {
        Self {
            gpus: 8,
            model: GpuSpec::t4,
            agent,
            example: "pod-one-vgpu.yaml".to_owned(),
            libvgpu: None,
            // The profile this code was built in: `cargo run -p sim-node` (the test profile) then shares the
            // limiter's build with the tests, a release build with the benchmarks.
            release_limiter: !cfg!(debug_assertions),
            kernel_ns: 2_000_000,
            run_ms: 1500,
            verbose: false,
            extra_agent_args: Vec::new(),
        }
    }
}

/// One resource as the kubelet sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The resource name.
    pub resource: String,
    /// Devices listed.
    pub devices: usize,
    /// Of which healthy.
    pub healthy: usize,
    /// The socket it registered.
    pub endpoint: String,
}

/// What the kubelet got back for one container (all its resources merged, as the kubelet merges them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocated {
    /// The container.
    pub container: String,
    /// `(resource, IDs asked)` for each Allocate call.
    pub calls: Vec<(String, usize)>,
    /// Environment.
    pub envs: BTreeMap<String, String>,
    /// Mounts: (container path, host path, read-only).
    pub mounts: Vec<(String, String, bool)>,
    /// The container's own `env` from the pod spec (literal values only), which the kubelet applies after
    /// the device plugins' variables, so it wins.
    pub spec_env: BTreeMap<String, String>,
}

impl Allocated {
    /// The host path a container path resolves to through the mounts (longest mount prefix), if any.
    pub fn host_path(&self, container_path: &str) -> Option<PathBuf> {
        self.mounts
            .iter()
            .filter_map(|(c, h, _)| {
                let rest = container_path.strip_prefix(c.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some((c.len(), h, rest))
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, h, rest)| PathBuf::from(format!("{h}{rest}")))
    }
}

/// The program's report lines, by step (`device`, `alloc`, `kernels`), as key → value.
pub type ProgramReport = HashMap<String, HashMap<String, String>>;

/// Everything the flow saw, for the output and the test.
#[derive(Debug, Clone)]
pub struct FlowReport {
    /// The temporary host root.
    pub root: PathBuf,
    /// The GPUs of the simulated node (UUIDs, index order).
    pub gpus: Vec<String>,
    /// What the kubelet sees.
    pub registered: Vec<Registered>,
    /// `volcano.sh/node-vgpu-register`.
    pub node_register: String,
    /// `namespace/name` of the example pod.
    pub pod: String,
    /// Its UID.
    pub pod_uid: String,
    /// The `devices-to-allocate` queue the simulated scheduler wrote.
    pub queue: String,
    /// Per GPU container, in spec order.
    pub allocated: Vec<Allocated>,
    /// `volcano.sh/bind-phase` after admission.
    pub bind_phase: Option<String>,
    /// The environment the program ran with, where it differs from what Allocate returned.
    pub translated: BTreeMap<String, String>,
    /// The program's report.
    pub program: ProgramReport,
    /// The size of the region file (`CUDA_DEVICE_MEMORY_SHARED_CACHE` on the host) while the program held
    /// its memory; `None` when it did not exist.
    pub region_bytes: Option<u64>,
    /// The pod's lines of `/metrics` while the program held its memory.
    pub metrics: Vec<String>,
    /// Every request the agent made to the apiserver.
    pub requests: Vec<RecordedRequest>,
}

impl FlowReport {
    /// A numeric field of the program's report.
    pub fn program_value(&self, step: &str, key: &str) -> Option<f64> {
        self.program.get(step)?.get(key)?.parse().ok()
    }
}

/// The running system after the flow (for `--keep-running`); dropping it stops the agent.
#[derive(Debug)]
pub struct Flow {
    /// The agent.
    pub agent: ChildGuard,
    /// Its metrics port on 127.0.0.1.
    pub metrics_port: u16,
    /// The gpu-sim node.
    pub sim: SimNode,
    /// The stand-in kubelet.
    pub kubelet: FakeKubelet,
    /// The stand-in apiserver.
    pub api: FakeApiServer,
    /// The host root (removed on drop).
    pub root: tempfile::TempDir,
}

impl Flow {
    /// SIGTERM to the agent; its exit status.
    pub fn stop(self) -> anyhow::Result<std::process::ExitStatus> {
        self.agent.terminate(Duration::from_secs(10))
    }
}

/// `root` + an absolute host path.
pub(crate) fn under(root: &Path, host_path: &str) -> PathBuf {
    root.join(host_path.trim_start_matches('/'))
}

/// Builds `libvgpu.so` with a nested cargo into `target/limiter-cdylib` (as the limiter's own tests and
/// benchmark do, so the build is shared and the outer cargo's lock is never waited for).
pub fn build_libvgpu(release: bool) -> anyhow::Result<PathBuf> {
    let target = manifests::workspace_root().join("target/limiter-cdylib");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "vgpu-limiter",
        "--lib",
        "--target-dir",
    ])
    .arg(&target)
    .current_dir(manifests::workspace_root());
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("run cargo build -p vgpu-limiter")?;
    ensure!(status.success(), "cargo build -p vgpu-limiter failed");
    let lib = target
        .join(if release { "release" } else { "debug" })
        .join("libvgpu.so");
    ensure!(lib.is_file(), "{} missing after the build", lib.display());
    Ok(lib)
}

/// Compiles `csrc/vgpu_demo.c` against the gpu-sim's `libcuda.so.1` into `dir`.
pub fn compile_demo(dir: &Path) -> anyhow::Result<PathBuf> {
    let lib_dir = gpu_sim::cuda_library()
        .parent()
        .context("the gpu-sim's library directory")?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    compile_demo_with(&cc, lib_dir, dir)
}

/// Compiles `csrc/vgpu_demo.c` with the compiler `cc` against the `libcuda.so` in `lib_dir` into `dir`.
pub fn compile_demo_with(cc: &str, lib_dir: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc/vgpu_demo.c");
    let out = dir.join("vgpu-demo");
    let status = Command::new(cc)
        .args(["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-L")
        .arg(lib_dir)
        .args(["-lcuda", "-ldl"])
        .status()
        .with_context(|| format!("run {cc}"))?;
    ensure!(status.success(), "compiling {} failed", src.display());
    Ok(out)
}

/// One GPU of `volcano.sh/node-vgpu-register` (decoded with the plugin's copy of the scheduler's parser), with
/// what the simulated scheduler has placed on it.
#[derive(Debug, Clone)]
struct SchedGpu {
    uuid: String,
    split: u64,
    memory: u64,
    used_num: u64,
    used_mem: u64,
    used_cores: u64,
}

fn decode_register(value: &str) -> anyhow::Result<Vec<SchedGpu>> {
    let decoded = decode_node_register(value)
        .ok_or_else(|| anyhow!("the scheduler would ignore the register annotation {value:?}"))?;
    ensure!(!decoded.is_empty(), "no GPU in the register annotation");
    Ok(decoded
        .into_iter()
        .map(|g| SchedGpu {
            uuid: g.uuid,
            // Go `Atoi` gives 0 for junk; a negative count or size places nothing either.
            split: u64::try_from(g.number).unwrap_or(0),
            memory: u64::try_from(g.memory).unwrap_or(0),
            used_num: 0,
            used_mem: 0,
            used_cores: 0,
        })
        .collect())
}

/// A container's vGPU request: (name, number, memory units, cores).
type Request = (String, u64, Option<u64>, u64);

fn limit(container: &Value, resource: &str) -> Option<u64> {
    let v = &container["resources"]["limits"][resource];
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The containers the scheduler gives a segment (a `vgpu-number` or `vgpu-memory` limit), in spec order, as the
/// agent's own pod view reads them; a missing number is one vGPU, missing cores none.
fn requests(pod: &Value) -> anyhow::Result<Vec<Request>> {
    let names = ResourceNames::default();
    let parsed: Pod = serde_json::from_value(pod.clone()).context("the example is not a Pod")?;
    let containers = &pod["spec"]["containers"];
    Ok(pod_view(&parsed, &names)
        .containers
        .into_iter()
        .filter(ContainerLimits::has_vgpu)
        .map(|c| {
            let spec = containers
                .as_array()
                .and_then(|cs| cs.iter().find(|x| x["name"] == c.name.as_str()));
            let cores = spec.and_then(|x| limit(x, &names.cores)).unwrap_or(0);
            (c.name, c.count.unwrap_or(1), c.memory, cores)
        })
        .collect())
}

/// Places each request like Volcano's binpack policy (most used memory first, then index; docs/volcano-contract.md §6) and
/// encodes `devices-to-allocate` with the plugin's (the scheduler's) encoder: one segment per container.
fn place(gpus: &mut [SchedGpu], requests: &[Request]) -> anyhow::Result<String> {
    let mut segments = Vec::new();
    for (name, number, memory, cores) in requests {
        let mut order: Vec<usize> = (0..gpus.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(gpus[i].used_mem), i));
        let mut segment = Vec::new();
        let mut taken = 0;
        for i in order {
            if taken == *number {
                break;
            }
            let g = &mut gpus[i];
            let mem = memory.unwrap_or(g.memory);
            if g.used_num >= g.split || g.memory - g.used_mem < mem || g.used_cores + cores > 100 {
                continue;
            }
            g.used_num += 1;
            g.used_mem += mem;
            g.used_cores += cores;
            segment.push(ContainerDevice {
                uuid: g.uuid.clone(),
                device_type: DEVICE_TYPE_NVIDIA.to_owned(),
                used_mem: u32::try_from(mem)?,
                used_cores: u32::try_from(*cores)?,
            });
            taken += 1;
        }
        ensure!(
            taken == *number,
            "container {name}: no room for {number} vGPUs on the node"
        );
        segments.push(segment);
    }
    Ok(PodDevices(segments).encode())
}

pub(crate) fn parse_program_line(line: &str) -> Option<(String, HashMap<String, String>)> {
    let (step, rest) = line.split_once(' ')?;
    let fields = rest
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some((step.to_owned(), fields))
}

/// `GET /metrics` on the agent; the lines of the pod's series.
pub(crate) fn scrape(port: u16, pod: &str) -> anyhow::Result<Vec<String>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP response from the metrics endpoint"))?;
    ensure!(head.contains(" 200"), "metrics answered {head}");
    let needles = [format!("pod=\"{pod}\""), format!("podname=\"{pod}\"")];
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && needles.iter().any(|n| l.contains(n.as_str())))
        .map(str::to_owned)
        .collect())
}

/// The pod's series, compactly: the clean set as `name value` grouped under each label set (one group per GPU
/// the container's region lists), the legacy set (Volcano's monitor names) by name only.
fn say_series(lines: &[String], say: &mut (dyn FnMut(String) + Send)) {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    let mut legacy = Vec::new();
    for line in lines {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((label_text, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        if name.starts_with("vgpu_container_") {
            let value = value.trim().trim_end_matches(".0");
            let entry = format!("{} {value}", name.trim_start_matches("vgpu_container_"));
            match groups.iter_mut().find(|(l, _)| l == label_text) {
                Some((_, values)) => values.push(entry),
                None => groups.push((label_text.to_owned(), vec![entry])),
            }
        } else if !legacy.contains(&name) {
            legacy.push(name);
        }
    }
    for (labels, values) in &groups {
        say(format!("           vgpu_container_…{{{labels}}}:"));
        for chunk in values.chunks(4) {
            say(format!("             {}", chunk.join(", ")));
        }
    }
    if !legacy.is_empty() {
        say(format!(
            "           and the Volcano monitor's names (podname=…, zone=\"vGPU\"): {}",
            legacy.join(", ")
        ));
    }
    if lines.is_empty() {
        say("           (none)".to_owned());
    }
}

/// Waits for `f` to return `Some`, polling.
pub(crate) async fn eventually<T>(
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn short(uuid: &str) -> &str {
    uuid.get(..12).unwrap_or(uuid)
}

/// Runs the flow, printing readable lines through `say`; returns what it saw and the running system.
/// The shipped files the flow runs from.
pub(crate) struct Inputs {
    pub(crate) ds: AgentDaemonSet,
    pub(crate) device_cm: Value,
    pub(crate) node_cm: Value,
    pub(crate) pod: Value,
    pub(crate) pod_name: String,
    pub(crate) requests: Vec<Request>,
}

pub(crate) fn load_inputs(example: &str) -> anyhow::Result<Inputs> {
    let dir = manifests::manifests_dir();
    let ds = manifests::agent_daemonset(&dir)?;
    let device_docs = manifests::load(&dir.join("device-config.yaml"))?;
    let device_cm =
        manifests::find(&device_docs, "ConfigMap", "volcano-vgpu-device-config")?.clone();
    let node_docs = manifests::load(&dir.join("node-config.yaml"))?;
    let node_cm = manifests::find(&node_docs, "ConfigMap", "volcano-vgpu-node-config")?.clone();
    let example_path = dir.join("examples").join(example);
    let pod = manifests::load(&example_path)?
        .into_iter()
        .find(|d| d["kind"] == "Pod")
        .ok_or_else(|| anyhow!("{} holds no Pod", example_path.display()))?;
    let pod_name = pod["metadata"]["name"]
        .as_str()
        .context("the example pod has no name")?
        .to_owned();
    let requests = requests(&pod)?;
    ensure!(!requests.is_empty(), "{example} asks for no vGPU");
    Ok(Inputs {
        ds,
        device_cm,
        node_cm,
        pod,
        pod_name,
        requests,
    })
}

/// The DaemonSet's init step: the image's files (`libvgpu` and `ld.so.preload`, as `docker/build-artifacts.sh`
/// lays them out) installed by `docker/install-hook.sh` with the init container's arguments. Returns the
/// host directory they were installed into.
fn install_hook(ds: &AgentDaemonSet, root: &Path, libvgpu: &Path) -> anyhow::Result<PathBuf> {
    let [installer, image_src, install_dest] = ds.init.command.as_slice() else {
        bail!(
            "the install-hook init container's command is not [installer, source, destination]: {:?}",
            ds.init.command
        );
    };
    ensure!(
        installer == "/usr/bin/vgpu-install-hook",
        "unexpected installer {installer}"
    );
    let image_dir = under(&root.join("image"), image_src);
    std::fs::create_dir_all(&image_dir)?;
    std::fs::copy(libvgpu, image_dir.join("libvgpu.so"))
        .with_context(|| format!("copy {}", libvgpu.display()))?;
    std::fs::write(
        image_dir.join("ld.so.preload"),
        format!(
            "{}\n",
            vgpu_device_plugin::container::paths::CONTAINER_LIBVGPU
        ),
    )?;
    let dest_host = ds
        .init
        .mount(install_dest)
        .and_then(|m| m.host_path.clone())
        .ok_or_else(|| anyhow!("the init container does not mount {install_dest} from the host"))?;
    let dest = under(root, &dest_host);
    let output = Command::new("sh")
        .arg(manifests::workspace_root().join("docker/install-hook.sh"))
        .arg(&image_dir)
        .arg(&dest)
        .output()
        .context("run docker/install-hook.sh")?;
    ensure!(
        output.status.success(),
        "install-hook failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(dest)
}

/// The agent's command as the DaemonSet's `agent` container runs it: its environment (the downward API's
/// `spec.nodeName` = [`NODE`]) and its flags, with every path mapped under `root` (the hook and lock paths
/// are mounted at their host paths; the node config is the config map's file) and the metrics on
/// `127.0.0.1:metrics_port`. Returns the command and the flags exactly as passed to the agent.
fn daemonset_agent(
    ds: &AgentDaemonSet,
    node_cm: &Value,
    root: &Path,
    mut cmd: Command,
    metrics_port: u16,
) -> anyhow::Result<(Command, Vec<String>)> {
    for (name, value) in &ds.agent.env {
        if name == "RUST_LOG" && std::env::var_os("RUST_LOG").is_some() {
            continue;
        }
        cmd.env(name, value);
    }
    for (name, field) in &ds.agent.env_fields {
        ensure!(
            field == "spec.nodeName",
            "env {name} comes from {field}, which the flow does not simulate"
        );
        cmd.env(name, NODE);
    }
    let mut passed = Vec::new();
    for arg in &ds.agent.args {
        let translated = match arg.split_once('=') {
            Some(("--metrics-bind-address", _)) => {
                format!("--metrics-bind-address=127.0.0.1:{metrics_port}")
            }
            Some((flag, path)) if path.starts_with('/') => {
                let config_volume = ds
                    .agent
                    .mounts
                    .iter()
                    .find(|m| path.starts_with(&m.mount_path) && m.config_map.is_some());
                if let Some(m) = config_volume {
                    let cm = m.config_map.as_deref().unwrap_or_default();
                    ensure!(
                        cm == "volcano-vgpu-node-config",
                        "unexpected config map {cm}"
                    );
                    let file = path
                        .strip_prefix(&m.mount_path)
                        .unwrap_or(path)
                        .trim_start_matches('/');
                    let host = under(&root.join("configmap"), &m.mount_path).join(file);
                    std::fs::create_dir_all(host.parent().context("config dir")?)?;
                    std::fs::write(&host, manifests::config_map_data(node_cm, file)?)?;
                    format!("{flag}={}", host.display())
                } else {
                    format!("{flag}={}", under(root, path).display())
                }
            }
            _ => arg.clone(),
        };
        cmd.arg(&translated);
        passed.push(translated);
    }
    Ok((cmd, passed))
}

/// What Volcano v1.15 does at bind: reads the node's GPUs, places the pod (binpack), PATCHes the six
/// annotations (strategic merge), then POSTs the Binding. Returns the queue and the pod's UID.
pub(crate) async fn simulate_bind(
    api: &FakeApiServer,
    kubeconfig: &Path,
    inputs: &Inputs,
    node_register: &str,
) -> anyhow::Result<(String, String)> {
    let mut pod = inputs.pod.clone();
    pod["metadata"]["namespace"] = json!(NAMESPACE);
    pod["status"] = json!({"phase": "Pending"});
    api.create(&format!("/api/v1/namespaces/{NAMESPACE}/pods"), pod)?;
    let mut gpus = decode_register(node_register)?;
    let queue = place(&mut gpus, &inputs.requests)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        .to_string();
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let client =
        Client::try_from(kube::Config::from_custom_kubeconfig(config, &Default::default()).await?)?;
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let annotations = json!({"metadata": {"annotations": {
        "volcano.sh/vgpu-node": NODE,
        "volcano.sh/vgpu-time": now,
        "volcano.sh/bind-time": now,
        "volcano.sh/bind-phase": "allocating",
        "volcano.sh/vgpu-ids-new": queue,
        "volcano.sh/devices-to-allocate": queue,
    }}});
    let name = inputs.pod_name.as_str();
    pods.patch(
        name,
        &PatchParams::default(),
        &Patch::Strategic(&annotations),
    )
    .await
    .context("patch the bind annotations")?;
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}});
    pods.create_subresource::<Value, Value>("binding", name, &PostParams::default(), &binding)
        .await
        .context("bind the pod")?;
    let uid = api
        .get_object("pods", Some(NAMESPACE), name)
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Ok((queue, uid))
}

/// The systems a node talks to, stood in for: a kubelet listening in the device-plugin directory the
/// DaemonSet mounts (under `root`), an apiserver holding the node and the shipped device config map, a
/// kubeconfig for it, and a free port for the agent's metrics. The flow and the container run share it.
pub(crate) struct StandIns {
    pub(crate) kubelet: FakeKubelet,
    pub(crate) api: FakeApiServer,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) plugin_dir: PathBuf,
    pub(crate) metrics_port: u16,
}

pub(crate) async fn stand_ins(inputs: &Inputs, root: &Path) -> anyhow::Result<StandIns> {
    let plugin_dir = inputs
        .ds
        .agent
        .mount("/var/lib/kubelet/device-plugins")
        .and_then(|m| m.host_path.clone())
        .context("the agent does not mount the kubelet's device-plugin directory")?;
    let plugin_dir = under(root, &plugin_dir);
    std::fs::create_dir_all(&plugin_dir)?;
    let kubelet = FakeKubelet::start(&plugin_dir).await?;
    let api = FakeApiServer::start().await?;
    let kubeconfig = root.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None)?;
    api.create(
        "/api/v1/nodes",
        json!({"metadata": {"name": NODE, "labels": {"nvidia.com/gpu.present": "true"}}}),
    )?;
    let cm_namespace = inputs.device_cm["metadata"]["namespace"]
        .as_str()
        .unwrap_or("kube-system");
    api.create(
        &format!("/api/v1/namespaces/{cm_namespace}/configmaps"),
        inputs.device_cm.clone(),
    )?;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(StandIns {
        kubelet,
        api,
        kubeconfig,
        plugin_dir,
        metrics_port,
    })
}

/// The node's `volcano.sh/node-vgpu-register` annotation, once the agent has written it.
pub(crate) async fn node_register(api: &FakeApiServer) -> anyhow::Result<String> {
    eventually(
        "the node's volcano.sh/node-vgpu-register annotation",
        || {
            api.get_object("nodes", None, NODE)?["metadata"]["annotations"]
            ["volcano.sh/node-vgpu-register"]
            .as_str()
            .map(str::to_owned)
        },
    )
    .await
}

/// The pod's `volcano.sh/bind-phase` once it has left `allocating` (`None` if it never does).
pub(crate) async fn bind_phase(api: &FakeApiServer, pod_name: &str) -> Option<String> {
    eventually("bind-phase to leave allocating", || {
        let p = api.get_object("pods", Some(NAMESPACE), pod_name)?;
        let phase = p["metadata"]["annotations"]["volcano.sh/bind-phase"].as_str()?;
        (phase != "allocating").then(|| phase.to_owned())
    })
    .await
    .ok()
}

/// The kubelet's admission: `Allocate` on every resource each GPU container asks for (after
/// `GetPreferredAllocation`), the responses merged per container as the kubelet merges them.
pub(crate) async fn admit(
    kubelet: &FakeKubelet,
    inputs: &Inputs,
    agent_log: &Path,
) -> anyhow::Result<Vec<Allocated>> {
    let mut allocated = Vec::new();
    for (name, ..) in &inputs.requests {
        let mut a = Allocated {
            container: name.clone(),
            ..Default::default()
        };
        let container = inputs.pod["spec"]["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name.as_str()))
            .cloned()
            .unwrap_or_default();
        for var in container["env"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (var["name"].as_str(), var["value"].as_str()) {
                a.spec_env.insert(k.to_owned(), v.to_owned());
            }
        }
        for resource in RESOURCES {
            let Some(size) = limit(&container, resource) else {
                continue;
            };
            let size = usize::try_from(size)?;
            let response = kubelet.admit(resource, size).await?.map_err(|s| {
                anyhow!(
                    "Allocate on {resource} for {name} failed: {}\nagent log:\n{}",
                    s.message(),
                    std::fs::read_to_string(agent_log).unwrap_or_default()
                )
            })?;
            a.calls.push((resource.to_owned(), size));
            for c in response.container_responses {
                a.envs.extend(c.envs);
                a.mounts.extend(
                    c.mounts
                        .into_iter()
                        .map(|m| (m.container_path, m.host_path, m.read_only)),
                );
            }
        }
        allocated.push(a);
    }
    Ok(allocated)
}

/// The container's environment as this host needs it, where it differs from Allocate's: the libraries
/// `/etc/ld.so.preload` names become `LD_PRELOAD` (on their mounts' host paths), container paths in
/// variables become host paths, and `NVIDIA_VISIBLE_DEVICES` (the GPUs the NVIDIA runtime exposes)
/// becomes `CUDA_VISIBLE_DEVICES`.
fn translate(a: &Allocated) -> anyhow::Result<BTreeMap<String, String>> {
    let mut translated = BTreeMap::new();
    if let Some(preload_host) = a.host_path("/etc/ld.so.preload") {
        let listed = std::fs::read_to_string(&preload_host)
            .with_context(|| format!("read {}", preload_host.display()))?;
        let libs: Vec<String> = listed
            .split_whitespace()
            .map(|l| {
                a.host_path(l)
                    .map(|p| p.display().to_string())
                    .ok_or_else(|| anyhow!("ld.so.preload names {l}, which no mount provides"))
            })
            .collect::<anyhow::Result<_>>()?;
        translated.insert("LD_PRELOAD".to_owned(), libs.join(":"));
    }
    if let Some(cache) = a.envs.get("CUDA_DEVICE_MEMORY_SHARED_CACHE") {
        let host = a
            .host_path(cache)
            .ok_or_else(|| anyhow!("the shared cache {cache} is on no mount"))?;
        translated.insert(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE".to_owned(),
            host.display().to_string(),
        );
    }
    if let Some(visible) = a.envs.get("NVIDIA_VISIBLE_DEVICES") {
        translated.insert("CUDA_VISIBLE_DEVICES".to_owned(), visible.clone());
    }
    // The limiter's default broker socket is under /tmp/vgpulock; its override names the host path.
    if let Some(broker) = a.host_path("/tmp/vgpulock/hostpid/broker.sock") {
        translated.insert(
            "VGPU_HOSTPID_SOCKET".to_owned(),
            broker.display().to_string(),
        );
    }
    Ok(translated)
}

/// What the program run saw.
struct ProgramRun {
    report: ProgramReport,
    stderr: String,
    region_bytes: Option<u64>,
    metrics: Vec<String>,
}

/// Runs the CUDA program with `env` (plus the gpu-sim's node and driver), scraping the pod's series while it
/// holds its memory.
async fn run_program(
    demo: &Path,
    sim: &SimNode,
    env: &BTreeMap<String, String>,
    opts: &FlowOptions,
    metrics_port: u16,
    pod_name: &str,
) -> anyhow::Result<ProgramRun> {
    let (ld_name, ld_value) = gpu_sim::library_path_env();
    let mut program = tokio::process::Command::new(demo);
    program
        .arg(opts.kernel_ns.to_string())
        .arg(opts.run_ms.to_string())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(sim.env())
        .env(&ld_name, &ld_value)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = program.spawn().context("start the CUDA program")?;
    let mut stdin = child.stdin.take().context("program stdin")?;
    let stdout = child.stdout.take().context("program stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let region_path = env
        .get("CUDA_DEVICE_MEMORY_SHARED_CACHE")
        .map(PathBuf::from);
    let mut report: ProgramReport = HashMap::new();
    let mut metrics = Vec::new();
    let mut region_bytes = None;
    let deadline = Duration::from_millis(opts.run_ms) + PATIENCE;
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if line == "holding" {
                // The region is written by the program; the agent reads it when scraped.
                metrics = scrape(metrics_port, pod_name)?;
                region_bytes = region_path
                    .as_ref()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len());
                stdin.write_all(b"go\n").await?;
                stdin.flush().await?;
                continue;
            }
            if let Some((step, fields)) = parse_program_line(&line) {
                report.insert(step, fields);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| anyhow!("the CUDA program did not finish within {deadline:?}"))??;
    let output = child.wait_with_output().await?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if let Some(error) = report.get("error") {
        bail!("the CUDA program failed: {error:?}\n{stderr}");
    }
    ensure!(
        output.status.success(),
        "the CUDA program exited with {}: {stderr}",
        output.status
    );
    Ok(ProgramRun {
        report,
        stderr,
        region_bytes,
        metrics,
    })
}

/// Runs the flow, printing readable lines through `say`; returns what it saw and the running system.
pub async fn run(
    opts: FlowOptions,
    say: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<(FlowReport, Flow)> {
    let inputs = load_inputs(&opts.example)?;
    let ds = &inputs.ds;

    // 1. The host.
    let sim = SimNode::new(NodeSpec::uniform(opts.gpus, opts.model)).context("gpu-sim node")?;
    let root = tempfile::Builder::new().prefix("sim-node-").tempdir()?;
    let first = sim.spec().gpus[0].clone();
    say(format!(
        "gpu-sim    {} × {} ({} MiB each); host root {}",
        opts.gpus,
        first.name,
        first.memory_mib,
        root.path().display()
    ));

    // 2. The init step.
    let libvgpu = match &opts.libvgpu {
        Some(path) => path.clone(),
        None => {
            say(format!(
                "build      libvgpu.so: cargo build -p vgpu-limiter --lib{} into target/limiter-cdylib (shared with \
                 the tests; under a minute the first time, instant after)",
                if opts.release_limiter {
                    " --release"
                } else {
                    ""
                }
            ));
            build_libvgpu(opts.release_limiter)?
        }
    };
    let hook = install_hook(ds, root.path(), &libvgpu)?;
    say(format!(
        "install    libvgpu.so, ld.so.preload → {} (the DaemonSet's init step, docker/install-hook.sh)",
        hook.display()
    ));

    // 3. Kubelet, apiserver, agent.
    let StandIns {
        kubelet,
        api,
        kubeconfig,
        metrics_port,
        ..
    } = stand_ins(&inputs, root.path()).await?;
    let mut cmd = agent_command(&sim, kubelet.socket(), &opts.agent);
    cmd.env("KUBECONFIG", &kubeconfig);
    let (mut cmd, passed_args) =
        daemonset_agent(ds, &inputs.node_cm, root.path(), cmd, metrics_port)?;
    cmd.args(&opts.extra_agent_args);
    let log_path = root.path().join("agent.log");
    if !opts.verbose {
        cmd.stderr(std::fs::File::create(&log_path)?);
    }
    let root_text = root.path().display().to_string();
    let shown: Vec<String> = passed_args
        .iter()
        .chain(&opts.extra_agent_args)
        .map(|a| a.replace(&root_text, "<root>"))
        .collect();
    say(format!(
        "agent      {} {}",
        opts.agent.describe(),
        shown.join(" ")
    ));
    say(format!(
        "           {}; the DaemonSet's flags and env, with its host paths under <root> and its metrics port \
         (:9394) on 127.0.0.1:{metrics_port}{}",
        opts.agent.explain(),
        if opts.verbose {
            ""
        } else {
            "; its log goes to <root>/agent.log (--verbose shows it)"
        }
    ));
    let started = Instant::now();
    let agent = ChildGuard(cmd.spawn().context("start the agent")?);
    let log = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let views = tokio::select! {
        views = kubelet.wait_for_resources(&RESOURCES, PATIENCE) => views
            .map_err(|e| anyhow!("{e}\nagent log:\n{}", log(&log_path)))?,
        exited = wait_exit(agent.0.id()) => {
            bail!("the agent exited before registering ({exited}):\n{}", log(&log_path));
        }
    };
    say(format!(
        "registered in {} ms:",
        started.elapsed().as_millis()
    ));
    let mut registered = Vec::new();
    for resource in RESOURCES {
        let view = &views[resource];
        let r = Registered {
            resource: resource.to_owned(),
            devices: view.devices.len(),
            healthy: view
                .devices
                .iter()
                .filter(|d| d.health == "Healthy")
                .count(),
            endpoint: view
                .registration
                .as_ref()
                .map(|r| r.endpoint.clone())
                .unwrap_or_default(),
        };
        say(format!(
            "  {:<24} {:>7} devices, {:>7} healthy  via {}",
            r.resource, r.devices, r.healthy, r.endpoint
        ));
        registered.push(r);
    }
    let node_register = node_register(&api).await?;
    say(format!(
        "  node annotation volcano.sh/node-vgpu-register: {} GPUs, e.g. {}",
        node_register.matches(':').count(),
        node_register.split(':').next().unwrap_or_default()
    ));

    // 4. The scheduler's bind.
    let pod_name = inputs.pod_name.clone();
    let (queue, pod_uid) = simulate_bind(&api, &kubeconfig, &inputs, &node_register).await?;
    say(format!(
        "volcano    {NAMESPACE}/{pod_name} (volcano-config/examples/{}) bound to {NODE} as Volcano v1.15 binds \
         (PATCH of the annotations, then the Binding), binpack placement:",
        opts.example
    ));
    say(format!("           devices-to-allocate = {queue}"));

    // 5. The kubelet's admission.
    let allocated = admit(&kubelet, &inputs, &log_path).await?;
    let bind_phase = bind_phase(&api, &pod_name).await;
    api.patch_object(
        "pods",
        Some(NAMESPACE),
        &pod_name,
        // The kubelet starts the pod: it is no longer one Allocate can be for.
        json!({"status": {"phase": "Running", "startTime": harness::apiserver::now_rfc3339()}}),
    )?;
    for a in &allocated {
        let calls: Vec<String> = a
            .calls
            .iter()
            .map(|(r, n)| format!("{} ×{n}", r.trim_start_matches("volcano.sh/")))
            .collect();
        say(format!(
            "kubelet    Allocate for container {}: {}",
            a.container,
            calls.join(", ")
        ));
        for (k, v) in &a.envs {
            say(format!("  env      {k}={v}"));
        }
        for (c, h, ro) in &a.mounts {
            say(format!(
                "  mount    {c} ← {h}{}",
                if *ro { " (ro)" } else { "" }
            ));
        }
    }
    say(format!(
        "           pod annotation volcano.sh/bind-phase={}",
        bind_phase.as_deref().unwrap_or("(unchanged)")
    ));

    // 6. The program, in the first GPU container's environment.
    let a = allocated
        .first()
        .cloned()
        .context("no container was allocated")?;
    let bin_dir = root.path().join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    say("build      the CUDA program csrc/vgpu_demo.c with cc".to_owned());
    let demo = compile_demo(&bin_dir)?;
    let translated = translate(&a)?;
    say(format!(
        "program    {} (C, -lcuda against the gpu-sim's libcuda.so.1), in container {}'s environment from Allocate, \
         translated to this host:",
        demo.display(),
        a.container
    ));
    for (k, v) in &translated {
        say(format!("  env      {k}={v}"));
    }
    say(format!(
        "           ({} = the gpu-sim driver, as the NVIDIA runtime mounts the driver; CUDA_VISIBLE_DEVICES \
         stands for the GPUs NVIDIA_VISIBLE_DEVICES exposes)",
        gpu_sim::library_path_env().0
    ));
    let mut env = a.envs.clone();
    env.extend(a.spec_env.clone());
    env.extend(translated.clone());
    for (k, v) in &a.spec_env {
        say(format!(
            "  env      {k}={v} (the container's own env in the pod spec)"
        ));
    }
    let run = run_program(&demo, &sim, &env, &opts, metrics_port, &pod_name).await?;
    say_program(&run, &a, &first, &opts, metrics_port, say);

    let report = FlowReport {
        root: root.path().to_owned(),
        gpus: sim.spec().gpus.iter().map(|g| g.uuid.clone()).collect(),
        registered,
        node_register,
        pod: format!("{NAMESPACE}/{pod_name}"),
        pod_uid,
        queue,
        allocated,
        bind_phase,
        translated,
        program: run.report,
        region_bytes: run.region_bytes,
        metrics: run.metrics,
        requests: api.requests(),
    };
    Ok((
        report,
        Flow {
            agent,
            metrics_port,
            sim,
            kubelet,
            api,
            root,
        },
    ))
}

/// What the run showed, in a few lines for a newcomer: the pod, its caps, what was refused, the SM share
/// measured, and what to try next.
pub fn summary(report: &FlowReport, example: &str) -> Vec<String> {
    let mut out = vec![format!(
        "Summary: pod {} (volcano-config/examples/{example}) was bound by the simulated Volcano scheduler, \
         admitted by the stand-in kubelet through the agent's Allocate, and left bind-phase={}.",
        report.pod,
        report.bind_phase.as_deref().unwrap_or("(unchanged)")
    )];
    let index_of = |uuid: &str| {
        report
            .gpus
            .iter()
            .position(|g| g == uuid)
            .map_or_else(|| "?".to_owned(), |i| i.to_string())
    };
    for a in &report.allocated {
        let gpus: Vec<String> = a
            .envs
            .get("NVIDIA_VISIBLE_DEVICES")
            .map(|v| {
                v.split(',')
                    .map(|u| format!("GPU {}", index_of(u)))
                    .collect()
            })
            .unwrap_or_default();
        let memory: Vec<&str> = a
            .envs
            .iter()
            .filter(|(k, _)| k.starts_with("CUDA_DEVICE_MEMORY_LIMIT"))
            .map(|(_, v)| v.as_str())
            .collect();
        let sm = match a.envs.get("CUDA_DEVICE_SM_LIMIT").map(String::as_str) {
            None | Some("0") => "no SM cap".to_owned(),
            Some(cap) => format!("SM cap {cap} %"),
        };
        out.push(format!(
            "  container {}: {} with memory cap {} and {sm}",
            a.container,
            if gpus.is_empty() {
                "no GPU".to_owned()
            } else {
                gpus.join(", ")
            },
            if memory.is_empty() {
                "none".to_owned()
            } else {
                memory.join(", ")
            },
        ));
    }
    let field = |step: &str, key: &str| report.program.get(step).and_then(|f| f.get(key));
    if let (Some(held), Some(refused), Some(name)) = (
        field("alloc", "held_mib"),
        field("alloc", "refused_mib"),
        field("alloc", "name"),
    ) {
        out.push(format!(
            "  memory: the CUDA program held {held} MiB under its cap; what it asked beyond (the last, {refused} MiB) \
             was refused with {name}, the error an application sees in the container"
        ));
    }
    let counted = report.metrics.iter().find_map(|l| {
        l.strip_prefix("vgpu_container_allocations_refused_total{")
            .and_then(|rest| rest.rsplit_once("} "))
            .map(|(_, v)| v.trim().to_owned())
    });
    if let Some(counted) = counted {
        out.push(format!(
            "  metrics: the agent counted the refusals (vgpu_container_allocations_refused_total {counted})"
        ));
    }
    match (
        field("kernels", "nvml_gpu_pct"),
        field("kernels", "sm_limit"),
    ) {
        (Some(pct), Some(cap)) if !matches!(cap.as_str(), "unset" | "0") => out.push(format!(
            "  SM: NVML measured the GPU {pct} % busy over the last second against the {cap} % cap"
        )),
        (Some(pct), _) => out.push(format!(
            "  SM: NVML measured the GPU {pct} % busy over the last second (no cap)"
        )),
        _ => {}
    }
    out.push(
        "Try next (cargo run -p sim-node -- run <options>; -- run --help lists them all):"
            .to_owned(),
    );
    for line in [
        "  --keep-running                       keep the agent up: curl its /metrics, inject an XID, watch the kubelet's view",
        "  --example pod-memory-only.yaml       a memory-only pod (its GPU and cap, no SM cap); also pod-several-vgpus.yaml,",
        "                                       pod-two-gpu-containers-sidecar.yaml",
        "  --gpus 2 --model a100-80gb           another node; -- --gpu-memory-factor 10 passes flags to the agent",
        "  tests/run                            the whole test suite (what CI runs)",
    ] {
        out.push(line.to_owned());
    }
    out
}

/// The program's steps, readably.
fn say_program(
    run: &ProgramRun,
    a: &Allocated,
    gpu: &GpuSpec,
    opts: &FlowOptions,
    metrics_port: u16,
    say: &mut (dyn FnMut(String) + Send),
) {
    let report = &run.report;
    let field = |step: &str, key: &str| report.get(step).and_then(|f| f.get(key));
    let value = |step: &str, key: &str| field(step, key).cloned().unwrap_or_else(|| "?".to_owned());
    let number = |step: &str, key: &str| field(step, key).and_then(|v| v.parse::<f64>().ok());
    let used = number("device", "total_mib")
        .zip(number("alloc", "free_mib"))
        .map(|(t, f)| (t - f).to_string())
        .unwrap_or_else(|| "?".to_owned());
    say(format!(
        "  memory   cuMemGetInfo on {}: total {} MiB (the cap; the GPU has {} MiB). After {} MiB of allocations \
         ({used} MiB used with the context), one more {} MiB cuMemAlloc_v2 → {} ({}): refused at the cap",
        short(&value("device", "uuid")),
        value("device", "total_mib"),
        gpu.memory_mib,
        value("alloc", "held_mib"),
        value("alloc", "refused_mib"),
        value("alloc", "name"),
        value("alloc", "rc"),
    ));
    for line in run.stderr.lines().filter(|l| !l.trim().is_empty()).take(2) {
        say(format!("  libvgpu  {line}"));
    }
    say(format!(
        "metrics    the pod's series on http://127.0.0.1:{metrics_port}/metrics while the program held its memory:"
    ));
    say_series(&run.metrics, say);
    let cap = a
        .envs
        .get("CUDA_DEVICE_SM_LIMIT")
        .cloned()
        .unwrap_or_else(|| "none".to_owned());
    let nvml = number("kernels", "nvml_gpu_pct");
    let capped = cap.parse::<f64>().ok().filter(|c| *c > 0.0);
    let paced = match (nvml, capped) {
        (_, None) => ": no SM cap (0 = unlimited)",
        (Some(u), Some(c)) if u > 0.0 && u <= c + 10.0 => ": paced at the cap",
        (Some(_), Some(_)) => ": NOT paced at the cap",
        (None, Some(_)) => "",
    };
    let engages = if capped.is_some() {
        " (launches are paced from the first one, then by measured utilisation)"
    } else {
        ""
    };
    // Kernels that take no time make the program's own count absurd (thousands of "busy" percent).
    let no_time = number("kernels", "busy_pct").is_some_and(|b| b > 150.0);
    say(format!(
        "  SM cap   CUDA_DEVICE_SM_LIMIT={cap}: {} kernels of {} ms, each synchronised, in {} ms = {} % busy \
         overall{engages}; over the last second the gpu-sim's NVML measured {} %{}{}",
        value("kernels", "launches"),
        opts.kernel_ns as f64 / 1e6,
        value("kernels", "elapsed_ms"),
        value("kernels", "busy_pct"),
        value("kernels", "nvml_gpu_pct"),
        if no_time {
            " (kernels took no time: this gpu-sim has no kernel-time model)"
        } else {
            ""
        },
        paced
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(lines: &[&str]) -> Vec<String> {
        let lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let mut out = Vec::new();
        say_series(&lines, &mut |l| out.push(l));
        out
    }

    #[test]
    fn each_gpus_series_are_shown_under_their_own_labels() {
        let out = said(&[
            r#"vgpu_container_memory_used_bytes{pod="p",gpu_index="0"} 5"#,
            r#"vgpu_container_memory_used_bytes{pod="p",gpu_index="1"} 0"#,
            r#"vgpu_container_memory_limit_bytes{pod="p",gpu_index="0"} 9"#,
            r#"vgpu_container_memory_limit_bytes{pod="p",gpu_index="1"} 9"#,
            r#"vGPU_device_memory_usage_in_bytes{podname="p",vdeviceid="0"} 5"#,
            r#"vGPU_device_memory_usage_in_bytes{podname="p",vdeviceid="1"} 0"#,
        ]);
        assert_eq!(
            out,
            [
                r#"           vgpu_container_…{pod="p",gpu_index="0"}:"#,
                "             memory_used_bytes 5, memory_limit_bytes 9",
                r#"           vgpu_container_…{pod="p",gpu_index="1"}:"#,
                "             memory_used_bytes 0, memory_limit_bytes 9",
                r#"           and the Volcano monitor's names (podname=…, zone="vGPU"): vGPU_device_memory_usage_in_bytes"#,
            ]
        );
    }

    fn report(envs: &[(&str, &str)], kernels: &[(&str, &str)]) -> FlowReport {
        let fields = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        FlowReport {
            root: PathBuf::from("/tmp/x"),
            gpus: vec!["GPU-a".to_owned(), "GPU-b".to_owned()],
            registered: Vec::new(),
            node_register: String::new(),
            pod: "default/vgpu-one".to_owned(),
            pod_uid: "uid".to_owned(),
            queue: String::new(),
            allocated: vec![Allocated {
                container: "cuda".to_owned(),
                envs: envs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            }],
            bind_phase: Some("success".to_owned()),
            translated: BTreeMap::new(),
            program: HashMap::from([
                (
                    "alloc".to_owned(),
                    fields(&[
                        ("held_mib", "2688"),
                        ("refused_mib", "16"),
                        ("name", "CUDA_ERROR_OUT_OF_MEMORY"),
                    ]),
                ),
                ("kernels".to_owned(), fields(kernels)),
            ]),
            region_bytes: None,
            metrics: vec![
                r#"vgpu_container_allocations_refused_total{namespace="default",pod="vgpu-one",container="cuda"} 2"#
                    .to_owned(),
            ],
            requests: Vec::new(),
        }
    }

    #[test]
    fn the_summary_names_the_pod_its_caps_the_refusal_and_the_sm_share() {
        let r = report(
            &[
                ("NVIDIA_VISIBLE_DEVICES", "GPU-b"),
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "3000m"),
                ("CUDA_DEVICE_SM_LIMIT", "30"),
            ],
            &[("nvml_gpu_pct", "29"), ("sm_limit", "30")],
        );
        let text = summary(&r, "pod-one-vgpu.yaml").join("\n");
        for needle in [
            "pod default/vgpu-one",
            "bind-phase=success",
            "container cuda: GPU 1 with memory cap 3000m and SM cap 30 %",
            "held 2688 MiB",
            "CUDA_ERROR_OUT_OF_MEMORY",
            "vgpu_container_allocations_refused_total 2",
            "29 % busy over the last second against the 30 % cap",
            "--keep-running",
            "--example pod-memory-only.yaml",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn the_summary_of_a_memory_only_pod_claims_no_sm_cap() {
        let r = report(
            &[
                ("NVIDIA_VISIBLE_DEVICES", "GPU-a"),
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "1024m"),
                ("CUDA_DEVICE_SM_LIMIT", "0"),
            ],
            &[("nvml_gpu_pct", "88"), ("sm_limit", "0")],
        );
        let text = summary(&r, "pod-memory-only.yaml").join("\n");
        assert!(
            text.contains("GPU 0 with memory cap 1024m and no SM cap"),
            "{text}"
        );
        assert!(
            text.contains("88 % busy over the last second (no cap)"),
            "{text}"
        );
        assert!(!text.contains("against the"), "{text}");
    }
}
