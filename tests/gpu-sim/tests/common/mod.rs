//! What the gpu-sim's integration tests share: building a C test program against the fake libraries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles `ctests/<source>` (with the fakes' headers from `csrc/` and `ctests/`, warnings as errors, plus
/// `flags`) into `<name>` in this test process's own directory, linked with `libs` against the fake libraries'
/// directory. Panics with the compiler's output if it fails: a test program that does not build is a test failure.
pub fn compile_ctest(source: &str, name: &str, flags: &[&str], libs: &[&str]) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gpu-sim-ctests-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("create the C tests' directory");
    let exe = out.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let output = Command::new(&cc)
        .args(["-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror"])
        .args(flags)
        .arg("-I")
        .arg(crate_dir.join("csrc"))
        .arg("-I")
        .arg(crate_dir.join("ctests"))
        .arg(crate_dir.join("ctests").join(source))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(gpu_sim::nvml_library_dir())
        .args(libs)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        output.status.success(),
        "compiling {source} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}
