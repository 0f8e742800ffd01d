//! `libvgpu.so`: a drop-in replacement for HAMi-core's library, preloaded into every process of a
//! GPU container, intercepting the CUDA driver API and NVML to cap the container's GPU memory.
//!
//! # What this crate owns, and where to start
//!
//! * [`table`] — THE list of intercepted entry points. One macro row per function defines the
//!   exported hook, its lazily resolved real function, and its `cuGetProcAddress` facts.
//! * [`hooks`] — the bodies: [`hooks::memory`] (allocation/free, the enforcement seam),
//!   [`hooks::meminfo`] and [`hooks::nvml`] (virtualised totals), [`hooks::procaddr`]
//!   (`cuGetProcAddress`), [`hooks::launch`] (the hot path), [`hooks::init`].
//! * [`dlsym`] — our `dlsym`, for programs that `dlopen` the driver.
//! * [`budget`] — the per-device budget behind a trait, kept in the container's shared region.
//! * [`real`] — the real `dlsym`, the driver libraries, atomic symbol slots.
//! * [`state`], [`config`], [`devices`], [`log`], [`guard`] — lazy init, environment, device
//!   mapping, stderr diagnostics (refusals rate-limited), panic containment and the re-entry flag.
//! * [`sync`] — one-time initialisation and a spin lock that a fork child takes over and a
//!   re-entering thread is told about (never `std::sync` in code a forked child may run).
//!
//! # Rules this library keeps (it runs inside every process of the container)
//!
//! Nothing happens at load time: no constructor, no thread, no file, no output. The first CUDA or
//! NVML call initialises lazily. Real functions live in `AtomicUsize` slots (0 = not yet,
//! 1 = missing, else the address); the launch path is one atomic load. Missing `libcuda.so.1`
//! or `libnvidia-ml.so.1` makes hooks return an error code, never crash. No `extern "C"` body
//! can unwind. Only CUDA/NVML names and `dlsym` are exported. A hook entered again on the same thread
//! (a driver calling back) forwards to the real function; `fork()` at any moment leaves a child
//! whose first call initialises afresh ([`sync`]).

pub(crate) mod budget;
pub(crate) mod config;
pub(crate) mod devices;
pub(crate) mod dlsym;
pub(crate) mod ffi;
pub(crate) mod guard;
pub(crate) mod hooks;
pub(crate) mod log;
pub(crate) mod real;
pub(crate) mod sm;
pub(crate) mod state;
pub(crate) mod sync;
pub(crate) mod table;
