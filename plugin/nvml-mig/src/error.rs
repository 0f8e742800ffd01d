//! Typed errors: each names the GPU, the NVML function and its return code, and the profile involved.

use std::fmt;

use nvml_wrapper_sys::bindings as ffi;

/// An NVML return code (`nvmlReturn_t`), displayed with its name: `NVML_ERROR_IN_USE (19)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NvmlCode(pub u32);

impl NvmlCode {
    /// `NVML_ERROR_NOT_SUPPORTED`
    pub const NOT_SUPPORTED: Self = Self(ffi::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED);
    /// `NVML_ERROR_INVALID_ARGUMENT`
    pub const INVALID_ARGUMENT: Self = Self(ffi::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT);
    /// `NVML_ERROR_NOT_FOUND`
    pub const NOT_FOUND: Self = Self(ffi::nvmlReturn_enum_NVML_ERROR_NOT_FOUND);
    /// `NVML_ERROR_INSUFFICIENT_SIZE`
    pub const INSUFFICIENT_SIZE: Self = Self(ffi::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE);
    /// `NVML_ERROR_FUNCTION_NOT_FOUND`
    pub const FUNCTION_NOT_FOUND: Self = Self(ffi::nvmlReturn_enum_NVML_ERROR_FUNCTION_NOT_FOUND);
    /// `NVML_ERROR_IN_USE`
    pub const IN_USE: Self = Self(ffi::nvmlReturn_enum_NVML_ERROR_IN_USE);
    /// `NVML_ERROR_INSUFFICIENT_RESOURCES`
    pub const INSUFFICIENT_RESOURCES: Self =
        Self(ffi::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES);
    /// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`
    pub const ARGUMENT_VERSION_MISMATCH: Self =
        Self(ffi::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    /// `NVML_ERROR_UNKNOWN`
    pub const UNKNOWN: Self = Self(ffi::nvmlReturn_enum_NVML_ERROR_UNKNOWN);

    /// The code's name in `nvml.h`, or `None` for a value this crate does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "NVML_SUCCESS",
            1 => "NVML_ERROR_UNINITIALIZED",
            2 => "NVML_ERROR_INVALID_ARGUMENT",
            3 => "NVML_ERROR_NOT_SUPPORTED",
            4 => "NVML_ERROR_NO_PERMISSION",
            5 => "NVML_ERROR_ALREADY_INITIALIZED",
            6 => "NVML_ERROR_NOT_FOUND",
            7 => "NVML_ERROR_INSUFFICIENT_SIZE",
            8 => "NVML_ERROR_INSUFFICIENT_POWER",
            9 => "NVML_ERROR_DRIVER_NOT_LOADED",
            10 => "NVML_ERROR_TIMEOUT",
            11 => "NVML_ERROR_IRQ_ISSUE",
            12 => "NVML_ERROR_LIBRARY_NOT_FOUND",
            13 => "NVML_ERROR_FUNCTION_NOT_FOUND",
            14 => "NVML_ERROR_CORRUPTED_INFOROM",
            15 => "NVML_ERROR_GPU_IS_LOST",
            16 => "NVML_ERROR_RESET_REQUIRED",
            17 => "NVML_ERROR_OPERATING_SYSTEM",
            18 => "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
            19 => "NVML_ERROR_IN_USE",
            20 => "NVML_ERROR_MEMORY",
            21 => "NVML_ERROR_NO_DATA",
            22 => "NVML_ERROR_VGPU_ECC_NOT_SUPPORTED",
            23 => "NVML_ERROR_INSUFFICIENT_RESOURCES",
            24 => "NVML_ERROR_FREQ_NOT_SUPPORTED",
            25 => "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
            26 => "NVML_ERROR_DEPRECATED",
            27 => "NVML_ERROR_NOT_READY",
            28 => "NVML_ERROR_GPU_NOT_FOUND",
            29 => "NVML_ERROR_INVALID_STATE",
            30 => "NVML_ERROR_RESET_TYPE_NOT_SUPPORTED",
            999 => "NVML_ERROR_UNKNOWN",
            _ => return None,
        })
    }
}

impl fmt::Display for NvmlCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "NVML return code {}", self.0),
        }
    }
}

/// What is left after a failed [`apply`](crate::apply) tried to clear the GPU back to an empty layout.
#[derive(Debug)]
pub enum Rollback {
    /// Every GPU instance is gone: the GPU holds an empty layout (MIG mode stays as it is).
    Clean,
    /// Some instances could not be destroyed; `remaining` are their GPU instance ids, `errors` why.
    Incomplete {
        /// GPU instance ids still present after the rollback.
        remaining: Vec<u32>,
        /// The failures of the rollback itself.
        errors: Vec<MigError>,
    },
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::Clean => f.write_str("rolled back to an empty layout"),
            Rollback::Incomplete { remaining, errors } => {
                write!(f, "rollback INCOMPLETE: GPU instances {remaining:?} remain")?;
                for e in errors {
                    write!(f, "; {e}")?;
                }
                Ok(())
            }
        }
    }
}

/// `" (profile 3g.40gb)"` or nothing.
fn for_profile(profile: &Option<String>) -> String {
    profile
        .as_ref()
        .map(|p| format!(" (profile {p})"))
        .unwrap_or_default()
}

