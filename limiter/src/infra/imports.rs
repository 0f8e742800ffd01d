//! Imports that may be NULL, and the one way to ask whether they are there.
//!
//! The shipped library (glibc 2.17, `limiter/build-portable.sh`) does not need `libpthread.so.0`
//! or `libdl.so.2`: a post-link edit (`limiter/elf-unneed`) makes the functions it imports from
//! them weak and has them looked up in whatever is loaded. On glibc ≥ 2.34 `libc.so.6` defines all
//! of them; on an older glibc they are bound only when the process itself loaded those libraries
//! at start (every CUDA program does: `libcuda.so.1` needs both), and are NULL otherwise (`/bin/true`,
//! a shell, a C tool linked with neither). The library is linked `BIND_NOW`, so an import NULL at
//! load stays NULL, even if the process `dlopen`s `libpthread` later.
//!
//! So before any call that reaches one of them, its address must be checked here. Rust assumes a
//! function pointer is never null and would fold `f as *const () != null` to `true`; the address
//! is passed through [`std::hint::black_box`], which the optimiser cannot see through, so the
//! check really reads the GOT entry the loader filled (or left 0).
//!
//! Which calls reach them: `dlopen`/`dlvsym` (the driver and the real `dlsym`,
//! `driver/real.rs`), `sem_init` (creating the shared region: checked where it is called, in the
//! `vgpu-region` crate, `Region::open_or_create`, which then fails and capped devices refuse
//! device memory; opening an existing region needs no `sem_init`), and a thread spawn
//! (`std::thread`: `pthread_create`, `pthread_attr_setstacksize`, `pthread_setname_np`,
//! `pthread_detach`, and the TLS-destructor key `pthread_key_*`/`pthread_setspecific`, which std
//! uses on glibc 2.17 for thread-local destructors; in this library only on a spawn's path). Fork
//! handlers use `__register_atfork` (in `libc.so.6` in every glibc), not `pthread_atfork`.
//! The remaining ones are the unwinder's (zig's LLVM libunwind, which only the glibc-2.17 build
//! links): its FDE-cache lock `pthread_rwlock_*` and `dladdr` (`unw_get_proc_name`) are defined
//! by this library itself for that build (`infra/unwind_lock.rs`), so they are not imports.
//! On a build for the host's glibc nothing is weak and every check here is `true`.

/// Whether the import `f` was bound by the dynamic loader.
#[inline]
fn bound(f: *const ()) -> bool {
    !std::hint::black_box(f).is_null()
}

/// `dlopen` and `dlvsym` (libdl before glibc 2.34): the driver libraries and the real `dlsym`.
pub(crate) fn dl() -> bool {
    bound(libc::dlopen as *const ()) && bound(libc::dlvsym as *const ())
}

/// Everything a `std::thread` spawn calls in libpthread before glibc 2.34.
pub(crate) fn threads() -> bool {
    [
        libc::pthread_create as *const (),
        libc::pthread_attr_setstacksize as *const (),
        libc::pthread_detach as *const (),
        libc::pthread_setname_np as *const (),
        libc::pthread_key_create as *const (),
        libc::pthread_key_delete as *const (),
        libc::pthread_setspecific as *const (),
    ]
    .into_iter()
    .all(bound)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_linked_normally_has_every_import() {
        // The test binary links glibc normally: nothing is weak, so every check must hold (and a
        // check that folded to a constant would hold too; the NULL side is proven by the
        // container tests on glibc 2.31, tests/sim-node/src/containers.rs).
        assert!(super::dl());
        assert!(super::threads());
    }

    #[test]
    fn a_null_address_is_not_bound() {
        assert!(!super::bound(std::ptr::null()));
        assert!(super::bound(super::dl as *const ()));
    }
}
