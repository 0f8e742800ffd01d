//! The Rust layout against the golden vectors and against a C compiler's view of HAMi-core's structs.

mod common;

use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

use vgpu_region::layout::{self, DeviceMemory, DeviceUtil, ProcSlot, SharedRegion, v0};

/// Every v1.2 size and offset, named as in `shared_region_layout_c` (plus a few the vectors do not list).
fn rust_v1_layout() -> BTreeMap<String, usize> {
    let entries: &[(&str, usize)] = &[
        ("sizeof_shared_region", size_of::<SharedRegion>()),
        ("sizeof_proc_slot", size_of::<ProcSlot>()),
        ("sizeof_sem_t", size_of::<layout::SemBytes>()),
        ("sizeof_device_memory", size_of::<DeviceMemory>()),
        ("sizeof_device_util", size_of::<DeviceUtil>()),
        ("alignof_shared_region", align_of::<SharedRegion>()),
        (
            "initialized_flag",
            offset_of!(SharedRegion, initialized_flag),
        ),
        ("major_version", offset_of!(SharedRegion, major_version)),
        ("minor_version", offset_of!(SharedRegion, minor_version)),
        ("sm_init_flag", offset_of!(SharedRegion, sm_init_flag)),
        ("owner_pid", offset_of!(SharedRegion, owner_pid)),
        ("sem", offset_of!(SharedRegion, sem)),
        ("device_num", offset_of!(SharedRegion, device_num)),
        ("uuids", offset_of!(SharedRegion, uuids)),
        ("limit", offset_of!(SharedRegion, limit)),
        ("sm_limit", offset_of!(SharedRegion, sm_limit)),
        ("procs", offset_of!(SharedRegion, procs)),
        ("proc_num", offset_of!(SharedRegion, proc_num)),
        (
            "utilization_switch",
            offset_of!(SharedRegion, utilization_switch),
        ),
        ("recent_kernel", offset_of!(SharedRegion, recent_kernel)),
        ("priority", offset_of!(SharedRegion, priority)),
        (
            "last_kernel_time",
            offset_of!(SharedRegion, last_kernel_time),
        ),
        ("sem_postinit", offset_of!(SharedRegion, sem_postinit)),
        ("slot.pid", offset_of!(ProcSlot, pid)),
        ("slot.hostpid", offset_of!(ProcSlot, hostpid)),
        ("slot.used", offset_of!(ProcSlot, used)),
        ("slot.monitorused", offset_of!(ProcSlot, monitorused)),
        ("slot.device_util", offset_of!(ProcSlot, device_util)),
        ("slot.status", offset_of!(ProcSlot, status)),
        ("slot.seqlock", offset_of!(ProcSlot, seqlock)),
        ("slot.unused", offset_of!(ProcSlot, unused)),
        ("mem.context_size", offset_of!(DeviceMemory, context_size)),
        ("mem.module_size", offset_of!(DeviceMemory, module_size)),
        ("mem.data_size", offset_of!(DeviceMemory, data_size)),
        ("mem.offset", offset_of!(DeviceMemory, offset)),
        ("mem.total", offset_of!(DeviceMemory, total)),
        ("mem.unused", offset_of!(DeviceMemory, unused)),
        ("util.dec_util", offset_of!(DeviceUtil, dec_util)),
        ("util.enc_util", offset_of!(DeviceUtil, enc_util)),
        ("util.sm_util", offset_of!(DeviceUtil, sm_util)),
        ("util.unused", offset_of!(DeviceUtil, unused)),
    ];
    entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn rust_v0_layout() -> BTreeMap<String, usize> {
    let entries: &[(&str, usize)] = &[
        ("sizeof_shared_region", size_of::<v0::SharedRegion>()),
        ("sizeof_proc_slot", size_of::<v0::ProcSlot>()),
        (
            "initialized_flag",
            offset_of!(v0::SharedRegion, initialized_flag),
        ),
        ("sm_init_flag", offset_of!(v0::SharedRegion, sm_init_flag)),
        ("owner_pid", offset_of!(v0::SharedRegion, owner_pid)),
        ("sem", offset_of!(v0::SharedRegion, sem)),
        ("num", offset_of!(v0::SharedRegion, num)),
        ("uuids", offset_of!(v0::SharedRegion, uuids)),
        ("limit", offset_of!(v0::SharedRegion, limit)),
        ("sm_limit", offset_of!(v0::SharedRegion, sm_limit)),
        ("procs", offset_of!(v0::SharedRegion, procs)),
        ("proc_num", offset_of!(v0::SharedRegion, proc_num)),
        (
            "utilization_switch",
            offset_of!(v0::SharedRegion, utilization_switch),
        ),
        ("recent_kernel", offset_of!(v0::SharedRegion, recent_kernel)),
        ("priority", offset_of!(v0::SharedRegion, priority)),
        ("slot.used", offset_of!(v0::ProcSlot, used)),
        ("slot.monitorused", offset_of!(v0::ProcSlot, monitorused)),
        ("slot.device_util", offset_of!(v0::ProcSlot, device_util)),
        ("slot.status", offset_of!(v0::ProcSlot, status)),
    ];
    entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Compares every integer entry of a vector table with `ours`, mapping vector names through `rename`.
fn compare(
    table: &str,
    vectors: &common::Json,
    ours: &BTreeMap<String, usize>,
    rename: fn(&str) -> Option<&str>,
) {
    let map = vectors
        .as_object()
        .unwrap_or_else(|| panic!("{table} is not an object"));
    let mut checked = 0;
    for (name, value) in map {
        let Some(expected) = value.as_i64() else {
            continue;
        };
        let Some(key) = rename(name) else { continue };
        let actual = ours
            .get(key)
            .unwrap_or_else(|| panic!("{table}: no Rust counterpart for {name:?}"));
        assert_eq!(*actual as i64, expected, "{table}: {name}");
        checked += 1;
    }
    assert!(checked >= 15, "{table}: only {checked} entries compared");
}

#[test]
fn v1_layout_matches_c_vectors() {
    let v = common::load_vectors();
    let table = v
        .get("shared_region_layout_c")
        .and_then(|t| t.get("hami_core_c_v1_2"))
        .expect("vector table");
    compare(
        "shared_region_layout_c",
        table,
        &rust_v1_layout(),
        |name| match name {
            "file_size_written_by_hami_core" => None,
            other => Some(other),
        },
    );
    let file_size = table
        .get("file_size_written_by_hami_core")
        .and_then(common::Json::as_i64);
    assert_eq!(file_size, Some(layout::REGION_FILE_SIZE as i64));
}

#[test]
fn v1_layout_matches_go_mirror_vectors() {
    let v = common::load_vectors();
    let table = v
        .get("shared_region_layout_go_mirror")
        .and_then(|t| t.get("v1"))
        .expect("vector table");
    compare(
        "shared_region_layout_go_mirror.v1",
        table,
        &rust_v1_layout(),
        |name| match name {
            "num" => Some("device_num"),
            // The Go mirror declares owner_pid as u32, so its `sem` sits at 20; C (and we) put it at 24.
            "sem" => None,
            "slot.unused(seqlock+unused[2] in C)" => Some("slot.seqlock"),
            "tail_unused(sem_postinit in C)" => Some("sem_postinit"),
            other => Some(other),
        },
    );
}

#[test]
fn v0_layout_matches_go_mirror_vectors() {
    let v = common::load_vectors();
    let table = v
        .get("shared_region_layout_go_mirror")
        .and_then(|t| t.get("v0"))
        .expect("vector table");
    compare(
        "shared_region_layout_go_mirror.v0",
        table,
        &rust_v0_layout(),
        |name| Some(name),
    );
    assert_eq!(
        v0::REGION_FILE_SIZE,
        1_197_897,
        "v0 detect rule: file size == sizeof v0 + 1"
    );
}

#[test]
fn constants_match_vectors() {
    let v = common::load_vectors();
    let c = v
        .get("shared_region_constants")
        .expect("shared_region_constants");
    assert_eq!(
        c.get("magic_initialized_flag")
            .and_then(common::Json::as_i64),
        Some(i64::from(layout::MULTIPROCESS_SHARED_REGION_MAGIC_FLAG))
    );
    assert_eq!(layout::MAX_DEVICES, 16);
    assert_eq!(layout::MAX_PIDS, 1024);
    assert_eq!((layout::MAJOR_VERSION, layout::MINOR_VERSION), (1, 2));
}

#[test]
fn v1_layout_matches_a_c_compiler() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/print_layout.c");
    let exe = dir.path().join("print_layout");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?} ({e}); install cc or set CC"));
    assert!(
        out.status.success(),
        "compiling {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("run print_layout");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let ours = rust_v1_layout();
    let mut compared = 0;
    for line in text.lines() {
        let (name, value) = line.split_once(' ').expect("name value");
        let value: usize = value.parse().expect("number");
        assert_eq!(ours.get(name), Some(&value), "C says {name} = {value}");
        compared += 1;
    }
    assert_eq!(compared, ours.len(), "every Rust entry has a C counterpart");
}
