//! A bug in a hook is contained by the unwinder the library really links (GCC's static
//! `libgcc_eh.a` since `build.rs` stopped linking the shared `libgcc_s.so.1`): a build with the
//! test-only feature `panic-probe` panics in `cuInit(PANIC_PROBE)`; the caller must get 999, the
//! process must go on, and the cap must hold afterwards. Also: the library's load-time
//! dependencies stay libc (and, for the glibc-2.17 build, its libpthread/libdl) — every process of
//! a GPU container pays for each one at exec (README, "What it costs").

mod common;

use common::{compile, needed};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::path::PathBuf;
use std::process::Command;

/// The library built with `--features panic-probe`, in its own target directory.
fn probe_library() -> PathBuf {
    common::build_library(&["panic-probe"], "limiter-cdylib-probe")
}

#[test]
fn a_panic_in_a_hook_returns_999_and_the_cap_still_holds() {
    let lib = probe_library();
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).expect("sim node");
    let dir = tempfile::tempdir().expect("tempdir");
    let lib_dir = gpu_sim::cuda_library()
        .parent()
        .expect("fake driver dir")
        .to_string_lossy()
        .into_owned();
    let prog = compile(dir.path(), "panic_probe", &["-L", &lib_dir, "-lcuda"]);
    let (k, v) = gpu_sim::library_path_env();
    let out = Command::new(&prog)
        .envs(node.env())
        .env(k, v)
        .env("LD_PRELOAD", &lib)
        .env("CUDA_DEVICE_MEMORY_LIMIT", "1g")
        .env(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            node.dir().join("cudevshr.cache"),
        )
        .output()
        .expect("run panic_probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the process must survive: {stdout}{stderr}"
    );
    assert_eq!(
        stdout, "probe 999\nprobe again 999\ninit 0\nsmall 0\nover the cap 2\nfree 0\n",
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("panic probe"),
        "the panic was reported: {stderr}"
    );
    assert!(
        !needed(&lib).iter().any(|n| n.starts_with("libgcc_s")),
        "the probe build links the shared unwinder: {:?}",
        needed(&lib)
    );
}

/// Each `DT_NEEDED` library costs every exec in a GPU container a file lookup, a mapping and its
/// relocations (libgcc_s.so.1 was ~110 µs, libm.so.6 ~40 µs). glibc < 2.34 keeps `dlopen` and
/// `pthread_create` in libdl/libpthread, so the glibc-2.17 build needs those two.
#[test]
fn the_library_needs_nothing_beyond_glibc() {
    let lib = common::libvgpu();
    let needed = needed(&lib);
    let allowed = [
        "libc.so.6",
        "ld-linux-x86-64.so.2",
        "libpthread.so.0",
        "libdl.so.2",
    ];
    let extra: Vec<&String> = needed
        .iter()
        .filter(|n| !allowed.contains(&n.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "{} needs {extra:?} beyond glibc (all: {needed:?})",
        lib.display()
    );
}
