//! The policy layer: what the limiter decides. Lazy initialisation ([`state`]), the environment's
//! caps ([`caps`]), the CUDA-ordinal → container-device map ([`devices`]), the memory budget in the
//! shared region ([`budget`]), and the SM cap ([`sm`]).
//!
//! Uses the driver and infra layers; never the hooks layer.

pub(crate) mod budget;
pub(crate) mod caps;
pub(crate) mod devices;
pub(crate) mod sm;
pub(crate) mod state;
