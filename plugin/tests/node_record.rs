//! The node's record wins over a hostile tenant's region: regions made with the region crate (the way the
//! limiter makes them) in a cache root laid out as Allocate lays it out, records written as Allocate writes
//! them, and the guarded feedback the agent runs, one round at a time. The agent end to end (log, metric,
//! Event, restart) is in `node_record_agent.rs`.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vgpu_device_plugin::handoff::record::{
    ContainerRecord, RecordStore, RecordedGpu, TamperKind, clamp_priority,
};
use vgpu_device_plugin::monitor::feedback::PriorityFeedback;
use vgpu_region::layout::{SharedRegion, UUID_LEN};
use vgpu_region::{Region, RegionConfig, RegionReader};

const GPU_A: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
const GPU_B: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000001";
const MIB: u64 = 1 << 20;
const NOW: u64 = 1_790_000_000;

/// One container: its record (as Allocate writes it) and its region (as the limiter creates it from the
/// environment Allocate returned).
struct Tenant {
    path: PathBuf,
    region: Region,
}

fn tenant(root: &Path, name: &str, gpu: &str, mib: u64, sm: u64, priority: i32) -> Tenant {
    let key = format!("uid-{name}_cuda");
    let record = ContainerRecord {
        namespace: "ns".into(),
        pod: format!("pod-{name}"),
        pod_uid: format!("uid-{name}"),
        container: "cuda".into(),
        cache_file: format!("{name}.cache"),
        gpus: vec![RecordedGpu {
            uuid: gpu.into(),
            memory_limit_bytes: mib * MIB,
        }],
        sm_limit_percent: sm,
        priority,
    };
    RecordStore::beside(root).write(&key, &record).unwrap();
    let dir = root.join(&key);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.cache"));
    let region = create_region(&path, gpu, mib * MIB, sm, 1);
    Tenant { path, region }
}

fn create_region(path: &Path, gpu: &str, limit: u64, sm: u64, priority: i32) -> Region {
    let mut config = RegionConfig {
        priority,
        ..RegionConfig::default()
    };
    config.limits[0] = limit;
    config.sm_limits[0] = sm;
    let region = Region::open_or_create(path, &config).unwrap();
    region.set_device_info(&[gpu]).unwrap();
    region
}

/// What a tenant does with `pwrite` to its own region file (it is mounted read-write).
fn poke(path: &Path, offset: usize, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset as u64).unwrap();
}

fn limit_at(device: usize) -> usize {
    std::mem::offset_of!(SharedRegion, limit) + 8 * device
}

fn sm_limit_at(device: usize) -> usize {
    std::mem::offset_of!(SharedRegion, sm_limit) + 8 * device
}

fn uuid_at(device: usize) -> usize {
    std::mem::offset_of!(SharedRegion, uuids) + UUID_LEN * device
}

fn uuid_bytes(uuid: &str) -> [u8; UUID_LEN] {
    let mut out = [0u8; UUID_LEN];
    out[..uuid.len()].copy_from_slice(uuid.as_bytes());
    out
}

fn snapshot(path: &Path) -> vgpu_region::RegionSnapshot {
    RegionReader::read_snapshot(path).unwrap()
}

fn guarded(root: &Path) -> PriorityFeedback {
    PriorityFeedback::new(root.to_path_buf())
        .with_activity_window(Duration::ZERO)
        .guarded()
}

fn kinds(report: &vgpu_device_plugin::monitor::feedback::RoundReport) -> Vec<TamperKind> {
    let mut kinds: Vec<TamperKind> = report.tampered.iter().map(|t| t.kind).collect();
    kinds.dedup();
    kinds
}

#[test]
fn tampered_limits_gpus_and_priority_are_written_back_and_reported_once_per_change() {
    let root = tempfile::tempdir().unwrap();
    let a = tenant(root.path(), "a", GPU_A, 3000, 30, 1);
    let mut feedback = guarded(root.path());
    let clean = feedback.round();
    assert!(
        clean.tampered.is_empty(),
        "an untouched region: {:?}",
        clean.tampered
    );

    // The tenant lifts its memory cap (0 = unlimited), its SM cap, names another GPU and claims priority −5.
    poke(&a.path, limit_at(0), &0u64.to_ne_bytes());
    poke(&a.path, sm_limit_at(0), &100u64.to_ne_bytes());
    poke(&a.path, uuid_at(0), &uuid_bytes(GPU_B));
    poke(
        &a.path,
        std::mem::offset_of!(SharedRegion, priority),
        &(-5i32).to_ne_bytes(),
    );
    let report = feedback.round();
    let found = kinds(&report);
    for kind in [TamperKind::Limits, TamperKind::Gpus, TamperKind::Priority] {
        assert!(found.contains(&kind), "{kind:?} not reported: {report:?}");
    }
    let t = &report.tampered[0];
    assert_eq!(
        (t.namespace.as_str(), t.pod.as_str(), t.container.as_str()),
        ("ns", "pod-a", "cuda")
    );
    let s = snapshot(&a.path);
    assert_eq!(s.limits[0], 3000 * MIB, "memory cap restored");
    assert_eq!(s.sm_limits[0], 30, "SM cap restored");
    assert_eq!(s.uuid(0), Some(GPU_A), "the recorded GPU restored");
    assert_eq!(s.priority, 1, "the pod's priority restored");
    assert_eq!(
        a.region.limit(0).unwrap(),
        3000 * MIB,
        "seen by the limiter's mapping too"
    );

    // Nothing changed since: nothing reported.
    assert!(feedback.round().tampered.is_empty());
    // Changed again: reported again.
    poke(&a.path, limit_at(0), &(u64::MAX).to_ne_bytes());
    let again = feedback.round();
    assert_eq!(kinds(&again), vec![TamperKind::Limits], "{again:?}");
    assert_eq!(snapshot(&a.path).limits[0], 3000 * MIB);
}

