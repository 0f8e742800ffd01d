//! A process that never touches CUDA or NVML must not notice the preload: same stdout, stderr and
//! exit code, no files, no threads, same `dlsym(RTLD_NEXT, …)` answers — and on a machine without
//! `libcuda.so.1`/`libnvidia-ml.so.1` nothing crashes.
//!
//! These tests point `LD_LIBRARY_PATH` at an empty directory, so no driver is found even if the
//! machine has one.

mod common;

use common::{compile, run};
use std::path::Path;
use std::process::Command;

/// Runs `make()` with and without the preload in a private, empty TMPDIR and checks the results
/// are identical and no file appeared.
fn same_with_and_without(make: impl Fn(&Path) -> Command) -> common::Run {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache_existed = Path::new("/tmp/cudevshr.cache").exists();
    let plain = run(make(tmp.path()), false);
    let preloaded = run(make(tmp.path()), true);
    assert_eq!(
        preloaded, plain,
        "the preload changed the program's behaviour"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("read tmp").collect();
    assert!(left.is_empty(), "files appeared in TMPDIR: {left:?}");
    if !cache_existed {
        assert!(
            !Path::new("/tmp/cudevshr.cache").exists(),
            "the shared cache was created"
        );
    }
    preloaded
}

fn isolated(program: impl AsRef<std::ffi::OsStr>, tmp: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("TMPDIR", tmp)
        .env("LD_LIBRARY_PATH", tmp) // empty: no driver libraries
        .env("CUDA_DEVICE_MEMORY_LIMIT", "1g");
    cmd
}

#[test]
fn shell_echo_is_unchanged() {
    let out = same_with_and_without(|tmp| {
        let mut c = isolated("sh", tmp);
        c.args(["-c", "echo hi"]);
        c
    });
    assert_eq!(out.stdout, "hi\n");
}

#[test]
fn python_is_unchanged() {
    assert!(
        Command::new("python3").arg("-V").output().is_ok(),
        "python3 is missing: tests/prereqs/install.sh installs it (Debian's python3)"
    );
    let out = same_with_and_without(|tmp| {
        let mut c = isolated("python3", tmp);
        c.args(["-c", "print(1)"]);
        c
    });
    assert_eq!(out.stdout, "1\n");
}

#[test]
fn rtld_next_lookups_and_thread_count_are_unchanged() {
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(bin_dir.path(), "rtld_next", &[]);
    let out = same_with_and_without(|tmp| isolated(&prog, tmp));
    assert!(out.stdout.contains("same: 1"), "{}", out.stdout);
    assert!(!out.stdout.contains("first: NULL"), "{}", out.stdout);
    assert!(out.stdout.contains("threads: 1"), "{}", out.stdout);
}

#[test]
fn fork_child_exit_code_is_unchanged() {
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(bin_dir.path(), "fork_exit", &[]);
    let out = same_with_and_without(|tmp| isolated(&prog, tmp));
    assert_eq!(out.code, Some(3));
    assert_eq!(out.stdout, "child exited 3\n");
}

#[test]
fn probing_for_a_missing_driver_is_unchanged() {
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(bin_dir.path(), "probe_driver", &[]);
    let out = same_with_and_without(|tmp| isolated(&prog, tmp));
    assert_eq!(
        out.stdout,
        "RTLD_DEFAULT cuMemAlloc_v2: NULL\nRTLD_DEFAULT cuInit: NULL\nRTLD_DEFAULT nvmlInit_v2: NULL\n\
         dlopen libcuda.so.1: absent\ndlopen libnvidia-ml.so.1: absent\n"
    );
}

#[test]
fn hooks_return_error_codes_without_a_driver() {
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(bin_dir.path(), "hooks_without_driver", &[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run(isolated(&prog, tmp.path()), true);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout, "cuInit: 3\ncuInit again: 3\ncuMemAlloc_v2: 3\nnvmlInit_v2: 12\n",
        "CUDA_ERROR_NOT_INITIALIZED / NVML_ERROR_LIBRARY_NOT_FOUND"
    );
    assert_eq!(out.stderr, "");
}

#[test]
fn malformed_limit_is_reported_once_on_first_cuda_use_only() {
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(bin_dir.path(), "hooks_without_driver", &[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cmd = isolated(&prog, tmp.path());
    cmd.env("CUDA_DEVICE_MEMORY_LIMIT", "2gb");
    let out = run(cmd, true);
    let reports: Vec<_> = out.stderr.lines().collect();
    assert_eq!(reports.len(), 1, "{}", out.stderr);
    assert!(
        reports[0].contains("CUDA_DEVICE_MEMORY_LIMIT=\"2gb\""),
        "{}",
        reports[0]
    );

    // A process that never calls CUDA says nothing, even with the malformed value.
    let mut sh = isolated("sh", tmp.path());
    sh.args(["-c", "true"])
        .env("CUDA_DEVICE_MEMORY_LIMIT", "2gb");
    assert_eq!(run(sh, true).stderr, "");
}
