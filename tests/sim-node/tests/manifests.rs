//! The shipped manifests (`volcano-config/`) agree with the code: the DaemonSet passes only flags and
//! environment variables the agent accepts, its host paths are the ones the agent hands to the kubelet, the
//! config maps hold exactly the keys the agent's parsers accept (at their defaults), the scheduler
//! configuration enables vGPU sharing on the same config map, the example pods ask for the resources the
//! agent serves, and the image layout the init container relies on is the one `docker/build-artifacts.sh`
//! builds. (Schema validation against Kubernetes itself is `volcano-config/validate.sh`, run by CI.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sim_node::manifests::{self, AgentDaemonSet, config_map_data, find, load};
use vgpu_device_plugin::config::ResourceNames;
use vgpu_device_plugin::config::device::{
    DEVICE_CONFIG_KEY, DEVICE_CONFIG_MAP, ExplicitFlags, NODE_CONFIG_PATH, VolcanoConfig, merge,
    parse_device_config, parse_node_config,
};
use vgpu_device_plugin::container::paths::{CONTAINER_LIBVGPU, CONTAINER_LOCK_DIR};

fn dir() -> PathBuf {
    manifests::manifests_dir()
}

fn daemonset() -> AgentDaemonSet {
    manifests::agent_daemonset(&dir()).unwrap()
}

/// The agent's `--help` (the same clap definition as `vgpu-device-plugin`, through `sim-node agent`).
fn agent_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sim-node"))
        .args(["agent", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "agent --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_parses_and_names_its_kind() {
    let mut files = Vec::new();
    yaml_files(&dir(), &mut files);
    assert!(files.len() >= 8, "{files:?}");
    for file in files {
        let docs = load(&file).unwrap();
        assert!(!docs.is_empty(), "{} is empty", file.display());
        for doc in docs {
            for key in ["apiVersion", "kind"] {
                assert!(
                    doc[key].is_string(),
                    "{}: a document without {key}",
                    file.display()
                );
            }
            assert!(
                doc["metadata"]["name"].is_string(),
                "{}: a document without a name",
                file.display()
            );
        }
    }
}

#[test]
fn the_daemonset_passes_only_flags_and_variables_the_agent_accepts() {
    let ds = daemonset();
    let help = agent_help();
    for arg in &ds.agent.args {
        let flag = arg.split('=').next().unwrap();
        assert!(flag.starts_with("--"), "{arg}: flags only");
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "the agent has no flag {flag}:\n{help}"
        );
    }
    // Variables for the NVIDIA container runtime and for tracing, which the agent does not parse itself.
    let not_agent_flags = [
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "RUST_LOG",
    ];
    let names = ds
        .agent
        .env
        .iter()
        .map(|(n, _)| n)
        .chain(ds.agent.env_fields.iter().map(|(n, _)| n));
    for name in names {
        assert!(
            not_agent_flags.contains(&name.as_str()) || help.contains(&format!("[env: {name}=")),
            "the agent reads no variable {name}:\n{help}"
        );
    }
    assert!(
        ds.agent
            .env_fields
            .contains(&("NODE_NAME".to_owned(), "spec.nodeName".to_owned())),
        "NODE_NAME from the downward API: {:?}",
        ds.agent.env_fields
    );
    assert_eq!(ds.agent.command, ["/usr/bin/vgpu-device-plugin"]);
}

