//! The agent's end-to-end tests run the real `vgpu-device-plugin` binary through the fixture of
//! `harness::cluster`; this names the binary (only these tests know its path) and re-exports the rest.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use gpu_sim::{NodeSpec, SimNode};
// Each test binary uses its own part of these.
#[allow(unused_imports)]
pub use harness::cluster::{
    ALL, Agent, BindStyle, CORES, Cluster, ClusterBuilder, ControlPlane, Ctr, MEMORY, NUMBER,
    PATIENCE, Ready, bind_annotations, free_port, http_get, kubelet, pod_json, run_to_exit,
    sockets_in,
};

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_vgpu-device-plugin");

/// The agent binary under test, on `sim`, registering at `kubelet_socket`.
pub fn agent_command(sim: &SimNode, kubelet_socket: &Path) -> Command {
    harness::cluster::agent_command(Path::new(AGENT), sim, kubelet_socket)
}

/// A cluster running the agent binary under test.
pub fn cluster(spec: NodeSpec) -> ClusterBuilder {
    Cluster::builder(AGENT, spec)
}

/// [`ControlPlane::command`] with the agent binary under test.
pub trait AgentCommand {
    /// The agent as a node runs it, bound to `node`, its files under `dir`.
    fn agent_command(&self, sim: &SimNode, dir: &Path, node: &str) -> Command;
}

impl AgentCommand for ControlPlane {
    fn agent_command(&self, sim: &SimNode, dir: &Path, node: &str) -> Command {
        self.command(Path::new(AGENT), sim, dir, node)
    }
}
