//! Infrastructure: what every layer above may use; nothing here reaches upward (no file of this
//! directory names the driver, policy or hooks layers).

pub(crate) mod config;
pub(crate) mod fork;
pub(crate) mod guard;
pub(crate) mod imports;
pub(crate) mod log;
pub(crate) mod sync;
#[cfg(vgpu_zig_unwinder)]
mod unwind_lock;