#[test]
fn the_agents_host_paths_are_mounted_at_the_same_paths_it_hands_to_the_kubelet() {
    // The agent returns host paths in Allocate (libvgpu.so, the caches, the lock directory) and writes its
    // sockets beside the kubelet's: each must be mounted at its host path, or the kubelet gets paths that
    // exist only inside the agent's container.
    let ds = daemonset();
    let hook = ds.agent.flag("--hook-path").expect("--hook-path");
    let lock = ds.agent.flag("--lock-dir").expect("--lock-dir");
    let kubelet_dir = Path::new(kubelet_api::v1beta1::KUBELET_SOCKET)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        ds.agent.flag("--kubelet-socket").is_none()
            && !ds.agent.env.iter().any(|(n, _)| n == "KUBELET_SOCKET"),
        "the default kubelet socket, under the mounted directory"
    );
    for path in [hook, lock, kubelet_dir.as_str()] {
        let m = ds
            .agent
            .mount(path)
            .unwrap_or_else(|| panic!("{path} is not mounted: {:?}", ds.agent.mounts));
        assert_eq!(
            m.host_path.as_deref(),
            Some(path),
            "{path} is the same path on the host"
        );
    }
    assert_eq!(
        lock, CONTAINER_LOCK_DIR,
        "HAMi-core's lock directory, the same on both sides"
    );
    // ld.so.preload names the path libvgpu.so has in containers; the agent mounts $HOOK_PATH/libvgpu.so there.
    assert_eq!(format!("{hook}/libvgpu.so"), CONTAINER_LIBVGPU);
    // The node config map, where the agent reads it.
    assert_eq!(ds.agent.flag("--node-config"), Some(NODE_CONFIG_PATH));
    let (mount_dir, file) = NODE_CONFIG_PATH.rsplit_once('/').unwrap();
    let m = ds.agent.mount(mount_dir).expect("the node config mount");
    assert_eq!(m.config_map.as_deref(), Some("volcano-vgpu-node-config"));
    let node_docs = load(&dir().join("node-config.yaml")).unwrap();
    config_map_data(
        find(&node_docs, "ConfigMap", "volcano-vgpu-node-config").unwrap(),
        file,
    )
    .unwrap();
}

#[test]
fn the_probes_and_the_metrics_port_are_the_agents() {
    let ds = daemonset();
    let address = ds
        .agent
        .flag("--metrics-bind-address")
        .expect("--metrics-bind-address");
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(ds.agent.ports, [("metrics".to_owned(), port)]);
    let c = &ds.object["spec"]["template"]["spec"]["containers"][0];
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let annotations = &ds.object["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
}

#[test]
fn the_daemonset_is_least_privilege_and_node_critical() {
    let ds = daemonset();
    let pod = &ds.object["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["hostPID"], true, "the host-PID broker needs host PIDs");
    assert!(pod["hostNetwork"].is_null(), "no host network");
    for c in pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().unwrap())
    {
        let sc = &c["securityContext"];
        assert!(
            sc["privileged"].is_null() || sc["privileged"] == false,
            "{}",
            c["name"]
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{}",
            c["name"]
        );
        let added: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(
            added.iter().all(|cap| *cap == "DAC_OVERRIDE"),
            "{}: {added:?}",
            c["name"]
        );
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "{}",
            c["name"]
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{}",
            c["name"]
        );
    }
}

#[test]
fn the_init_container_installs_what_the_image_build_puts_in_the_image() {
    let ds = daemonset();
    let script =
        std::fs::read_to_string(manifests::workspace_root().join("docker/build-artifacts.sh"))
            .unwrap();
    let [installer, source, dest] = ds.init.command.as_slice() else {
        panic!("install-hook command: {:?}", ds.init.command)
    };
    assert!(
        script.contains(&format!("\"$out{installer}\"")),
        "the image has {installer}"
    );
    assert!(
        script.contains(&format!("\"$out{source}/libvgpu.so\"")),
        "the image has {source}/libvgpu.so"
    );
    // ld.so.preload holds the path of libvgpu.so inside containers.
    assert!(
        script.contains(&format!(
            "printf '{CONTAINER_LIBVGPU}\\n' >\"$out{source}/ld.so.preload\""
        )),
        "build-artifacts.sh writes ld.so.preload = {CONTAINER_LIBVGPU}"
    );
    let hook = ds.agent.flag("--hook-path").unwrap();
    assert_eq!(dest, hook, "installed where the agent's --hook-path points");
    assert_eq!(
        ds.init.mount(dest).and_then(|m| m.host_path.as_deref()),
        Some(hook)
    );
    // One image, tagged with the workspace version.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(ds.agent.image, ds.init.image);
    assert!(
        ds.agent.image.ends_with(&format!(":v{version}")),
        "{} is v{version}",
        ds.agent.image
    );
}

