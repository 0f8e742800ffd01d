//! The real agent binary against a fake kubelet that dials back with each `:authority` form kubelets and gRPC
//! clients send: `localhost` (kubelets from 1.26), the raw socket path (kubelets before 1.26, grpc-java), the
//! percent-encoded path (gRPC C-core from 1.57) and an empty one. Under each, registration, the dial-back's
//! `GetDevicePluginOptions` and `ListAndWatch`, `GetPreferredAllocation` and a Volcano hand-off `Allocate` must
//! all be served. Without `plugin/src/authority.rs` every form but `localhost` is reset by h2 with
//! PROTOCOL_ERROR before a handler runs.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};
use harness::kubelet::AuthorityForm;

async fn serves_every_call_under(form: AuthorityForm) {
    let c = cluster(NodeSpec::uniform(2, GpuSpec::t4))
        .authority(form)
        // The adapter says, once per connection, which authority it had to replace.
        .env(
            "RUST_LOG",
            "info,vgpu_device_plugin::kubelet::authority=debug",
        )
        .ready(Ready::Spawned)
        .start()
        .await;
    let (kubelet, agent) = (&c.kubelet, &c.agent);
    let kubelet_dir = kubelet.dir().to_owned();

    // Registration, then the dial-back: GetDevicePluginOptions and ListAndWatch on every endpoint.
    let views = kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{form:?}: {e}\n{}", agent.log_text()));
    for resource in ALL {
        let view = &views[resource];
        assert!(
            view.error.is_none(),
            "{form:?} {resource}: {:?}",
            view.error
        );
        assert!(view.options.is_some(), "{form:?} {resource}: no options");
    }
    assert_eq!(views[NUMBER].devices.len(), 20, "{form:?}");
    assert_eq!(views[MEMORY].devices.len(), 2 * 15360, "{form:?}");
    assert_eq!(views[CORES].devices.len(), 200, "{form:?}");

    // A pod Volcano bound to the second GPU.
    let gpu = c.uuid(1);
    bind(&c, "p1", &format!("{gpu},NVIDIA,3000,30:")).await;

    // GetPreferredAllocation names the scheduler's GPU...
    let available: Vec<String> = views[NUMBER].devices.iter().map(|d| d.id.clone()).collect();
    let preferred = kubelet
        .preferred(NUMBER, &available, 1)
        .await
        .unwrap()
        .unwrap_or_else(|s| {
            panic!(
                "{form:?}: GetPreferredAllocation: {s}\n{}",
                agent.log_text()
            )
        });
    assert_eq!(preferred.len(), 1, "{form:?}");
    assert!(preferred[0].starts_with(&gpu), "{form:?}: {preferred:?}");

    // ...and the kubelet's admission (GetPreferredAllocation, then Allocate) hands the container its GPU.
    let response = kubelet
        .admit(NUMBER, 1)
        .await
        .unwrap()
        .unwrap_or_else(|s| panic!("{form:?}: Allocate: {s}\n{}", agent.log_text()));
    let envs = &response.container_responses[0].envs;
    assert_eq!(envs["NVIDIA_VISIBLE_DEVICES"], gpu, "{form:?}");
    assert_eq!(envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "3000m", "{form:?}");
    assert_eq!(envs["CUDA_DEVICE_SM_LIMIT"], "30", "{form:?}");
    // The cores endpoint answers its (empty) Allocate under the same form.
    let id = views[CORES].devices[0].id.clone();
    let cores = kubelet.allocate(CORES, &[&id]).await.unwrap();
    assert!(cores.is_ok(), "{form:?}: cores Allocate: {cores:?}");

    // The calls really carried the form: the agent replaced exactly the authorities h2 refuses.
    let log = agent.log_text();
    let replaced = log.contains("serving it as localhost");
    assert_eq!(
        replaced,
        form != AuthorityForm::Localhost,
        "{form:?}: replacement logged = {replaced}\n{log}"
    );
    if let Some(value) = form.value(&kubelet_dir.join("nvidia-vgpu-number.sock"))
        && !value.is_empty()
    {
        let value = String::from_utf8(value).unwrap();
        assert!(log.contains(&value), "{form:?}: {value} not in\n{log}");
    }
    assert!(!log.contains("panicked"), "{log}");
}

/// What Volcano up to v1.15 does at bind: create the pod, patch the six annotations, bind it to the node.
async fn bind(c: &Cluster, name: &str, queue: &str) {
    c.bind(
        name,
        BindStyle::PatchThenBind,
        &[("cuda", Some(1), Some(3000), Some(30))],
        queue,
        "1787220000",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_served_to_a_kubelet_sending_localhost() {
    serves_every_call_under(AuthorityForm::Localhost).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_served_to_a_kubelet_sending_the_raw_socket_path() {
    serves_every_call_under(AuthorityForm::RawPath).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_served_to_a_client_sending_the_percent_encoded_socket_path() {
    serves_every_call_under(AuthorityForm::PercentEncodedPath).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_served_to_a_client_sending_an_empty_authority() {
    serves_every_call_under(AuthorityForm::Empty).await;
}
