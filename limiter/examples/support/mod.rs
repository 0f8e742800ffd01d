//! What the limiter's benchmarks share: the release `libvgpu.so` they preload and the C programs they
//! time, compiled against the gpu-sim's fake driver. Each example uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `libvgpu.so` in release with a nested `cargo build --release -p vgpu-limiter --lib` into
/// `<workspace target>/limiter-cdylib` (its own target directory, so the outer cargo's lock is never
/// waited for) and returns its path.
pub fn build_libvgpu(workspace_target: &Path) -> PathBuf {
    let target = workspace_target.join("limiter-cdylib");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "vgpu-limiter",
            "--lib",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "cargo build --release -p vgpu-limiter failed"
    );
    target.join("release/libvgpu.so")
}

/// Compiles `src` (relative to the limiter's directory) with `cc -O2 -lcuda` against the gpu-sim's
/// fake driver into `dir/name`.
pub fn compile(dir: &Path, src: &str, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let lib_dir = gpu_sim::cuda_library().parent().expect("fake driver dir");
    let out = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-std=gnu11", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-L")
        .arg(lib_dir)
        .args(["-lcuda", "-ldl"])
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {} failed", src.display());
    out
}

/// Compiles `src` (relative to the limiter's directory) with `cc -O2`, linking nothing else, into
/// `dir/name`.
pub fn compile_plain(dir: &Path, src: &str, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let out = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-std=gnu11", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {} failed", src.display());
    out
}
