//! What the limiter's benchmarks share: the release `libvgpu.so` they preload and the C programs they
//! time, compiled against the gpu-sim's fake driver. Each example uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

mod needed;
#[allow(unused_imports)] // each user takes a subset
pub use needed::needed;

/// The workspace's `target/` (the example runs from `target/<profile>/examples/<name>`).
pub fn workspace_target() -> PathBuf {
    std::env::current_exe()
        .expect("current_exe")
        .ancestors()
        .nth(3)
        .expect("target directory")
        .to_path_buf()
}

/// The library to measure: `VGPU_BENCH_LIB` if set, else this tree's release build.
pub fn bench_library() -> PathBuf {
    std::env::var_os("VGPU_BENCH_LIB")
        .map_or_else(|| build_libvgpu(&workspace_target()), Into::into)
}

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
    let lib_dir = gpu_sim::cuda_library().parent().expect("fake driver dir");
    let mut extra = vec!["-L".into(), lib_dir.as_os_str().to_owned()];
    extra.extend(["-lcuda".into(), "-ldl".into()]);
    cc(dir, src, name, &extra)
}

/// Compiles `src` (relative to the limiter's directory) with `cc -O2`, linking nothing else, into
/// `dir/name`.
pub fn compile_plain(dir: &Path, src: &str, name: &str) -> PathBuf {
    cc(dir, src, name, &[])
}

fn cc(dir: &Path, src: &str, name: &str, extra: &[std::ffi::OsString]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let out = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-std=gnu11", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .args(extra)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {} failed", src.display());
    out
}
