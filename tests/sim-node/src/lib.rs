//! `sim-node`'s library: the whole system on simulated GPUs, on a machine with no GPU and no cluster.
//!
//! * [`flow`] runs what a GPU node does for one pod, end to end: the agent as the shipped DaemonSet
//!   configures it, a stand-in kubelet and apiserver, a simulated Volcano bind of one of the shipped example
//!   pods, the Allocate that follows, and a CUDA program launched with exactly what Allocate returned.
//!   `sim-node run` prints it; `tests/flow.rs` checks every step.
//! * [`manifests`] reads the shipped manifests in `volcano-config/` (also checked by `tests/manifests.rs`).
//! * [`agent`] starts the agent as a child process on a gpu-sim node.
//! * [`containers`] runs the same node in a real container engine: the shipped image, the DaemonSet's
//!   containers as the manifest describes them, and workload containers that get the limiter through the
//!   bind-mounted `/etc/ld.so.preload` (`docker/e2e.sh` builds the images and runs `tests/containers.rs`).

pub mod agent;
pub mod containers;
pub mod flow;
pub mod manifests;
