//! The vGPU node agent: a drop-in for Volcano's vGPU device plugin.
//!
//! It discovers the node's GPUs through NVML and cuts them into the three resources Volcano's `deviceshare`
//! plugin schedules (`volcano.sh/vgpu-number`, `-memory`, `-cores`; [`gpu`]), serves one kubelet
//! device-plugin endpoint per resource and registers them again when the kubelet restarts ([`kubelet`]),
//! publishes the node's GPUs in the annotations the scheduler reads and, in Allocate, finds the pod the
//! scheduler placed and decides what its container gets ([`handoff`]): the environment, mounts, CDI devices
//! and device nodes that put `libvgpu.so` and its limits into the container ([`container`]). While
//! containers run it keeps their shared regions honest, feeds the SM limiter and serves the metrics
//! ([`monitor`]). [`volcano`] holds the wire codecs of the contract with the scheduler, [`config`] the
//! settings from flags, the device config map and the node's file, [`cluster`] the apiserver client and its
//! time bounds.
//!
//! Start at [`agent::run`]; [`cli`] parses flags into a [`config::AgentConfig`] and is all `main.rs` calls.
//! `ARCHITECTURE.md` at the repository root walks an Allocate call through these modules.
//!
//! # Layers
//!
//! Dependencies point one way, from the edges (the kubelet, the apiserver, the running containers) in to
//! the domain at the bottom. `tests/layers` checks this rule on every test run, reading it from this block:
//!
//! ```text
//! layers (a file may use files of its own module, and of modules on lower lines; never a module on its own line or above):
//! cli               | main: flags and environment into an AgentConfig, then the agent
//! agent             | composition root: starts, supervises and stops every task
//! kubelet monitor   | the kubelet's gRPC endpoints; the watch over running containers
//! handoff           | the Allocate decision, pod selection, node annotations, allocation records
//! container         | what a container is handed: env, mounts, CDI, device nodes
//! gpu               | NVML inventory, health, the device plan
//! config            | settings: flags, device config map, node file
//! cluster           | the apiserver client and its time bounds
//! volcano error     | the pure wire codecs of the Volcano contract; error reporting
//! ```

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod container;
pub mod error;
pub mod gpu;
pub mod handoff;
pub mod kubelet;
pub mod monitor;
pub mod volcano;