/// Every way a MIG operation fails. `gpu` is the parent GPU's UUID (or `index <n>` if it has none).
#[derive(Debug, thiserror::Error)]
pub enum MigError {
    /// The loaded NVML library does not export the function (a driver older than the API).
    #[error("{gpu}: {function} is not exported by the loaded NVML library{}", for_profile(.profile))]
    FunctionMissing {
        /// the parent GPU
        gpu: String,
        /// the NVML function
        function: &'static str,
        /// the profile the call was for, if any
        profile: Option<String>,
    },
    /// An NVML call failed.
    #[error("{gpu}: {function} failed with {code}{}", for_profile(.profile))]
    Nvml {
        /// the parent GPU
        gpu: String,
        /// the NVML function
        function: &'static str,
        /// the profile the call was for, if any
        profile: Option<String>,
        /// what NVML returned
        code: NvmlCode,
    },
    /// A call through nvml-wrapper failed (MIG mode, processes, MIG device handles, UUIDs, memory).
    #[error("{gpu}: {function} failed: {source}")]
    Wrapper {
        /// the parent GPU
        gpu: String,
        /// the NVML function nvml-wrapper called
        function: &'static str,
        /// nvml-wrapper's error
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// The GPU is not MIG-capable (`nvmlDeviceGetMigMode` answered `NVML_ERROR_NOT_SUPPORTED`: T4, V100).
    #[error(
        "{gpu}: MIG is not supported on this GPU ({function} returned NVML_ERROR_NOT_SUPPORTED)"
    )]
    NotSupported {
        /// the parent GPU
        gpu: String,
        /// the NVML function that said so
        function: &'static str,
    },
    /// MIG mode is off, so the GPU has no MIG layout.
    #[error("{gpu}: MIG mode is disabled")]
    MigDisabled {
        /// the parent GPU
        gpu: String,
    },
    /// A MIG mode change waits for a GPU reset (or reboot): current and pending modes differ.
    /// Nothing else was changed; reset the GPU (`nvidia-smi -r`) and apply again.
    #[error(
        "{gpu}: MIG mode change pending a GPU reset (current {}, pending {})",
        on_off(*.current),
        on_off(*.pending)
    )]
    ResetPending {
        /// the parent GPU
        gpu: String,
        /// MIG mode now
        current: bool,
        /// MIG mode after the reset
        pending: bool,
    },
    /// Processes use the GPU or one of its MIG devices: nothing is destroyed under them.
    #[error("{gpu}: in use ({detail}); MIG layout left unchanged")]
    InUse {
        /// the parent GPU
        gpu: String,
        /// who: the process ids found and where, or the NVML call that returned `NVML_ERROR_IN_USE`
        detail: String,
        /// the process ids found (empty when only NVML's `NVML_ERROR_IN_USE` told)
        pids: Vec<u32>,
    },
    /// The layout names a GPU instance profile this GPU does not have.
    #[error("{gpu}: no GPU instance profile named {profile:?} on this GPU (it has {available:?})")]
    UnknownProfile {
        /// the parent GPU
        gpu: String,
        /// the name asked for
        profile: String,
        /// the names this GPU reports
        available: Vec<String>,
    },
    /// The layout cannot be placed on the GPU: no set of non-overlapping placements NVML allows holds it.
    #[error("{gpu}: layout [{layout}] does not fit on this GPU: {reason}")]
    Impossible {
        /// the parent GPU
        gpu: String,
        /// the layout asked for
        layout: String,
        /// why
        reason: String,
    },
    /// No compute instance profile of the GPU instance uses all of its slices.
    #[error("{gpu}: GPU instance {gi} has no compute instance profile filling it{}", for_profile(.profile))]
    NoFullComputeProfile {
        /// the parent GPU
        gpu: String,
        /// the GPU instance id
        gi: u32,
        /// the GPU instance's profile
        profile: Option<String>,
    },
    /// After creation, no MIG device stands for a created compute instance.
    #[error("{gpu}: no MIG device found for GPU instance {gi} compute instance {ci}{}", for_profile(.profile))]
    MissingMigDevice {
        /// the parent GPU
        gpu: String,
        /// GPU instance id
        gi: u32,
        /// compute instance id
        ci: u32,
        /// the profile
        profile: Option<String>,
    },
    /// NVML reported something this crate cannot use (a profile name that is not UTF-8, a GI id unknown).
    #[error("{gpu}: unexpected NVML answer from {function}: {detail}")]
    Unexpected {
        /// the parent GPU
        gpu: String,
        /// the NVML function
        function: &'static str,
        /// what was wrong
        detail: String,
    },
    /// `apply` failed after it had started changing the GPU; it then tried to clear the GPU to an empty
    /// layout, and `rollback` says how far that got.
    #[error("{gpu}: applying [{layout}] failed while {step}: {cause}; {rollback}")]
    Aborted {
        /// the parent GPU
        gpu: String,
        /// the layout asked for
        layout: String,
        /// what `apply` was doing
        step: String,
        /// why it stopped
        cause: Box<MigError>,
        /// what the rollback achieved
        rollback: Box<Rollback>,
    },
}

fn on_off(b: bool) -> &'static str {
    if b { "enabled" } else { "disabled" }
}

impl MigError {
    /// True if this is [`MigError::InUse`], or an aborted apply caused by it.
    pub fn is_in_use(&self) -> bool {
        match self {
            MigError::InUse { .. } => true,
            MigError::Aborted { cause, .. } => cause.is_in_use(),
            _ => false,
        }
    }

    /// What the rollback of an aborted apply achieved.
    pub fn rollback(&self) -> Option<&Rollback> {
        match self {
            MigError::Aborted { rollback, .. } => Some(rollback),
            _ => None,
        }
    }

    /// The NVML code of a failed NVML call, if this is one.
    pub fn nvml_code(&self) -> Option<NvmlCode> {
        match self {
            MigError::Nvml { code, .. } => Some(*code),
            MigError::Aborted { cause, .. } => cause.nvml_code(),
            _ => None,
        }
    }
}
