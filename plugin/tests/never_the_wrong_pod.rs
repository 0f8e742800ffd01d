//! Allocate under bad input: the real agent on the gpu-sim, a fake kubelet and a fake apiserver, and pods whose
//! annotations the agent cannot serve. A pod that may be the one the kubelet is admitting is never skipped for
//! the next pod (whose GPUs would then start in the wrong pod): it fails with an Event, the kubelet's error
//! names it and the cause, and the next pod gets its own GPUs on the next call. Requests the node cannot have
//! (sizes, duplicate or unknown IDs) are refused before anything is looked up, and the agent keeps serving.

#![allow(clippy::unwrap_used)]

mod common;

use std::ops::Deref;
use std::time::Duration;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};

/// The fixture's cluster, its agent watching, and what these tests add.
struct Cluster(common::Cluster);

impl Deref for Cluster {
    type Target = common::Cluster;

    fn deref(&self) -> &common::Cluster {
        &self.0
    }
}

impl Cluster {
    async fn start(gpus: u32, args: &[&str]) -> Self {
        Self(
            cluster(NodeSpec::uniform(gpus, GpuSpec::t4))
                .args(args)
                .ready(Ready::Watching)
                .start()
                .await,
        )
    }

    /// Binds a pod as Volcano master does (annotations inside the Binding). `containers` are (name,
    /// vgpu-number or 0 for none, vgpu-memory); `queue` is written verbatim, so it may be anything.
    async fn bind(&self, name: &str, containers: &[Ctr<'_>], queue: &str, time: &str) {
        let specs: Vec<common::Ctr<'_>> = containers
            .iter()
            // 0 stands for no vgpu-number limit: a memory-only container.
            .map(|(n, count, mem)| (*n, (*count > 0).then_some(*count), Some(*mem), None))
            .collect();
        self.0
            .bind(name, BindStyle::InBinding, &specs, queue, time)
            .await;
    }

    /// The kubelet admits a container of `size` vGPUs and the agent refuses: the status.
    async fn refused(&self, size: usize) -> tonic::Status {
        match self.kubelet.admit(NUMBER, size).await.unwrap() {
            Ok(r) => panic!(
                "Allocate handed out {:?}\n{}",
                r.container_responses[0].envs.get("NVIDIA_VISIBLE_DEVICES"),
                self.agent.log_text()
            ),
            Err(status) => status,
        }
    }

    /// The kubelet admits a 1-vGPU container and the agent refuses it as pod `pod`'s, for a cause that says
    /// `cause`; the pod is marked failed.
    async fn refused_as(&self, pod: &str, cause: &str) {
        let status = self.refused(1).await;
        assert!(
            status.message().contains(&format!("default/{pod}"))
                && status.message().contains(cause),
            "{}",
            status.message()
        );
        assert_eq!(
            self.annotation(pod, "volcano.sh/bind-phase")
                .await
                .as_deref(),
            Some("failed"),
            "{}",
            self.agent.log_text()
        );
    }

    /// The `VGPUAllocateFailed` Event notes recorded on a pod, waiting for the first (they are published off
    /// the Allocate lock, after the kubelet's answer).
    async fn failure_events(&self, pod: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let notes: Vec<String> = self
                .api
                .events()
                .iter()
                .filter(|e| {
                    e["reason"] == "VGPUAllocateFailed"
                        && (e["regarding"]["name"] == pod || e["involvedObject"]["name"] == pod)
                })
                .map(|e| {
                    e["note"]
                        .as_str()
                        .or(e["message"].as_str())
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            if !notes.is_empty() || std::time::Instant::now() > deadline {
                return notes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A container: name, vgpu-number (0: none), vgpu-memory.
type Ctr<'a> = (&'a str, u64, u64);

fn dev(uuid: &str, mem: u64, cores: u64) -> String {
    format!("{uuid},NVIDIA,{mem},{cores}:")
}

/// The regression of issue 13: the oldest pending pod's queue does not decode. The old agent skipped it and
/// handed the kubelet (admitting that pod) the next pod's GPU and limits; the next pod then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_oldest_pod_fails_this_allocate_and_never_gets_the_next_pod_s_gpu() {
    let c = Cluster::start(2, &[]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    c.bind(
        "bad",
        &[("cuda", 1, 1000)],
        &format!("{a},NVIDIA,-1,0:"),
        "1787220000",
    )
    .await;
    c.bind(
        "good",
        &[("cuda", 1, 2000)],
        &dev(&b, 2000, 0),
        "1787220001",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let status = c.refused(1).await;
    let message = status.message();
    assert!(
        message.contains("default/bad")
            && message.contains("used memory")
            && message.contains("\"-1\""),
        "the kubelet's error names the pod and the field: {message}"
    );
    assert!(!message.contains("no pending pod"), "{message}");
    assert_eq!(
        c.annotation("bad", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("failed")
    );
    assert_eq!(
        c.annotation("good", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("allocating"),
        "the next pod's assignment was not touched"
    );
    assert_eq!(
        c.annotation("good", "volcano.sh/devices-to-allocate").await,
        Some(dev(&b, 2000, 0))
    );
    let notes = c.failure_events("bad").await;
    assert!(
        notes.iter().any(|n| n.contains("used memory")),
        "{notes:?}\n{:?}",
        c.api.events()
    );

    // The next call is the good pod's, and it gets its own GPU.
    let r = c.kubelet.admit(NUMBER, 1).await.unwrap().unwrap();
    let envs = &r.container_responses[0].envs;
    assert_eq!(envs["NVIDIA_VISIBLE_DEVICES"], b);
    assert_eq!(envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m");
    assert_eq!(
        c.annotation("good", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("success")
    );
}

/// Each way a pod the kubelet may be admitting can be unusable, end to end: refused with the pod and the
/// cause in the kubelet's error, marked failed, an Event on it; then a good pod still allocates. Four of these
/// (other type only, count mismatch, empty queue, `;` only) used to leave the pod `allocating` with no Event
/// behind the generic "no pending pod" error; the unknown GPU one named no pod in the error and the unhealthy
/// one was handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unusable_pod_class_is_refused_by_name_with_an_event() {
    let c = Cluster::start(2, &["--health-recovery-period", "1h"]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    let one = [("cuda", 1, 1000)];
    let two = [("cuda", 2, 1000)];
    let pair = [("first", 1, 1000), ("second", 1, 1000)];
    let cases: Vec<(&str, &[Ctr<'_>], String, usize, &str)> = vec![
        (
            "unknown-gpu",
            &one,
            dev("GPU-00000000-0000-0000-0000-000000000000", 1000, 0),
            1,
            "serves no such GPU",
        ),
        (
            "other-type",
            &one,
            "MLU-1,MLU,1000,0:".to_owned(),
            1,
            "is not a queue with an NVIDIA device left",
        ),
        (
            "count-mismatch",
            &two,
            dev(&a, 1000, 0),
            2,
            "1 device(s) is not the 2 GPU(s)",
        ),
        (
            "empty-queue",
            &one,
            String::new(),
            1,
            "\"\" is not a queue with an NVIDIA device left",
        ),
        (
            "separators-only",
            &pair,
            ";".to_owned(),
            1,
            "\";\" is not a queue with an NVIDIA device left",
        ),
        (
            "too-much-memory",
            &one,
            dev(&a, 15361, 0),
            1,
            "\"15361\" is not at most 15360",
        ),
        (
            "same-gpu-twice",
            &two,
            format!("{}{}", dev(&a, 1000, 0), dev(&a, 1000, 0)),
            2,
            "not a GPU distinct",
        ),
        (
            "cores-over-100",
            &one,
            dev(&a, 1000, 101),
            1,
            "field 3 (used cores)",
        ),
    ];
    for (i, (name, containers, queue, size, expected)) in cases.iter().enumerate() {
        c.bind(name, containers, queue, &(1_787_220_000 + i).to_string())
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = c.refused(*size).await;
        let message = status.message();
        assert!(
            message.contains(&format!("default/{name}")) && message.contains(expected),
            "{name}: {message}"
        );
        assert_eq!(
            c.annotation(name, "volcano.sh/bind-phase").await.as_deref(),
            Some("failed"),
            "{name}"
        );
        let notes = c.failure_events(name).await;
        assert!(
            notes.iter().any(|n| n.contains(expected)),
            "{name}: {notes:?}"
        );
    }

    // The GPU the agent marked unhealthy after the scheduler placed the pod.
    c.bind("on-sick-gpu", &one, &dev(&b, 1000, 0), "1787220100")
        .await;
    c.sim.inject_xid(&b, 79).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let view = c.kubelet.resource(NUMBER).unwrap();
        if view
            .devices
            .iter()
            .any(|d| d.id.starts_with(&b) && d.health == "Unhealthy")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            c.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let message = c.refused(1).await.message().to_owned();
    assert!(
        message.contains("default/on-sick-gpu") && message.contains("not a healthy GPU"),
        "{message}"
    );
    let notes = c.failure_events("on-sick-gpu").await;
    assert!(notes.iter().any(|n| n.contains("Unhealthy")), "{notes:?}");

    // Through all of it the agent kept serving.
    c.bind("good", &one, &dev(&a, 1000, 0), "1787220200").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c.kubelet.admit(NUMBER, 1).await.unwrap().unwrap();
    assert_eq!(r.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], a);
}

/// Sizes and ID lists the node cannot have are refused before anything is allocated: an `allocation_size` of
/// 2^31 − 1 (the largest the kubelet API can carry) once made the agent reserve that many IDs and abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_sizes_and_id_lists_are_refused_and_the_agent_keeps_serving() {
    let c = Cluster::start(1, &[]).await;
    let a = c.uuid(0);
    let ids: Vec<String> = c
        .kubelet
        .resource(NUMBER)
        .unwrap()
        .devices
        .iter()
        .map(|d| d.id.clone())
        .collect();

    let status = c
        .kubelet
        .preferred(NUMBER, &ids, i32::MAX as usize)
        .await
        .unwrap()
        .expect_err("an allocation_size of 2^31 - 1");
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("allocation_size 2147483647"),
        "{}",
        status.message()
    );

    let twice = vec![ids[0].clone(), ids[0].clone()];
    let status = c
        .kubelet
        .preferred(NUMBER, &twice, 1)
        .await
        .unwrap()
        .unwrap_err();
    assert!(status.message().contains("twice"), "{}", status.message());
    let unknown = vec!["GPU-not-here-0".to_owned()];
    let status = c
        .kubelet
        .preferred(NUMBER, &unknown, 1)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        status
            .message()
            .contains("not an ID this resource advertises"),
        "{}",
        status.message()
    );
    let past_the_end = vec![format!("{a}-{}", ids.len())];
    let status = c
        .kubelet
        .preferred(NUMBER, &past_the_end, 1)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        status.message().contains("not an ID"),
        "{}",
        status.message()
    );

    for bad in [
        vec![ids[0].as_str(), ids[0].as_str()],
        vec!["GPU-not-here-0"],
        vec![],
    ] {
        let status = c.kubelet.allocate(NUMBER, &bad).await.unwrap().unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{bad:?}: {}",
            status.message()
        );
    }
    let many: Vec<String> = (0..60_000).map(|i| format!("{a}-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let status = c.kubelet.allocate(CORES, &many).await.unwrap().unwrap_err();
    assert!(
        status.message().contains("not at most"),
        "{}",
        status.message()
    );

    assert!(c.agent.log_text().lines().all(|l| !l.contains("panicked")));
    c.bind("p1", &[("cuda", 1, 1000)], &dev(&a, 1000, 0), "1787220000")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c.kubelet.admit(NUMBER, 1).await.unwrap().unwrap();
    assert_eq!(r.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], a);
}

/// The kubelet calls the memory endpoint for a container with both limits too, before or after its number
/// call (it walks the limits map). After the number call the pod's queue points at the next container, so
/// the old agent handed a memory-only next container's GPU to the first container's memory call, and the
/// memory-only container then failed. Both orders, one pod each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_container_s_memory_call_never_takes_the_next_memory_only_container_s_gpu() {
    let c = Cluster::start(2, &[]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    let number_id = c.kubelet.resource(NUMBER).unwrap().devices[0].id.clone();
    let memory_ids: Vec<String> = c
        .kubelet
        .resource(MEMORY)
        .unwrap()
        .devices
        .iter()
        .take(1000)
        .map(|d| d.id.clone())
        .collect();
    let memory_ids: Vec<&str> = memory_ids.iter().map(String::as_str).collect();
    let containers = [("trainer", 1, 1000), ("feeder", 0, 1000)];
    let queue = format!("{};{}", dev(&a, 1000, 0), dev(&b, 1000, 0));
    let visible = |r: &kubelet_api::v1beta1::AllocateResponse| {
        r.container_responses[0]
            .envs
            .get("NVIDIA_VISIBLE_DEVICES")
            .cloned()
    };
    for (pod, memory_first) in [("number-first", false), ("memory-first", true)] {
        let time = if memory_first {
            "1787220001"
        } else {
            "1787220000"
        };
        c.bind(pod, &containers, &queue, time).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let call = |resource: &'static str| {
            let ids: Vec<&str> = if resource == NUMBER {
                vec![number_id.as_str()]
            } else {
                memory_ids.clone()
            };
            let c = &c;
            async move {
                c.kubelet
                    .allocate(resource, &ids)
                    .await
                    .unwrap()
                    .unwrap_or_else(|s| panic!("{pod}: {}\n{}", s.message(), c.agent.log_text()))
            }
        };
        let (trainer, trainer_memory) = if memory_first {
            let m = call(MEMORY).await;
            (call(NUMBER).await, m)
        } else {
            let n = call(NUMBER).await;
            (n, call(MEMORY).await)
        };
        assert_eq!(visible(&trainer).as_deref(), Some(a.as_str()), "{pod}");
        assert_eq!(
            visible(&trainer_memory),
            None,
            "{pod}: the trainer's memory call is answered empty"
        );
        let feeder = call(MEMORY).await;
        assert_eq!(
            visible(&feeder).as_deref(),
            Some(b.as_str()),
            "{pod}: the feeder gets its own GPU"
        );
        assert_eq!(
            feeder.container_responses[0].envs["CUDA_DEVICE_MEMORY_LIMIT_0"],
            "1000m"
        );
        assert_eq!(
            c.annotation(pod, "volcano.sh/bind-phase").await.as_deref(),
            Some("success"),
            "{pod}"
        );
    }
}

/// Events are published after the kubelet has its answer, off the Allocate lock: an apiserver that never
/// answers the Event neither delays the refusal nor holds up the next pod's Allocate. (The old agent published
/// under the lock, without a bound of its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_event_write_holds_up_neither_the_refusal_nor_the_next_allocate() {
    let c = Cluster::start(2, &[]).await;
    let b = c.uuid(1);
    let elsewhere = "GPU-00000000-0000-0000-0000-000000000000";
    c.bind(
        "bad",
        &[("cuda", 1, 1000)],
        &dev(elsewhere, 1000, 0),
        "1787220000",
    )
    .await;
    c.bind(
        "good",
        &[("cuda", 1, 1000)],
        &dev(&b, 1000, 0),
        "1787220001",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.api.hang_next("POST", "/events");

    let started = std::time::Instant::now();
    let both = async {
        let message = c.refused(1).await.message().to_owned();
        let next = c.kubelet.admit(NUMBER, 1).await.unwrap();
        (message, next)
    };
    let (message, next) = tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the hung Event write held Allocate for over 5 s\n{}",
                c.agent.log_text()
            )
        });
    assert!(message.contains("default/bad"), "{message}");
    let r = next.unwrap_or_else(|s| panic!("{}\n{}", s.message(), c.agent.log_text()));
    assert_eq!(r.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], b);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// The admitted pod's uid and the cache directory the kubelet mounted for its container (`/tmp/vgpu`).
fn cache_mount(r: &kubelet_api::v1beta1::ContainerAllocateResponse) -> String {
    r.mounts
        .iter()
        .find(|m| m.container_path == "/tmp/vgpu")
        .map(|m| m.host_path.clone())
        .expect("a /tmp/vgpu mount")
}

/// A tenant allowed to patch its own pod (the `edit` role) re-opens it after the kubelet started it: a pod
/// stays `Pending` while one of its containers waits (an image that never pulls), so it puts its running pod
/// back to `allocating`, first in line (`vgpu-time` 0), with a queue of its choosing. The next pod's Allocate
/// used to be handed the tenant's GPU, limits and cache directory — the one the tenant's running container has
/// mounted, region and all. A pod the kubelet started is never a candidate; the other pod gets its own.
/// With the status rewritten too (a tenant that may write `pods/status`), the node's record refuses to hand
/// the container out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_pod_reopened_by_its_tenant_never_takes_another_pod_s_allocate() {
    let c = Cluster::start(2, &[]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    let tenant_queue = dev(&a, 1000, 0);
    c.bind("tenant", &[("cuda", 1, 1000)], &tenant_queue, "1787220000")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tenant = c.0.admit(1).await;
    let tenant_dir = cache_mount(&tenant);
    assert_eq!(tenant.envs["NVIDIA_VISIBLE_DEVICES"], a);
    let records = c.dir.path().join("hook/vgpu/containers.records");
    let record_of = |dir: &str| {
        let key = std::path::Path::new(dir)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        std::fs::read(records.join(format!("{key}.json"))).unwrap()
    };
    let tenant_record = record_of(&tenant_dir);

    // The kubelet starts the pod; one container runs, the other's image never pulls.
    c.api
        .patch_object(
            "pods",
            Some("default"),
            "tenant",
            serde_json::json!({"status": {
                "phase": "Pending",
                "startTime": "2026-12-06T10:00:00Z",
                "containerStatuses": [{"name": "cuda", "image": "i", "imageID": "", "ready": true,
                    "restartCount": 0, "containerID": "containerd://0123abcd"}],
            }}),
        )
        .unwrap();
    let reopen = || {
        c.api
            .patch_object(
                "pods",
                Some("default"),
                "tenant",
                serde_json::json!({"metadata": {"annotations": {
                    "volcano.sh/bind-phase": "allocating",
                    "volcano.sh/vgpu-time": "0",
                    "volcano.sh/devices-to-allocate": tenant_queue,
                }}}),
            )
            .unwrap();
    };
    reopen();
    c.bind(
        "victim",
        &[("cuda", 1, 2000)],
        &dev(&b, 2000, 0),
        "1787220001",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = c.0.admit(1).await;
    let envs = &victim.envs;
    assert_eq!(
        envs["NVIDIA_VISIBLE_DEVICES"], b,
        "the victim gets its own GPU"
    );
    assert_eq!(envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m");
    assert_ne!(cache_mount(&victim), tenant_dir);
    assert_eq!(
        c.annotation("victim", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("success")
    );
    assert_eq!(
        record_of(&tenant_dir),
        tenant_record,
        "the tenant's record is untouched"
    );

    // A tenant that can also clear its pod's status: the node's record of its container marks the pod as
    // handed out before, so it is passed over (not chosen, and not failed in the victim's place); the
    // victim's call is served, and the container's record and directory stay the running container's.
    c.api
        .patch_object(
            "pods",
            Some("default"),
            "tenant",
            serde_json::json!({"status": {"startTime": null, "containerStatuses": null}}),
        )
        .unwrap();
    reopen();
    c.bind(
        "victim-2",
        &[("cuda", 1, 3000)],
        &dev(&b, 3000, 0),
        "1787220002",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.0.admit(1).await;
    assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], b);
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "3000m");
    assert_ne!(cache_mount(&r), tenant_dir);
    assert_eq!(
        record_of(&tenant_dir),
        tenant_record,
        "the tenant's record is untouched"
    );
    assert_eq!(
        c.annotation("victim-2", "volcano.sh/bind-phase")
            .await
            .as_deref(),
        Some("success")
    );
}

/// An init container with a vGPU limit (a native sidecar too): the scheduler gives it no segment, and the
/// kubelet allocates it first. The Go plugin handed it the first app container's devices (and the app
/// container then failed, or got the next pod's); the call is refused naming it, and the next pod is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_container_with_a_vgpu_limit_is_refused_by_name_not_given_the_app_container_s_gpu()
{
    let c = Cluster::start(2, &[]).await;
    let (a, b) = (c.uuid(0), c.uuid(1));
    let mut pod = pod_json("sidecar", &[("cuda", Some(1), Some(1000), None)]);
    pod["spec"]["initContainers"] = serde_json::json!([{
        "name": "warmup", "image": "i", "restartPolicy": "Always",
        "resources": {"limits": {"volcano.sh/vgpu-number": "1"}},
    }]);
    c.0.create_pod(pod).await;
    c.0.bind_pod(
        "sidecar",
        BindStyle::InBinding,
        bind_annotations("node-a", &dev(&a, 1000, 0), "1787220000"),
    )
    .await;
    c.bind(
        "next",
        &[("cuda", 1, 2000)],
        &dev(&b, 2000, 0),
        "1787220001",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.refused_as("sidecar", "init container \"warmup\"").await;
    assert_eq!(c.0.admit(1).await.envs["NVIDIA_VISIBLE_DEVICES"], b);
}
