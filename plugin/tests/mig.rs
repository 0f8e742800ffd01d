//! MIG mode end to end (issue #19): the real agent on a gpu-sim node whose node config says `operatingmode: mig`,
//! a fake apiserver and kubelet, and Volcano-style MIG binds (`GPU-<uuid>[<group>-<position>]` in
//! `devices-to-allocate`). Allocate must make the GPU's MIG layout the group (through NVML, the gpu-sim's MIG
//! model), answer with the position's MIG UUID only, refuse to repartition a GPU another live container or a
//! process holds, fail only that pod, and survive a failed repartition with the GPU usable again.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};
use kube::api::DeleteParams;
use kubelet_api::v1beta1::ContainerAllocateResponse;
use serde_json::json;

const NODE: &str = "node-a";

/// One vGPU container; the memory is the template's (`knownMigGeometries`' `memory`).
fn ctr(memory: u64) -> [Ctr<'static>; 1] {
    [("cuda", Some(1), Some(memory), None)]
}

fn mig_dev(parent: &str, group: &str, position: u32, mem: u64) -> String {
    format!("{parent}[{group}-{position}],NVIDIA,{mem},0:")
}

/// A node whose node config sets `operatingmode: mig` (the shipped `knownMigGeometries` apply).
async fn mig_cluster(spec: NodeSpec) -> Cluster {
    cluster(spec)
        .start_with(|_, dir| {
            let node_config = json!({"nodeconfig": [{"name": NODE, "operatingmode": "mig"}]});
            std::fs::write(dir.join("node-config.json"), node_config.to_string()).unwrap();
        })
        .await
}

async fn bind(c: &Cluster, name: &str, memory: u64, queue: &str, time: u64) {
    c.bind(
        name,
        BindStyle::PatchThenBind,
        &ctr(memory),
        queue,
        &time.to_string(),
    )
    .await;
}

/// The MIG UUID a MIG hand-off answered with, after checking the answer carries nothing else.
fn mig_uuid_of(r: &ContainerAllocateResponse) -> String {
    let uuid = r.envs["NVIDIA_VISIBLE_DEVICES"].clone();
    assert!(uuid.starts_with("MIG-"), "{r:?}");
    assert_eq!(r.envs.len(), 1, "only NVIDIA_VISIBLE_DEVICES: {:?}", r.envs);
    assert!(
        r.mounts.is_empty(),
        "no libvgpu, cache or preload mounts: {:?}",
        r.mounts
    );
    assert!(r.devices.is_empty() && r.cdi_devices.is_empty(), "{r:?}");
    uuid
}

