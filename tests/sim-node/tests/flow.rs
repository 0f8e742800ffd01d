//! The whole flow of `sim-node run`, checked step by step: the agent as the shipped DaemonSet runs it
//! registers, a Volcano bind of the shipped one-vGPU example pod is allocated, a CUDA program launched with
//! exactly what Allocate returned is refused at its memory cap and paced at its SM cap, and the pod's series
//! are on the metrics endpoint. The flow runs once per test binary; each test checks one step of it.
//!
//! `VGPU_TEST_AGENT=<vgpu-device-plugin>` and `VGPU_TEST_LIBRARY=<libvgpu.so>` run other builds, e.g. the
//! image's (`target/image-root/`), as CI does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use gpu_sim::GpuSpec;
use serde_json::Value;
use sim_node::agent::AgentBinary;
use sim_node::flow::{self, FlowOptions, FlowReport};
use sim_node::manifests;

const GPUS: u32 = 2;
/// The example's limits (volcano-config/examples/pod-one-vgpu.yaml).
const MEMORY_MIB: u64 = 3000;
const SM_LIMIT: u64 = 30;

/// The flow's report for the one-vGPU example, run once.
fn report() -> &'static FlowReport {
    // A failed flow is reported once, by every test, rather than run again by each.
    static REPORT: OnceLock<Result<FlowReport, String>> = OnceLock::new();
    let result = REPORT.get_or_init(|| {
        std::panic::catch_unwind(|| run_flow("pod-one-vgpu.yaml")).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "the flow panicked".to_owned())
        })
    });
    match result {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    }
}

/// The flow of `example`, on its own runtime; the agent is stopped before the report is shared.
fn run_flow(example: &str) -> FlowReport {
    {
        // VGPU_TEST_AGENT / VGPU_TEST_LIBRARY: run the image's binaries (CI does, after
        // docker/build-artifacts.sh) instead of this build's.
        let agent = match std::env::var_os("VGPU_TEST_AGENT") {
            Some(path) => AgentBinary::Real(PathBuf::from(path)),
            None => AgentBinary::Embedded(PathBuf::from(env!("CARGO_BIN_EXE_sim-node"))),
        };
        let mut options = FlowOptions::new(agent);
        options.gpus = GPUS;
        options.example = example.to_owned();
        options.model = GpuSpec::t4;
        options.release_limiter = !cfg!(debug_assertions);
        options.libvgpu = std::env::var_os("VGPU_TEST_LIBRARY").map(PathBuf::from);
        options.run_ms = 1500;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut lines = Vec::new();
            let mut say = |line: String| lines.push(line);
            let result = flow::run(options, &mut say).await;
            let (report, running) = result.unwrap_or_else(|e| {
                panic!(
                    "the flow failed: {e:#}\nits output so far:\n{}",
                    lines.join("\n")
                )
            });
            let status = running.stop().unwrap();
            assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
            println!("{}", lines.join("\n"));
            report
        })
    }
}

fn envs(r: &FlowReport) -> &std::collections::BTreeMap<String, String> {
    &r.allocated[0].envs
}

fn mount(r: &FlowReport, container_path: &str) -> (String, bool) {
    r.allocated[0]
        .mounts
        .iter()
        .find(|(c, _, _)| c == container_path)
        .map(|(_, h, ro)| (h.clone(), *ro))
        .unwrap_or_else(|| panic!("no mount at {container_path}: {:?}", r.allocated[0].mounts))
}

