//! GPU health through the real binary: XID events, lost GPUs, recovery, and GPUs without event support.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use harness::ResourceView;
use kubelet_api::v1beta1::{HEALTHY, UNHEALTHY};

/// The health of every ID that belongs to `gpu`, on one resource, as (healthy, unhealthy) counts.
fn health_of(view: &ResourceView, gpu_ids: &dyn Fn(&str) -> bool) -> (usize, usize) {
    let mine = view.devices.iter().filter(|d| gpu_ids(&d.id));
    mine.fold((0, 0), |(h, u), d| {
        if d.health == HEALTHY {
            (h + 1, u)
        } else {
            (h, u + 1)
        }
    })
}

/// Whether every resource shows the GPU with this UUID (upstream-style IDs) as all-unhealthy or all-healthy,
/// and every other GPU healthy.
fn gpu_is(
    views: &std::collections::HashMap<String, ResourceView>,
    uuid: &str,
    unhealthy: bool,
) -> bool {
    ALL.iter().all(|r| {
        let Some(view) = views.get(*r) else {
            return false;
        };
        let (h, u) = health_of(view, &|id| id.starts_with(uuid));
        let (oh, ou) = health_of(view, &|id| !id.starts_with(uuid));
        let own_ok = if unhealthy {
            h == 0 && u > 0
        } else {
            u == 0 && h > 0
        };
        own_ok && ou == 0 && oh > 0
    })
}