/// The kubelet's admission fails naming `pod`; its `bind-phase` is `failed` and an Event on it says `what`.
async fn admit_fails(c: &Cluster, pod: &str, what: &[&str]) -> String {
    let status = c
        .kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .expect_err("the hand-off must fail");
    let message = status.message().to_owned();
    assert!(message.contains(&format!("pod default/{pod}")), "{message}");
    for w in what {
        assert!(message.contains(w), "{w:?} not in: {message}");
    }
    assert_eq!(
        c.annotation(pod, "volcano.sh/bind-phase").await.as_deref(),
        Some("failed")
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let events = c.api.events();
        if events.iter().any(|e| {
            let t = e.to_string();
            t.contains("VGPUAllocateFailed")
                && t.contains(pod)
                && what.iter().all(|w| t.contains(w))
        }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    message
}

/// Deletes the pod for good (grace period 0): a terminating pod still counts as alive on its GPU.
async fn delete(c: &Cluster, name: &str) {
    c.pods()
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

fn healthy_ids(c: &Cluster) -> Vec<String> {
    let mut ids: Vec<String> = c
        .kubelet
        .resource(NUMBER)
        .unwrap()
        .devices
        .iter()
        .filter(|d| d.health == "Healthy")
        .map(|d| d.id.clone())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_geometries_a_repartition_between_them_and_a_mixed_node() {
    // GPU 0: an A100 80GB with MIG off; GPU 1: a T4 (not MIG-capable) on the same mig node.
    let c = mig_cluster(NodeSpec::new(vec![GpuSpec::a100_80gb(0), GpuSpec::t4(1)])).await;
    let (a100, t4) = (c.uuid(0), c.uuid(1));
    let ids_before = healthy_ids(&c);
    assert!(!ids_before.is_empty());

    // group1 (7 × 1g.10gb): MIG mode enabled and the GPU partitioned.
    bind(
        &c,
        "g1-a",
        9728,
        &mig_dev(&a100, "group1", 0, 9728),
        1_787_220_000,
    )
    .await;
    let first = mig_uuid_of(&c.admit(1).await);
    assert_eq!(
        c.annotation("g1-a", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("success")
    );
    // Same group, another position: the layout is reused, another MIG device.
    bind(
        &c,
        "g1-b",
        9728,
        &mig_dev(&a100, "group1", 6, 9728),
        1_787_220_001,
    )
    .await;
    let last = mig_uuid_of(&c.admit(1).await);
    assert_ne!(first, last);
    assert!(
        c.agent.log_text().contains("repartitioned=false"),
        "the second group1 bind reused the layout:\n{}",
        c.agent.log_text()
    );
    // The node's records name the MIG devices, so the monitor takes their regions as the containers' own.
    let records = std::fs::read_dir(c.root().join("hook/vgpu"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        records.contains(&first) && records.contains(&last),
        "records: {records}"
    );

    // group3 (2 × 3g.40gb) while g1-a and g1-b are alive: refused, nothing changed, only that pod fails.
    bind(
        &c,
        "g3-early",
        40192,
        &mig_dev(&a100, "group3", 0, 40192),
        1_787_220_002,
    )
    .await;
    admit_fails(
        &c,
        "g3-early",
        &["MIG", "cannot be repartitioned while", "g1-a"],
    )
    .await;
    assert_eq!(
        c.annotation("g1-a", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("success"),
        "the running pod is untouched"
    );

    // Once they are gone, group3 repartitions the GPU: new MIG devices.
    delete(&c, "g1-a").await;
    delete(&c, "g1-b").await;
    bind(
        &c,
        "g3-a",
        40192,
        &mig_dev(&a100, "group3", 1, 40192),
        1_787_220_003,
    )
    .await;
    let g3_second = mig_uuid_of(&c.admit(1).await);
    assert!(g3_second != first && g3_second != last);
    assert!(c.agent.log_text().contains("repartitioned=true"));
    bind(
        &c,
        "g3-b",
        40192,
        &mig_dev(&a100, "group3", 0, 40192),
        1_787_220_004,
    )
    .await;
    let g3_first = mig_uuid_of(&c.admit(1).await);
    assert_ne!(
        g3_first, g3_second,
        "positions 0 and 1 are different MIG devices"
    );
    // Position → MIG UUID is the same rule with or without a repartition: position 1 asked again on the
    // reused layout is the device the repartition gave it.
    bind(
        &c,
        "g3-again",
        40192,
        &mig_dev(&a100, "group3", 1, 40192),
        1_787_220_004,
    )
    .await;
    assert_eq!(mig_uuid_of(&c.admit(1).await), g3_second);

    // A position past the group fails that pod, naming it.
    bind(
        &c,
        "far",
        40192,
        &mig_dev(&a100, "group3", 2, 40192),
        1_787_220_005,
    )
    .await;
    admit_fails(&c, "far", &["position 2 is outside group"]).await;

    // Mixed node: a bracketed ID on the T4 names no geometry (as upstream, the scheduler never places one
    // there); a whole-GPU ID on the T4 is a hami-core hand-off, as the Go plugin serves it.
    bind(
        &c,
        "t4-mig",
        1000,
        &mig_dev(&t4, "group1", 0, 1000),
        1_787_220_006,
    )
    .await;
    admit_fails(&c, "t4-mig", &["no knownMigGeometries entry", "Tesla T4"]).await;
    bind(
        &c,
        "t4-whole",
        1000,
        &format!("{t4},NVIDIA,1000,0:"),
        1_787_220_007,
    )
    .await;
    let r = c.admit(1).await;
    assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], t4);
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");

    // The kubelet's IDs are the GPU slots, unchanged by MIG, and every GPU stayed Healthy.
    assert_eq!(healthy_ids(&c), ids_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_on_the_gpu_refuses_the_repartition_and_a_failed_one_rolls_back() {
    let c = mig_cluster(NodeSpec::new(vec![GpuSpec::a100_80gb(0)])).await;
    let a100 = c.uuid(0);

    // A process holds memory on the parent GPU: the repartition is refused, that pod fails.
    let holder = c.sim.hold(0, 1 << 20);
    bind(
        &c,
        "busy",
        9728,
        &mig_dev(&a100, "group1", 0, 9728),
        1_787_220_000,
    )
    .await;
    admit_fails(
        &c,
        "busy",
        &["MIG", "GPU in use", "MIG layout left unchanged"],
    )
    .await;
    drop(holder);

    // The fault switch: the next instance creation fails; the agent's apply rolls back to an empty layout.
    c.sim.control().fail_mig_creations(&a100, 1, 23).unwrap();
    bind(
        &c,
        "faulted",
        9728,
        &mig_dev(&a100, "group1", 0, 9728),
        1_787_220_001,
    )
    .await;
    admit_fails(
        &c,
        "faulted",
        &[
            "MIG",
            "cannot give the GPU the group's layout",
            "rolled back to an empty layout",
        ],
    )
    .await;

    // The GPU is usable again: the next bind partitions it.
    bind(
        &c,
        "after",
        40192,
        &mig_dev(&a100, "group3", 0, 40192),
        1_787_220_002,
    )
    .await;
    mig_uuid_of(&c.admit(1).await);
    assert_eq!(
        healthy_ids(&c).len(),
        c.kubelet.resource(NUMBER).unwrap().devices.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hami_core_node_refuses_a_mig_id_by_name() {
    let c = cluster(NodeSpec::new(vec![GpuSpec::a100_80gb(0)]))
        .start()
        .await;
    let a100 = c.uuid(0);
    bind(
        &c,
        "mig-on-hami",
        9728,
        &mig_dev(&a100, "group1", 0, 9728),
        1_787_220_000,
    )
    .await;
    admit_fails(&c, "mig-on-hami", &["operatingmode is hami-core"]).await;
}

/// `/proc/driver/nvidia-caps/mig-minors` as the driver writes it for one GPU of this minor (`config`, `monitor`,
/// then per GPU instance 0..15 its `access` and its 8 compute instances' `access`, 9 minors per GI).
fn real_mig_minors(gpu_minor: u32) -> String {
    let mut text = String::from("config 1\nmonitor 2\n");
    let base = 3 + gpu_minor * 15 * 9;
    for gi in 0..15 {
        let gi_minor = base + gi * 9;
        text.push_str(&format!("gpu{gpu_minor}/gi{gi}/access {gi_minor}\n"));
        for ci in 0..8 {
            let ci_minor = gi_minor + 1 + ci;
            text.push_str(&format!("gpu{gpu_minor}/gi{gi}/ci{ci}/access {ci_minor}\n"));
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_device_specs_a_mig_device_gets_its_parent_gpu_and_capability_nodes() {
    let c = cluster(NodeSpec::new(vec![GpuSpec::a100_80gb(0)]))
        .device_tree()
        .args([
            "--pass-device-specs",
            "--dev-root",
            "{root}/devroot",
            "--nvidia-caps-minors",
            "{root}/mig-minors",
        ])
        .start_with(|_, dir| {
            let node_config = json!({"nodeconfig": [{"name": NODE, "operatingmode": "mig"}]});
            std::fs::write(dir.join("node-config.json"), node_config.to_string()).unwrap();
            std::fs::write(dir.join("mig-minors"), real_mig_minors(0)).unwrap();
            let caps = dir.join("devroot/dev/nvidia-caps");
            std::fs::create_dir_all(&caps).unwrap();
            for minor in 3..3 + 15 * 9 {
                std::os::unix::fs::symlink("/dev/null", caps.join(format!("nvidia-cap{minor}")))
                    .unwrap();
            }
        })
        .await;
    let a100 = c.uuid(0);
    let dev = c.root().join("devroot/dev");

    // Positions 0 and 1 of group1 (7 × 1g.10gb): two GPU instances, one compute instance (0) each.
    let mut gis = Vec::new();
    for (name, position, time) in [("p0", 0, 1_787_220_000), ("p1", 1, 1_787_220_001)] {
        bind(
            &c,
            name,
            9728,
            &mig_dev(&a100, "group1", position, 9728),
            time,
        )
        .await;
        let r = c.admit(1).await;
        assert!(
            r.envs["NVIDIA_VISIBLE_DEVICES"].starts_with("MIG-"),
            "{r:?}"
        );
        let got: Vec<(&str, String)> = r
            .devices
            .iter()
            .map(|d| {
                assert_eq!(d.permissions, "rw", "{d:?}");
                (d.container_path.as_str(), d.host_path.clone())
            })
            .collect();
        assert_eq!(got.len(), 5, "{got:?}");
        let host = |n: &str| dev.join(n).display().to_string();
        assert_eq!(
            got[..3],
            [
                ("/dev/nvidiactl", host("nvidiactl")),
                ("/dev/nvidia-uvm", host("nvidia-uvm")),
                ("/dev/nvidia0", host("nvidia0")),
            ],
        );
        let cap = |(path, host_path): &(&str, String)| -> u32 {
            let minor = path.strip_prefix("/dev/nvidia-caps/nvidia-cap").unwrap();
            assert_eq!(host_path, &host(&format!("nvidia-caps/nvidia-cap{minor}")));
            minor.parse().unwrap()
        };
        let (gi_minor, ci_minor) = (cap(&got[3]), cap(&got[4]));
        // The GI's `access` line and its compute instance 0's, as the file lists them.
        assert_eq!((gi_minor - 3) % 9, 0, "{got:?}");
        assert_eq!(ci_minor, gi_minor + 1, "{got:?}");
        gis.push(gi_minor);
    }
    assert_ne!(gis[0], gis[1], "two MIG devices, two GPU instances");

    // Without the lines for the MIG device, the pod fails naming the file and the line looked for.
    std::fs::write(c.root().join("mig-minors"), "config 1\nmonitor 2\n").unwrap();
    bind(
        &c,
        "p2",
        9728,
        &mig_dev(&a100, "group1", 2, 9728),
        1_787_220_002,
    )
    .await;
    let minors = c.root().join("mig-minors").display().to_string();
    admit_fails(&c, "p2", &[&minors, "has no line `gpu0/gi"]).await;
}