/// The value of the first series `name{…}` whose labels contain every `labels` pair.
fn series(lines: &[String], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    lines.iter().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (label_text, value) = rest.rsplit_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

#[test]
fn the_agent_registers_the_three_resources_as_the_daemonset_configures_it() {
    let r = report();
    let t4 = GpuSpec::t4(0);
    let counts: Vec<(&str, usize, usize)> = r
        .registered
        .iter()
        .map(|x| (x.resource.as_str(), x.devices, x.healthy))
        .collect();
    let gpus = GPUS as usize;
    // The shipped device config: split 10, factor 1, core scaling 1.
    let memory = gpus * t4.memory_mib as usize;
    assert_eq!(
        counts,
        vec![
            ("volcano.sh/vgpu-number", gpus * 10, gpus * 10),
            ("volcano.sh/vgpu-memory", memory, memory),
            ("volcano.sh/vgpu-cores", gpus * 100, gpus * 100),
        ]
    );
    let endpoints: Vec<&str> = r.registered.iter().map(|x| x.endpoint.as_str()).collect();
    assert_eq!(
        endpoints,
        [
            "nvidia-vgpu-number.sock",
            "nvidia-vgpu-memory.sock",
            "nvidia-vgpu-cores.sock"
        ]
    );
    let expected: String = r
        .gpus
        .iter()
        .map(|u| {
            format!(
                "{u},10,{},NVIDIA-{},true,hami-core:",
                t4.memory_mib, t4.name
            )
        })
        .collect();
    assert_eq!(r.node_register, expected);
}

#[test]
fn the_simulated_bind_is_allocated_with_the_gpu_limits_and_mounts_of_the_contract() {
    let r = report();
    // Binpack on an empty node takes GPU 0.
    assert_eq!(
        r.queue,
        format!("{},NVIDIA,{MEMORY_MIB},{SM_LIMIT}:", r.gpus[0])
    );
    assert_eq!(r.allocated.len(), 1);
    assert_eq!(r.allocated[0].container, "cuda");
    let calls: Vec<(&str, usize)> = r.allocated[0]
        .calls
        .iter()
        .map(|(res, n)| (res.as_str(), *n))
        .collect();
    assert_eq!(
        calls,
        [
            ("volcano.sh/vgpu-number", 1),
            ("volcano.sh/vgpu-memory", MEMORY_MIB as usize),
            ("volcano.sh/vgpu-cores", SM_LIMIT as usize)
        ]
    );
    let e = envs(r);
    assert_eq!(e["NVIDIA_VISIBLE_DEVICES"], r.gpus[0]);
    assert_eq!(e["CUDA_DEVICE_MEMORY_LIMIT_0"], format!("{MEMORY_MIB}m"));
    assert_eq!(e["CUDA_DEVICE_SM_LIMIT"], SM_LIMIT.to_string());
    let cache = &e["CUDA_DEVICE_MEMORY_SHARED_CACHE"];
    assert!(
        cache.starts_with("/tmp/vgpu/") && cache.ends_with(".cache"),
        "{cache}"
    );

    // Host paths are the DaemonSet's, under the simulated host root.
    let root = r.root.display().to_string();
    assert_eq!(
        mount(r, "/usr/local/vgpu/libvgpu.so"),
        (format!("{root}/usr/local/vgpu/libvgpu.so"), true)
    );
    assert_eq!(
        mount(r, "/etc/ld.so.preload"),
        (format!("{root}/usr/local/vgpu/ld.so.preload"), true)
    );
    assert_eq!(
        mount(r, "/tmp/vgpu"),
        (
            format!("{root}/usr/local/vgpu/vgpu/containers/{}_cuda", r.pod_uid),
            false
        )
    );
    assert_eq!(
        mount(r, "/tmp/vgpulock"),
        (format!("{root}/tmp/vgpulock"), false)
    );
    assert_eq!(r.bind_phase.as_deref(), Some("success"));
}

#[test]
fn the_program_runs_with_the_installed_libvgpu_preloaded_and_is_refused_at_its_memory_cap() {
    let r = report();
    // What /etc/ld.so.preload names, on the host: the file the init step installed.
    let preload = PathBuf::from(&r.translated["LD_PRELOAD"]);
    assert_eq!(preload, r.root.join("usr/local/vgpu/libvgpu.so"));
    assert_eq!(r.translated["CUDA_VISIBLE_DEVICES"], r.gpus[0]);
    let cache = &r.translated["CUDA_DEVICE_MEMORY_SHARED_CACHE"];
    assert!(
        cache.starts_with(&mount(r, "/tmp/vgpu").0),
        "{cache} is in the container's cache directory"
    );
    // HAMi-core's v1 region, as the limiter writes it and the agent's metrics read it (docs/volcano-contract.md §7.3).
    assert_eq!(r.region_bytes, Some(2_008_953), "the region file {cache}");

    let value = |step, key| {
        r.program_value(step, key)
            .unwrap_or_else(|| panic!("the program reported no {step}.{key}: {:?}", r.program))
    };
    assert_eq!(r.program["device"]["uuid"], r.gpus[0]);
    assert_eq!(
        value("device", "total_mib"),
        MEMORY_MIB as f64,
        "the cap, not the GPU"
    );
    assert_eq!(value("alloc", "rc"), 2.0);
    assert_eq!(r.program["alloc"]["name"], "CUDA_ERROR_OUT_OF_MEMORY");
    let used = value("device", "total_mib") - value("alloc", "free_mib");
    let refused = value("alloc", "refused_mib");
    assert!(value("alloc", "held_mib") > 0.0);
    assert!(
        used <= MEMORY_MIB as f64 && used + refused > MEMORY_MIB as f64,
        "refused exactly when the next {refused} MiB would pass the cap ({used} MiB used)"
    );
}

#[test]
fn the_pods_series_are_on_the_metrics_endpoint() {
    let r = report();
    let pod = [
        ("namespace", "default"),
        ("pod", "vgpu-one"),
        ("container", "cuda"),
    ];
    let limit = series(&r.metrics, "vgpu_container_memory_limit_bytes", &pod)
        .unwrap_or_else(|| panic!("no limit series: {:#?}", r.metrics));
    assert_eq!(limit, (MEMORY_MIB << 20) as f64);
    let used = series(&r.metrics, "vgpu_container_memory_used_bytes", &pod).unwrap();
    assert!(used > 0.0 && used <= limit, "used {used} of {limit}");
    let refused = series(&r.metrics, "vgpu_container_allocations_refused_total", &pod).unwrap();
    assert!(refused >= 1.0, "the refusal is counted: {refused}");
    assert_eq!(
        series(&r.metrics, "vgpu_container_sm_limit_ratio", &pod),
        Some(SM_LIMIT as f64 / 100.0)
    );
    // The Volcano monitor's names, for existing dashboards.
    let legacy = [
        ("podname", "vgpu-one"),
        ("ctrname", "cuda"),
        ("zone", "vGPU"),
    ];
    assert_eq!(
        series(&r.metrics, "vGPU_device_memory_limit_in_bytes", &legacy),
        Some(limit)
    );
}

#[test]
fn the_program_is_paced_at_its_sm_cap() {
    let r = report();
    let value = |key| {
        r.program_value("kernels", key)
            .unwrap_or_else(|| panic!("the program reported no kernels.{key}: {:?}", r.program))
    };
    let launches = value("launches");
    let nvml = value("nvml_gpu_pct");
    assert!(launches > 0.0);
    // Kernels take modelled time (else the gpu-sim measures nothing and there is nothing to pace).
    assert!(
        nvml > 0.0,
        "the gpu-sim measured no utilisation: {:?}",
        r.program
    );
    // Unpaced, back-to-back 2 ms kernels keep the GPU ~100 % busy; the cap holds it near 30 %.
    assert!(
        nvml <= SM_LIMIT as f64 + 10.0,
        "utilisation {nvml} % with CUDA_DEVICE_SM_LIMIT={SM_LIMIT}: {:?}",
        r.program
    );
}

/// (apiGroup, resource, namespace, name) of an API path.
fn target(path: &str) -> Option<(String, String, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let resource = (*rest.first()?).to_owned();
    let name = rest.get(1).map(|s| (*s).to_owned());
    Some((group, resource, namespace, name))
}

fn allows(rule: &Value, group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    let has = |key: &str, v: &str| {
        rule[key]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == v || x == "*"))
    };
    let names_ok = match rule["resourceNames"].as_array() {
        None => true,
        Some(names) => name.is_some_and(|n| names.iter().any(|x| x == n)),
    };
    has("apiGroups", group) && has("resources", resource) && has("verbs", verb) && names_ok
}