fn spawn(sim: &SimNode, kubelet: &harness::FakeKubelet, args: &[&str]) -> Agent {
    let mut cmd = agent_command(sim, kubelet.socket());
    cmd.args(args);
    Agent::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_xid_marks_the_gpu_unhealthy_everywhere_then_it_recovers() {
    let sim = SimNode::new(NodeSpec::uniform(2, GpuSpec::t4)).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let agent = spawn(
        &sim,
        &kubelet,
        &[
            "--health-recovery-period",
            "2s",
            "--health-probe-interval",
            "200ms",
        ],
    );
    kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    let bad = sim.spec().gpus[1].uuid.clone();

    sim.inject_xid(&bad, 79).unwrap();
    kubelet
        .wait_until(PATIENCE, "GPU 1 Unhealthy on all three endpoints", |v| {
            gpu_is(v, &bad, true)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    // Capacity stays; only health changes.
    let views = kubelet.resource(MEMORY).unwrap();
    assert_eq!(views.devices.len(), 2 * 15360);
    assert_eq!(
        views
            .devices
            .iter()
            .filter(|d| d.health == UNHEALTHY)
            .count(),
        15360
    );

    kubelet
        .wait_until(
            PATIENCE,
            "GPU 1 Healthy again after the quiet period",
            |v| gpu_is(v, &bad, false),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let log = agent.log_text();
    assert!(
        log.contains("critical XID") && log.contains("Healthy again"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_xids_are_ignored_and_disabled_xids_too() {
    let sim = SimNode::new(NodeSpec::uniform(3, GpuSpec::t4)).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let mut cmd = agent_command(&sim, kubelet.socket());
    cmd.env("DP_DISABLE_HEALTHCHECKS", "48");
    let agent = Agent::spawn(cmd);
    kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    let gpus: Vec<String> = sim.spec().gpus.iter().map(|g| g.uuid.clone()).collect();

    // XID 13 is an application error; 48 is disabled here; 79 on the third GPU is the marker that the
    // monitor has read past the first two (the control log is delivered in order).
    sim.inject_xid(&gpus[0], 13).unwrap();
    sim.inject_xid(&gpus[1], 48).unwrap();
    sim.inject_xid(&gpus[2], 79).unwrap();
    let views = kubelet
        .wait_until(PATIENCE, "GPU 2 Unhealthy", |v| gpu_is(v, &gpus[2], true))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert!(
        gpu_is(&views, &gpus[2], true),
        "GPUs 0 and 1 stayed healthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_that_stops_answering_is_unhealthy_until_it_answers_again() {
    let sim = SimNode::new(NodeSpec::uniform(2, GpuSpec::t4)).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let agent = spawn(
        &sim,
        &kubelet,
        &[
            "--health-recovery-period",
            "1s",
            "--health-probe-interval",
            "200ms",
        ],
    );
    kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    let lost = sim.spec().gpus[0].uuid.clone();

    sim.fail_gpu(&lost).unwrap();
    kubelet
        .wait_until(PATIENCE, "lost GPU Unhealthy", |v| gpu_is(v, &lost, true))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    // Past the quiet period but still lost: it must stay unhealthy.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let views = kubelet
        .wait_until(PATIENCE, "state", |_| true)
        .await
        .unwrap();
    assert!(
        gpu_is(&views, &lost, true),
        "a GPU that still fails NVML does not recover"
    );

    sim.recover_gpu(&lost).unwrap();
    kubelet
        .wait_until(PATIENCE, "GPU Healthy after answering again", |v| {
            gpu_is(v, &lost, false)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_without_event_support_is_warned_about_not_marked_unhealthy() {
    let sim = SimNode::new(NodeSpec::new(vec![
        GpuSpec::t4(0).with_events(false),
        GpuSpec::t4(1),
    ]))
    .unwrap();
    let (_dir, kubelet) = kubelet().await;
    let agent = Agent::spawn(agent_command(&sim, kubelet.socket()));
    let views = kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    assert!(
        views
            .values()
            .all(|v| v.devices.iter().all(|d| d.health == HEALTHY))
    );
    let quiet = &sim.spec().gpus[0].uuid;
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(quiet.as_str()) && l.contains("XID events")),
        "{log}"
    );

    // Events on the other GPU still work.
    let other = sim.spec().gpus[1].uuid.clone();
    sim.inject_xid(&other, 94).unwrap();
    kubelet
        .wait_until(PATIENCE, "GPU 1 Unhealthy", |v| gpu_is(v, &other, true))
        .await
        .unwrap();
}

/// A GPU that had an uncorrectable memory error answers NVML again at once, but its repair (rows
/// to remap on Ampere and later, pages to retire before) waits for a GPU reset: it stays
/// `Unhealthy` past the quiet period while NVML reports the repair pending, and recovers once the
/// GPU has been reset. Both generations: the T4 reports pending page retirement, the A100
/// pending row remapping (each NVML field the other does not support).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_whose_memory_repair_waits_for_a_reset_stays_unhealthy_until_it_is_reset() {
    let generations: [fn(u32) -> GpuSpec; 2] = [GpuSpec::t4, GpuSpec::a100_80gb];
    for gpu in generations {
        let sim = SimNode::new(NodeSpec::uniform(2, gpu)).unwrap();
        let model = sim.spec().gpus[0].name.clone();
        let (_dir, kubelet) = kubelet().await;
        let agent = spawn(
            &sim,
            &kubelet,
            &[
                "--health-recovery-period",
                "1s",
                "--health-probe-interval",
                "200ms",
                // Two 80 GB GPUs in 1 MiB units would pass the kubelet's 4 MiB message limit.
                "--gpu-memory-factor",
                "4",
            ],
        );
        kubelet
            .wait_for_resources(&ALL, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{model}: {e}\n{}", agent.log_text()));
        let bad = sim.spec().gpus[1].uuid.clone();
        sim.set_reset_pending(&bad).unwrap();
        sim.inject_xid(&bad, 48).unwrap();
        kubelet
            .wait_until(PATIENCE, "GPU 1 Unhealthy", |v| gpu_is(v, &bad, true))
            .await
            .unwrap_or_else(|e| panic!("{model}: {e}\n{}", agent.log_text()));
        // Three quiet periods: still Unhealthy, and the log says why.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let views: std::collections::HashMap<String, ResourceView> = ALL
            .iter()
            .filter_map(|r| Some(((*r).to_owned(), kubelet.resource(r)?)))
            .collect();
        assert!(
            gpu_is(&views, &bad, true),
            "{model}: recovered with a reset pending\n{}",
            agent.log_text()
        );
        assert!(
            agent.log_text().contains("wait for a GPU reset"),
            "{}",
            agent.log_text()
        );
        sim.reset_gpu(&bad).unwrap();
        kubelet
            .wait_until(PATIENCE, "GPU 1 Healthy after its reset", |v| {
                gpu_is(v, &bad, false)
            })
            .await
            .unwrap_or_else(|e| panic!("{model}: {e}\n{}", agent.log_text()));

        // An agent started while a GPU waits for its reset does not vouch for it either.
        drop(agent);
        sim.set_reset_pending(&bad).unwrap();
        let agent = spawn(
            &sim,
            &kubelet,
            &["--health-recovery-period", "1s", "--gpu-memory-factor", "4"],
        );
        kubelet
            .wait_until(PATIENCE, "GPU 1 Unhealthy from the start", |v| {
                gpu_is(v, &bad, true)
            })
            .await
            .unwrap_or_else(|e| panic!("{model}: {e}\n{}", agent.log_text()));
    }
}
