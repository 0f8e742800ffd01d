//! The node in a real container engine: the shipped image and the shipped DaemonSet, run by Docker.
//!
//! [`crate::flow`] runs the agent and the CUDA program as host processes with `LD_PRELOAD`. This module
//! runs what a cluster runs instead, with the image `docker/e2e.sh` built from `docker/Dockerfile`:
//!
//! 1. the DaemonSet's init container (its command, security context and mount, read from
//!    `volcano-config/vgpu-device-plugin.yaml`) installs `libvgpu.so` into a host directory standing for
//!    `/usr/local/vgpu`, twice (the second run must leave the library's inode alone);
//! 2. the agent container, with the DaemonSet's flags, environment, security context (read-only root,
//!    capabilities, no privilege escalation, memory limit), host paths and `hostPID`, against the fake
//!    kubelet's socket and the fake apiserver, with the gpu-sim's `libnvidia-ml.so.1` where the NVIDIA
//!    runtime mounts the driver;
//! 3. after a Volcano bind and the kubelet's Allocate (the flow's own steps), workload containers from a
//!    different base image, started with exactly Allocate's environment and mounts (host paths under the
//!    test's root) and the gpu-sim driver mounted as the NVIDIA runtime mounts it; no `LD_PRELOAD`
//!    anywhere: the limiter arrives through the bind-mounted `/etc/ld.so.preload`.
//!
//! Every manifest field that decides how a container runs is translated here, and a field this module
//! does not know makes it fail: the manifest and this test cannot drift apart silently.
//!
//! Two stand-ins remain, both named where they happen: the agent reaches the fake apiserver through the
//! host network and a mounted kubeconfig (a cluster gives it a service-account token and a Service IP),
//! and `NVIDIA_VISIBLE_DEVICES` becomes `CUDA_VISIBLE_DEVICES` in the workload (the gpu-sim shows every
//! GPU of the node, where the NVIDIA runtime would expose only the allocated ones).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use serde_json::{Value, json};

use crate::flow::{
    self, Allocated, NAMESPACE, NODE, PATIENCE, ProgramReport, RESOURCES, parse_program_line, under,
};

/// Where the NVIDIA container runtime puts the driver's libraries in a container (Debian/Ubuntu x86_64).
pub const DRIVER_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";
/// Where the kubeconfig of the stand-in apiserver is mounted in the agent container.
const KUBECONFIG_IN_CONTAINER: &str = "/var/run/vgpu-e2e/kubeconfig";
/// The host's CA store (Debian's `ca-certificates`), lent to the agent container; see [`run`].
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where the gpu-sim finds the host's /proc in a workload container; see [`driver_flags`].
const SIM_HOST_PROC: &str = "/run/gpu-sim-host-proc";
/// Where NVIDIA's `pynvml` is mounted in workload containers.
const PYNVML_IN_CONTAINER: &str = "/opt/pynvml";
/// Where the CUDA program is mounted in workload containers.
const DEMO_IN_CONTAINER: &str = "/usr/local/bin/vgpu-demo";
/// Where the C tools of [`compile_tools`] are mounted in workload containers.
const TOOLS_IN_CONTAINER: &str = "/opt/vgpu-e2e-tools";

/// What to run, from `docker/e2e.sh`'s environment.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// The `docker` client.
    pub docker: PathBuf,
    /// The image built from `docker/Dockerfile`.
    pub image: String,
    /// Base images for workload containers (each needs `sh`; `python3` for the NVML client check).
    pub workload_images: Vec<String>,
    /// A directory holding the `pynvml` module (NVIDIA's `nvidia-ml-py`), mounted into the workload.
    pub pynvml_dir: Option<PathBuf>,
    /// The gpu-sim's `libcuda.so.1` and `libnvidia-ml.so.1` to mount as the driver, built for the oldest
    /// glibc among the images (`None`: this build's, which needs the build machine's glibc).
    pub driver_dir: Option<PathBuf>,
    /// The C compiler for the CUDA program, targeting that glibc too (`None`: `$CC` or `cc`).
    pub cc: Option<String>,
    /// The example pod.
    pub example: String,
    /// Simulated GPUs.
    pub gpus: u32,
}

impl E2eOptions {
    /// From the environment `docker/e2e.sh` sets: `VGPU_E2E_IMAGE`, `VGPU_E2E_WORKLOAD_IMAGES`
    /// (comma-separated), `VGPU_E2E_PYNVML`, `VGPU_E2E_DRIVER_DIR`, `VGPU_E2E_CC`, and `DOCKER` (default
    /// `docker`).
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| {
                anyhow!(
                    "{name} is not set: this test runs the shipped image in a container engine; run it \
                     through docker/e2e.sh, which builds the images and sets {name}"
                )
            })
        };
        Ok(Self {
            docker: std::env::var_os("DOCKER")
                .map(PathBuf::from)
                .unwrap_or_else(|| "docker".into()),
            image: var("VGPU_E2E_IMAGE")?,
            workload_images: var("VGPU_E2E_WORKLOAD_IMAGES")?
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            pynvml_dir: std::env::var_os("VGPU_E2E_PYNVML").map(PathBuf::from),
            driver_dir: std::env::var_os("VGPU_E2E_DRIVER_DIR").map(PathBuf::from),
            cc: std::env::var("VGPU_E2E_CC").ok(),
            example: "pod-one-vgpu.yaml".to_owned(),
            gpus: 2,
        })
    }
}