#[test]
fn every_apiserver_request_of_the_agent_is_allowed_by_the_shipped_rbac() {
    let r = report();
    let docs =
        manifests::load(&manifests::manifests_dir().join("vgpu-device-plugin.yaml")).unwrap();
    let cluster_rules =
        manifests::find(&docs, "ClusterRole", "volcano-device-plugin").unwrap()["rules"]
            .as_array()
            .unwrap()
            .clone();
    let role = manifests::find(&docs, "Role", "volcano-device-plugin-config").unwrap();
    let role_ns = role["metadata"]["namespace"].as_str().unwrap().to_owned();
    let role_rules = role["rules"].as_array().unwrap().clone();

    let mut used = BTreeSet::new();
    for request in &r.requests {
        // The simulated scheduler's own writes (a strategic-merge PATCH and the Binding) are not the agent's.
        let scheduler = request.path.ends_with("/binding")
            || request
                .content_type
                .as_deref()
                .is_some_and(|c| c.contains("strategic-merge-patch"));
        if scheduler {
            continue;
        }
        let verb = request.verb();
        let (group, resource, namespace, name) = target(&request.path)
            .unwrap_or_else(|| panic!("unexpected request {} {}", request.method, request.path));
        let allowed = cluster_rules
            .iter()
            .any(|rule| allows(rule, &group, &resource, verb, name.as_deref()))
            || (namespace.as_deref() == Some(role_ns.as_str())
                && role_rules
                    .iter()
                    .any(|rule| allows(rule, &group, &resource, verb, name.as_deref())));
        assert!(
            allowed,
            "{verb} {group}/{resource} {namespace:?}/{name:?} ({} {}) is not allowed by the shipped RBAC",
            request.method, request.path
        );
        used.insert(format!("{group}/{resource}:{verb}"));
    }
    println!("the agent's requests: {used:?}");
    // And nothing is granted that the agent does not use: the flow exercises every grant but the
    // VGPUAllocateFailed Event (a failure path, covered by the plugin's hand-off tests).
    let mut granted = BTreeSet::new();
    for rule in cluster_rules.iter().chain(&role_rules) {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    granted.insert(format!(
                        "{}/{}:{}",
                        group.as_str().unwrap(),
                        resource.as_str().unwrap(),
                        verb.as_str().unwrap()
                    ));
                }
            }
        }
    }
    let unused: Vec<&String> = granted
        .difference(&used)
        .filter(|g| !g.starts_with("events.k8s.io/events:"))
        .collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
}

