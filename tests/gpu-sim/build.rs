//! Builds the fake `libnvidia-ml.so.1` and `libcuda.so.1` (and the C-level ABI checker and the
//! limiter-bypassing `gpu-sim-bypass` used by the tests) from `csrc/`.
//!
//! Each library is linked as a plain shared object with the real soname, using the C compiler the
//! `cc` crate picks (honouring `CC`/`CFLAGS`), and every symbol that is not an entry point of the
//! API it fakes is hidden. Both share the node model (`sim_node.c`) and the node-wide device state
//! (`sim_state.c`).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const LIBRARY_SOURCES: &[&str] = &["sim_node.c", "sim_state.c", "timeline.c", "nvml.c"];
const CUDA_SOURCES: &[&str] = &[
    "sim_node.c",
    "sim_state.c",
    "timeline.c",
    "cuda_procs.c",
    "cuda.c",
];
const HEADERS: &[&str] = &[
    "sim_node.h",
    "sim_state.h",
    "timeline.h",
    "nvml_api.h",
    "cuda_api.h",
    "cuda_procs.h",
];
const ABI_CHECK_SOURCE: &str = "abi_check.c";
const BYPASS_SOURCE: &str = "bypass.c";

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
        .chain(CUDA_SOURCES)
        .chain(HEADERS)
        .chain([&ABI_CHECK_SOURCE, &BYPASS_SOURCE])
    {
        println!("cargo:rerun-if-changed=csrc/{file}");
    }

    let lib_dir = out_dir.join("lib");
    let bin_dir = out_dir.join("bin");
    fs::create_dir_all(&lib_dir)?;
    fs::create_dir_all(&bin_dir)?;

    let compiler = cc::Build::new().cargo_warnings(false).try_get_compiler()?;

    // libnvidia-ml.so.1, exporting only the symbols nvml.c marks visible.
    let library = shared_library(
        &compiler,
        &csrc,
        &lib_dir,
        "libnvidia-ml.so.1",
        LIBRARY_SOURCES,
        &[],
    )?;

    // The unversioned development name, as the driver packages install it.
    dev_symlink(&lib_dir, "libnvidia-ml.so", "libnvidia-ml.so.1")?;

    // libcuda.so.1, exporting only the CUDA driver entry points cuda.c marks visible. No identical
    // code folding: every exported name keeps its own address (as in the real driver), so a caller
    // can tell which variant cuGetProcAddress handed out.
    let cuda = shared_library(
        &compiler,
        &csrc,
        &lib_dir,
        "libcuda.so.1",
        CUDA_SOURCES,
        &["-fno-ipa-icf"],
    )?;
    dev_symlink(&lib_dir, "libcuda.so", "libcuda.so.1")?;

    // The raw-ABI checker, a separate program so it can dlopen the library with its own environment.
    let abi_check = bin_dir.join("nvml-abi-check");
    let mut cmd = compiler.to_command();
    cmd.args(COMMON_FLAGS)
        .arg(csrc.join(ABI_CHECK_SOURCE))
        .arg("-o")
        .arg(&abi_check)
        .arg("-ldl");
    run(cmd, "nvml-abi-check")?;

    // A process that allocates through a libcuda it dlopens itself, bypassing any limiter.
    let bypass = bin_dir.join("gpu-sim-bypass");
    let mut cmd = compiler.to_command();
    cmd.args(COMMON_FLAGS)
        .arg(csrc.join(BYPASS_SOURCE))
        .arg("-o")
        .arg(&bypass)
        .arg("-ldl");
    run(cmd, "gpu-sim-bypass")?;

    println!("cargo:rustc-env=GPU_SIM_NVML_LIB={}", path_str(&library)?);
    println!("cargo:rustc-env=GPU_SIM_CUDA_LIB={}", path_str(&cuda)?);
    println!(
        "cargo:rustc-env=GPU_SIM_NVML_ABI_CHECK={}",
        path_str(&abi_check)?
    );
    println!("cargo:rustc-env=GPU_SIM_BYPASS={}", path_str(&bypass)?);
    Ok(())
}

/// Links `lib_dir/soname` from `sources` (in `csrc`) as a shared object with that soname, hiding
/// every symbol the sources do not mark visible.
fn shared_library(
    compiler: &cc::Tool,
    csrc: &Path,
    lib_dir: &Path,
    soname: &str,
    sources: &[&str],
    extra_flags: &[&str],
) -> Result<PathBuf, Box<dyn Error>> {
    let library = lib_dir.join(soname);
    let mut cmd = compiler.to_command();
    cmd.args(COMMON_FLAGS)
        .args(["-shared", "-fPIC", "-fvisibility=hidden"])
        .args(extra_flags)
        .arg(format!("-Wl,-soname,{soname}"))
        .arg("-Wl,-z,defs")
        .args(sources.iter().map(|f| csrc.join(f)))
        .arg("-o")
        .arg(&library);
    run(cmd, soname)?;
    Ok(library)
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

/// `dir/name -> target`, replacing an old link.
fn dev_symlink(dir: &Path, name: &str, target: &str) -> Result<(), Box<dyn Error>> {
    let link = dir.join(name);
    match fs::remove_file(&link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    std::os::unix::fs::symlink(target, &link)?;
    Ok(())
}

fn path_str(path: &Path) -> Result<&str, Box<dyn Error>> {
    path.to_str()
        .ok_or_else(|| format!("OUT_DIR path is not UTF-8: {}", path.display()).into())
}
