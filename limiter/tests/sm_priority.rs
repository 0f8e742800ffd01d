//! HAMi's priority protocol through the region, in HAMi-core's original order: the monitor holds
//! `recent_kernel` at −1 while a higher-priority task is active, and every launch of the
//! container waits — also in a container with no SM cap at all (here: a memory cap only), which
//! the 2026 HAMi-core refactor let through. Once released, launches proceed and mark the container
//! active again (`recent_kernel = 2`). A new region carries `CUDA_TASK_PRIORITY` and the SM caps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod sm_support;

use sm_support::{Load, node, region};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use vgpu_region::{Region, RegionConfig, RegionReader};

#[test]
fn launches_wait_while_the_monitor_blocks_the_container_even_without_an_sm_cap() {
    let node = node(1);
    let path = region(&node, "low-priority");
    let r = Region::open_or_create(&path, &RegionConfig::default()).unwrap();
    r.layout().recent_kernel.store(-1, Ordering::SeqCst);

    let child = Load::new(path.clone(), 3.0)
        .env("CUDA_DEVICE_MEMORY_LIMIT", "8g")
        .sync_every(16)
        .spawn(&node);
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(1200));
    let released = SystemTime::now();
    let t = node.timeline().unwrap().expect("timeline (cuInit ran)");
    let ran_before = t.process_busy_total_ns(pid, 0);
    r.layout().recent_kernel.store(0, Ordering::SeqCst);
    let o = sm_support::finish(child);

    assert_eq!(
        ran_before, 0,
        "kernels ran while the monitor blocked the container"
    );
    assert!(o.launches > 100, "launches did not resume: {}", o.launches);
    let t = node.timeline().unwrap().unwrap();
    let from = t.period_at(released) + 2;
    let to = t.period_at(SystemTime::UNIX_EPOCH + Duration::from_nanos(o.end_ns));
    let after = t.process_utilization(0, pid, from..to);
    assert!(after > 60.0, "only {after:.1} % after the release");
    assert_eq!(r.recent_kernel(), 2, "the container was not marked active");
}

/// Issue 20: under a memory cap alone, a launch whose mark is fresh passes on the exports' fast
/// path (three loads, no call into the region). The protocol must still hold mid-run: a mark the
/// monitor ages is renewed by the next launch, `last_kernel_time` keeps advancing (a refresh every
/// 256 launches), and a block set while launches are flowing stops them until it is lifted.
#[test]
fn the_launch_fast_path_keeps_the_mark_fresh_and_stops_at_a_block_set_mid_run() {
    let node = node(1);
    let path = region(&node, "fast-path");
    let r = Region::open_or_create(&path, &RegionConfig::default()).unwrap();

    let child = Load::new(path.clone(), 6.0)
        .env("CUDA_DEVICE_MEMORY_LIMIT", "8g")
        .sync_every(16)
        .spawn(&node);
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(r.recent_kernel(), 2, "launches did not mark the container");

    // The monitor ages the mark (HAMi's feedback loop decrements it): the next launch renews it.
    r.layout().recent_kernel.store(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.recent_kernel(), 2, "an aged mark was not renewed");

    // `last_kernel_time` (1 s resolution) advances while launches take the fast path.
    let stamp = r.last_kernel_time();
    std::thread::sleep(Duration::from_millis(2100));
    assert!(
        r.last_kernel_time() > stamp,
        "last_kernel_time stayed at {stamp} while launching"
    );

    // Blocked mid-run: after the launches already past the gate drain, no kernel runs.
    r.layout().recent_kernel.store(-1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    let busy = |t: &gpu_sim::Timeline| t.process_busy_total_ns(pid, 0);
    let blocked_at = busy(&node.timeline().unwrap().unwrap());
    std::thread::sleep(Duration::from_millis(900));
    let still = busy(&node.timeline().unwrap().unwrap());
    r.layout().recent_kernel.store(0, Ordering::SeqCst);
    let o = sm_support::finish(child);
    assert_eq!(
        still, blocked_at,
        "kernels ran while the monitor blocked the container mid-run"
    );
    assert!(o.launches > 100, "launches did not run: {}", o.launches);
    assert_eq!(r.recent_kernel(), 2, "not marked active after the release");
}

#[test]
fn a_new_region_records_the_task_priority_and_the_sm_caps() {
    let node = node(2);
    let path = region(&node, "prio");
    let child = Load::new(path.clone(), 1.0)
        .env("CUDA_DEVICE_SM_LIMIT", "100")
        .env("CUDA_DEVICE_SM_LIMIT_0", "30")
        .env("CUDA_TASK_PRIORITY", "0")
        .spawn(&node);
    let o = sm_support::finish(child);
    assert!(o.launches > 0);
    let snap = RegionReader::open(&path).unwrap().snapshot().unwrap();
    assert_eq!(snap.priority, 0);
    assert_eq!(snap.sm_limits[0], 30);
    assert_eq!(
        snap.sm_limits[1], 100,
        "HAMi-core's value for an uncapped device"
    );
    assert_eq!(snap.utilization_switch, 1);
}
