//! Starting the node agent as a child process on a gpu-sim node: which executable runs it, its environment,
//! and a guard that never leaves it running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gpu_sim::SimNode;

/// The agent as a child process on `sim`, registering with the kubelet at `socket`.
pub fn agent_command(sim: &SimNode, socket: &Path, agent: &AgentBinary) -> Command {
    let mut cmd = match agent {
        AgentBinary::Real(path) => Command::new(path),
        AgentBinary::Embedded(path) => {
            let mut cmd = Command::new(path);
            cmd.arg("agent");
            cmd
        }
    };
    cmd.envs(sim.env())
        .env("NVML_LIB", gpu_sim::nvml_library())
        .env("KUBELET_SOCKET", socket)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null());
    cmd
}

/// Which executable runs the agent: the real `vgpu-device-plugin`, or a `sim-node` binary's `agent`
/// subcommand (the same library code).
#[derive(Debug, Clone)]
pub enum AgentBinary {
    /// `vgpu-device-plugin`.
    Real(PathBuf),
    /// `sim-node agent …`.
    Embedded(PathBuf),
}

impl AgentBinary {
    /// The real agent when it was built next to the running `sim-node` by the same build (linked within
    /// two minutes of it, or later), otherwise `sim-node agent`: a binary left by an earlier build would run
    /// old code.
    pub fn find() -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("locate sim-node")?;
        let real = me.with_file_name("vgpu-device-plugin");
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let current = match (modified(&real), modified(&me)) {
            (Some(agent), Some(sim_node)) => agent + Duration::from_secs(120) >= sim_node,
            _ => false,
        };
        Ok(if current {
            Self::Real(real)
        } else {
            Self::Embedded(me)
        })
    }

    /// The command, for the output.
    pub fn describe(&self) -> String {
        match self {
            Self::Real(p) => p.display().to_string(),
            Self::Embedded(p) => format!("{} agent", p.display()),
        }
    }

    /// What runs, in words, for a reader who expected `vgpu-device-plugin`.
    pub fn explain(&self) -> &'static str {
        match self {
            Self::Real(_) => "the vgpu-device-plugin binary",
            // `sim-node agent` calls the same entry point `vgpu-device-plugin`'s main does, so one build of
            // sim-node is enough for the demo.
            Self::Embedded(_) => {
                "the agent's own entry point (vgpu_device_plugin::cli), built into sim-node so the run needs one \
                 build; it parses the same flags as vgpu-device-plugin"
            }
        }
    }
}

/// Kills the agent on drop, so an error path never leaves it running.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.0.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("send SIGTERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("agent did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Resolves when the process exits (polling /proc, so the child handle stays with its guard).
pub async fn wait_exit(pid: u32) -> String {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    loop {
        match std::fs::read_to_string(&path) {
            Ok(stat) if !stat.contains(") Z ") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => return "exited".into(),
        }
    }
}
