//! The node's GPUs: what NVML reports ([`inventory`]), whether each is healthy ([`health`]), how they are cut
//! into the three vGPU resources the kubelet sees ([`plan`]), loading NVML with a diagnosis when it is
//! missing ([`nvml`]), and all of it at start, with every check that can refuse to start ([`prepare`]); in MIG
//! mode, each GPU's MIG layout and the MIG device of a position ([`mig`]).

pub mod health;
pub mod inventory;
pub mod mig;
pub mod nvml;
pub mod plan;
pub mod prepare;
pub mod processes;
