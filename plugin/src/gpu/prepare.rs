//! Everything that can refuse to start before anything is served: the sharing settings checked, NVML loaded
//! ([`crate::gpu::nvml::init`]), the GPUs discovered and filtered, and the three device lists planned.

use std::path::PathBuf;
use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use crate::config::device::VolcanoConfig;
use crate::config::{AgentConfig, InvalidSetting, ResourceKind};
use crate::gpu::inventory::{DiscoveryError, Inventory, apply_filter, discover};
use crate::gpu::plan::{DevicePlan, MessageTooLarge};
use crate::volcano::node_register::OperatingMode;

/// Why the node's GPUs cannot be served. Each variant's message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A sharing setting is out of range, or does not fit the GPUs.
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    /// NVML could not be loaded or initialised.
    #[error("{}", crate::gpu::nvml::diagnosis(lib, source))]
    Nvml {
        /// The library path or name tried.
        lib: PathBuf,
        /// NVML's error.
        source: NvmlError,
    },
    /// No usable GPU.
    #[error("GPU discovery failed: {0}")]
    Discovery(#[from] DiscoveryError),
    /// A device list would not fit in one kubelet message.
    #[error(transparent)]
    TooLarge(#[from] MessageTooLarge),
}

/// What the agent discovered and will serve, ready before anything is served.
#[derive(Debug)]
pub struct Prepared {
    /// NVML, loaded.
    pub nvml: Arc<Nvml>,
    /// The GPUs, sorted by minor number, after `filterdevices`.
    pub inventory: Arc<Inventory>,
    /// One plan per resource, in [`ResourceKind::ALL`] order.
    pub plans: Vec<Arc<DevicePlan>>,
    /// The merged Volcano configuration.
    pub volcano: Arc<VolcanoConfig>,
}

/// Logs the node's operating mode: `hami-core` (the default) or `mig`, in which Allocate repartitions GPUs
/// through NVML for bracketed MIG device IDs (issue #19, `gpu::mig`). Both are served.
pub fn check_mode(volcano: &VolcanoConfig) -> Result<(), PrepareError> {
    match volcano.operating_mode {
        OperatingMode::HamiCore => {}
        OperatingMode::Mig => tracing::info!(
            "operatingmode mig: Allocate makes each GPU's MIG layout the group the scheduler chose, through NVML"
        ),
    }
    Ok(())
}

/// Loads NVML, discovers the GPUs and plans the device lists: every check that can refuse to start.
pub fn prepare(config: &AgentConfig, volcano: VolcanoConfig) -> Result<Prepared, PrepareError> {
    volcano.sharing.validate()?;
    check_mode(&volcano)?;
    let nvml = crate::gpu::nvml::init(&config.nvml_lib).map_err(|source| PrepareError::Nvml {
        lib: config.nvml_lib.clone(),
        source,
    })?;
    if let Ok(version) = nvml.sys_driver_version() {
        tracing::info!(driver = %version, lib = %config.nvml_lib.display(), "NVML initialised");
    }
    let mut inventory = discover(&nvml, &config.sysfs_root)?;
    apply_filter(&mut inventory, &volcano.filter);
    if inventory.gpus.is_empty() {
        return Err(DiscoveryError::NoGpus.into());
    }
    volcano
        .sharing
        .check_memory_factor(inventory.gpus.iter().map(|gpu| gpu.memory_mib()))?;
    for gpu in &inventory.gpus {
        tracing::info!(
            uuid = %gpu.uuid, model = %gpu.model, memory_mib = gpu.memory_mib(), minor = gpu.minor,
            numa = ?gpu.numa_node, "GPU discovered"
        );
    }
    let mut plans = Vec::new();
    for kind in ResourceKind::ALL {
        let plan =
            DevicePlan::for_mode(kind, volcano.operating_mode, &inventory, &volcano.sharing)?;
        tracing::info!(
            resource = volcano.resources.get(kind), ids = plan.total(), id_style = ?plan.style,
            max_message_bytes = plan.max_message_bytes, "device list planned"
        );
        plans.push(Arc::new(plan));
    }
    Ok(Prepared {
        nvml: Arc::new(nvml),
        inventory: Arc::new(inventory),
        plans,
        volcano: Arc::new(volcano),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_mode_is_accepted_and_hami_core_stays_the_default() {
        assert_eq!(
            VolcanoConfig::default().operating_mode,
            OperatingMode::HamiCore
        );
        assert!(check_mode(&VolcanoConfig::default()).is_ok());
        let mig = VolcanoConfig {
            operating_mode: OperatingMode::Mig,
            ..VolcanoConfig::default()
        };
        assert!(check_mode(&mig).is_ok());
    }
}
