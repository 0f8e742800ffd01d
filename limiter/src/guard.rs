//! Panics never cross the C ABI.
//!
//! The code is written not to panic (no indexing without bounds, no `unwrap`); this is the
//! backstop. `catch_unwind` costs nothing on the non-panicking path, so it wraps every export,
//! including `cuLaunchKernel`. (Even without it, Rust aborts instead of unwinding out of an
//! `extern "C"` function; catching lets the application get an error code instead.)

use std::panic::{AssertUnwindSafe, catch_unwind};

#[inline(always)]
pub(crate) fn ffi<R>(on_panic: R, body: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}
