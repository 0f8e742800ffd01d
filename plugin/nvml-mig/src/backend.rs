//! The MIG operations [`apply`](crate::apply) and [`current`](crate::current) are written against: one method
//! per NVML call (or small group of calls). [`MigGpu`](crate::MigGpu) implements it over the real library;
//! the unit tests implement it with a fake to drive the rollback paths.

use crate::error::MigError;
use crate::profile::{CiProfile, GiProfile, Placement};

/// MIG mode now and after the next GPU reset (`nvmlDeviceGetMigMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigMode {
    /// enabled now
    pub current: bool,
    /// enabled after the next reset
    pub pending: bool,
}

/// A GPU instance (`nvmlGpuInstanceInfo_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuInstance {
    /// GPU instance id (unique on its GPU)
    pub id: u32,
    /// its profile id ([`GiProfile::id`])
    pub profile_id: u32,
    /// its memory slices
    pub placement: Placement,
}

/// A compute instance (`nvmlComputeInstanceInfo_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeInstance {
    /// compute instance id (unique within its GPU instance)
    pub id: u32,
    /// the GPU instance it belongs to
    pub gi_id: u32,
    /// its profile id ([`CiProfile::id`])
    pub profile_id: u32,
    /// its compute slices within the GPU instance
    pub placement: Placement,
}

/// A MIG device: what a container is given (`nvmlDeviceGetMigDeviceHandleByIndex`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDevice {
    /// index among the parent's MIG devices
    pub index: u32,
    /// `MIG-…`
    pub uuid: String,
    /// `nvmlDeviceGetGpuInstanceId`
    pub gi_id: u32,
    /// `nvmlDeviceGetComputeInstanceId`
    pub ci_id: u32,
    /// total memory in bytes (`nvmlDeviceGetMemoryInfo` on the MIG device)
    pub memory_bytes: u64,
}

/// A process found on the GPU or one of its MIG devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// `"GPU"` for the parent, or the MIG device's UUID
    pub device: String,
    /// the process id NVML reports
    pub pid: u32,
}

/// The MIG operations on one GPU. Errors name the GPU, the NVML function and code, and the profile.
pub trait MigBackend {
    /// The GPU's name in errors: its UUID, or `index <n>`.
    fn gpu(&self) -> &str;
    /// `nvmlDeviceGetMigMode`; [`MigError::NotSupported`] on a GPU without MIG.
    fn mig_mode(&self) -> Result<MigMode, MigError>;
    /// `nvmlDeviceSetMigMode`; [`MigError::InUse`] if the driver says the GPU is in use.
    fn set_mig_mode(&self, enabled: bool) -> Result<(), MigError>;
    /// Every GPU instance profile the GPU supports, in profile-index order. (NVML documents
    /// `NVML_ERROR_NOT_SUPPORTED` for these queries while MIG mode is off, so the list may then be empty.)
    fn gi_profiles(&self) -> Result<Vec<GiProfile>, MigError>;
    /// `nvmlDeviceGetGpuInstancePossiblePlacements_v2`, in NVML's order.
    fn gi_placements(&self, profile: &GiProfile) -> Result<Vec<Placement>, MigError>;
    /// `nvmlDeviceGetGpuInstanceRemainingCapacity`: how many more of `profile` fit now.
    fn gi_remaining_capacity(&self, profile: &GiProfile) -> Result<u32, MigError>;
    /// `nvmlDeviceGetGpuInstances` for one profile.
    fn gpu_instances(&self, profile: &GiProfile) -> Result<Vec<GpuInstance>, MigError>;
    /// `nvmlDeviceCreateGpuInstanceWithPlacement`.
    fn create_gpu_instance(
        &self,
        profile: &GiProfile,
        placement: Placement,
    ) -> Result<GpuInstance, MigError>;
    /// `nvmlGpuInstanceDestroy`; [`MigError::InUse`] on `NVML_ERROR_IN_USE`.
    fn destroy_gpu_instance(&self, gi: u32) -> Result<(), MigError>;
    /// Every compute instance profile of GPU instance `gi` (engine profile shared), in index order.
    fn ci_profiles(&self, gi: u32) -> Result<Vec<CiProfile>, MigError>;
    /// `nvmlGpuInstanceGetComputeInstances` for one profile.
    fn compute_instances(
        &self,
        gi: u32,
        profile: &CiProfile,
    ) -> Result<Vec<ComputeInstance>, MigError>;
    /// `nvmlGpuInstanceCreateComputeInstance`.
    fn create_compute_instance(
        &self,
        gi: u32,
        profile: &CiProfile,
    ) -> Result<ComputeInstance, MigError>;
    /// `nvmlComputeInstanceDestroy`; [`MigError::InUse`] on `NVML_ERROR_IN_USE`.
    fn destroy_compute_instance(&self, gi: u32, ci: u32) -> Result<(), MigError>;
    /// Processes holding the GPU or any of its MIG devices (compute and graphics).
    fn processes(&self) -> Result<Vec<Holder>, MigError>;
    /// The GPU's MIG devices, by index.
    fn mig_devices(&self) -> Result<Vec<MigDevice>, MigError>;
}
