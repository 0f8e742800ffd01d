//! The golden vectors of `tests/data/volcano-vectors.json` (where they came from: `tests/data/README.md`), produced
//! by running the upstream Go functions, against the `volcano` module. Each vector is checked field by field; where our behaviour differs from the Go
//! plugin on purpose (its selection bugs, its lenient decoder, its `CUDA_OVERSUBSCRIBE` keying), the test
//! asserts our rule and says why next to the assertion.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;
use vgpu_device_plugin::config::{ResourceKind, SharingSettings};
use vgpu_device_plugin::container::response::{
    Handoff, LimiterSettings, cache_dir_name, container_answer, new_cache_file,
};
use vgpu_device_plugin::gpu::plan::ids_per_gpu;
use vgpu_device_plugin::handoff::selection::{
    self, AllocatingEndpoint, ContainerLimits, PHASE_PENDING, PodView, gpu_containers, matches,
    next_assignment, select_pending_pod,
};
use vgpu_device_plugin::volcano::handshake::format_scheduler_time;
use vgpu_device_plugin::volcano::handshake::{Handshake, parse_handshake, reported_value};
use vgpu_device_plugin::volcano::mig::{
    MigDeviceId, decode_mig_id, default_known_mig_geometries, encode_mig_id, is_mig_id,
    lookup_mig_slot,
};
use vgpu_device_plugin::volcano::node_register::{OperatingMode, node_mode};
use vgpu_device_plugin::volcano::node_register::{
    RegisteredGpu, decode_node_register, encode_node_register,
};
use vgpu_device_plugin::volcano::pod_devices::{ContainerDevice, PodDevices};
use vgpu_device_plugin::volcano::*;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/volcano-vectors.json"
);

fn vectors() -> &'static Value {
    static CELL: OnceLock<Value> = OnceLock::new();
    CELL.get_or_init(|| {
        let text = std::fs::read_to_string(VECTORS).unwrap_or_else(|e| {
            panic!(
                "cannot read the golden vectors at {VECTORS} ({e}): they are part of the repository \
                 (tests/data/volcano-vectors.json); restore the file from git"
            )
        });
        serde_json::from_str(&text).unwrap()
    })
}

fn section(name: &str) -> &'static Value {
    vectors()
        .get(name)
        .unwrap_or_else(|| panic!("section {name} missing from the vectors"))
}

fn list(name: &str) -> &'static Vec<Value> {
    section(name).as_array().unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

fn devices_of(v: &Value) -> Vec<ContainerDevice> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| ContainerDevice {
            uuid: s(&d["uuid"]).to_owned(),
            device_type: s(&d["type"]).to_owned(),
            used_mem: u32::try_from(u(&d["usedmem"])).unwrap(),
            used_cores: u32::try_from(u(&d["usedcores"])).unwrap(),
        })
        .collect()
}

fn string_map(v: &Value) -> HashMap<String, String> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), s(v).to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// node_register

