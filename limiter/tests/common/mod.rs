//! Shared helpers: find the built `libvgpu.so`, compile the C programs in `tests/c/`, run them
//! with and without the preload.
//!
//! Finding the cdylib: Cargo builds a package's library target before its integration tests, and
//! that includes a cdylib-only library; the file lands in `target/<profile>/deps/libvgpu.so` and is
//! copied ("uplifted") to `target/<profile>/libvgpu.so`. The test executable lives in
//! `target/<profile>/deps/`, so both are found relative to `std::env::current_exe()` — no second
//! cargo invocation, no lock. `VGPU_TEST_LIBRARY` overrides the path.

#![allow(dead_code)] // each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `libvgpu.so` built for this test run.
///
/// `VGPU_TEST_LIBRARY=<path>` tests another build instead (e.g. the glibc-2.17 one from
/// `limiter/build-portable.sh`).
pub fn libvgpu() -> PathBuf {
    if let Some(path) = std::env::var_os("VGPU_TEST_LIBRARY") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    for candidate in [
        deps.join("libvgpu.so"),
        deps.parent().expect("profile dir").join("libvgpu.so"),
    ] {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "libvgpu.so not found next to {} — run the tests with `cargo test -p vgpu-limiter`, which builds it",
        exe.display()
    );
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
