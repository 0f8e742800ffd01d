//! Shared helpers: find the built `libvgpu.so`, compile the C programs in `tests/c/`, run them
//! with and without the preload.
//!
//! Finding the cdylib: `cargo test` does not build a cdylib-only library for the package's
//! integration tests (nothing can link it), so the first test that needs `libvgpu.so` builds it
//! with a nested `cargo build -p vgpu-limiter` into its own target directory
//! (`target/limiter-cdylib`, so the outer cargo's lock on `target/` is never waited for). Cargo is
//! incremental, so later calls cost a fraction of a second and the library always matches the
//! sources under test. `VGPU_TEST_LIBRARY` overrides the path (e.g. the glibc-2.17 build).

#![allow(dead_code)] // each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../examples/support/needed.rs"]
mod needed;
#[allow(unused_imports)] // each user takes a subset
pub use needed::needed;

/// The `libvgpu.so` built for this test run.
///
/// `VGPU_TEST_LIBRARY=<path>` tests another build instead (e.g. the glibc-2.17 one from
/// `limiter/build-portable.sh`).
pub fn libvgpu() -> PathBuf {
    if let Some(path) = std::env::var_os("VGPU_TEST_LIBRARY") {
        return PathBuf::from(path);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_libvgpu).clone()
}

fn build_libvgpu() -> PathBuf {
    build_library(&[], "limiter-cdylib")
}

/// Builds `libvgpu.so` with `features` into `target/<dir>` (a nested `cargo build`, in the test
/// run's profile) and returns its path. A build with other features needs its own directory, or
/// each would rebuild the other's artifacts.
pub fn build_library(features: &[&str], dir: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let target = profile_dir.parent().expect("target dir").join(dir);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "vgpu-limiter",
        "--lib",
        "--target-dir",
    ])
    .arg(&target)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build -p vgpu-limiter");
    assert!(
        status.success(),
        "cargo build -p vgpu-limiter {features:?} failed"
    );
    let lib = target
        .join(if release { "release" } else { "debug" })
        .join("libvgpu.so");
    assert!(lib.is_file(), "{} missing after the build", lib.display());
    lib
}

/// Compiles `tests/c/<name>.c` into `dir` with `extra` linker arguments.
pub fn compile(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-std=gnu11", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .args(extra)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(status.success(), "compiling {} failed", src.display());
    out
}

/// What a run produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    pub stdout: String,
    pub stderr: String,
    pub code: Option<i32>,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            code: o.status.code(),
        }
    }
}

/// Runs `cmd` with a clean library environment, optionally preloading libvgpu.so.
pub fn run(mut cmd: Command, preload: bool) -> Run {
    cmd.env_remove("LD_PRELOAD");
    if preload {
        cmd.env("LD_PRELOAD", libvgpu());
    }
    cmd.output().expect("spawn").into()
}
