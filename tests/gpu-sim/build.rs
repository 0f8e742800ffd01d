//! Builds the fake `libnvidia-ml.so.1` (and the C-level ABI checker used by the tests) from `csrc/`.
//!
//! The library is linked as a plain shared object with the real soname, using the C compiler the `cc`
//! crate picks (honouring `CC`/`CFLAGS`), and every symbol that is not an NVML entry point is hidden.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const LIBRARY_SOURCES: &[&str] = &["sim_node.c", "nvml.c"];
const HEADERS: &[&str] = &["sim_node.h", "nvml_api.h"];
const ABI_CHECK_SOURCE: &str = "abi_check.c";

/// Flags shared by every C file: strict warnings, one C dialect.
const COMMON_FLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pthread",
];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?);
    let csrc = manifest_dir.join("csrc");

    println!("cargo:rerun-if-changed=csrc");
    for file in LIBRARY_SOURCES
        .iter()
        .chain(HEADERS)
        .chain([&ABI_CHECK_SOURCE])
    {
        println!("cargo:rerun-if-changed=csrc/{file}");
    }

    let lib_dir = out_dir.join("lib");
    let bin_dir = out_dir.join("bin");
    fs::create_dir_all(&lib_dir)?;
    fs::create_dir_all(&bin_dir)?;

    let compiler = cc::Build::new().cargo_warnings(false).try_get_compiler()?;

    // libnvidia-ml.so.1, exporting only the symbols nvml.c marks visible.
    let library = lib_dir.join("libnvidia-ml.so.1");
    let mut cmd = compiler.to_command();
    cmd.args(COMMON_FLAGS)
        .args([
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-Wl,-soname,libnvidia-ml.so.1",
            "-Wl,-z,defs",
        ])
        .args(LIBRARY_SOURCES.iter().map(|f| csrc.join(f)))
        .arg("-o")
        .arg(&library);
    run(cmd, "libnvidia-ml.so.1")?;

    // The unversioned development name, as the driver packages install it.
    let dev_link = lib_dir.join("libnvidia-ml.so");
    match fs::remove_file(&dev_link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    std::os::unix::fs::symlink("libnvidia-ml.so.1", &dev_link)?;

    // The raw-ABI checker, a separate program so it can dlopen the library with its own environment.
    let abi_check = bin_dir.join("nvml-abi-check");
    let mut cmd = compiler.to_command();
    cmd.args(COMMON_FLAGS)
        .arg(csrc.join(ABI_CHECK_SOURCE))
        .arg("-o")
        .arg(&abi_check)
        .arg("-ldl");
    run(cmd, "nvml-abi-check")?;

    println!("cargo:rustc-env=GPU_SIM_NVML_LIB={}", path_str(&library)?);
    println!(
        "cargo:rustc-env=GPU_SIM_NVML_ABI_CHECK={}",
        path_str(&abi_check)?
    );
    Ok(())
}

fn run(mut cmd: Command, what: &str) -> Result<(), Box<dyn Error>> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run the C compiler for {what}: {e} ({cmd:?})"))?;
    if !status.success() {
        return Err(format!("building {what} failed ({status}): {cmd:?}").into());
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str, Box<dyn Error>> {
    path.to_str()
        .ok_or_else(|| format!("OUT_DIR path is not UTF-8: {}", path.display()).into())
}
