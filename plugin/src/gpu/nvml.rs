//! Loading NVML ([`init`]), and what the agent says, and how long it waits, when NVML cannot be loaded or
//! initialised: the most common install failure ("Failed to initialize NVML: could not load NVML library").
//!
//! The diagnosis names the library tried, NVML's error, and the two usual causes in the order this error
//! makes likely: the NVIDIA driver is not installed (or its kernel module not loaded), or the agent's
//! container does not run with the NVIDIA container runtime (which is what mounts the driver's
//! `libnvidia-ml.so.1` into it), with the Docker and containerd settings to check. The agent then retries
//! with a capped exponential backoff instead of exiting, so a node whose driver is installed after the agent
//! (GPU operator, driver container) recovers without a restart and without a crash loop.

use std::path::Path;
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::InitFlags;
use nvml_wrapper::error::NvmlError;

/// Loads `lib` and initialises NVML so that a node without GPUs is reported as such by discovery rather than
/// as an opaque init failure (`NVML_INIT_FLAG_NO_GPUS`); drivers older than `nvmlInitWithFlags` get a plain
/// init.
pub fn init(lib: &Path) -> Result<Nvml, NvmlError> {
    match Nvml::builder()
        .lib_path(lib.as_os_str())
        .flags(InitFlags::NO_GPUS)
        .init()
    {
        Err(NvmlError::FailedToLoadSymbol(_)) => Nvml::builder().lib_path(lib.as_os_str()).init(),
        other => other,
    }
}

/// First retry delay.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest delay between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The next delay after `current`: doubled, capped at [`BACKOFF_MAX`].
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(BACKOFF_MAX)
}

/// A short, stable label for the metric `vgpu_agent_nvml_error{reason}`.
pub fn reason(error: &NvmlError) -> &'static str {
    match error {
        NvmlError::LibloadingError(_) => "library_not_loadable",
        NvmlError::DriverNotLoaded => "driver_not_loaded",
        NvmlError::NoPermission => "no_permission",
        NvmlError::LibRmVersionMismatch => "driver_library_mismatch",
        NvmlError::FailedToLoadSymbol(_) => "symbol_missing",
        _ => "init_failed",
    }
}

/// The one-paragraph diagnosis logged when NVML is unavailable.
pub fn diagnosis(lib: &Path, error: &NvmlError) -> String {
    let lib = lib.display();
    let what = match error {
        NvmlError::LibloadingError(e) => {
            format!("could not load the NVML library {lib} ({e})")
        }
        NvmlError::DriverNotLoaded => {
            format!("NVML ({lib}) loaded but says the NVIDIA kernel driver is not loaded")
        }
        NvmlError::LibRmVersionMismatch => format!(
            "NVML ({lib}) does not match the loaded kernel driver (driver upgraded without a reboot, or a \
             library from another driver version in the image)"
        ),
        NvmlError::NoPermission => {
            format!("NVML ({lib}) has no permission to open the GPUs (run the agent privileged)")
        }
        other => format!("NVML ({lib}) failed to initialise: {other}"),
    };
    format!(
        "cannot initialise NVML: {what}. Usual causes: (1) the NVIDIA driver is not installed or its kernel \
         module is not loaded on this node (check nvidia-smi and lsmod | grep nvidia on the host); (2) this \
         container does not run with the NVIDIA container runtime, which mounts libnvidia-ml.so.1 into it: make \
         it the default runtime (Docker: \"default-runtime\": \"nvidia\" in /etc/docker/daemon.json; containerd: \
         default_runtime_name = \"nvidia\" under [plugins.\"io.containerd.grpc.v1.cri\".containerd] in \
         /etc/containerd/config.toml) or give the DaemonSet runtimeClassName: nvidia; on nodes without the \
         runtime, mount the driver directory into the agent and point --nvml-lib (NVML_LIB) at the library"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_stops_at_a_minute() {
        let mut delay = BACKOFF_START;
        let mut seen = vec![delay.as_secs()];
        for _ in 0..8 {
            delay = next_backoff(delay);
            seen.push(delay.as_secs());
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn diagnosis_names_library_error_and_both_causes() {
        let text = diagnosis(
            Path::new("/x/libnvidia-ml.so.1"),
            &NvmlError::DriverNotLoaded,
        );
        for needle in [
            "/x/libnvidia-ml.so.1",
            "kernel driver is not loaded",
            "driver is not installed",
            "\"default-runtime\": \"nvidia\"",
            "default_runtime_name = \"nvidia\"",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
        assert_eq!(reason(&NvmlError::DriverNotLoaded), "driver_not_loaded");
        assert_eq!(reason(&NvmlError::Unknown), "init_failed");
    }
}
