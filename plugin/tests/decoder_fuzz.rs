//! Property tests of the annotation codecs: no input makes a decoder panic, the strict pod-devices decoder
//! accepts only values it re-encodes byte for byte, and every well-formed value survives a round trip.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use vgpu_device_plugin::volcano::handshake::{Handshake, parse_handshake};
use vgpu_device_plugin::volcano::node_register::{
    MODE_HAMI_CORE, RegisteredGpu, decode_node_register, encode_node_register,
};
use vgpu_device_plugin::volcano::pod_devices::{ContainerDevice, PodDevices};
use vgpu_device_plugin::volcano::*;

/// Strings over the format's own alphabet (plus a few troublemakers), where interesting near-misses live.
fn format_alphabet() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[,:;NVIDIAGPU0-9abcdef\\-\\[\\] +\\t]{0,120}").unwrap()
}

/// The same alphabet in whole tokens laid out as records, so that a good share of the strings are valid or
/// one token away from it.
fn format_tokens() -> impl Strategy<Value = String> {
    let field = prop::sample::select(vec![
        "GPU-0fc3",
        "GPU-a[g1-0]",
        "NVIDIA",
        "0",
        "1",
        "30",
        "100",
        "101",
        "007",
        "-1",
        "+1",
        "4294967295",
        "4294967296",
        "",
        " ",
        "\t",
    ]);
    // Mostly the separator the position calls for (`,` `,` `,` `:`), sometimes another.
    let separator = |right: &'static str| {
        prop_oneof![
            12 => Just(right),
            1 => Just(","),
            1 => Just(":"),
            1 => Just(";"),
        ]
    };
    let record = (
        prop::collection::vec(field, 4),
        separator(","),
        separator(","),
        separator(","),
        separator(":"),
    )
        .prop_map(|(f, a, b, c, end)| [f[0], a, f[1], b, f[2], c, f[3], end].concat());
    let segment = prop::collection::vec(record, 0..3).prop_map(|records| records.concat());
    prop::collection::vec(segment, 0..4).prop_map(|segments| segments.join(";"))
}

/// Records that are almost right: the four fields drawn from plausible and broken pieces.
fn near_miss_record() -> impl Strategy<Value = String> {
    let uuid = prop_oneof![
        Just("GPU-0fc3eda5".to_owned()),
        Just(String::new()),
        Just("GPU 1".to_owned()),
        "[A-Za-z0-9\\-\\[\\]]{1,12}",
    ];
    let kind = prop_oneof![
        Just("NVIDIA".to_owned()),
        Just("MLU".to_owned()),
        Just(String::new())
    ];
    let number = prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        Just("-1".to_owned()),
        Just("+1".to_owned()),
        Just("007".to_owned()),
        Just("4294967296".to_owned()),
        Just("101".to_owned()),
        Just(String::new()),
        (0u32..=100).prop_map(|n| n.to_string()),
    ];
    (uuid, kind, number.clone(), number, 3usize..=5).prop_map(|(u, k, m, c, fields)| {
        let mut parts = vec![u, k, m, c];
        parts.truncate(fields.min(4));
        if fields == 5 {
            parts.push("x".to_owned());
        }
        parts.join(",")
    })
}

