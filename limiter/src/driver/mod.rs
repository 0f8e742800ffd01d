//! The driver layer: the C types of the CUDA driver API and NVML ([`ffi`]), THE list of driver
//! functions ([`functions`]), and reaching the real functions ([`real`], [`table`]).
//!
//! Uses only the infra layer; names no hook body and no policy type.

pub(crate) mod ffi;
pub(crate) mod functions;
pub(crate) mod real;
pub(crate) mod table;
