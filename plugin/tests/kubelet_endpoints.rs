//! The real agent binary on the gpu-sim, talking to a fake kubelet: registration, device lists, kubelet
//! restarts and shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use kubelet_api::v1beta1::{HEALTHY, NumaNode, TopologyInfo, VERSION};

async fn check_node(spec: NodeSpec, split: u32, factor: u32) {
    let sim = SimNode::new(spec).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let mut cmd = agent_command(&sim, kubelet.socket());
    cmd.args([
        "--device-split-count",
        &split.to_string(),
        "--gpu-memory-factor",
        &factor.to_string(),
    ]);
    let agent = Agent::spawn(cmd);
    let views = kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));

    let gpus = &sim.spec().gpus;
    let expect = |resource: &str| -> u64 {
        match resource {
            NUMBER => u64::from(split) * gpus.len() as u64,
            MEMORY => gpus.iter().map(|g| g.memory_mib / u64::from(factor)).sum(),
            CORES => 100 * gpus.len() as u64,
            _ => unreachable!(),
        }
    };
    for resource in ALL {
        let view = &views[resource];
        let registration = view.registration.as_ref().unwrap();
        assert_eq!(registration.version, VERSION);
        assert_eq!(registration.resource_name, resource);
        let short = resource.rsplit('/').next().unwrap();
        assert_eq!(registration.endpoint, format!("nvidia-{short}.sock"));
        let options = view.options.as_ref().unwrap();
        assert!(!options.pre_start_required);
        assert_eq!(
            registration.options.as_ref(),
            Some(options),
            "RegisterRequest and GetDevicePluginOptions agree"
        );

        assert_eq!(
            view.devices.len() as u64,
            expect(resource),
            "{resource} count"
        );
        let ids: HashSet<&str> = view.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids.len(), view.devices.len(), "{resource} IDs are unique");
        assert!(
            view.devices
                .iter()
                .all(|d| d.health == HEALTHY && d.id.len() <= 63)
        );
        assert!(view.error.is_none(), "{resource}: {:?}", view.error);
    }
    // Each GPU's number IDs carry its UUID and its NUMA node (the sim derives NUMA from the PCI bus).
    let number = &views[NUMBER].devices;
    for gpu in gpus {
        let own: Vec<_> = number
            .iter()
            .filter(|d| d.id.starts_with(&format!("{}-", gpu.uuid)))
            .collect();
        assert_eq!(own.len(), split as usize, "{}", gpu.uuid);
        let numa = gpu.numa_node.map(|n| TopologyInfo {
            nodes: vec![NumaNode { id: i64::from(n) }],
        });
        assert!(own.iter().all(|d| d.topology == numa));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_three_endpoints_for_one_gpu() {
    check_node(NodeSpec::uniform(1, GpuSpec::t4), 10, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_three_endpoints_for_two_gpus_listed_out_of_minor_order() {
    check_node(
        NodeSpec::new(vec![GpuSpec::a100_40gb(1), GpuSpec::a100_40gb(0)]),
        4,
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_three_endpoints_for_eight_gpus() {
    check_node(NodeSpec::uniform(8, GpuSpec::h100_80gb), 10, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregisters_when_kubelet_restarts() {
    let sim = SimNode::new(NodeSpec::uniform(2, GpuSpec::t4)).unwrap();
    let (_dir, mut kubelet) = kubelet().await;
    let agent = Agent::spawn(agent_command(&sim, kubelet.socket()));
    kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    assert_eq!(kubelet.registrations().len(), 3);

    for round in 1..=2 {
        kubelet.restart().await.unwrap();
        let views = kubelet
            .wait_for_resources(&ALL, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", agent.log_text()));
        assert_eq!(kubelet.registrations().len(), 3 * (round + 1));
        assert_eq!(views[NUMBER].devices.len(), 20);
        assert_eq!(views[MEMORY].devices.len(), 2 * 15360);
        // The agent re-created its sockets after the kubelet deleted them.
        let names: Vec<String> = sockets_in(kubelet.dir())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for short in ["vgpu-number", "vgpu-memory", "vgpu-cores"] {
            assert!(names.contains(&format!("nvidia-{short}.sock")), "{names:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_kubelet_that_is_not_there_yet() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(agent_command(&sim, &dir.path().join("kubelet.sock")));
    // The agent serves its endpoints before any kubelet exists.
    let deadline = std::time::Instant::now() + PATIENCE;
    while sockets_in(dir.path()).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "endpoints not served:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kubelet = harness::FakeKubelet::start(dir.path()).await.unwrap();
    kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_removes_the_sockets_and_exits_zero() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let mut agent = Agent::spawn(agent_command(&sim, kubelet.socket()));
    kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    assert_eq!(
        sockets_in(kubelet.dir()).len(),
        4,
        "kubelet.sock and our three"
    );

    agent.signal(15);
    let status = agent.wait_exit(PATIENCE);
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        agent.log_text()
    );
    assert_eq!(
        sockets_in(kubelet.dir()),
        vec![kubelet.socket().to_path_buf()],
        "only the kubelet's socket is left"
    );
    assert!(!agent.log_text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_node_name_memory_and_cores_allocate_empty_and_number_names_what_is_missing() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let _agent = Agent::spawn(agent_command(&sim, kubelet.socket()));
    let views = kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();

    for resource in [MEMORY, CORES] {
        let ids: Vec<&str> = views[resource]
            .devices
            .iter()
            .take(3)
            .map(|d| d.id.as_str())
            .collect();
        let response = kubelet
            .allocate(resource, &ids)
            .await
            .unwrap()
            .expect("Allocate succeeds");
        assert_eq!(response.container_responses.len(), 1);
        assert!(
            response.container_responses[0].envs.is_empty()
                && response.container_responses[0].mounts.is_empty()
        );
    }
    let id = views[NUMBER].devices[0].id.clone();
    let status = kubelet
        .allocate(NUMBER, &[&id])
        .await
        .unwrap()
        .expect_err("number Allocate needs the Volcano hand-off");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("volcano.sh/vgpu-number")
            && status.message().contains("NODE_NAME"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numa_node_comes_from_sysfs_when_nvml_cannot_say() {
    let sim = SimNode::new(NodeSpec::new(vec![
        GpuSpec::t4(0)
            .with_numa_node(None)
            .with_pci_bus_id("00000000:AF:00.0"),
    ]))
    .unwrap();
    let sysfs = tempfile::tempdir().unwrap();
    let dev = sysfs.path().join("bus/pci/devices/0000:af:00.0");
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(dev.join("numa_node"), "1\n").unwrap();
    let (_dir, kubelet) = kubelet().await;
    let mut cmd = agent_command(&sim, kubelet.socket());
    cmd.arg("--sysfs-root").arg(sysfs.path());
    let _agent = Agent::spawn(cmd);
    let views = kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    let expected = Some(TopologyInfo {
        nodes: vec![NumaNode { id: 1 }],
    });
    assert!(views[MEMORY].devices.iter().all(|d| d.topology == expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_nvml_cannot_read_is_reported_and_the_others_are_served() {
    let sim = SimNode::new(NodeSpec::uniform(2, GpuSpec::t4)).unwrap();
    let broken = sim.spec().gpus[0].uuid.clone();
    sim.fail_gpu(&broken).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let agent = Agent::spawn(agent_command(&sim, kubelet.socket()));
    let views = kubelet.wait_for_resources(&ALL, PATIENCE).await.unwrap();
    assert_eq!(
        views[NUMBER].devices.len(),
        10,
        "only the readable GPU is advertised"
    );
    let healthy = &sim.spec().gpus[1].uuid;
    assert!(
        views[NUMBER]
            .devices
            .iter()
            .all(|d| d.id.starts_with(healthy.as_str()))
    );
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("cannot be read through NVML")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_name_without_any_cluster_still_serves_the_counts() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let (dir, kubelet) = kubelet().await;
    let mut cmd = agent_command(&sim, kubelet.socket());
    cmd.env("NODE_NAME", "node-a")
        .env("HOME", dir.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    let agent = Agent::spawn(cmd);
    let views = kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert_eq!(views[NUMBER].devices.len(), 10);
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("no Kubernetes client")),
        "{log}"
    );
}