/// The `docker` client.
#[derive(Debug, Clone)]
pub struct Docker {
    bin: PathBuf,
}

impl Docker {
    /// A client running `bin` (with the process's `DOCKER_HOST`).
    pub fn new(bin: &Path) -> Self {
        Self {
            bin: bin.to_owned(),
        }
    }

    /// `docker <args>`.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    /// `docker <args>`: its stdout, or an error with its stderr.
    pub fn run<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(args);
        let shown = format!("{cmd:?}");
        let out = cmd.output().with_context(|| format!("run {shown}"))?;
        ensure!(
            out.status.success(),
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `docker inspect -f <format> <object>`, trimmed.
    pub fn inspect(&self, object: &str, format: &str) -> anyhow::Result<String> {
        Ok(self
            .run(["inspect", "-f", format, object])?
            .trim()
            .to_owned())
    }
}

/// A named container, removed (with its process) on drop.
#[derive(Debug)]
pub struct Container {
    docker: Docker,
    /// Its name.
    pub name: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self
            .docker
            .command(["rm", "-f", "-v", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A unique container name for this run.
fn container_name(what: &str) -> String {
    format!("vgpu-e2e-{what}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{nanos:08x}")
}

// ---------------------------------------------------------------------------------------------------------
// The manifest, translated to `docker run` flags
// ---------------------------------------------------------------------------------------------------------

/// The DaemonSet's pod spec.
fn pod_spec(ds: &Value) -> anyhow::Result<&Value> {
    let spec = &ds["spec"]["template"]["spec"];
    ensure!(spec.is_object(), "the DaemonSet has no pod template spec");
    Ok(spec)
}

/// The container `name` of the pod spec's `list` (`containers` or `initContainers`).
fn container<'a>(spec: &'a Value, list: &str, name: &str) -> anyhow::Result<&'a Value> {
    spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .ok_or_else(|| anyhow!("the DaemonSet has no {list} entry named {name}"))
}

/// `docker run` flags for a container's `securityContext` and resource limits, and the pod's `hostPID`.
/// A field this function does not translate is an error, so a manifest change cannot be ignored here.
pub fn security_flags(pod: &Value, c: &Value) -> anyhow::Result<Vec<String>> {
    let mut flags = Vec::new();
    if pod["hostPID"].as_bool() == Some(true) {
        flags.push("--pid=host".to_owned());
    }
    let sc = &c["securityContext"];
    for (key, value) in sc.as_object().into_iter().flatten() {
        match key.as_str() {
            "runAsUser" => flags.push(format!(
                "--user={}",
                value.as_u64().context("runAsUser is not a number")?
            )),
            "allowPrivilegeEscalation" => {
                if value.as_bool() == Some(false) {
                    flags.push("--security-opt=no-new-privileges".to_owned());
                }
            }
            "readOnlyRootFilesystem" => {
                if value.as_bool() == Some(true) {
                    flags.push("--read-only".to_owned());
                }
            }
            "privileged" => {
                if value.as_bool() == Some(true) {
                    flags.push("--privileged".to_owned());
                }
            }
            "capabilities" => {
                for (k, caps) in value.as_object().into_iter().flatten() {
                    let flag = match k.as_str() {
                        "drop" => "--cap-drop",
                        "add" => "--cap-add",
                        other => bail!("securityContext.capabilities.{other} is not translated"),
                    };
                    for cap in caps.as_array().into_iter().flatten() {
                        let cap = cap.as_str().context("a capability is not a string")?;
                        flags.push(format!("{flag}={cap}"));
                    }
                }
            }
            "seccompProfile" => {
                // Docker's default seccomp profile is the runtime's default.
                ensure!(
                    value["type"] == "RuntimeDefault",
                    "seccompProfile {value} is not translated (only RuntimeDefault)"
                );
            }
            other => bail!("securityContext.{other} is not translated to docker run flags"),
        }
    }
    if let Some(limit) = c["resources"]["limits"]["memory"].as_str() {
        let mib = limit
            .strip_suffix("Mi")
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("memory limit {limit:?} is not in Mi"))?;
        flags.push(format!("--memory={mib}m"));
    }
    Ok(flags)
}

/// `-v` flags for a container's `volumeMounts`: each `hostPath` volume from under `root` (created when
/// the volume says `DirectoryOrCreate` or `Directory`, as the kubelet would find or make it), each config
/// map volume from a directory of its files under `root/configmap`.
pub fn volume_flags(
    pod: &Value,
    c: &Value,
    root: &Path,
    config_maps: &BTreeMap<String, Value>,
) -> anyhow::Result<Vec<String>> {
    let mut flags = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().context("a volumeMount has no name")?;
        let mount_path = m["mountPath"]
            .as_str()
            .context("a volumeMount has no mountPath")?;
        let read_only = m["readOnly"].as_bool() == Some(true);
        let volume = pod["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == name))
            .ok_or_else(|| anyhow!("volumeMount {name} names no volume"))?;
        let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
            let host = under(root, path);
            match volume["hostPath"]["type"].as_str() {
                Some("Directory" | "DirectoryOrCreate") => std::fs::create_dir_all(&host)?,
                other => bail!("hostPath type {other:?} of volume {name} is not translated"),
            }
            host
        } else if let Some(cm) = volume["configMap"]["name"].as_str() {
            let dir = root.join("configmap").join(name);
            std::fs::create_dir_all(&dir)?;
            match config_maps.get(cm) {
                Some(object) => {
                    for (key, value) in object["data"].as_object().into_iter().flatten() {
                        std::fs::write(dir.join(key), value.as_str().unwrap_or_default())?;
                    }
                }
                None => ensure!(
                    volume["configMap"]["optional"].as_bool() == Some(true),
                    "config map {cm} of volume {name} is missing and not optional"
                ),
            }
            dir
        } else {
            bail!("volume {name} is neither hostPath nor configMap: not translated");
        };
        flags.push(format!(
            "--volume={}:{mount_path}{}",
            source.display(),
            if read_only { ":ro" } else { "" }
        ));
    }
    Ok(flags)
}

