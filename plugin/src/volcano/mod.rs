//! The Volcano wire contract: the annotations the scheduler and this agent exchange, as pure codecs
//! (docs/volcano-contract.md §2–§4). Nothing here does I/O, builds protobuf or talks to Kubernetes: [`crate::handoff`] reads pods
//! and nodes, calls these functions, and writes back what they return.
//!
//! Where to start:
//! - [`node_register`]: the `volcano.sh/node-vgpu-register` inventory the scheduler places pods with.
//! - [`pod_devices`]: the `devices-to-allocate` / `vgpu-ids-new` encoding, a strict decoder and the queue
//!   operations the Go plugin performs on it.
//! - [`mig`]: dynamic MIG: the `knownMigGeometries` model and its upstream defaults, the bracketed device IDs
//!   `GPU-<uuid>[<group>-<position>]` and the template they name.
//! - [`handshake`]: the legacy `volcano.sh/node-vgpu-handshake` heartbeat of Volcano ≤ v1.15.0.
//!
//! Every malformed annotation becomes one [`AnnotationError`] naming the annotation, where in it, the offending
//! text and what was expected, so the agent can log one line and keep serving other pods.

pub mod handshake;
pub mod mig;
pub mod node_register;
pub mod pod_devices;

/// Node annotation: the GPU inventory (docs/volcano-contract.md §2.1).
pub const NODE_REGISTER: &str = "volcano.sh/node-vgpu-register";
/// Node annotation: the legacy liveness handshake (docs/volcano-contract.md §2.3).
pub const NODE_HANDSHAKE: &str = "volcano.sh/node-vgpu-handshake";
/// Node annotation: the scheduler's optional node lock, literally without a prefix (docs/volcano-contract.md §2.2).
pub const NODE_LOCK: &str = "hamivgpu";
/// Pod annotation: the node the scheduler bound the pod's vGPUs on.
pub const VGPU_NODE: &str = "volcano.sh/vgpu-node";
/// Pod annotation: bind time in Unix seconds, the order pending pods are served in; MaxUint64 once done.
pub const VGPU_TIME: &str = "volcano.sh/vgpu-time";
/// Pod annotation: the permanent record of the pod's devices, which the scheduler re-reads for accounting.
pub const VGPU_IDS_NEW: &str = "volcano.sh/vgpu-ids-new";
/// Pod annotation: the work queue the agent consumes, one `;` segment per vGPU container.
pub const DEVICES_TO_ALLOCATE: &str = "volcano.sh/devices-to-allocate";
/// Pod annotation: `allocating` from the scheduler, then `success` or `failed` from the agent.
pub const BIND_PHASE: &str = "volcano.sh/bind-phase";
/// Pod annotation: bind time in Unix seconds (informational in Volcano).
pub const BIND_TIME: &str = "volcano.sh/bind-time";
/// `bind-phase` while the scheduler waits for the agent.
pub const PHASE_ALLOCATING: &str = "allocating";
/// `bind-phase` once every container got its devices.
pub const PHASE_SUCCESS: &str = "success";
/// `bind-phase` after an allocation the agent could not complete.
pub const PHASE_FAILED: &str = "failed";
/// `vgpu-time` of a pod the agent is done with (Go's `math.MaxUint64`), so it never sorts first again.
pub const VGPU_TIME_DONE: &str = "18446744073709551615";
/// The request type in every device record the scheduler writes (not the card model).
pub const DEVICE_TYPE_NVIDIA: &str = "NVIDIA";

/// How much of an offending value an error repeats: enough to recognise it, not a 64 KiB log line.
const QUOTED_CHARS: usize = 64;

/// A malformed annotation: which one, where in it, the offending text, and the form that was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}, {position}: {value:?} is not {expected}")]
pub struct AnnotationError {
    /// The annotation key, e.g. `volcano.sh/devices-to-allocate`.
    pub annotation: &'static str,
    /// Where in the value: `whole value`, `segment 1, record 0, field 2 (used memory)`, …
    pub position: String,
    /// The offending text, cut to about 64 characters.
    pub value: String,
    /// What would have been accepted, worded to follow "is not".
    pub expected: &'static str,
}

impl AnnotationError {
    /// Builds the error, cutting `value` so a huge annotation cannot flood the log.
    pub fn new(
        annotation: &'static str,
        position: impl Into<String>,
        value: &str,
        expected: &'static str,
    ) -> Self {
        Self {
            annotation,
            position: position.into(),
            value: quote(value),
            expected,
        }
    }
}

/// The first [`QUOTED_CHARS`] characters of `value`, with `…` when it was longer.
pub(crate) fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_annotation_position_value_and_expectation() {
        let err = AnnotationError::new(
            DEVICES_TO_ALLOCATE,
            "segment 0, record 0, field 2 (used memory)",
            "-1",
            "a decimal number",
        );
        assert_eq!(
            err.to_string(),
            "annotation volcano.sh/devices-to-allocate, segment 0, record 0, field 2 (used memory): \"-1\" is not \
             a decimal number"
        );
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(1000);
        let err = AnnotationError::new(DEVICES_TO_ALLOCATE, "whole value", &long, "short");
        assert_eq!(err.value.chars().count(), QUOTED_CHARS + 1);
        assert!(err.value.ends_with('…'));
        let short = AnnotationError::new(DEVICES_TO_ALLOCATE, "whole value", "abc", "short");
        assert_eq!(short.value, "abc");
        let exact = "x".repeat(QUOTED_CHARS);
        assert_eq!(quote(&exact), exact);
    }
}
