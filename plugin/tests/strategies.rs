//! The device list strategies end to end (issue #8): what the kubelet gets from Allocate for one- and
//! multi-GPU containers under `envvar` with `--pass-device-specs` and the driver paths, and under
//! `volume-mounts`; and the refusal of an unknown strategy.

#![allow(clippy::unwrap_used)]

mod common;
mod handoff;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use handoff::*;

/// Four T4s with minors 3, 1, 0, 2 in NVML order, so a minor is never the NVML index.
fn node() -> NodeSpec {
    NodeSpec::new(vec![
        GpuSpec::t4(3),
        GpuSpec::t4(1),
        GpuSpec::t4(0),
        GpuSpec::t4(2),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envvar_passes_present_device_nodes_and_the_driver_directory() {
    let c = SimCluster::start(
        node(),
        &[
            "--pass-device-specs",
            "--dev-root",
            "{root}/devroot",
            "--driver-host-path",
            "{root}/driver",
            "--driver-set-path",
        ],
    )
    .await;
    let (a, b, d) = (c.uuid(0), c.uuid(1), c.uuid(3));
    c.bind(
        "p1",
        &[
            ("one", vec![a.clone()]),
            ("two", vec![b.clone(), d.clone()]),
        ],
    )
    .await;
    let dev = c.root().join("devroot/dev");
    let host = |n: &str| dev.join(n).display().to_string();

    for (uuids, size) in [(vec![a.clone()], 1), (vec![b.clone(), d.clone()], 2)] {
        let r = c.admit(size).await;
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], uuids.join(","));
        let mut expected = vec![
            (
                "/dev/nvidiactl".to_owned(),
                host("nvidiactl"),
                "rw".to_owned(),
            ),
            (
                "/dev/nvidia-uvm".to_owned(),
                host("nvidia-uvm"),
                "rw".to_owned(),
            ),
        ];
        for uuid in &uuids {
            let node = format!("nvidia{}", c.minor(uuid));
            expected.push((format!("/dev/{node}"), host(&node), "rw".to_owned()));
        }
        let got: Vec<(String, String, String)> = r
            .devices
            .iter()
            .map(|d| {
                (
                    d.container_path.clone(),
                    d.host_path.clone(),
                    d.permissions.clone(),
                )
            })
            .collect();
        assert_eq!(got, expected, "absent uvm-tools/modeset are left out");

        let driver = c.root().join("driver").display().to_string();
        assert!(
            mounts(&r).contains(&("/usr/local/nvidia".to_owned(), driver, true)),
            "{:?}",
            mounts(&r)
        );
        assert_eq!(
            r.envs["LD_LIBRARY_PATH"],
            "/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
        );
        assert!(r.envs["PATH"].starts_with("/usr/local/nvidia/bin:"));
        assert!(r.annotations.is_empty() && r.cdi_devices.is_empty());
        // The limiter is still injected the classic way.
        assert!(mounts(&r).iter().any(|m| m.0 == "/etc/ld.so.preload"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_mounts_list_each_gpu_of_the_container() {
    let c = SimCluster::start(node(), &["--device-list-strategy", "volume-mounts"]).await;
    let (a, b, d) = (c.uuid(2), c.uuid(0), c.uuid(1));
    c.bind(
        "p1",
        &[
            ("one", vec![a.clone()]),
            ("two", vec![b.clone(), d.clone()]),
        ],
    )
    .await;
    for (uuids, size) in [(vec![a], 1), (vec![b, d], 2)] {
        let r = c.admit(size).await;
        assert_eq!(
            r.envs["NVIDIA_VISIBLE_DEVICES"],
            "/var/run/nvidia-container-devices"
        );
        let lists: Vec<(String, String, bool)> = mounts(&r)
            .into_iter()
            .filter(|m| m.0.starts_with("/var/run/nvidia-container-devices/"))
            .collect();
        let expected: Vec<(String, String, bool)> = uuids
            .iter()
            .map(|u| {
                (
                    format!("/var/run/nvidia-container-devices/{u}"),
                    "/dev/null".to_owned(),
                    true,
                )
            })
            .collect();
        assert_eq!(lists, expected);
        assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
        assert!(
            r.devices.is_empty(),
            "no device specs without --pass-device-specs"
        );
    }
}

#[test]
fn an_unknown_strategy_is_refused_with_the_accepted_values() {
    let sim = SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = agent_command(&sim, &dir.path().join("kubelet.sock"));
    cmd.args(["--device-list-strategy", "envvar,cdi"]);
    let (status, log) = run_to_exit(cmd);
    assert_eq!(status.code(), Some(2), "{log:?}");
    let text = log.join("\n");
    assert!(
        text.contains("--device-list-strategy")
            && text.contains("\"cdi\"")
            && text.contains("expected envvar, volume-mounts, cdi-annotations or cdi-cri"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_the_node_does_not_have_fails_the_pod_instead_of_a_missing_device_node() {
    let c = SimCluster::start(
        node(),
        &["--pass-device-specs", "--dev-root", "{root}/devroot"],
    )
    .await;
    let stranger = "GPU-00000000-1111-2222-3333-444444444444".to_owned();
    c.bind("p1", &[("cuda", vec![stranger.clone()])]).await;
    let status = c
        .kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .expect_err("Allocate must fail");
    assert!(
        status.message().contains(&stranger) && status.message().contains("serves no such GPU"),
        "{}",
        status.message()
    );
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(c.client.clone(), NS);
    let annotations = pods.get("p1").await.unwrap().metadata.annotations.unwrap();
    assert_eq!(annotations["volcano.sh/bind-phase"], "failed");
}