fn node_register_case(index: usize) {
    let case = &list("node_register")[index];
    let input = &case["input"];
    assert_eq!(s(&case["annotation_key"]), NODE_REGISTER);
    let factor = u(&input["gpuMemoryFactor"]);
    let split = u32::try_from(u(&input["deviceSplitCount"])).unwrap();
    let mode = OperatingMode::parse(s(&input["mode"])).expect("a mode the agent accepts");
    let mut gpus: Vec<&Value> = input["nvml_gpus_in_discovery_order"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    // The caller hands GPUs over sorted by minor number (the inventory is).
    gpus.sort_by_key(|g| u(&g["minor"]));
    let registered: Vec<RegisteredGpu> = gpus
        .iter()
        .map(|g| RegisteredGpu {
            uuid: s(&g["uuid"]).to_owned(),
            split_count: split,
            memory_units: (u(&g["memory_total_bytes"]) >> 20) / factor,
            model: s(&g["nvml_name"]).to_owned(),
            healthy: g["healthy"].as_bool().unwrap(),
            mode: mode.as_str().to_owned(),
        })
        .collect();

    let value = encode_node_register(&registered);
    assert_eq!(value, s(&case["annotation_value"]), "{}", s(&case["name"]));

    let decoded = decode_node_register(&value).expect("the scheduler must accept what we write");
    let expected = &case["volcano_decoded"];
    let expected_devices = expected["devices"].as_array().unwrap();
    assert_eq!(decoded.len(), expected_devices.len());
    for (got, want) in decoded.iter().zip(expected_devices) {
        assert_eq!(got.index, usize::try_from(u(&want["index"])).unwrap());
        assert_eq!(got.uuid, s(&want["uuid"]));
        assert_eq!(got.number, want["number"].as_i64().unwrap());
        assert_eq!(got.memory, want["memory"].as_i64().unwrap());
        assert_eq!(got.type_, s(&want["type"]));
        assert_eq!(got.health, want["health"].as_bool().unwrap());
    }
    assert_eq!(node_mode(&decoded), s(&expected["mode"]));

    // What the kubelet advertises (docs/volcano-contract.md §1.2): Σ split, Σ memory units, 100 × scaling (1 here) per
    // GPU, in the node's mode (MIG mode lists the same counts: `gpu::plan::ids_per_gpu`).
    let allocatable = &case["expected_node_allocatable"];
    let sharing = SharingSettings {
        split_count: split,
        memory_factor: u32::try_from(factor).unwrap(),
        ..SharingSettings::default()
    };
    let total = |kind| -> u64 {
        gpus.iter()
            .map(|g| ids_per_gpu(kind, mode, u(&g["memory_total_bytes"]) >> 20, &sharing))
            .sum()
    };
    let number: u64 = registered.iter().map(|g| u64::from(g.split_count)).sum();
    let memory: u64 = registered.iter().map(|g| g.memory_units).sum();
    assert_eq!(number, u(&allocatable["volcano.sh/vgpu-number"]));
    assert_eq!(memory, u(&allocatable["volcano.sh/vgpu-memory"]));
    assert_eq!(total(ResourceKind::Number), number);
    assert_eq!(total(ResourceKind::Memory), memory);
    assert_eq!(
        total(ResourceKind::Cores),
        u(&allocatable["volcano.sh/vgpu-cores"])
    );
}

#[test]
fn node_register_single_a100_with_defaults() {
    node_register_case(0);
}

#[test]
fn node_register_two_t4_sorted_by_minor_with_one_unhealthy() {
    node_register_case(1);
}

#[test]
fn node_register_h100_with_memory_factor_10_and_split_4() {
    node_register_case(2);
}

#[test]
fn node_register_a100_in_mig_mode() {
    node_register_case(3);
}

// ---------------------------------------------------------------------------------------------------------
// mig_device_ids: the scheduler's encodeMIGID and the plugin's ExtractMigTemplatesFromUUID, run upstream

#[test]
fn mig_device_ids_encode_like_the_scheduler_and_decode_like_the_plugin() {
    let cases = list("mig_device_ids");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let parent = s(&case["original_uuid_before_bracket"]);
        let group = s(&case["plugin_parse_group"]);
        let position = u32::try_from(u(&case["plugin_parse_position"])).unwrap();
        let id = s(&case["volcano_encodeMIGID"]);
        assert_eq!(encode_mig_id(parent, group, position), id);
        assert!(is_mig_id(id));
        assert_eq!(
            decode_mig_id(id).unwrap(),
            MigDeviceId {
                parent_uuid: parent,
                group,
                position
            }
        );
    }
}

#[test]
fn mig_device_ids_name_a_template_of_the_shipped_geometries() {
    // On an A100-SXM4-80GB with the Go plugin's shipped geometries: group1-0 is the first 1g.10gb of seven;
    // group2-3 is the single 1g.10gb after the three 2g.20gb (Volcano mig.go:152-170).
    let known = default_known_mig_geometries();
    let slots: Vec<(String, usize, u32)> = list("mig_device_ids")
        .iter()
        .map(|case| {
            let id = decode_mig_id(s(&case["volcano_encodeMIGID"])).unwrap();
            let slot = lookup_mig_slot(&known, "NVIDIA A100-SXM4-80GB", &id).unwrap();
            (
                slot.template.name.clone(),
                slot.template_index,
                slot.instance,
            )
        })
        .collect();
    assert_eq!(
        slots,
        [("1g.10gb".to_owned(), 0, 0), ("1g.10gb".to_owned(), 1, 0)]
    );
}

