//! The hooks layer, on top: the exported functions ([`exports`], our `dlsym` in [`dlsym`]) and
//! their bodies. Every body takes the exact C arguments and is `unsafe`: the caller's pointers are
//! trusted as the real driver would trust them.
//!
//! Uses the policy, driver and infra layers; nothing uses it.

pub(crate) mod context;
pub(crate) mod dlsym;
pub(crate) mod exports;
pub(crate) mod graph;
pub(crate) mod init;
pub(crate) mod launch;
pub(crate) mod meminfo;
pub(crate) mod memory;
pub(crate) mod nvml;
pub(crate) mod procaddr;
pub(crate) mod vmm;
