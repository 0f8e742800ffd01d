//! The monitor's priority feedback on real region files (made with the region crate, the way the limiter
//! makes them) in a cache root laid out as Allocate lays it out: one container alone, two sharing a GPU,
//! priorities, corrupt neighbours, and the periodic task the agent runs.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use vgpu_device_plugin::monitor::feedback::{self, PriorityFeedback};
use vgpu_region::{LaunchGate, Region, RegionConfig};

const GPU_A: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
const GPU_B: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000001";
const NOW: u64 = 1_790_000_000;

/// A container's region under `<root>/<uid>_<name>/`, with its GPUs and priority, as the limiter creates it.
fn container(root: &Path, name: &str, gpus: &[&str], priority: i32) -> Region {
    let dir = root.join(format!("uid-{name}_{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = RegionConfig {
        priority,
        ..RegionConfig::default()
    };
    let region = Region::open_or_create(&dir.join("vgpu.cache"), &config).unwrap();
    region.set_device_info(gpus).unwrap();
    region
}

/// The feedback judging activity by `recent_kernel` alone, exactly as HAMi's monitor does (the regions here are
/// freshly created, so their `last_kernel_time` is now and would count as activity for ten seconds).
fn recent_kernel_only(root: &Path) -> PriorityFeedback {
    PriorityFeedback::new(root.to_path_buf()).with_activity_window(Duration::ZERO)
}

/// `rounds` feedback rounds over the root with `launch` called on the listed regions before each.
fn rounds(
    feedback: &mut PriorityFeedback,
    rounds: usize,
    launching: &[&Region],
) -> feedback::RoundReport {
    let mut report = feedback::RoundReport::default();
    for _ in 0..rounds {
        for region in launching {
            let _ = region.record_kernel_launch(NOW);
        }
        report = feedback.round();
    }
    report
}

fn state(region: &Region) -> (i32, i32) {
    (region.recent_kernel(), region.utilization_switch())
}

#[test]
fn a_container_alone_on_its_gpu_runs_free_and_goes_idle_two_rounds_after_its_last_launch() {
    let root = tempfile::tempdir().unwrap();
    let alone = container(root.path(), "alone", &[GPU_A], 1);
    assert_eq!(state(&alone), (2, 1), "HAMi-core's initial values");
    let mut feedback = recent_kernel_only(root.path());

    let report = rounds(&mut feedback, 1, &[&alone]);
    assert_eq!(report.regions, 1);
    assert_eq!(
        state(&alone),
        (1, 0),
        "active, alone: the SM cap is not enforced"
    );
    assert!(report.blocked.is_empty() && report.enforced.is_empty());

    rounds(&mut feedback, 1, &[]);
    assert_eq!(
        state(&alone),
        (0, 0),
        "idle after two rounds without a launch"
    );
    rounds(&mut feedback, 3, &[]);
    assert_eq!(
        state(&alone),
        (0, 0),
        "stays at 0, never negative on its own"
    );
    assert_eq!(alone.record_kernel_launch(NOW), LaunchGate::Proceed);
    assert_eq!(alone.recent_kernel(), 2);
}

#[test]
fn two_containers_sharing_a_gpu_at_one_priority_are_both_capped_until_one_goes_idle() {
    let root = tempfile::tempdir().unwrap();
    let a = container(root.path(), "a", &[GPU_A], 1);
    let b = container(root.path(), "b", &[GPU_A], 1);
    let elsewhere = container(root.path(), "c", &[GPU_B], 1);
    let mut feedback = recent_kernel_only(root.path());

    let report = rounds(&mut feedback, 2, &[&a, &b, &elsewhere]);
    assert_eq!(state(&a), (1, 1), "contended: cap enforced");
    assert_eq!(state(&b), (1, 1));
    assert_eq!(state(&elsewhere), (1, 0), "another GPU is no contention");
    assert_eq!(report.enforced.len(), 2);
    assert!(report.blocked.is_empty(), "same priority never blocks");

    // b stops launching: its last launch decays to 0 in the next round, and a is alone again.
    rounds(&mut feedback, 1, &[&a]);
    assert_eq!(state(&a), (1, 0), "b is idle: a runs free");
    assert_eq!(state(&b), (0, 0), "an idle container is not capped either");
    // b launches again: both capped from the next round.
    rounds(&mut feedback, 1, &[&a, &b]);
    assert_eq!((state(&a), state(&b)), ((1, 1), (1, 1)));
}

#[test]
fn an_active_higher_priority_container_blocks_lower_priority_launches_on_its_gpu() {
    let root = tempfile::tempdir().unwrap();
    let high = container(root.path(), "high", &[GPU_A], 0);
    let low = container(root.path(), "low", &[GPU_A], 1);
    let other_gpu = container(root.path(), "other", &[GPU_B], 1);
    let mut feedback = recent_kernel_only(root.path());

    let report = rounds(&mut feedback, 1, &[&high, &low, &other_gpu]);
    assert_eq!(low.recent_kernel(), -1, "blocked");
    assert_eq!(low.utilization_switch(), 1);
    assert_eq!(
        state(&high),
        (1, 0),
        "the high-priority task alone at its level runs free"
    );
    assert_eq!(state(&other_gpu), (1, 0), "nothing of priority 0 on GPU B");
    assert_eq!(report.blocked.len(), 1);
    assert!(report.blocked[0].starts_with(root.path().join("uid-low_low")));
    assert_eq!(low.record_kernel_launch(NOW), LaunchGate::Blocked);

    // While high keeps launching, low stays blocked (its own launches are held, so it is not active).
    rounds(&mut feedback, 3, &[&high, &low]);
    assert_eq!(low.recent_kernel(), -1);
    assert_eq!(low.record_kernel_launch(NOW), LaunchGate::Blocked);

    // high goes idle: after its activity decays, low is let go (0, not −1) and may launch again.
    rounds(&mut feedback, 1, &[]);
    assert_eq!(high.recent_kernel(), 0);
    assert_eq!(
        low.recent_kernel(),
        0,
        "unblocked the round high became idle"
    );
    assert_eq!(low.utilization_switch(), 0);
    assert_eq!(low.record_kernel_launch(NOW), LaunchGate::Proceed);
}

#[test]
fn a_multi_gpu_container_is_blocked_by_a_higher_priority_one_on_any_of_its_gpus() {
    // HAMi's CheckBlocking stops at the first of the container's GPUs anyone is active on (here GPU A, where
    // only the low-priority container itself is active) and so never blocks it. Every GPU counts here.
    let root = tempfile::tempdir().unwrap();
    let low = container(root.path(), "low", &[GPU_A, GPU_B], 1);
    let high = container(root.path(), "high", &[GPU_B], 0);
    let mut feedback = recent_kernel_only(root.path());
    rounds(&mut feedback, 1, &[&low, &high]);
    assert_eq!(state(&low), (-1, 1));
    assert_eq!(state(&high), (1, 0));
}

#[test]
fn priorities_beyond_hamis_two_levels_are_clamped_into_them_instead_of_crashing() {
    // HAMi's monitor indexes a two-entry array by priority and panics on 5 or −1; here a claim outside HAMi-core's
    // 0 (high) and 1 (low) counts as the nearest of the two, so −1 outranks nobody that 0 does not.
    let root = tempfile::tempdir().unwrap();
    let urgent = container(root.path(), "urgent", &[GPU_A], -1);
    let normal = container(root.path(), "normal", &[GPU_A], 0);
    let batch = container(root.path(), "batch", &[GPU_A], 5);
    let mut feedback = recent_kernel_only(root.path());
    rounds(&mut feedback, 1, &[&urgent, &normal, &batch]);
    assert_eq!(state(&urgent), (1, 1), "two at the high level: both capped");
    assert_eq!(state(&normal), (1, 1));
    assert_eq!(state(&batch), (-1, 1));
}

#[test]
fn corrupt_foreign_and_truncated_files_are_skipped_and_the_rest_still_get_their_feedback() {
    let root = tempfile::tempdir().unwrap();
    let a = container(root.path(), "a", &[GPU_A], 1);
    let b = container(root.path(), "b", &[GPU_A], 1);
    let junk = |name: &str, bytes: &[u8]| {
        let dir = root.path().join(format!("uid-{name}_{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.cache"), bytes).unwrap();
    };
    junk("garbage", b"not a region at all");
    junk("empty", b"");
    let mut oversized = vec![0u8; 3 << 20];
    oversized[..4].copy_from_slice(&19_920_718i32.to_ne_bytes());
    junk("oversized", &oversized);
    let mut feedback = recent_kernel_only(root.path());
    let report = rounds(&mut feedback, 1, &[&a, &b]);
    assert_eq!((report.regions, report.skipped), (2, 3));
    assert_eq!(state(&a), (1, 1));
    assert_eq!(state(&b), (1, 1));
    let size = |name: &str| {
        std::fs::metadata(root.path().join(format!("uid-{name}_{name}/x.cache")))
            .unwrap()
            .len()
    };
    assert_eq!(
        (size("garbage"), size("empty"), size("oversized")),
        (19, 0, 3 << 20),
        "skipped files are never written"
    );
}

#[test]
fn containers_that_only_record_launch_times_still_count_as_active() {
    // HAMi-core since March 2026 stops storing recent_kernel once its switch is 0, but still records the
    // launch time: two such containers on one GPU would both run free for ever under HAMi's monitor.
    let root = tempfile::tempdir().unwrap();
    let a = container(root.path(), "a", &[GPU_A], 1);
    let b = container(root.path(), "b", &[GPU_A], 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let launch_without_recent_kernel = |r: &Region| {
        let _ = r.record_kernel_launch(now);
        vgpu_region::RegionReader::open_writable(r.path())
            .unwrap()
            .set_recent_kernel(0)
            .unwrap();
    };
    launch_without_recent_kernel(&a);
    launch_without_recent_kernel(&b);
    recent_kernel_only(root.path()).round();
    assert_eq!(
        (state(&a), state(&b)),
        ((0, 0), (0, 0)),
        "HAMi's view: idle"
    );

    launch_without_recent_kernel(&a);
    launch_without_recent_kernel(&b);
    let report = PriorityFeedback::new(root.path().to_path_buf()).round();
    assert_eq!((state(&a), state(&b)), ((0, 1), (0, 1)), "both capped");
    assert_eq!(report.enforced.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_periodic_task_writes_the_feedback_and_stops_when_aborted() {
    let root = tempfile::tempdir().unwrap();
    let high = container(root.path(), "high", &[GPU_A], 0);
    let low = container(root.path(), "low", &[GPU_A], 1);
    // The agent's task believes only the node's record for priorities, so the two are recorded as Allocate
    // records them.
    for (name, priority) in [("high", 0), ("low", 1)] {
        let record = vgpu_device_plugin::handoff::record::ContainerRecord {
            namespace: "ns".into(),
            pod: name.into(),
            pod_uid: format!("uid-{name}"),
            container: name.into(),
            cache_file: "vgpu.cache".into(),
            gpus: vec![vgpu_device_plugin::handoff::record::RecordedGpu {
                uuid: GPU_A.into(),
                memory_limit_bytes: 0,
            }],
            sm_limit_percent: 100,
            priority,
        };
        vgpu_device_plugin::handoff::record::RecordStore::beside(root.path())
            .write(&format!("uid-{name}_{name}"), &record)
            .unwrap();
    }
    let task = tokio::spawn(feedback::run(
        root.path().to_path_buf(),
        Duration::from_millis(50),
        vgpu_device_plugin::monitor::events::Reporting::default(),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while low.recent_kernel() != -1 {
        let _ = high.record_kernel_launch(NOW);
        assert!(std::time::Instant::now() < deadline, "never blocked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Once high stops, low is released within a few periods.
    while low.recent_kernel() != 0 {
        assert!(std::time::Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // A round already on its blocking thread finishes within microseconds; after that nothing writes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = high.record_kernel_launch(NOW);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(high.recent_kernel(), 2);
}