#[test]
fn node_register_covers_every_vector() {
    assert_eq!(list("node_register").len(), 4);
}

#[test]
fn node_register_decode_edge_cases_match_the_scheduler() {
    let cases = list("node_register_decode_edge_cases");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let value = s(&case["annotation_value"]);
        let decoded = decode_node_register(value);
        match &case["volcano_result"] {
            Value::String(text) => {
                assert!(text.starts_with("nil"), "{text}");
                assert_eq!(decoded, None, "{value:?}");
            }
            result => {
                let decoded = decoded.unwrap();
                assert_eq!(
                    decoded.len() as u64,
                    u(&result["device_count"]),
                    "{value:?}"
                );
                // The last record's mode wins for the whole node.
                assert_eq!(node_mode(&decoded), s(&result["mode"]), "{value:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// pod devices

#[test]
fn pod_devices_decode_edge_cases_agree_with_the_plugin_where_valid() {
    let cases = list("pod_devices_decode_edge_cases");
    assert_eq!(cases.len(), 7);
    let mut refused = 0;
    for case in cases {
        let value = s(&case["value"]);
        let plugin: Vec<Vec<Value>> = case["plugin_decode"]
            .as_array()
            .unwrap()
            .iter()
            .map(|seg| seg.as_array().unwrap().clone())
            .collect();
        let plugin_has_negative = plugin
            .iter()
            .flatten()
            .any(|d| d["usedmem"].as_i64().unwrap() < 0 || d["usedcores"].as_i64().unwrap() < 0);
        let ours = PodDevices::decode(DEVICES_TO_ALLOCATE, value);
        if plugin_has_negative {
            // We deliberately differ: the Go plugin decodes "-1" and would hand HAMi-core a limit of "-1m";
            // the scheduler's own decoder drops the device. We refuse the annotation and name the field.
            let err = ours.unwrap_err();
            assert_eq!(err.annotation, DEVICES_TO_ALLOCATE);
            assert_eq!(err.position, "segment 0, record 0, field 2 (used memory)");
            assert_eq!(err.value, "-1");
            refused += 1;
            continue;
        }
        let ours = ours.unwrap_or_else(|e| panic!("{value:?}: {e}"));
        let expected: Vec<Vec<ContainerDevice>> = case["plugin_decode"]
            .as_array()
            .unwrap()
            .iter()
            .map(devices_of)
            .collect();
        assert_eq!(ours.0, expected, "{value:?}");
        assert_eq!(
            ours.remaining() as u64,
            u(&case["plugin_total_device_count"]),
            "{value:?}"
        );
        // The strict decoder accepts only what re-encodes to the same text.
        assert_eq!(ours.encode(), value);
        // Where the scheduler's decoder agrees with the plugin's, so do we.
        let volcano: Vec<Vec<(String, String, u64, u64)>> = case["volcano_decode"]
            .as_array()
            .unwrap()
            .iter()
            .map(|seg| {
                seg.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| {
                        (
                            s(&d["UUID"]).to_owned(),
                            s(&d["Type"]).to_owned(),
                            u(&d["Usedmem"]),
                            u(&d["Usedcores"]),
                        )
                    })
                    .collect()
            })
            .collect();
        let ours_flat: Vec<Vec<(String, String, u64, u64)>> = ours
            .0
            .iter()
            .map(|seg| {
                seg.iter()
                    .map(|d| {
                        (
                            d.uuid.clone(),
                            d.device_type.clone(),
                            u64::from(d.used_mem),
                            u64::from(d.used_cores),
                        )
                    })
                    .collect()
            })
            .collect();
        assert_eq!(ours_flat, volcano, "{value:?}");
    }
    assert_eq!(refused, 1, "exactly the -1 vector is refused");
}

#[test]
fn scheduler_fit_queues_decode_strictly_and_have_a_segment_per_vgpu_container() {
    let cases = list("scheduler_fit");
    assert_eq!(cases.len(), 14);
    let mut checked = 0;
    for case in cases {
        let name = s(&case["name"]);
        let Some(queue) = case.get(DEVICES_TO_ALLOCATE) else {
            assert_eq!(case["fit"], Value::Bool(false), "{name}");
            continue;
        };
        let queue = s(queue);
        assert_eq!(queue, s(&case[VGPU_IDS_NEW]), "{name}");
        let decoded = PodDevices::decode(DEVICES_TO_ALLOCATE, queue).unwrap();
        assert_eq!(decoded.encode(), queue, "{name}");
        let pod = PodView {
            containers: case["input"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| ContainerLimits {
                    name: s(&c["name"]).to_owned(),
                    count: c["limits"].get("volcano.sh/vgpu-number").map(u),
                    memory: c["limits"].get("volcano.sh/vgpu-memory").map(u),
                    disable_control: false,
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(decoded.0.len(), gpu_containers(&pod).len(), "{name}");
        let requests = case["container_requests"].as_array().unwrap();
        for (segment, request) in decoded.0.iter().zip(requests) {
            assert_eq!(segment.len() as u64, u(&request["Nums"]), "{name}");
        }
        checked += 1;
    }
    assert_eq!(checked, 11);
}

#[test]
fn scheduler_bind_annotations_use_our_keys() {
    let example = section("scheduler_bind_annotations_example");
    let annotations = string_map(&example["annotations"]);
    let mut keys: Vec<&str> = annotations.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut ours = vec![
        BIND_PHASE,
        BIND_TIME,
        DEVICES_TO_ALLOCATE,
        VGPU_IDS_NEW,
        VGPU_NODE,
        VGPU_TIME,
    ];
    ours.sort_unstable();
    assert_eq!(keys, ours);
    assert_eq!(annotations[BIND_PHASE], PHASE_ALLOCATING);
    assert_eq!(annotations[VGPU_TIME], u(&example["at_unix"]).to_string());
    assert!(
        example["node_lock_when_NodeLockEnable"]
            .get(NODE_LOCK)
            .is_some()
    );
    let queue = PodDevices::decode(DEVICES_TO_ALLOCATE, &annotations[DEVICES_TO_ALLOCATE]).unwrap();
    assert_eq!(queue.0.len(), 2);
    assert_eq!(queue.remaining(), 3);
}

// ---------------------------------------------------------------------------------------------------------
// pending pod selection

/// A vector pod as a PodView: Pending, bind-phase `allocating` (the vectors carry no bind-phase; a finished pod
/// is recognised by its empty queue), one container per segment with a count limit equal to its device count.
fn vector_pod(v: &Value) -> PodView {
    let annotations: BTreeMap<String, String> = string_map(&v["annotations"]).into_iter().collect();
    let mut annotations = annotations;
    annotations
        .entry(BIND_PHASE.to_owned())
        .or_insert_with(|| PHASE_ALLOCATING.to_owned());
    let queue = PodDevices::decode(DEVICES_TO_ALLOCATE, &annotations[DEVICES_TO_ALLOCATE]).unwrap();
    let containers = queue
        .0
        .iter()
        .enumerate()
        .map(|(i, seg)| ContainerLimits {
            name: format!("c{i}"),
            count: Some(seg.len() as u64),
            memory: None,
            disable_control: false,
        })
        .collect();
    PodView {
        namespace: "default".to_owned(),
        name: s(&v["name"]).to_owned(),
        uid: format!("uid-{}", s(&v["name"])),
        phase: Some(PHASE_PENDING.to_owned()),
        node_name: None,
        creation_timestamp: None,
        annotations,
        containers,
        init_with_vgpu: Vec::new(),
        started: false,
    }
}

fn selection_case(index: usize) -> (Vec<PodView>, String, usize, Option<String>) {
    let case = &list("pending_pod_selection")[index];
    let input = &case["input"];
    let pods: Vec<PodView> = input["pods_in_list_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(vector_pod)
        .collect();
    let node = s(&input["node"]).to_owned();
    let size = usize::try_from(u(&input["kubelet_request_size"])).unwrap();
    let go_selected = case["selected"].as_str().map(str::to_owned);
    (pods, node, size, go_selected)
}

fn select(pods: &[PodView], node: &str, size: usize) -> Option<String> {
    select_pending_pod(pods, node, AllocatingEndpoint::Number, size).map(|i| pods[i].name.clone())
}

/// Our answer must not depend on the order the apiserver lists pods in.
fn select_both_orders(pods: &[PodView], node: &str, size: usize) -> Option<String> {
    let forward = select(pods, node, size);
    let mut reversed = pods.to_vec();
    reversed.reverse();
    assert_eq!(
        select(&reversed, node, size),
        forward,
        "list order changed the answer"
    );
    forward
}

#[test]
fn selection_oldest_vgpu_time_wins() {
    let (pods, node, size, go) = selection_case(0);
    assert_eq!(select_both_orders(&pods, &node, size), go);
    assert_eq!(go.as_deref(), Some("p1"));
}

#[test]
fn selection_request_size_filters_candidates() {
    let (pods, node, size, go) = selection_case(1);
    assert_eq!(select_both_orders(&pods, &node, size), go);
    assert_eq!(go.as_deref(), Some("p2"));
}

#[test]
fn selection_ignores_pods_on_other_nodes() {
    let (pods, node, size, go) = selection_case(2);
    assert_eq!(select_both_orders(&pods, &node, size), go);
    assert_eq!(go.as_deref(), Some("p2"));
}

#[test]
fn selection_tie_on_vgpu_time_is_decided_by_age_then_name_not_list_order() {
    let (mut pods, node, size, go) = selection_case(3);
    // The Go plugin picks the LAST listed pod on a tie (p2). We differ on purpose: the answer must not depend
    // on list order, and the kubelet admits pods in creation order, so the older pod (then the smaller
    // namespace/name) is the one it is asking about. With no creation times given, the name decides: p1.
    assert_eq!(go.as_deref(), Some("p2"));
    assert_eq!(
        select_both_orders(&pods, &node, size).as_deref(),
        Some("p1")
    );
    // With creation times, the older pod wins whatever its name.
    pods[0].creation_timestamp = Some(200);
    pods[1].creation_timestamp = Some(100);
    assert_eq!(
        select_both_orders(&pods, &node, size).as_deref(),
        Some("p2")
    );
}

#[test]
fn selection_never_picks_an_already_allocated_pod() {
    let (pods, node, size, go) = selection_case(4);
    assert_eq!(select_both_orders(&pods, &node, size), go);
    assert_eq!(go.as_deref(), Some("p1"));
    let done = pods.iter().find(|p| p.name == "done").unwrap();
    assert_eq!(selection::vgpu_time(done), u64::MAX);
    assert_eq!(next_assignment(done).unwrap(), None);
}

#[test]
fn selection_finds_a_pod_with_two_single_gpu_containers() {
    let (pods, node, size, go) = selection_case(5);
    // The Go plugin's bug (#3): it compares the pod's total (2) with the request (1) and finds nothing, so
    // the pod fails admission. We compare the next segment's size, so each container is found in turn.
    assert_eq!(go, None);
    assert_eq!(
        select_both_orders(&pods, &node, size).as_deref(),
        Some("multi")
    );
    let mut pod = pods[0].clone();
    let first = next_assignment(&pod).unwrap().unwrap();
    assert_eq!(
        (first.segment, first.container, first.devices.len()),
        (0, 0, 1)
    );
    let mut queue =
        PodDevices::decode(DEVICES_TO_ALLOCATE, &pod.annotations[DEVICES_TO_ALLOCATE]).unwrap();
    queue.take_segment(first.segment);
    pod.annotations
        .insert(DEVICES_TO_ALLOCATE.to_owned(), queue.encode());
    assert!(matches(&pod, &node, AllocatingEndpoint::Number, 1));
    let second = next_assignment(&pod).unwrap().unwrap();
    assert_eq!((second.segment, second.container), (1, 1));
}

#[test]
fn selection_covers_every_vector() {
    assert_eq!(list("pending_pod_selection").len(), 6);
}

// ---------------------------------------------------------------------------------------------------------
// plugin allocate walk

const POD_UID: &str = "5f0c7a1e-3b2d-4c5e-8f9a-0b1c2d3e4f50";

/// The walk vectors carry no factor field; the one that uses another factor says so in its name.
fn walk_factor(name: &str) -> u32 {
    name.split("gpuMemoryFactor=")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .map_or(1, |digits| digits.parse().unwrap())
}

fn walk_case(index: usize) {
    let walk = &list("plugin_allocate_walk")[index];
    let name = s(&walk["name"]);
    let steps = walk["steps"].as_array().unwrap();
    let settings = LimiterSettings {
        memory_factor: walk_factor(name),
        gdrcopy: false,
        gds: false,
        mofed: false,
        ..Default::default()
    };
    let first_queue = s(&steps[0]["to_allocate_before"]);
    let segments = PodDevices::decode(DEVICES_TO_ALLOCATE, first_queue)
        .unwrap()
        .0;
    // Containers named "sidecar" have no vGPU limit; the others take the segments in order.
    let mut next_segment = segments.iter();
    let containers: Vec<ContainerLimits> = walk["pod_containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = s(c).to_owned();
            let count = if name == "sidecar" {
                None
            } else {
                Some(next_segment.next().unwrap().len() as u64)
            };
            ContainerLimits {
                name,
                count,
                memory: None,
                disable_control: false,
            }
        })
        .collect();
    let mut pod = PodView {
        namespace: "default".to_owned(),
        name: "walk".to_owned(),
        uid: POD_UID.to_owned(),
        phase: Some(PHASE_PENDING.to_owned()),
        node_name: Some("node-a".to_owned()),
        creation_timestamp: Some(1_787_220_000),
        annotations: [
            (VGPU_NODE, "node-a"),
            (VGPU_TIME, "1787220000"),
            (BIND_PHASE, PHASE_ALLOCATING),
            (DEVICES_TO_ALLOCATE, first_queue),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        containers,
        init_with_vgpu: Vec::new(),
        started: false,
    };

    for step in steps {
        assert_eq!(
            pod.annotations[DEVICES_TO_ALLOCATE],
            s(&step["to_allocate_before"]),
            "{name}"
        );
        let size = usize::try_from(u(&step["kubelet_request_size"])).unwrap();
        assert_eq!(
            select_pending_pod(
                std::slice::from_ref(&pod),
                "node-a",
                AllocatingEndpoint::Number,
                size
            ),
            Some(0),
            "{name}"
        );
        let assignment = next_assignment(&pod).unwrap().unwrap();
        let expected_devices = devices_of(&step["devices"]);
        assert_eq!(assignment.devices, expected_devices, "{name}");

        let container = &pod.containers[assignment.container];
        let go_index = usize::try_from(u(&step["container_index_used"])).unwrap();
        let go_name = s(&step["container_name_used"]);
        let cache_template = s(&step["cache_dir_host"]);
        let ours_dir = format!(
            "${{HOOK_PATH}}/vgpu/containers/{}",
            cache_dir_name(POD_UID, &container.name)
        );
        if go_name == "sidecar" {
            // The Go plugin's bug (#4): it maps segment 0 to spec.containers[0], the sidecar, so the sidecar's
            // name and env are used. We map segment k to the k-th container with a vGPU limit: "cuda".
            assert_eq!(go_index, 0);
            assert_eq!((assignment.container, container.name.as_str()), (1, "cuda"));
            assert_eq!(
                ours_dir,
                cache_template
                    .replace("<pod-uid>", POD_UID)
                    .replace("_sidecar", "_cuda")
            );
        } else {
            assert_eq!(assignment.container, go_index, "{name}");
            assert_eq!(container.name, go_name, "{name}");
            assert_eq!(ours_dir, cache_template.replace("<pod-uid>", POD_UID));
        }

        let devices = assignment.devices.clone();
        let answer = container_answer(
            &settings,
            &Handoff {
                devices: &devices,
                cache_host_dir: PathBuf::from("/usr/local/vgpu/vgpu/containers")
                    .join(cache_dir_name(POD_UID, &container.name)),
                // The vectors use a fixed placeholder for the random name.
                cache_file: "00000000-0000-0000-0000-000000000000.cache".to_owned(),
                disable_control: container.disable_control,
            },
        );
        let envs: HashMap<String, String> = answer.envs.into_iter().collect();
        assert_eq!(envs, string_map(&step["envs"]), "{name}");

        let mut queue =
            PodDevices::decode(DEVICES_TO_ALLOCATE, &pod.annotations[DEVICES_TO_ALLOCATE]).unwrap();
        let taken = queue.take_segment(assignment.segment);
        assert_eq!(taken, expected_devices);
        let after = queue.encode();
        assert_eq!(after, s(&step["to_allocate_after_patch"]), "{name}");
        // The Go plugin finishes when the re-read queue no longer contains "GPU"; we count what is left.
        assert_eq!(
            queue.remaining() == 0,
            step["bind_phase_success_patched"].as_bool().unwrap(),
            "{name}"
        );
        assert_eq!(queue.remaining() == 0, !after.contains("GPU"));
        pod.annotations
            .insert(DEVICES_TO_ALLOCATE.to_owned(), after);
    }
    // Nothing is left for any endpoint once the walk is done.
    assert_eq!(next_assignment(&pod).unwrap(), None);
    assert!(!matches(&pod, "node-a", AllocatingEndpoint::Number, 1));

    let patch = |v: &Value| string_map(v);
    let done = |phase: &str| -> HashMap<String, String> {
        [(BIND_PHASE, phase), (VGPU_TIME, VGPU_TIME_DONE)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    assert_eq!(patch(&walk["final_patch_on_success"]), done(PHASE_SUCCESS));
    assert_eq!(patch(&walk["final_patch_on_failure"]), done(PHASE_FAILED));
    assert_eq!(VGPU_TIME_DONE, u64::MAX.to_string());
}

#[test]
fn walk_single_container_one_vgpu() {
    walk_case(0);
}

#[test]
fn walk_two_gpu_containers_keeps_the_empty_segment() {
    walk_case(1);
}

#[test]
fn walk_memory_factor_scales_the_env_not_the_annotation() {
    assert_eq!(walk_factor(s(&list("plugin_allocate_walk")[2]["name"])), 10);
    walk_case(2);
}

#[test]
fn walk_sidecar_first_maps_the_segment_to_the_gpu_container() {
    walk_case(3);
}

#[test]
fn walk_covers_every_vector() {
    assert_eq!(list("plugin_allocate_walk").len(), 4);
}

// ---------------------------------------------------------------------------------------------------------
// allocate envs

fn env_case(index: usize) {
    let case = &list("allocate_env_examples")[index];
    let devices = devices_of(&case["devices"]);
    let core_scaling = case["deviceCoreScaling"].as_f64().unwrap();
    let settings = LimiterSettings {
        memory_factor: u32::try_from(u(&case["gpuMemoryFactor"])).unwrap(),
        memory_scaling: 1.0,
        disable_core_limit: case["disableCoreLimit"].as_bool().unwrap(),
        gdrcopy: false,
        gds: false,
        mofed: false,
        ..Default::default()
    };
    let handoff = Handoff {
        devices: &devices,
        cache_host_dir: PathBuf::from("/usr/local/vgpu/vgpu/containers/uid_cuda"),
        cache_file: new_cache_file(),
        disable_control: false,
    };
    let mut expected = string_map(&case["envs"]);
    let mut got: HashMap<String, String> = container_answer(&settings, &handoff)
        .envs
        .into_iter()
        .collect();

    // The cache name is random: compare its shape, /tmp/vgpu/<uuid4>.cache, then drop it from both sides.
    assert_eq!(
        expected
            .remove("CUDA_DEVICE_MEMORY_SHARED_CACHE")
            .as_deref(),
        Some("/tmp/vgpu/<uuid4>.cache")
    );
    let cache = got.remove("CUDA_DEVICE_MEMORY_SHARED_CACHE").unwrap();
    let stem = cache
        .strip_prefix("/tmp/vgpu/")
        .and_then(|c| c.strip_suffix(".cache"))
        .unwrap_or_else(|| panic!("{cache}"));
    assert_eq!(uuid::Uuid::parse_str(stem).unwrap().get_version_num(), 4);

    // We deliberately differ on CUDA_OVERSUBSCRIBE: the Go plugin sets it when deviceCoreScaling > 1, which is
    // about cores, not memory; we set it when the memory scaling is above 1 (as HAMi upstream does).
    let go_oversubscribes = expected.remove("CUDA_OVERSUBSCRIBE").is_some();
    assert_eq!(go_oversubscribes, core_scaling > 1.0);
    assert!(!got.contains_key("CUDA_OVERSUBSCRIBE"));
    assert_eq!(got, expected);

    let oversubscribed = LimiterSettings {
        memory_scaling: 2.0,
        ..settings
    };
    let envs = container_answer(&oversubscribed, &handoff).envs;
    assert_eq!(envs["CUDA_OVERSUBSCRIBE"], "true");
}

#[test]
fn allocate_envs_factor_1() {
    env_case(0);
}

#[test]
fn allocate_envs_factor_10_with_core_limit_disabled() {
    env_case(1);
}

#[test]
fn allocate_envs_cover_every_vector() {
    assert_eq!(list("allocate_env_examples").len(), 2);
}

// ---------------------------------------------------------------------------------------------------------
// legacy handshake

const AT: u64 = 1_787_220_000;

fn handshake_example(key: &str) -> &'static str {
    s(&section("legacy_handshake_examples")[key])
}

#[test]
fn handshake_key_and_layout() {
    assert_eq!(handshake_example("annotation_key"), NODE_HANDSHAKE);
    assert!(handshake_example("time_layout").starts_with("2006.01.02 15:04:05"));
    assert!(handshake_example("stale_rule").contains("60s"));
}

#[test]
fn handshake_heartbeat_is_go_time_string() {
    let value = handshake_example("plugin_heartbeat(plugin<=v1.12.0, every 30s)");
    assert_eq!(reported_value(UNIX_EPOCH + Duration::from_secs(AT)), value);
    assert_eq!(parse_handshake(Some(value)), Handshake::Reported);
}

#[test]
fn handshake_real_world_heartbeat_with_nanos_and_monotonic_suffix() {
    let value = handshake_example("plugin_heartbeat_with_monotonic_suffix_real_world");
    assert_eq!(parse_handshake(Some(value)), Handshake::Reported);
    // We write the same text without Go's monotonic-clock suffix, which nobody parses.
    let (ours, _monotonic) = value.split_once(" m=+").unwrap();
    assert_eq!(
        reported_value(UNIX_EPOCH + Duration::new(AT, 123_456_789)),
        ours
    );
}

#[test]
fn handshake_scheduler_ack_is_requesting_with_its_time() {
    let value = handshake_example("scheduler_ack(volcano<=v1.15.0)");
    assert_eq!(
        parse_handshake(Some(value)),
        Handshake::Requesting {
            at_unix: Some(i64::try_from(AT).unwrap())
        }
    );
    assert_eq!(
        format!(
            "Requesting_{}",
            format_scheduler_time(i64::try_from(AT).unwrap())
        ),
        value
    );
}

#[test]
fn handshake_scheduler_mark_stale_is_deleted_with_its_time() {
    let value = handshake_example("scheduler_mark_stale");
    let at = i64::try_from(AT).unwrap() + 61;
    assert_eq!(
        parse_handshake(Some(value)),
        Handshake::Deleted { at_unix: Some(at) }
    );
    assert_eq!(format!("Deleted_{}", format_scheduler_time(at)), value);
}

#[test]
fn handshake_covers_every_vector() {
    assert_eq!(
        section("legacy_handshake_examples")
            .as_object()
            .unwrap()
            .len(),
        7
    );
}
