//! Every compute process on a GPU and the device memory NVML says it holds
//! (`nvmlDeviceGetComputeRunningProcesses_v3`), for the memory backstop.
//!
//! Drivers before R470 lack `_v3`: a missing symbol (nvml-wrapper's `FailedToLoadSymbol`, or
//! `NVML_ERROR_FUNCTION_NOT_FOUND` from a driver that exports a stub) moves the [`Lister`] to `_v2` for good,
//! so an old driver costs one failed call, not one per round. Drivers before R450 (no `_v2`) are not
//! supported: nvml-wrapper loads the unversioned v1 function but does not wrap it, and calling it would take
//! unsafe code, which the workspace forbids; such a GPU's listing fails every round (logged rate-limited by
//! the backstop). Any other error is the GPU's for this round ([`ProcessError`]).
//!
//! PIDs are host PIDs: NVML reports them in the PID namespace of the driver, i.e. the host's, whichever
//! namespace the process itself runs in. On a MIG-enabled GPU NVML answers for the parent device with aggregate
//! information only (and only to a privileged caller); per-process memory needs the MIG device handles, which
//! are not queried here. An entry whose `usedGpuMemory` is "not available" comes back with `used_bytes: None`:
//! the backstop counts the process but adds nothing for it.

use nvml_wrapper::Device;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

/// One process with a compute context on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    /// Its PID on the host.
    pub pid: u32,
    /// Device memory it holds, when NVML can say.
    pub used_bytes: Option<u64>,
}

/// Which `nvmlDeviceGetComputeRunningProcesses` the lister calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiVersion {
    /// `_v2` (R450+, with the MIG instance IDs).
    V2,
    /// `_v3` (R470+).
    V3,
}

impl ApiVersion {
    /// The version to try after `self` failed with `error`; `None`: the error is not about the version (or
    /// there is nothing older), so it is the GPU's error.
    pub fn fallback(self, error: &NvmlError) -> Option<ApiVersion> {
        if !matches!(
            error,
            NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound
        ) {
            return None;
        }
        match self {
            ApiVersion::V3 => Some(ApiVersion::V2),
            ApiVersion::V2 => None,
        }
    }

    /// The NVML function's name, for logs.
    pub fn function(self) -> &'static str {
        match self {
            ApiVersion::V2 => "nvmlDeviceGetComputeRunningProcesses_v2",
            ApiVersion::V3 => "nvmlDeviceGetComputeRunningProcesses_v3",
        }
    }
}

/// Why one GPU's processes could not be listed this round.
#[derive(Debug, thiserror::Error)]
#[error("{function} failed")]
pub struct ProcessError {
    /// The function that failed.
    pub function: &'static str,
    /// NVML's error.
    #[source]
    pub source: NvmlError,
}

/// Lists compute processes, remembering which API version the driver has.
#[derive(Debug, Clone)]
pub struct Lister {
    version: ApiVersion,
}

impl Default for Lister {
    fn default() -> Self {
        Self {
            version: ApiVersion::V3,
        }
    }
}

impl Lister {
    /// The version in use (the newest the driver has, once a call found out).
    pub fn version(&self) -> ApiVersion {
        self.version
    }

    /// The compute processes on `device`, appended to `out` (cleared first). Falls back to older versions as
    /// the driver needs ([`ApiVersion::fallback`]); a fallback is logged once.
    pub fn list(
        &mut self,
        device: &Device<'_>,
        out: &mut Vec<GpuProcess>,
    ) -> Result<(), ProcessError> {
        out.clear();
        loop {
            let listed = match self.version {
                ApiVersion::V3 => device.running_compute_processes().map(|p| extend(out, p)),
                ApiVersion::V2 => device
                    .running_compute_processes_v2()
                    .map(|p| extend(out, p)),
            };
            match listed {
                Ok(()) => return Ok(()),
                Err(error) => match self.version.fallback(&error) {
                    Some(older) => {
                        tracing::info!(
                            missing = self.version.function(),
                            using = older.function(),
                            %error,
                            "the driver lacks a newer process listing; using an older one"
                        );
                        self.version = older;
                    }
                    None => {
                        return Err(ProcessError {
                            function: self.version.function(),
                            source: error,
                        });
                    }
                },
            }
        }
    }
}

fn extend(out: &mut Vec<GpuProcess>, processes: Vec<ProcessInfo>) {
    out.extend(processes.into_iter().map(|p| GpuProcess {
        pid: p.pid,
        used_bytes: match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        },
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_symbol_falls_back_one_version_at_a_time() {
        let missing = NvmlError::FailedToLoadSymbol("undefined symbol".into());
        assert_eq!(ApiVersion::V3.fallback(&missing), Some(ApiVersion::V2));
        assert_eq!(
            ApiVersion::V2.fallback(&missing),
            None,
            "v1 is not called (see list)"
        );
        assert_eq!(
            ApiVersion::V3.fallback(&NvmlError::FunctionNotFound),
            Some(ApiVersion::V2)
        );
    }

    #[test]
    fn other_errors_are_the_gpus_not_the_versions() {
        for error in [
            NvmlError::GpuLost,
            NvmlError::NotSupported,
            NvmlError::Unknown,
            NvmlError::NoPermission,
        ] {
            assert_eq!(ApiVersion::V3.fallback(&error), None, "{error:?}");
        }
    }
}