#[test]
fn the_device_config_map_holds_every_key_at_the_agents_defaults() {
    let docs = load(&dir().join("device-config.yaml")).unwrap();
    let cm = find(&docs, "ConfigMap", DEVICE_CONFIG_MAP).unwrap();
    assert_eq!(
        cm["metadata"]["namespace"], "kube-system",
        "the first namespace the agent and the scheduler read"
    );
    let yaml = config_map_data(cm, DEVICE_CONFIG_KEY).unwrap();
    let file = parse_device_config("device-config.yaml", yaml).unwrap();
    let merged = merge(
        Some(("device-config.yaml", &file)),
        None,
        None,
        &ExplicitFlags::default(),
    )
    .unwrap();
    assert!(
        merged.warnings.is_empty(),
        "keys the agent does not know: {:?}",
        merged.warnings
    );
    assert_eq!(
        merged,
        VolcanoConfig::default(),
        "every value at the agent's built-in default"
    );
    // Every key of docs/volcano-contract.md §5.2, no more.
    let raw: Value = serde_saphyr::from_str(yaml).unwrap();
    let keys: BTreeSet<&str> = raw["nvidia"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let contract: BTreeSet<&str> = [
        "resourceCountName",
        "resourceMemoryName",
        "resourceMemoryPercentageName",
        "resourceCoreName",
        "resourcePriorityName",
        "overwriteEnv",
        "defaultMemory",
        "defaultCores",
        "defaultGPUNum",
        "deviceSplitCount",
        "deviceMemoryScaling",
        "deviceCoreScaling",
        "disableCoreLimit",
        "gpuMemoryFactor",
        "knownMigGeometries",
        "passDeviceSpecs",
    ]
    .into();
    assert_eq!(keys, contract);
    let nv = file.nvidia.unwrap();
    assert!(nv.unknown.is_empty(), "{:?}", nv.unknown);
}

#[test]
fn the_node_config_map_parses_and_applies_to_its_node() {
    let docs = load(&dir().join("node-config.yaml")).unwrap();
    let cm = find(&docs, "ConfigMap", "volcano-vgpu-node-config").unwrap();
    let json = config_map_data(cm, "config.json").unwrap();
    let file = parse_node_config("config.json", json).unwrap();
    let entry = file.nodeconfig.first().expect("an example entry");
    assert!(
        entry.operatingmode.is_some()
            && entry.devicesplitcount.is_some()
            && entry.filterdevices.is_some()
    );
    let merged = merge(
        None,
        Some(("config.json", &file)),
        Some(&entry.name),
        &ExplicitFlags::default(),
    )
    .unwrap();
    assert_eq!(
        merged,
        VolcanoConfig::default(),
        "the example entry restates the defaults"
    );
}

#[test]
fn the_scheduler_configuration_enables_vgpu_on_the_same_config_map() {
    let docs = load(&dir().join("volcano-scheduler-configmap.yaml")).unwrap();
    let cm = find(&docs, "ConfigMap", "volcano-scheduler-configmap").unwrap();
    assert_eq!(cm["metadata"]["namespace"], "volcano-system");
    let conf: Value =
        serde_saphyr::from_str(config_map_data(cm, "volcano-scheduler.conf").unwrap()).unwrap();
    let plugins: Vec<&Value> = conf["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["plugins"].as_array().unwrap())
        .collect();
    let deviceshare = plugins
        .iter()
        .find(|p| p["name"] == "deviceshare")
        .expect("deviceshare");
    let args = &deviceshare["arguments"];
    assert_eq!(args["deviceshare.VGPUEnable"], true);
    assert!(
        args["deviceshare.GPUSharingEnable"].is_null()
            && args["deviceshare.GPUNumberEnable"].is_null(),
        "cannot be combined with VGPUEnable"
    );
    assert_eq!(args["deviceshare.KnownGeometriesCMName"], DEVICE_CONFIG_MAP);
    assert_eq!(
        args["deviceshare.KnownGeometriesCMNamespace"],
        "kube-system"
    );
    for needed in ["predicates", "gang"] {
        assert!(plugins.iter().any(|p| p["name"] == needed), "{needed}");
    }
}

#[test]
fn the_example_pods_ask_for_the_resources_the_agent_serves() {
    let names = ResourceNames::default();
    let served = [
        names.number.as_str(),
        names.memory.as_str(),
        names.cores.as_str(),
    ];
    let mut seen = Vec::new();
    let mut files = Vec::new();
    yaml_files(&dir().join("examples"), &mut files);
    files.sort();
    for file in &files {
        for doc in load(file).unwrap() {
            assert_eq!(doc["kind"], "Pod", "{}", file.display());
            assert_eq!(
                doc["spec"]["schedulerName"],
                "volcano",
                "{}",
                file.display()
            );
            let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(doc.clone()).unwrap();
            for c in doc["spec"]["containers"].as_array().unwrap() {
                if let Some(limits) = c["resources"]["limits"].as_object() {
                    for key in limits.keys().filter(|k| k.starts_with("volcano.sh/")) {
                        assert!(
                            served.contains(&key.as_str()),
                            "{}: {key} is not served",
                            file.display()
                        );
                    }
                }
            }
            // Which containers the agent will hand GPUs to (segment k = k-th of them).
            let view = vgpu_device_plugin::handoff::pod_cache::pod_view(&pod, &names);
            let gpu: Vec<(String, Option<u64>, Option<u64>)> = view
                .containers
                .iter()
                .filter(|c| c.has_vgpu())
                .map(|c| (c.name.clone(), c.count, c.memory))
                .collect();
            seen.push((file.file_name().unwrap().to_str().unwrap().to_owned(), gpu));
        }
    }
    let expected = vec![
        (
            "pod-memory-only.yaml".to_owned(),
            vec![("cuda".to_owned(), None, Some(1024))],
        ),
        (
            "pod-one-vgpu.yaml".to_owned(),
            vec![("cuda".to_owned(), Some(1), Some(3000))],
        ),
        (
            "pod-several-vgpus.yaml".to_owned(),
            vec![("cuda".to_owned(), Some(2), Some(2000))],
        ),
        (
            "pod-two-gpu-containers-sidecar.yaml".to_owned(),
            vec![
                ("trainer".to_owned(), Some(2), Some(2000)),
                ("eval".to_owned(), Some(1), Some(1000)),
            ],
        ),
    ];
    assert_eq!(seen, expected);
}

/// The label that moves a node from the main DaemonSet to the MIG one.
const MIG_LABEL: &str = "volcano.sh/vgpu-mig";

#[test]
fn the_mig_daemonset_is_the_main_one_with_only_the_documented_differences() {
    let main = daemonset().object;
    let docs = load(&dir().join("vgpu-device-plugin-mig.yaml")).unwrap();
    assert_eq!(
        docs.len(),
        1,
        "only the DaemonSet: the RBAC is the main file's"
    );
    let mig = find(&docs, "DaemonSet", "volcano-device-plugin-mig").unwrap();

    // The main DaemonSet keeps off MIG nodes in every term it selects GPU nodes by.
    let terms = main["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .as_array()
        .unwrap();
    assert!(!terms.is_empty());
    for term in terms {
        assert!(
            term["matchExpressions"].as_array().unwrap().contains(
                &serde_json::json!({"key": MIG_LABEL, "operator": "NotIn", "values": ["true"]})
            ),
            "{term}"
        );
    }

    // The main DaemonSet with the differences the MIG file's header documents is the MIG DaemonSet: the same
    // image, flags, variables, probes, resources, host paths and init container.
    let mut expected = main.clone();
    let label = serde_json::json!({"app.kubernetes.io/name": "vgpu-node-agent-mig"});
    expected["metadata"]["name"] = "volcano-device-plugin-mig".into();
    expected["metadata"]["labels"] = label.clone();
    expected["spec"]["selector"]["matchLabels"] = label.clone();
    let pod = &mut expected["spec"]["template"];
    pod["metadata"]["labels"] = label;
    let spec = &mut pod["spec"];
    spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] = serde_json::json!([
        {"matchExpressions": [{"key": MIG_LABEL, "operator": "In", "values": ["true"]}]}
    ]);
    spec["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "nvidia-caps",
            "hostPath": {"path": "/dev/nvidia-caps", "type": "DirectoryOrCreate"}
        }));
    let agent = spec["containers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == "agent")
        .unwrap();
    agent["securityContext"] = serde_json::json!({
        "privileged": true,
        "runAsUser": 0,
        "readOnlyRootFilesystem": true
    });
    agent["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "nvidia-caps", "mountPath": "/dev/nvidia-caps"}));
    assert_eq!(
        *mig, expected,
        "the MIG DaemonSet differs from the main one beyond the documented differences"
    );
    // Privileged is the agent container's only: the init container stays as least-privilege as the main one.
    let init = &mig["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["name"], "install-hook");
    assert!(init["securityContext"]["privileged"].is_null(), "{init}");
}
