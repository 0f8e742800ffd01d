//! MIG repartitioning through NVML, safely.
//!
//! nvml-wrapper 0.13 wraps MIG mode and MIG device handles, not GPU/compute instance profiles, placements,
//! creation, destruction or listing. This crate calls those raw functions from the library nvml-wrapper
//! already loaded (`Nvml::lib()`), behind a safe API; its unsafe code is confined to `src/nvml.rs` (see
//! the soundness notes there).
//!
//! * [`MigGpu`] — one GPU's MIG operations ([`MigBackend`]): mode, GPU instance profiles
//!   (`nvmlDeviceGetGpuInstanceProfileInfoV`, falling back to the v1 call), possible placements, remaining
//!   capacity, GPU and compute instances listed, created and destroyed, MIG devices with their UUID, GPU
//!   and compute instance ids and memory. Instances are named by id, never by a handle that could dangle.
//! * [`apply`] — makes the GPU's layout a [`Layout`] (GPU instance profile names in template order, one
//!   compute instance filling each) and says which MIG device stands for each template position.
//! * [`current`] — the layout the GPU has, in placement order, to compare before repartitioning.
//!
//! # `apply`, step by step
//!
//! 1. MIG mode: [`MigError::NotSupported`] on a GPU without MIG; [`MigError::ResetPending`] if the current
//!    and pending modes differ.
//! 2. Processes on the GPU or any MIG device: [`MigError::InUse`] and nothing changes. (One process query
//!    per device, before anything is touched; NVML's own `NVML_ERROR_IN_USE` comes only from the destroy
//!    calls, when other instances may already be gone, and is mapped to `InUse` as a backstop.)
//! 3. MIG mode enabled if off; if the driver leaves it pending a reset, [`MigError::ResetPending`].
//! 4. Names resolved against the GPU's own profile table ([`MigError::UnknownProfile`]) and the layout
//!    placed on paper (policy in [`placement`]; [`MigError::Impossible`] if no placement exists), before
//!    any instance is touched.
//! 5. Existing compute instances destroyed, then GPU instances.
//! 6. Per template position, a GPU instance at its chosen placement
//!    (`nvmlDeviceCreateGpuInstanceWithPlacement`) and a compute instance using all its slices.
//! 7. MIG devices matched to (GPU instance, compute instance): the UUID for each position.
//!
//! Any failure from step 5 on (except one before the first instance is destroyed, which changed nothing and
//! is returned as is: e.g. [`MigError::InUse`] from NVML's own `NVML_ERROR_IN_USE`) **rolls back**: every
//! compute and GPU instance that can be destroyed is, and the error ([`MigError::Aborted`]) carries the cause,
//! the step, and the [`Rollback`] outcome: `Clean` (an empty layout; MIG mode stays enabled) or `Incomplete`
//! with the instances left and why. A half layout is never left silently.
//!
//! `apply` always repartitions (MIG UUIDs change): compare [`current`] with the wanted layout first
//! ([`Layout::same_profiles`]) to avoid disturbing a GPU that already matches.

pub mod backend;
pub mod error;
pub mod layout;
mod nvml;
pub mod placement;
pub mod profile;

#[cfg(test)]
mod fake;

use nvml_wrapper::Device;

pub use backend::{ComputeInstance, GpuInstance, Holder, MigBackend, MigDevice, MigMode};
pub use error::{MigError, NvmlCode, Rollback};
pub use layout::{AppliedInstance, AppliedLayout, Layout, apply_with, current_with};
pub use nvml::MigGpu;
pub use profile::{CiProfile, GiProfile, NameSource, Placement};

/// Makes `device`'s MIG layout `layout` through NVML (see the crate docs for the steps and the rollback).
pub fn apply(device: &Device<'_>, layout: &Layout) -> Result<AppliedLayout, MigError> {
    apply_with(&MigGpu::new(device), layout)
}

/// `device`'s MIG layout: the profile of each GPU instance, in placement order; [`MigError::MigDisabled`]
/// when MIG mode is off, [`MigError::NotSupported`] on a GPU without MIG.
pub fn current(device: &Device<'_>) -> Result<Layout, MigError> {
    current_with(&MigGpu::new(device))
}