/// `-e` flags for a container's `env`: literal values, and `spec.nodeName` from the downward API.
pub fn env_flags(c: &Value) -> anyhow::Result<Vec<String>> {
    let mut flags = Vec::new();
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().context("an env entry has no name")?;
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            NODE.to_owned()
        } else {
            bail!("env {name}: {} is not translated", var["valueFrom"]);
        };
        flags.push(format!("--env={name}={value}"));
    }
    Ok(flags)
}

/// The gpu-sim as the NVIDIA runtime would provide the driver: its libraries where the driver's live,
/// and its node files (at their own paths, with the variables that name them).
fn driver_flags(sim: &SimNode, driver_dir: &Path, cuda: bool) -> anyhow::Result<Vec<String>> {
    let mut flags = vec![format!(
        "--volume={}:{DRIVER_LIB_DIR}/libnvidia-ml.so.1:ro",
        driver_dir.join("libnvidia-ml.so.1").display()
    )];
    if cuda {
        flags.push(format!(
            "--volume={}:{DRIVER_LIB_DIR}/libcuda.so.1:ro",
            driver_dir.join("libcuda.so.1").display()
        ));
        // The kernel driver knows every process by its host PID. The gpu-sim, a user-space library in
        // the container's PID namespace, learns it from the host's /proc (GPU_SIM_HOST_PROC), so the
        // processes of two containers (each PID 1 in its own namespace) stay apart, as on a real node.
        flags.push(format!("--volume=/proc:{SIM_HOST_PROC}:ro"));
        flags.push(format!("--env=GPU_SIM_HOST_PROC={SIM_HOST_PROC}"));
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (name, value) in sim.env() {
        if let Some(dir) = Path::new(&value)
            .parent()
            .filter(|_| value.starts_with('/'))
        {
            dirs.insert(dir.to_owned());
        }
        flags.push(format!("--env={name}={value}"));
    }
    ensure!(!dirs.is_empty(), "the gpu-sim names no node file");
    for dir in dirs {
        flags.push(format!("--volume={0}:{0}", dir.display()));
    }
    Ok(flags)
}

// ---------------------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------------------

/// One run of the init container.
#[derive(Debug, Clone)]
pub struct InitRun {
    /// Its output.
    pub output: String,
    /// The installed `libvgpu.so`'s inode afterwards.
    pub libvgpu_inode: u64,
}

/// One workload container's CUDA program.
#[derive(Debug, Clone, Default)]
pub struct WorkloadRun {
    /// The image it ran in.
    pub image: String,
    /// Its report lines (`device`, `alloc`, `kernels`).
    pub report: ProgramReport,
    /// Its stderr.
    pub stderr: String,
    /// The program's host PID (`docker inspect`'s `.State.Pid`: it is the container's first process).
    pub host_pid: Option<i32>,
    /// Host PIDs the container's region records while the program holds its memory.
    pub region_host_pids: Vec<i32>,
    /// Region PIDs (as the container sees them) at the same moment.
    pub region_pids: Vec<i32>,
    /// The pod's series on the metrics endpoint while it held its memory.
    pub metrics: Vec<String>,
    /// A second process of the container (`docker exec`) started while this one held its memory.
    pub second: Option<Box<WorkloadRun>>,
    /// The container started again with the same Allocate answer after this one ended (a restart).
    pub restarted: Option<Box<WorkloadRun>>,
}

/// A short-lived process run in a workload container (the limiter in its `/etc/ld.so.preload`).
#[derive(Debug, Clone)]
pub struct ToolRun {
    /// The image it ran in.
    pub image: String,
    /// The command, words joined by spaces.
    pub command: String,
    /// Its exit code (`None`: killed by a signal).
    pub exit_code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// What the whole run saw.
#[derive(Debug, Clone)]
pub struct E2eReport {
    /// The gpu-sim GPU the workload got.
    pub gpu: GpuSpec,
    /// Both init runs.
    pub init: Vec<InitRun>,
    /// `docker inspect` of the agent container: `{ReadonlyRootfs, Privileged, CapAdd, CapDrop, PidMode, User}`.
    pub agent_inspect: Value,
    /// What writing to the agent's root filesystem printed (it must fail).
    pub agent_root_write: Result<String, String>,
    /// From `docker run` of the agent to its three resources registered.
    pub start_to_registered: Duration,
    /// What the kubelet got, per container.
    pub allocated: Vec<Allocated>,
    /// `volcano.sh/bind-phase` after admission.
    pub bind_phase: Option<String>,
    /// The CUDA program, capped, in each workload image (the first with a second container beside it).
    pub workloads: Vec<WorkloadRun>,
    /// The program in a second pod whose container sets `CUDA_DISABLE_CONTROL=true` in its spec.
    pub uncontrolled: WorkloadRun,
    /// In each workload image, with the workload's flags: `/bin/true`, a shell running `ls`, a C tool that
    /// links neither libpthread nor libdl, and the probe of what such a process reaches of the limiter
    /// (`csrc/old_glibc_probe.c`).
    pub tools: Vec<ToolRun>,
    /// `pynvml`'s view inside the workload container while its program holds its memory (JSON printed by
    /// the check script), if it ran.
    pub nvml_client: Option<Value>,
    /// Its stderr.
    pub nvml_client_stderr: String,
    /// Plugin sockets left in the device-plugin directory after the agent container stopped.
    pub sockets_after_stop: Vec<String>,
    /// Plugin sockets there while it ran.
    pub sockets_while_running: Vec<String>,
    /// The agent container's exit code after `docker stop`.
    pub agent_exit_code: String,
}

/// The sockets in `dir` other than the kubelet's.
fn plugin_sockets(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock") && n != "kubelet.sock")
        .collect();
    names.sort();
    names
}

fn inode(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Runs the DaemonSet's init container from `image` into the host root.
fn run_init(
    docker: &Docker,
    image: &str,
    pod: &Value,
    root: &Path,
    config_maps: &BTreeMap<String, Value>,
) -> anyhow::Result<InitRun> {
    let init = container(pod, "initContainers", "install-hook")?;
    let command: Vec<String> = init["command"]
        .as_array()
        .context("the init container has no command")?
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    let (entrypoint, args) = command
        .split_first()
        .context("the init container's command is empty")?;
    let mut run = vec![
        "run".to_owned(),
        "--rm".to_owned(),
        format!("--name={}", container_name("init")),
        "--network=none".to_owned(),
        format!("--entrypoint={entrypoint}"),
    ];
    run.extend(security_flags(&json!({}), init)?);
    run.extend(volume_flags(pod, init, root, config_maps)?);
    run.extend(env_flags(init)?);
    run.push(image.to_owned());
    run.extend(args.iter().cloned());
    let output = docker.run(&run)?;
    let dest = args
        .last()
        .context("the init container's command has no destination")?;
    let host_dest = init["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == dest.as_str()))
        .and_then(|m| {
            pod["volumes"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == m["name"])?["hostPath"]["path"]
                .as_str()
        })
        .with_context(|| format!("the init container's destination {dest} is not a hostPath"))?;
    Ok(InitRun {
        output,
        libvgpu_inode: inode(&under(root, host_dest).join("libvgpu.so"))?,
    })
}

/// The workload container's `docker run` flags: Allocate's environment and mounts (host paths under
/// `root`), the container's own pod-spec `env` after them (as the kubelet orders them), and the driver.
fn workload_flags(
    a: &Allocated,
    root: &Path,
    sim: &SimNode,
    driver_dir: &Path,
    demo: &Path,
    pynvml_dir: Option<&Path>,
) -> anyhow::Result<Vec<String>> {
    // A GPU workload needs no network here; the engine runs with no bridge (docker/e2e.sh).
    let mut flags = vec!["--network=none".to_owned()];
    let mut env = a.envs.clone();
    env.extend(a.spec_env.clone());
    // The gpu-sim shows every GPU of the node; NVIDIA_VISIBLE_DEVICES names the ones the runtime would
    // expose. CUDA_VISIBLE_DEVICES restricts the program to them instead (the one stand-in left).
    if let Some(visible) = a.envs.get("NVIDIA_VISIBLE_DEVICES") {
        env.insert("CUDA_VISIBLE_DEVICES".to_owned(), visible.clone());
    }
    ensure!(
        !env.contains_key("LD_PRELOAD"),
        "a workload container must get the limiter through /etc/ld.so.preload, not LD_PRELOAD"
    );
    for (k, v) in &env {
        flags.push(format!("--env={k}={v}"));
    }
    for (c, h, ro) in &a.mounts {
        flags.push(format!(
            "--volume={}:{c}{}",
            under(root, h).display(),
            if *ro { ":ro" } else { "" }
        ));
    }
    flags.extend(driver_flags(sim, driver_dir, true)?);
    flags.push(format!(
        "--volume={}:{DEMO_IN_CONTAINER}:ro",
        demo.display()
    ));
    if let Some(dir) = pynvml_dir {
        flags.push(format!(
            "--volume={}:{PYNVML_IN_CONTAINER}:ro",
            dir.display()
        ));
    }
    Ok(flags)
}

/// A CUDA program running in a workload container, read line by line.
struct RunningWorkload {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    name: String,
    image: String,
    report: ProgramReport,
    _container: Option<Container>,
}

impl RunningWorkload {
    /// The program in a new container of `image` (removed when this is dropped).
    fn start(
        docker: &Docker,
        image: &str,
        flags: &[String],
        kernel_ns: u64,
        run_ms: u64,
    ) -> anyhow::Result<Self> {
        let name = container_name("workload");
        let mut args = vec!["run".to_owned(), "-i".to_owned(), "--rm".to_owned()];
        args.push(format!("--name={name}"));
        args.extend(flags.iter().cloned());
        args.push(image.to_owned());
        let container = Container {
            docker: docker.clone(),
            name: name.clone(),
        };
        Self::spawn(
            docker,
            args,
            name,
            image,
            Some(container),
            kernel_ns,
            run_ms,
        )
    }

    /// The program as a second process of the running container `of` (`docker exec`): the same PID
    /// namespace, mounts and environment.
    fn exec(of: &Self, docker: &Docker, kernel_ns: u64, run_ms: u64) -> anyhow::Result<Self> {
        let args = vec!["exec".to_owned(), "-i".to_owned(), of.name.clone()];
        let label = format!("{} (exec)", of.name);
        Self::spawn(docker, args, label, &of.image, None, kernel_ns, run_ms)
    }

    fn spawn(
        docker: &Docker,
        args: Vec<String>,
        name: String,
        image: &str,
        container: Option<Container>,
        kernel_ns: u64,
        run_ms: u64,
    ) -> anyhow::Result<Self> {
        let mut cmd = docker.command(&args);
        cmd.arg(DEMO_IN_CONTAINER)
            .arg(kernel_ns.to_string())
            .arg(run_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("docker run the workload")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("workload stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
            _container: container,
            name,
            image: image.to_owned(),
            report: ProgramReport::new(),
        })
    }

    /// Reads report lines until `holding` (true) or the end of output (false).
    fn until_holding(&mut self, deadline: Instant) -> anyhow::Result<bool> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == "holding" => return Ok(true),
                Ok(line) => {
                    if let Some((step, fields)) = parse_program_line(&line) {
                        self.report.insert(step, fields);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(false),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    bail!("the workload {} said nothing in time", self.name)
                }
            }
        }
    }

    fn go(&mut self) -> anyhow::Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            // A program that failed early has closed its end already; its report says why.
            match stdin.write_all(b"go\n").and_then(|()| stdin.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Lets the program go on and waits for its end. With `check`, a program that reported an `error`
    /// line or failed fails the run; without, what it reported is returned for the caller to judge.
    fn finish(mut self, deadline: Instant, check: bool) -> anyhow::Result<WorkloadRun> {
        self.go()?;
        while self.until_holding(deadline)? {}
        let output = self.child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if let Some(error) = self.report.get("error").filter(|_| check) {
            bail!(
                "the CUDA program in {} ({}) failed: {error:?}; it reported {:?}\n{stderr}",
                self.image,
                self.name,
                self.report
            );
        }
        ensure!(
            !check || output.status.success(),
            "the workload in {} exited with {}: {stderr}",
            self.image,
            output.status
        );
        Ok(WorkloadRun {
            image: self.image,
            report: self.report,
            stderr,
            ..Default::default()
        })
    }
}

/// NVIDIA's Python binding (`pynvml`, mounted at [`PYNVML_IN_CONTAINER`]) run in the running workload
/// container `name`: its JSON and stderr.
fn nvml_check(docker: &Docker, name: &str) -> anyhow::Result<(Option<Value>, String)> {
    let out = docker
        .command(["exec", name, "env"])
        .arg(format!("PYTHONPATH={PYNVML_IN_CONTAINER}"))
        .args(["python3", "-c", NVML_CHECK])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "the pynvml check failed ({}): {stderr}",
        out.status
    );
    let value: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("pynvml printed {:?}", String::from_utf8_lossy(&out.stdout)))?;
    Ok((Some(value), stderr))
}

/// The pid docker reports for a running container (its first process, on the host).
fn host_pid(docker: &Docker, name: &str) -> Option<i32> {
    docker
        .inspect(name, "{{.State.Pid}}")
        .ok()?
        .parse()
        .ok()
        .filter(|p| *p > 0)
}

/// The container's region, read from the host: (host PIDs, PIDs) of its live process slots.
fn region_pids(a: &Allocated, root: &Path) -> anyhow::Result<(Vec<i32>, Vec<i32>)> {
    let cache = a
        .envs
        .get("CUDA_DEVICE_MEMORY_SHARED_CACHE")
        .context("Allocate set no CUDA_DEVICE_MEMORY_SHARED_CACHE")?;
    let host = a
        .host_path(cache)
        .with_context(|| format!("the region {cache} is on no mount"))?;
    let path = under(root, &host.display().to_string());
    let snapshot = vgpu_region::RegionReader::read_snapshot(&path)
        .with_context(|| format!("read the region {}", path.display()))?;
    Ok((
        snapshot.processes.iter().map(|p| p.hostpid).collect(),
        snapshot.processes.iter().map(|p| p.pid).collect(),
    ))
}

/// Runs the whole node in the container engine; see the module doc.
pub async fn run(opts: &E2eOptions) -> anyhow::Result<E2eReport> {
    let docker = Docker::new(&opts.docker);
    let inputs = flow::load_inputs(&opts.example)?;
    let ds = &inputs.ds.object;
    let pod = pod_spec(ds)?;
    let node_cm_name = inputs.node_cm["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let config_maps = BTreeMap::from([(node_cm_name, inputs.node_cm.clone())]);

    // The host. Docker bind-mounts from here, so it must be a path the daemon sees: the same machine.
    let sim = SimNode::new(NodeSpec::uniform(opts.gpus, GpuSpec::t4)).context("gpu-sim node")?;
    let gpu = sim.spec().gpus[0].clone();
    let root = tempfile::Builder::new().prefix("vgpu-e2e-").tempdir()?;
    let bin_dir = root.path().join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let driver_dir = match &opts.driver_dir {
        Some(dir) => dir.clone(),
        None => gpu_sim::cuda_library()
            .parent()
            .context("the gpu-sim's library directory")?
            .to_owned(),
    };
    let demo = match &opts.cc {
        Some(cc) => flow::compile_demo_with(cc, &driver_dir, &bin_dir)?,
        None => flow::compile_demo(&bin_dir)?,
    };

    // 1. The init container, twice.
    let first = run_init(&docker, &opts.image, pod, root.path(), &config_maps)?;
    let second = run_init(&docker, &opts.image, pod, root.path(), &config_maps)?;

    // 2. Kubelet, apiserver, the agent container.
    let agent_spec = container(pod, "containers", "agent")?;
    let flow::StandIns {
        kubelet,
        api,
        kubeconfig,
        plugin_dir,
        metrics_port,
    } = flow::stand_ins(&inputs, root.path()).await?;
    let agent_name = container_name("agent");
    let mut run_agent = vec![
        "run".to_owned(),
        "--detach".to_owned(),
        format!("--name={agent_name}"),
        // The stand-in apiserver listens on the host's loopback.
        "--network=host".to_owned(),
        format!(
            "--volume={}:{KUBECONFIG_IN_CONTAINER}:ro",
            kubeconfig.display()
        ),
        format!("--env=KUBECONFIG={KUBECONFIG_IN_CONTAINER}"),
        // The stand-in apiserver speaks plain HTTP, and a kubeconfig without a CA makes kube's TLS setup
        // look for the system's CA store, which the slim image does not have (in a pod the in-cluster
        // config brings the cluster's CA and none is needed). The host's store stands in for it.
        format!("--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"),
        format!("--env=SSL_CERT_FILE={HOST_CA_BUNDLE}"),
    ];
    run_agent.extend(security_flags(pod, agent_spec)?);
    run_agent.extend(volume_flags(pod, agent_spec, root.path(), &config_maps)?);
    run_agent.extend(env_flags(agent_spec)?);
    run_agent.extend(driver_flags(&sim, &driver_dir, false)?);
    let command: Vec<&str> = agent_spec["command"]
        .as_array()
        .context("the agent container has no command")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let (entrypoint, command_args) = command
        .split_first()
        .context("the agent's command is empty")?;
    run_agent.push(format!("--entrypoint={entrypoint}"));
    run_agent.push(opts.image.clone());
    run_agent.extend(command_args.iter().map(|s| (*s).to_owned()));
    for arg in agent_spec["args"].as_array().into_iter().flatten() {
        let arg = arg.as_str().context("an agent arg is not a string")?;
        // The host network is shared: the metrics port is a free one, the only flag changed.
        run_agent.push(match arg.split_once('=') {
            Some(("--metrics-bind-address", _)) => {
                format!("--metrics-bind-address=127.0.0.1:{metrics_port}")
            }
            _ => arg.to_owned(),
        });
    }
    let started = Instant::now();
    docker.run(&run_agent)?;
    let agent = Container {
        docker: docker.clone(),
        name: agent_name.clone(),
    };
    let agent_logs = || {
        docker
            .command(["logs", &agent_name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    };
    kubelet
        .wait_for_resources(&RESOURCES, PATIENCE)
        .await
        .map_err(|e| anyhow!("{e}\nagent container log:\n{}", agent_logs()))?;
    let start_to_registered = started.elapsed();
    let sockets_while_running = plugin_sockets(&plugin_dir);
    let agent_inspect: Value = serde_json::from_str(&docker.inspect(
        &agent_name,
        "{{json .HostConfig.ReadonlyRootfs}} {{json .HostConfig.Privileged}} {{json .HostConfig.CapAdd}} \
         {{json .HostConfig.CapDrop}} {{json .HostConfig.PidMode}} {{json .Config.User}}",
    )
    .map(|s| format!("[{}]", s.split(' ').collect::<Vec<_>>().join(",")))?)
    .context("parse docker inspect")?;
    let agent_inspect = json!({
        "ReadonlyRootfs": agent_inspect[0], "Privileged": agent_inspect[1], "CapAdd": agent_inspect[2],
        "CapDrop": agent_inspect[3], "PidMode": agent_inspect[4], "User": agent_inspect[5],
    });
    let probe = docker
        .command(["exec", &agent_name, "sh", "-c", "echo x > /vgpu-e2e-probe"])
        .output()?;
    let agent_root_write = if probe.status.success() {
        Ok("the write succeeded".to_owned())
    } else {
        Err(String::from_utf8_lossy(&probe.stderr).trim().to_owned())
    };

    // 3. The bind and the kubelet's admission (the flow's own steps).
    let node_register = flow::node_register(&api)
        .await
        .map_err(|e| anyhow!("{e}\nagent container log:\n{}", agent_logs()))?;
    flow::simulate_bind(&api, &kubeconfig, &inputs, &node_register).await?;
    let agent_log_file = root.path().join("agent.log");
    let allocated = flow::admit(&kubelet, &inputs, &agent_log_file).await?;
    let pod_name = inputs.pod_name.clone();
    let bind_phase = flow::bind_phase(&api, &pod_name).await;
    api.patch_object(
        "pods",
        Some(NAMESPACE),
        &pod_name,
        // The kubelet starts the pod: it is no longer one Allocate can be for.
        json!({"status": {"phase": "Running", "startTime": harness::apiserver::now_rfc3339()}}),
    )?;
    let a = allocated
        .first()
        .cloned()
        .context("no container was allocated")?;

    // 4. Workload containers.
    let kernel_ns = 2_000_000;
    let run_ms = 1500;
    let patience = Duration::from_millis(run_ms) + PATIENCE;
    let flags = workload_flags(
        &a,
        root.path(),
        &sim,
        &driver_dir,
        &demo,
        opts.pynvml_dir.as_deref(),
    )?;
    if std::env::var_os("VGPU_E2E_DEBUG").is_some() {
        eprintln!("workload flags: {}", flags.join(" "));
        std::mem::forget(sim);
        let root = root.keep();
        bail!(
            "VGPU_E2E_DEBUG: stopped before the workloads; the host root is {}",
            root.display()
        );
    }
    let mut workloads = Vec::new();
    let (mut nvml_client, mut nvml_client_stderr) = (None, String::new());
    for (i, image) in opts.workload_images.iter().enumerate() {
        let deadline = Instant::now() + patience;
        let mut w = RunningWorkload::start(&docker, image, &flags, kernel_ns, run_ms)?;
        ensure!(
            w.until_holding(deadline)?,
            "the workload in {image} ended before holding its memory: {:?}",
            w.report
        );
        let pid = host_pid(&docker, &w.name);
        let (region_host_pids, region_pids) = region_pids(&a, root.path())?;
        let metrics = flow::scrape(metrics_port, &pod_name)?;
        // A second process of the container, beside the first (which holds its memory until told to go):
        // it shares the container's region, so nothing is left for it, not even its context. And what a
        // user types instead of nvidia-smi, there too.
        let second = if i == 0 {
            let s = RunningWorkload::exec(&w, &docker, kernel_ns, 200)?;
            if opts.pynvml_dir.is_some() {
                (nvml_client, nvml_client_stderr) = nvml_check(&docker, &w.name)?;
            }
            Some(Box::new(s.finish(deadline, false)?))
        } else {
            None
        };
        let mut run = w.finish(deadline, true)?;
        run.host_pid = pid;
        run.region_host_pids = region_host_pids;
        run.region_pids = region_pids;
        run.metrics = metrics;
        run.second = second;
        // The container restarted (the kubelet reuses Allocate's answer, so the same region): the dead
        // container's processes, PID 1 among them, must not keep their charge.
        if i == 0 {
            let deadline = Instant::now() + patience;
            let r = RunningWorkload::start(&docker, image, &flags, kernel_ns, 100)?;
            run.restarted = Some(Box::new(r.finish(deadline, true)?));
        }
        workloads.push(run);
    }
    let first_image = opts
        .workload_images
        .first()
        .context("no workload image")?
        .clone();
    // Processes that load neither libpthread nor libdl, which is most of a container's (shells, coreutils):
    // on a glibc before 2.34 the limiter's imports from those two files are NULL in them
    // (limiter/src/infra/imports.rs). They must start and exit as without the limiter, and what of it they
    // can reach must fail closed.
    let tools_dir = root.path().join("tools");
    std::fs::create_dir_all(&tools_dir)?;
    compile_tools(opts.cc.as_deref(), &tools_dir)?;
    let mut tool_flags = flags.clone();
    tool_flags.push(format!(
        "--volume={}:{TOOLS_IN_CONTAINER}:ro",
        tools_dir.display()
    ));
    let mut tools = Vec::new();
    for image in &opts.workload_images {
        for command in [
            vec!["/bin/true".to_owned()],
            vec!["sh".into(), "-c".into(), "ls -d / && echo sh ok".into()],
            vec![format!("{TOOLS_IN_CONTAINER}/plain")],
            vec![format!("{TOOLS_IN_CONTAINER}/probe")],
        ] {
            tools.push(run_tool(&docker, image, &tool_flags, &command)?);
        }
    }
    // A second pod whose container says CUDA_DISABLE_CONTROL: Allocate leaves out the /etc/ld.so.preload
    // mount (the device plugin reads the variable, not libvgpu.so), so nothing limits it.
    let uncontrolled = {
        let mut inputs = flow::load_inputs(&opts.example)?;
        inputs.pod_name = format!("{}-uncontrolled", inputs.pod_name);
        inputs.pod["metadata"]["name"] = json!(inputs.pod_name);
        let spec_container = inputs.pod["spec"]["containers"]
            .as_array_mut()
            .and_then(|cs| cs.iter_mut().find(|c| c["name"] == a.container.as_str()))
            .context("the example's GPU container")?;
        let env = spec_container["env"].as_array_mut();
        let var = json!({"name": "CUDA_DISABLE_CONTROL", "value": "true"});
        match env {
            Some(env) => env.push(var),
            None => spec_container["env"] = json!([var]),
        }
        flow::simulate_bind(&api, &kubeconfig, &inputs, &node_register).await?;
        let allocated = flow::admit(&kubelet, &inputs, &agent_log_file).await?;
        let u = allocated
            .into_iter()
            .next()
            .context("the uncontrolled pod's container was not allocated")?;
        ensure!(
            !u.mounts.iter().any(|(c, _, _)| c == "/etc/ld.so.preload"),
            "Allocate mounted /etc/ld.so.preload for a container with CUDA_DISABLE_CONTROL: {:?}",
            u.mounts
        );
        let flags = workload_flags(&u, root.path(), &sim, &driver_dir, &demo, None)?;
        let deadline = Instant::now() + patience;
        let w = RunningWorkload::start(&docker, &first_image, &flags, kernel_ns, 100)?;
        w.finish(deadline, true)?
    };

    // 5. Stop the agent container as the kubelet would (SIGTERM, then its grace period).
    docker.run(["stop", "--time=10", &agent_name])?;
    let agent_exit_code = docker.inspect(&agent_name, "{{.State.ExitCode}}")?;
    let sockets_after_stop = plugin_sockets(&plugin_dir);
    drop(agent);

    Ok(E2eReport {
        gpu,
        init: vec![first, second],
        agent_inspect,
        agent_root_write,
        start_to_registered,
        allocated,
        bind_phase,
        workloads,
        uncontrolled,
        tools,
        nvml_client,
        nvml_client_stderr,
        sockets_after_stop,
        sockets_while_running,
        agent_exit_code,
    })
}

/// Compiles into `dir` the tools [`run`] starts in each workload image: `plain` (`csrc/old_glibc_plain.c`)
/// and `probe` (`csrc/old_glibc_probe.c`) with its link-time stub `libvgpu-e2e-stub.so`, found through
/// the run path [`TOOLS_IN_CONTAINER`]. No `-lpthread`, no `-ldl`. `cc` targets the oldest glibc among
/// the images (`None`: `$CC` or `cc`).
fn compile_tools(cc: Option<&str>, dir: &Path) -> anyhow::Result<()> {
    let cc = cc
        .map(str::to_owned)
        .or_else(|| std::env::var("CC").ok())
        .unwrap_or_else(|| "cc".to_owned());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc");
    let compile = |out: &str, source: &str, extra: &[String]| -> anyhow::Result<()> {
        let status = Command::new(&cc)
            .args(["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(dir.join(out))
            .arg(src.join(source))
            .args(extra)
            .status()
            .with_context(|| format!("run {cc}"))?;
        ensure!(status.success(), "compiling {source} failed");
        Ok(())
    };
    compile("plain", "old_glibc_plain.c", &[])?;
    compile(
        "libvgpu-e2e-stub.so",
        "old_glibc_stub.c",
        &[
            "-shared".into(),
            "-fPIC".into(),
            format!(
                "-Wl,--version-script={}",
                src.join("old_glibc_stub.map").display()
            ),
            "-Wl,-soname,libvgpu-e2e-stub.so".into(),
        ],
    )?;
    compile(
        "probe",
        "old_glibc_probe.c",
        &[
            format!("-L{}", dir.display()),
            "-l:libvgpu-e2e-stub.so".into(),
            format!("-Wl,-rpath,{TOOLS_IN_CONTAINER}"),
        ],
    )
}

/// `command` in a new container of `image` with `flags`, to its end.
fn run_tool(
    docker: &Docker,
    image: &str,
    flags: &[String],
    command: &[String],
) -> anyhow::Result<ToolRun> {
    let name = container_name("tool");
    let _container = Container {
        docker: docker.clone(),
        name: name.clone(),
    };
    let out = docker
        .command(["run", "--rm", &format!("--name={name}")])
        .args(flags)
        .arg(image)
        .args(command)
        .stdin(Stdio::null())
        .output()
        .context("docker run a tool")?;
    Ok(ToolRun {
        image: image.to_owned(),
        command: command.join(" "),
        exit_code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// What a user types instead of `nvidia-smi`, through NVIDIA's own Python binding (`nvidia-ml-py`):
/// the first visible GPU's memory as NVML reports it inside the container.
const NVML_CHECK: &str = r#"
import json, pynvml
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
m = pynvml.nvmlDeviceGetMemoryInfo(h)
name = pynvml.nvmlDeviceGetName(h)
print(json.dumps({"count": pynvml.nvmlDeviceGetCount(), "name": name if isinstance(name, str) else name.decode(),
                  "total": m.total, "used": m.used, "free": m.free}))
pynvml.nvmlShutdown()
"#;
