//! The node's GPUs: what NVML reports ([`inventory`]), whether each is healthy ([`health`]), how they are cut
//! into the three vGPU resources the kubelet sees ([`plan`]), and loading NVML with a diagnosis when it is
//! missing ([`nvml`]).

pub mod health;
pub mod inventory;
pub mod nvml;
pub mod plan;