#[test]
fn a_stricter_value_the_tenant_chose_is_left_alone() {
    // The limiter repairs its region to the stricter of its environment and the region; the node never undoes
    // that (a loop of writes against the limiter would follow).
    let root = tempfile::tempdir().unwrap();
    let a = tenant(root.path(), "a", GPU_A, 3000, 30, 1);
    poke(&a.path, limit_at(0), &(1000 * MIB).to_ne_bytes());
    poke(&a.path, sm_limit_at(0), &10u64.to_ne_bytes());
    let report = guarded(root.path()).round();
    assert!(report.tampered.is_empty(), "{report:?}");
    let s = snapshot(&a.path);
    assert_eq!((s.limits[0], s.sm_limits[0]), (1000 * MIB, 10));
}

#[test]
fn records_are_kept_on_disk_so_a_fresh_monitor_enforces_them() {
    // What an agent restart amounts to for the monitor: a new feedback over the same directories.
    let root = tempfile::tempdir().unwrap();
    let a = tenant(root.path(), "a", GPU_A, 3000, 30, 1);
    drop(guarded(root.path()));
    poke(&a.path, limit_at(0), &0u64.to_ne_bytes());
    let report = guarded(root.path()).round();
    assert_eq!(kinds(&report), vec![TamperKind::Limits]);
    assert_eq!(snapshot(&a.path).limits[0], 3000 * MIB);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(RecordStore::beside(root.path()).dir())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "records are the agent's alone");
}

#[test]
fn a_hostile_priority_claim_cannot_block_or_throttle_another_containers_gpu() {
    let root = tempfile::tempdir().unwrap();
    let hostile = tenant(root.path(), "hostile", GPU_A, 1000, 0, 1);
    let victim = tenant(root.path(), "victim", GPU_B, 1000, 0, 1);
    // The tenant claims the top priority, the victim's GPU, and "launched just now" for ever.
    poke(
        &hostile.path,
        std::mem::offset_of!(SharedRegion, priority),
        &(-5i32).to_ne_bytes(),
    );
    poke(&hostile.path, uuid_at(0), &uuid_bytes(GPU_B));
    poke(
        &hostile.path,
        std::mem::offset_of!(SharedRegion, recent_kernel),
        &i32::MAX.to_ne_bytes(),
    );
    // Control: the feedback that believes regions (HAMi's monitor, and this one before the record) blocks the
    // victim on a GPU the tenant was never given.
    let _ = victim.region.record_kernel_launch(NOW);
    let believed = PriorityFeedback::new(root.path().to_path_buf())
        .with_activity_window(Duration::ZERO)
        .round();
    assert_eq!(
        believed.blocked,
        vec![victim.path.clone()],
        "the attack works on a believing monitor"
    );
    assert_eq!(victim.region.recent_kernel(), -1);
    poke(
        &victim.path,
        std::mem::offset_of!(SharedRegion, recent_kernel),
        &0i32.to_ne_bytes(),
    );

    let mut feedback = guarded(root.path());
    for round in 0..4 {
        // The tenant rewrites its claims before every round; the victim launches.
        poke(
            &hostile.path,
            std::mem::offset_of!(SharedRegion, priority),
            &(-5i32).to_ne_bytes(),
        );
        poke(&hostile.path, uuid_at(0), &uuid_bytes(GPU_B));
        let _ = victim.region.record_kernel_launch(NOW);
        let report = feedback.round();
        assert!(
            report.blocked.is_empty() && report.enforced.is_empty(),
            "round {round}: {report:?}"
        );
        assert!(
            victim.region.recent_kernel() >= 0,
            "round {round}: the victim's launches were blocked"
        );
        assert_eq!(
            victim.region.utilization_switch(),
            0,
            "round {round}: the victim, alone on its GPU, was throttled"
        );
        assert!(
            hostile.region.recent_kernel() <= 2,
            "round {round}: recent_kernel {} kept above what a launch stores",
            hostile.region.recent_kernel()
        );
        assert_eq!(hostile.region.priority(), 1, "clamped back to the pod's");
    }
    assert_eq!(clamp_priority(-5), 0);
}