fn near_miss_value() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::collection::vec(near_miss_record(), 0..4),
            prop_oneof![Just(":"), Just(""), Just("::")],
        ),
        0..4,
    )
    .prop_map(|segments| {
        segments
            .into_iter()
            .map(|(records, end)| {
                records
                    .into_iter()
                    .map(|r| format!("{r}{end}"))
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(";")
    })
}

fn well_formed_device() -> impl Strategy<Value = ContainerDevice> {
    (
        "GPU-[0-9a-f]{1,8}(-[0-9a-f]{1,8}){0,4}(\\[[a-z0-9]{1,6}-[0-9]{1,2}\\])?",
        prop_oneof![
            4 => Just("NVIDIA".to_owned()),
            1 => "[A-Z][A-Za-z0-9]{0,7}",
        ],
        any::<u32>(),
        0u32..=100,
    )
        .prop_map(
            |(uuid, device_type, used_mem, used_cores)| ContainerDevice {
                uuid,
                device_type,
                used_mem,
                used_cores,
            },
        )
}

fn well_formed_pod_devices() -> impl Strategy<Value = PodDevices> {
    prop::collection::vec(prop::collection::vec(well_formed_device(), 0..4), 0..5)
        .prop_map(PodDevices)
}

fn decode(value: &str) -> Result<PodDevices, AnnotationError> {
    PodDevices::decode(DEVICES_TO_ALLOCATE, value)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn pod_devices_decode_never_panics_on_any_string(value in any::<String>()) {
        let _ = decode(&value);
    }

    #[test]
    fn pod_devices_decode_round_trips_whatever_it_accepts_from_the_format_alphabet(value in format_alphabet()) {
        if let Ok(decoded) = decode(&value) {
            prop_assert_eq!(decoded.encode(), value);
        }
    }

    #[test]
    fn pod_devices_decode_round_trips_whatever_it_accepts_from_format_tokens(value in format_tokens()) {
        if let Ok(decoded) = decode(&value) {
            prop_assert_eq!(decoded.encode(), value);
        }
    }

    #[test]
    fn pod_devices_decode_round_trips_whatever_it_accepts_from_near_misses(value in near_miss_value()) {
        match decode(&value) {
            Ok(decoded) => prop_assert_eq!(decoded.encode(), value),
            Err(err) => {
                prop_assert_eq!(err.annotation, DEVICES_TO_ALLOCATE);
                prop_assert!(err.value.chars().count() <= 65);
                prop_assert!(err.to_string().contains(err.expected));
            }
        }
    }

    #[test]
    fn pod_devices_encode_then_decode_is_the_identity(devices in well_formed_pod_devices()) {
        let encoded = devices.encode();
        let decoded = decode(&encoded).unwrap();
        if devices.0 == vec![vec![]] {
            // One empty segment encodes as "" (as in Go), which is zero segments: both mean "nothing left".
            prop_assert_eq!(decoded, PodDevices::default());
        } else {
            prop_assert_eq!(decoded, devices);
        }
    }

    #[test]
    fn taking_segments_drains_exactly_the_nvidia_devices(mut devices in well_formed_pod_devices()) {
        let total = devices.remaining();
        let segments = devices.0.len();
        let mut taken = 0;
        while let Some(next) = devices.next_segment() {
            let before = devices.remaining();
            let got = devices.take_segment(next);
            prop_assert!(!got.is_empty());
            prop_assert!(got.iter().all(ContainerDevice::is_nvidia));
            prop_assert_eq!(devices.remaining(), before - got.len());
            taken += got.len();
            // The queue stays decodable after every step, as the agent PATCHes it back each time.
            let encoded = devices.encode();
            prop_assert!(decode(&encoded).is_ok());
        }
        prop_assert_eq!(taken, total);
        prop_assert_eq!(devices.0.len(), segments);
    }

    #[test]
    fn parse_handshake_never_panics(value in any::<String>()) {
        let _ = parse_handshake(Some(&value));
    }

    #[test]
    fn parse_handshake_never_panics_near_the_format(
        value in "(Requesting|Deleted|Reported)?[_ ]{0,2}[0-9. :_]{0,30}"
    ) {
        let parsed = parse_handshake(Some(&value));
        if value.contains("Requesting") {
            let is_requesting = matches!(parsed, Handshake::Requesting { .. });
            prop_assert!(is_requesting);
        }
    }

    #[test]
    fn decode_node_register_never_panics(value in any::<String>()) {
        let _ = decode_node_register(&value);
    }

    #[test]
    fn decode_node_register_never_panics_near_the_format(
        value in "[,:;a-zA-Z0-9\\- +]{0,160}"
    ) {
        if let Some(gpus) = decode_node_register(&value) {
            prop_assert!(gpus.windows(2).all(|w| w[0].index < w[1].index));
        }
    }

    #[test]
    fn any_model_name_registers_one_intact_record_per_gpu(
        models in prop::collection::vec(any::<String>(), 0..6),
        split in any::<u32>(),
        memory in 0u64..=i64::MAX as u64,
    ) {
        let gpus: Vec<RegisteredGpu> = models
            .iter()
            .enumerate()
            .map(|(i, model)| RegisteredGpu {
                uuid: format!("GPU-{i:08x}"),
                split_count: split,
                memory_units: memory,
                model: model.clone(),
                healthy: i % 2 == 0,
                mode: MODE_HAMI_CORE.to_owned(),
            })
            .collect();
        let value = encode_node_register(&gpus);
        match decode_node_register(&value) {
            None => prop_assert!(gpus.is_empty()),
            Some(decoded) => {
                prop_assert_eq!(decoded.len(), gpus.len());
                for (i, (got, gpu)) in decoded.iter().zip(&gpus).enumerate() {
                    prop_assert_eq!(got.index, i);
                    prop_assert_eq!(&got.uuid, &gpu.uuid);
                    prop_assert_eq!(got.number, i64::from(gpu.split_count));
                    prop_assert_eq!(got.memory, i64::try_from(gpu.memory_units).unwrap());
                    prop_assert!(got.type_.starts_with("NVIDIA-"));
                    prop_assert!(!got.type_.contains([',', ':', ';']));
                    prop_assert_eq!(got.health, gpu.healthy);
                    prop_assert_eq!(got.mode.as_str(), MODE_HAMI_CORE);
                }
            }
        }
    }
}