#[test]
fn two_gpu_containers_with_a_sidecar_between_each_get_their_own_gpus_and_caps() {
    let r = run_flow("pod-two-gpu-containers-sidecar.yaml");
    let (a, b) = (&r.gpus[0], &r.gpus[1]);
    // Binpack: the trainer's two vGPUs on GPUs 0 and 1, then eval on the GPU with the most memory used.
    assert_eq!(
        r.queue,
        format!("{a},NVIDIA,2000,20:{b},NVIDIA,2000,20:;{a},NVIDIA,1000,0:")
    );
    let names: Vec<&str> = r.allocated.iter().map(|x| x.container.as_str()).collect();
    assert_eq!(names, ["trainer", "eval"], "the sidecar gets nothing");
    let (trainer, eval) = (&r.allocated[0], &r.allocated[1]);
    assert_eq!(trainer.envs["NVIDIA_VISIBLE_DEVICES"], format!("{a},{b}"));
    assert_eq!(trainer.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m");
    assert_eq!(trainer.envs["CUDA_DEVICE_MEMORY_LIMIT_1"], "2000m");
    assert_eq!(trainer.envs["CUDA_DEVICE_SM_LIMIT"], "20");
    assert_eq!(eval.envs["NVIDIA_VISIBLE_DEVICES"], *a);
    assert_eq!(eval.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
    assert!(!eval.envs.contains_key("CUDA_DEVICE_MEMORY_LIMIT_1"));
    // Each container its own cache directory, named by its own name.
    for x in [trainer, eval] {
        let cache = x
            .mounts
            .iter()
            .find(|(c, _, _)| c == "/tmp/vgpu")
            .map(|(_, h, _)| h.clone())
            .unwrap();
        assert!(
            cache.ends_with(&format!("/{}_{}", r.pod_uid, x.container)),
            "{cache}"
        );
    }
    assert_eq!(r.bind_phase.as_deref(), Some("success"));
    // The program ran as the trainer: its first GPU capped at 2000 MiB.
    assert_eq!(r.program_value("device", "total_mib"), Some(2000.0));
    assert_eq!(r.program_value("alloc", "rc"), Some(2.0));
}