#[test]
fn an_unrecorded_region_never_blocks_anyone() {
    // A region with no record (a container from before the record existed) is believed for its own GPUs only,
    // at the lowest priority.
    let root = tempfile::tempdir().unwrap();
    let victim = tenant(root.path(), "victim", GPU_A, 1000, 0, 1);
    let dir = root.path().join("uid-old_cuda");
    std::fs::create_dir_all(&dir).unwrap();
    let old = create_region(&dir.join("old.cache"), GPU_A, 0, 0, -5);
    let mut feedback = guarded(root.path());
    for _ in 0..3 {
        let _ = old.record_kernel_launch(NOW);
        let _ = victim.region.record_kernel_launch(NOW);
        let report = feedback.round();
        assert!(report.blocked.is_empty(), "{report:?}");
    }
    assert!(victim.region.recent_kernel() >= 0);
    // Both active on GPU A at one priority: both capped, as HAMi does for equals.
    assert_eq!(victim.region.utilization_switch(), 1);
}

#[test]
fn a_symlink_to_another_containers_region_is_removed_never_followed_nor_written_through() {
    let root = tempfile::tempdir().unwrap();
    let a = tenant(root.path(), "a", GPU_A, 1000, 30, 1);
    // The other container's region: no cap of its own in the file (its record is elsewhere).
    let other_dir = root.path().join("uid-b_cuda");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = other_dir.join("b.cache");
    drop(create_region(&other, GPU_B, 0, 100, 1));
    // The words a write through the link would change (the feedback's own words in that region are its
    // business: it is a region of its own).
    let words = |p: &Path| {
        let s = snapshot(p);
        (
            s.limits,
            s.sm_limits,
            s.priority,
            s.uuid(0).map(str::to_owned),
        )
    };
    let before = words(&other);
    drop(a.region);
    std::fs::remove_file(&a.path).unwrap();
    std::os::unix::fs::symlink("../uid-b_cuda/b.cache", &a.path).unwrap();

    let mut feedback = guarded(root.path());
    let report = feedback.round();
    assert!(kinds(&report).contains(&TamperKind::Symlink), "{report:?}");
    assert!(
        std::fs::symlink_metadata(&a.path).is_err(),
        "the link is gone"
    );
    assert!(
        words(&other) == before,
        "the other region's limits, GPUs or priority were written through the link"
    );
}

#[test]
fn a_truncated_region_is_reported_once_and_left_as_it_is() {
    let root = tempfile::tempdir().unwrap();
    let a = tenant(root.path(), "a", GPU_A, 1000, 30, 1);
    drop(a.region);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a.path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut feedback = guarded(root.path());
    assert_eq!(kinds(&feedback.round()), vec![TamperKind::Truncated]);
    assert_eq!(
        std::fs::metadata(&a.path).unwrap().len(),
        4096,
        "never extended"
    );
    assert!(
        feedback.round().tampered.is_empty(),
        "reported once, not every round"
    );
}

#[test]
fn a_deleted_region_is_reported_once_and_its_successor_capped_again() {
    let root = tempfile::tempdir().unwrap();
    let a = tenant(root.path(), "a", GPU_A, 1000, 30, 1);
    let mut feedback = guarded(root.path());
    assert!(feedback.round().tampered.is_empty());
    drop(a.region);
    std::fs::remove_file(&a.path).unwrap();
    assert_eq!(kinds(&feedback.round()), vec![TamperKind::Deleted]);
    assert!(feedback.round().tampered.is_empty(), "reported once");
    // A new process creates the region again, from a tampered environment (no cap).
    let again = create_region(&a.path, GPU_A, 0, 100, 1);
    let report = feedback.round();
    let found = kinds(&report);
    assert!(
        found.contains(&TamperKind::Replaced) && found.contains(&TamperKind::Limits),
        "{report:?}"
    );
    assert_eq!(again.limit(0).unwrap(), 1000 * MIB);
    assert_eq!(again.sm_limit(0).unwrap(), 30);
}

#[test]
fn only_the_recorded_region_file_counts_not_the_newest() {
    // Without a record the feedback takes a directory's newest `*.cache`; with one, a tenant dropping a newer
    // file that names another GPU changes nothing.
    let root = tempfile::tempdir().unwrap();
    let a = tenant(root.path(), "a", GPU_A, 1000, 0, 1);
    let victim = tenant(root.path(), "victim", GPU_B, 1000, 0, 1);
    std::thread::sleep(Duration::from_millis(20));
    let decoy = create_region(&a.path.with_file_name("zz-newer.cache"), GPU_B, 0, 100, 0);
    let mut feedback = guarded(root.path());
    for _ in 0..3 {
        let _ = decoy.record_kernel_launch(NOW);
        let _ = a.region.record_kernel_launch(NOW);
        let _ = victim.region.record_kernel_launch(NOW);
        let report = feedback.round();
        assert!(
            report.blocked.is_empty() && report.enforced.is_empty(),
            "{report:?}"
        );
    }
    assert_eq!(victim.region.utilization_switch(), 0);
}
