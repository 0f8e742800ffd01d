//! The vGPU node agent: a drop-in for Volcano's vGPU device plugin.
//!
//! It discovers the node's GPUs through NVML ([`inventory`]), cuts them into the three resources Volcano's
//! `deviceshare` plugin schedules (`volcano.sh/vgpu-number`, `-memory`, `-cores`; [`devices`]), serves one
//! kubelet device-plugin endpoint per resource ([`service`], [`endpoint`]), registers them ([`registration`])
//! and registers again when the kubelet restarts ([`kubelet_watch`]), and keeps each GPU's health current from
//! NVML events and probes, recovering GPUs that come back ([`health`]). Allocate hands each container its
//! GPUs in the form `--device-list-strategy` selects ([`volcano::allocate_env`], the CDI spec in [`cdi`], device
//! nodes in [`device_specs`]); NVML that is missing at start is diagnosed and waited for
//! ([`nvml_diagnostics`]).
//!
//! Start at [`agent::run`]; [`cli`] parses flags into an [`config::AgentConfig`] and is all `main.rs` calls.

pub mod agent;
pub mod allocate;
pub mod authority;
pub mod cache_cleanup;
pub mod cdi;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod device_config;
pub mod device_specs;
pub mod devices;
pub mod endpoint;
pub mod health;
pub mod inventory;
pub mod kubelet_watch;
pub mod monitor;
pub mod node_annotations;
pub mod node_metrics;
pub mod node_record;
pub mod nvml_diagnostics;
pub mod pid_broker;
pub mod pod_cache;
pub mod registration;
pub mod service;
pub mod volcano;
