//! Every allocation family, driven from C (`tests/c/families.c`, linked against the gpu-sim fake
//! driver: one A100 80GB, 300 MiB contexts) under `LD_PRELOAD=libvgpu.so` with a 1 GiB cap:
//! each is refused with `CUDA_ERROR_OUT_OF_MEMORY` exactly when the next object would pass the cap
//! (the primary context's 300 MiB included), the container's usage while holding them is what
//! was charged, and every free (or destroy/release) gives it back. Host-located `cuMemCreate`
//! is not charged at all. VMM memory stays charged while the driver keeps it: mapped after its
//! handle was released, or held by the creation's reference after NCCL's retain/release/unmap.

#![allow(clippy::unwrap_used)]

mod common;

use common::{compile, libvgpu};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const CAP: u64 = 1 << 30;
/// gpu-sim's default `cuda_context_mib`: what the limiter measures and charges per context.
const CTX: u64 = 300 * MIB;
const OBJ: u64 = 64 * MIB;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    count: u64,
    rc: i32,
    before: u64,
    held: u64,
    after: u64,
    freed: u64,
}

fn program(dir: &Path) -> PathBuf {
    let lib_dir = gpu_sim::cuda_library()
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let include = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/gpu-sim/csrc")
        .to_string_lossy()
        .into_owned();
    compile(dir, "families", &["-I", &include, "-L", &lib_dir, "-lcuda"])
}

fn run_family(prog: &Path, family: &str) -> Outcome {
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap();
    let (k, v) = gpu_sim::library_path_env();
    let out = Command::new(prog)
        .arg(family)
        .envs(node.env())
        .env(k, v)
        .env("CUDA_DEVICE_MEMORY_LIMIT", "1g")
        .env(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            node.dir().join("cudevshr.cache"),
        )
        .env("LD_PRELOAD", libvgpu())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{family}: {out:?}");
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&family), "{stdout}");
    let num = |key: &str| -> u64 {
        let i = fields
            .iter()
            .position(|f| *f == key)
            .unwrap_or_else(|| panic!("{stdout}"));
        fields[i + 1].parse().unwrap()
    };
    Outcome {
        count: num("count"),
        rc: num("rc") as i32,
        before: num("before"),
        held: num("held"),
        after: num("after"),
        freed: num("freed"),
    }
}

/// `family` makes objects charged `each` bytes: as many as fit next to the context, then OOM.
fn refused_at_the_cap_and_credited(prog: &Path, family: &str, each: u64) {
    let o = run_family(prog, family);
    let fit = (CAP - CTX) / each;
    assert_eq!(
        o,
        Outcome {
            count: fit,
            rc: 2,
            before: CTX,
            held: CTX + fit * each,
            after: CTX,
            freed: fit,
        },
        "{family}"
    );
}

#[test]
fn every_allocation_family_is_refused_at_the_cap_and_credited_on_free() {
    let dir = tempfile::tempdir().unwrap();
    let prog = program(dir.path());
    for family in [
        "array",
        "array_v1",
        "array3d",
        "array3d_v1",
        "pitch",
        "pitch_v1",
        "managed",
        "async",
        "async_ptsz",
        "pool",
        "pool_ptsz",
        "vmm_device",
        // Released while mapped (the samples' pattern), and NCCL's retain/release/unmap: charged
        // until the driver frees the memory, i.e. the last unmap or the last release.
        "vmm_mapped",
        "vmm_retained",
    ] {
        refused_at_the_cap_and_credited(&prog, family, OBJ);
    }
    // Two levels: 4096² + 2048² floats.
    refused_at_the_cap_and_credited(&prog, "mipmap", 80 * MIB);
}

#[test]
fn contexts_are_charged_against_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    refused_at_the_cap_and_credited(&program(dir.path()), "context", CTX);
}

#[test]
fn the_primary_context_is_credited_when_its_last_reference_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_family(&program(dir.path()), "primary");
    // A created context (current) and the primary one; another retain charges nothing; the two
    // releases drop the primary context and its charge.
    assert_eq!(
        o,
        Outcome {
            count: 1,
            rc: 0,
            before: 2 * CTX,
            held: 2 * CTX,
            after: CTX,
            freed: 2,
        }
    );
}

#[test]
fn graph_memory_nodes_are_charged_until_their_graph_or_the_allocation_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let prog = program(dir.path());
    // cuGraphAddMemAllocNode, and cuMemAllocAsync during stream capture (freed in the graph or,
    // for graph_escape, after the launch with cuMemFree); graph_cross: freed by a free node of
    // another graph that never runs, both graphs destroyed (the memory lives until cuMemFree).
    for family in ["graph_node", "graph_capture", "graph_escape", "graph_cross"] {
        refused_at_the_cap_and_credited(&prog, family, OBJ);
    }
}

#[test]
fn host_located_vmm_memory_is_not_charged() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_family(&program(dir.path()), "vmm_host");
    assert_eq!(
        o,
        Outcome {
            count: 4,
            rc: 0,
            before: CTX,
            held: CTX,
            after: CTX,
            freed: 4,
        }
    );
}
