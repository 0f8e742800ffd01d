//! Link settings that make `libvgpu.so` cheap to load into every process of a GPU container (it is
//! in `/etc/ld.so.preload` there, so shells, `ps` and every short-lived tool pay its load cost).
//! Measured by `cargo run --release -p vgpu-limiter --example exec_bench` (README, "What it costs").
//!
//! * **No `libgcc_s.so.1`.** Rust's standard library unwinds panics with libgcc's unwinder and
//!   links it as the shared `libgcc_s.so.1`: one more library for the loader to find, map and
//!   relocate at every exec (about 110 µs on our test machine, more than everything else together).
//!   We link the same unwinder statically from GCC's `libgcc_eh.a`, so `catch_unwind` around
//!   every export keeps working. Its symbols stay private: the cdylib's version script exports
//!   only the hooks, so a C++ program's own `libgcc_s` is never interposed. Builds whose linker is
//!   zig (`limiter/build-portable.sh`) already link zig's own unwinder statically and are left
//!   alone (their unwinder's `pthread_rwlock_*` and `dladdr` are defined by the library itself,
//!   `src/infra/unwind_lock.rs`, cfg `vgpu_zig_unwinder`, so that the post-link edit
//!   `limiter/elf-unneed` can drop `libpthread.so.0` and `libdl.so.2`); where no `libgcc_eh.a`
//!   is found the build falls back to `libgcc_s` with a warning.
//! * **`-Bsymbolic-functions`.** The function table (`src/driver/functions.rs`) holds the address
//!   of every hook, which `dlsym` and `cuGetProcAddress` hand out. Without this flag each of those
//!   ~58 addresses is a symbol lookup through every loaded library at every exec; with it the
//!   linker binds our own functions to our own definitions, which is also what the table means
//!   (our hook, not an equally named function of some other object). zig's linker wrapper does
//!   not take `-Bsymbolic-functions`; it gets `-Bsymbolic`, the same here since every symbol the
//!   library exports is a function.
//!
//! Full RELRO and `BIND_NOW` stay: Rust calls imported functions through the GOT (`-Z plt=no` is
//! the x86_64 default), so those relocations are resolved at load time whatever the binding mode;
//! lazy binding would only leave the GOT writable for no measurable gain.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    println!("cargo::rustc-check-cfg=cfg(vgpu_zig_unwinder)");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" {
        return;
    }
    if linker_is_zig() {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
        // zig's libunwind: its lock and `dladdr` come from `src/infra/unwind_lock.rs`.
        println!("cargo:rustc-cfg=vgpu_zig_unwinder");
        return;
    }
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic-functions");
    if env != "gnu" {
        return;
    }
    // No C start files (crti/crtn, crtbeginS/crtendS): Rust runs its constructors from
    // `.init_array`; what crtbeginS adds is a `frame_dummy` constructor that registers `.eh_frame`
    // with the unwinder at every load (and deregisters it at every exit), paging in the unwind
    // tables of a library almost no process ever unwinds. libgcc's unwinder finds them without
    // registration (`dl_iterate_phdr` + `PT_GNU_EH_FRAME`, as zig's does); `tests/panic_probe.rs`
    // proves a panic is still caught. ~3 µs and ~64 KiB resident less per exec (`exec_bench`).
    // Without crtbeginS there is no `__dso_handle`: the weak references to it (std's thread-local
    // destructors, `atexit`) pass NULL to glibc, which then ties those handlers to no object —
    // right for a library that is never unloaded.
    println!("cargo:rustc-cdylib-link-arg=-nostartfiles");
    match static_unwinder() {
        Some(dir) => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-lib=static=gcc_eh");
        }
        None => println!(
            "cargo:warning=libgcc_eh.a not found (`$CC -print-file-name=libgcc_eh.a`): \
             libvgpu.so will need libgcc_s.so.1, which costs every process start"
        ),
    }
}

/// cargo-zigbuild points the target's linker at a `zigcc-…` wrapper script.
fn linker_is_zig() -> bool {
    std::env::var("RUSTC_LINKER").is_ok_and(|l| l.contains("zig"))
}

/// The directory of the C compiler's static unwinder, `libgcc_eh.a`, if it has one.
fn static_unwinder() -> Option<PathBuf> {
    // `CC` may carry a wrapper and flags ("ccache gcc -m64"): the first word runs the rest.
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let mut words = cc.split_whitespace();
    let out = Command::new(words.next().unwrap_or("cc"))
        .args(words)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // GCC prints the bare name back when it has no such file.
    if path.is_absolute() && path.is_file() {
        path.parent().map(PathBuf::from)
    } else {
        None
    }
}
