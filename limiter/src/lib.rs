//! `libvgpu.so`: a drop-in replacement for HAMi-core's library, preloaded into every process of a
//! GPU container, intercepting the CUDA driver API and NVML to cap the container's GPU memory and
//! SM time.
//!
//! # Layers, and the one rule
//!
//! Four layers, each a directory; a file may use files of its own layer and of the layers below,
//! never above, and no two files use each other, directly or through others (no import circle):
//!
//! | layer | directory | what | may use |
//! |---|---|---|---|
//! | hooks | [`hooks`] | the exports ([`hooks::exports`], our `dlsym` in [`hooks::dlsym`]) and their bodies: [`hooks::memory`], [`hooks::context`], [`hooks::graph`], [`hooks::meminfo`], [`hooks::nvml`], [`hooks::procaddr`], [`hooks::launch`], [`hooks::init`] | policy, driver, infra |
//! | policy | [`policy`] | what the limiter decides: [`policy::state`] (lazy init), [`policy::caps`] (the environment's caps), [`policy::devices`] (ordinal → container device), [`policy::budget`] (memory, in the shared region), [`policy::sm`] (the SM cap) | driver, infra |
//! | driver | [`driver`] | [`driver::ffi`] (C types), [`driver::functions`] (THE list of driver functions), [`driver::table`] (its slots and typed accessors), [`driver::real`] (`dlopen`, the real `dlsym`) | infra |
//! | infra | [`infra`] | [`infra::sync`] (fork- and re-entry-aware once/lock), [`infra::fork`] (fork-child resets), [`infra::guard`] (panic containment, the re-entry flag), [`infra::log`], [`infra::config`] (environment parsing) | — |
//!
//! THE list ([`driver::functions`]) is one macro expanded twice: by the driver layer into the
//! real-function slots and `cuGetProcAddress` facts, by the hooks layer into the exported
//! `#[no_mangle]` functions bound to their bodies. So the driver layer never names a hook body.
//! Fork-child resets go the same way up: each module registers its own ([`infra::fork`]) at its own
//! lazy initialisation, nobody resets another module.
//!
//! # Rules this library keeps (it runs inside every process of the container)
//!
//! Nothing happens at load time: no constructor, no thread, no file, no output. The first CUDA or
//! NVML call initialises lazily. Real functions live in `AtomicUsize` slots (0 = not yet,
//! 1 = missing, else the address); the launch path is one atomic load. Missing `libcuda.so.1`
//! or `libnvidia-ml.so.1` makes hooks return an error code, never crash. No `extern "C"` body
//! can unwind. Only CUDA/NVML names and `dlsym` are exported. A hook entered again on the same thread
//! (a driver calling back) forwards to the real function; `fork()` at any moment leaves a child
//! whose first call initialises afresh ([`infra::sync`]; no `std::sync` lock or once on any path a
//! child can take).

pub(crate) mod driver;
pub(crate) mod hooks;
pub(crate) mod infra;
pub(crate) mod policy;
