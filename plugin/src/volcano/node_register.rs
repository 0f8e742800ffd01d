//! `volcano.sh/node-vgpu-register`: the node's GPU inventory, written by the agent and read by the scheduler
//! (docs/volcano-contract.md §2.1).
//!
//! One record per GPU, every record (the last too) ending in `:`, six `,`-separated fields:
//! `UUID,split,memory units,NVIDIA-<model>,health,mode`. The scheduler uses a record's position as the device
//! index, so the caller passes GPUs sorted by minor number. [`decode_node_register`] is a faithful copy of the
//! scheduler's parser, so tests can check what the scheduler would make of what we write.

use std::fmt::Write as _;

/// `mode` of a GPU shared through HAMi-core's `libvgpu.so` (the default).
pub const MODE_HAMI_CORE: &str = "hami-core";
/// `mode` of a GPU partitioned with dynamic MIG.
pub const MODE_MIG: &str = "mig";

/// A node's `operatingmode` (docs/volcano-contract.md §5.3), written as field 5 of every record.
///
/// The Go plugin writes the node config's string as is ([P] `pkg/util/util.go:646-648`, `pkg/plugin/register.go:104`)
/// and the scheduler reads `mig` as MIG and anything else as hami-core ([V] `vgpu/utils.go:86`,
/// `getSharingMode`); the agent accepts only these two spellings, so what it writes means what it serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OperatingMode {
    /// Shared through HAMi-core's `libvgpu.so`: [`MODE_HAMI_CORE`].
    #[default]
    HamiCore,
    /// Dynamic MIG: [`MODE_MIG`].
    Mig,
}

impl OperatingMode {
    /// The field-5 spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HamiCore => MODE_HAMI_CORE,
            Self::Mig => MODE_MIG,
        }
    }

    /// The mode for an `operatingmode` value, `None` for anything but the two spellings.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            MODE_HAMI_CORE => Some(Self::HamiCore),
            MODE_MIG => Some(Self::Mig),
            _ => None,
        }
    }
}

impl std::fmt::Display for OperatingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One GPU as the agent registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredGpu {
    /// NVML UUID, `GPU-…`.
    pub uuid: String,
    /// `deviceSplitCount`: how many containers may share the GPU.
    pub split_count: u32,
    /// Total memory in `gpuMemoryFactor` units.
    pub memory_units: u64,
    /// NVML product name, e.g. `NVIDIA A100-SXM4-80GB`; written as type `NVIDIA-<model>`.
    pub model: String,
    /// The device-plugin health of the GPU (the scheduler copies it but never acts on it).
    pub healthy: bool,
    /// [`MODE_HAMI_CORE`] or [`MODE_MIG`].
    pub mode: String,
}

/// Encodes the inventory. An empty list encodes as `""`, which the scheduler reads as "no vGPU on this node".
pub fn encode_node_register(gpus: &[RegisteredGpu]) -> String {
    let mut out = String::new();
    for gpu in gpus {
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "{},{},{},NVIDIA-{},{},{}:",
            gpu.uuid,
            gpu.split_count,
            gpu.memory_units,
            sanitize_model(&gpu.model),
            gpu.healthy,
            gpu.mode
        );
    }
    out
}

/// NVML names are free text; a `,`, `:` or `;` in one would shift every later field (or record) of the node, so
/// those, and control characters, become `-`.
fn sanitize_model(model: &str) -> String {
    model
        .chars()
        .map(|c| {
            if matches!(c, ',' | ':' | ';') || c.is_control() {
                '-'
            } else {
                c
            }
        })
        .collect()
}

/// One GPU as the scheduler decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedNodeGpu {
    /// Position in the `:`-split list, counting elements without a `,` too: the scheduler's device index.
    pub index: usize,
    /// Field 0.
    pub uuid: String,
    /// Field 1, Go `Atoi` (0 when unparsable).
    pub number: i64,
    /// Field 2, Go `Atoi` (0 when unparsable).
    pub memory: i64,
    /// Field 3.
    pub type_: String,
    /// Field 4, Go `ParseBool` (false when unparsable).
    pub health: bool,
    /// Field 5 as the scheduler normalises it: [`MODE_MIG`] for `mig`, [`MODE_HAMI_CORE`] for anything else.
    pub mode: String,
}

/// Parses the annotation as Volcano's scheduler does (`vgpu/utils.go decodeNodeDevices`); `None` means
/// the scheduler ignores the node.
///
/// No `:` at all, or any `,`-bearing element with fewer than 6 fields (the legacy 5-field form included),
/// rejects the whole node. Elements without a `,` (such as the empty one after the final `:`) are skipped but
/// still count towards the index. Extra fields are ignored.
pub fn decode_node_register(value: &str) -> Option<Vec<DecodedNodeGpu>> {
    if !value.contains(':') {
        return None;
    }
    let mut gpus = Vec::new();
    for (index, record) in value.split(':').enumerate() {
        if !record.contains(',') {
            continue;
        }
        let fields: Vec<&str> = record.split(',').collect();
        let [uuid, number, memory, type_, health, mode, ..] = fields.as_slice() else {
            return None;
        };
        gpus.push(DecodedNodeGpu {
            index,
            uuid: (*uuid).to_owned(),
            number: go_atoi(number),
            memory: go_atoi(memory),
            type_: (*type_).to_owned(),
            health: go_parse_bool(health),
            mode: sharing_mode(mode).to_owned(),
        });
    }
    Some(gpus)
}

/// The node's sharing mode as the scheduler sees it: the last record's mode wins for the whole node.
pub fn node_mode(gpus: &[DecodedNodeGpu]) -> &str {
    gpus.last().map_or(MODE_HAMI_CORE, |g| g.mode.as_str())
}

/// Volcano's `getSharingMode`.
fn sharing_mode(field: &str) -> &'static str {
    if field == MODE_MIG {
        MODE_MIG
    } else {
        MODE_HAMI_CORE
    }
}

/// Go's `strconv.Atoi` with the error discarded, as the scheduler calls it: an optional sign and decimal digits;
/// anything else is 0, and an out-of-range number is clamped (Go returns the clamped value with its error).
fn go_atoi(text: &str) -> i64 {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    let mut value: i64 = 0;
    for b in digits.bytes() {
        let d = i64::from(b - b'0');
        let next = value.checked_mul(10).and_then(|v| {
            if negative {
                v.checked_sub(d)
            } else {
                v.checked_add(d)
            }
        });
        match next {
            Some(v) => value = v,
            None => return if negative { i64::MIN } else { i64::MAX },
        }
    }
    value
}

/// Go's `strconv.ParseBool` with the error discarded: false for anything it does not accept.
fn go_parse_bool(text: &str) -> bool {
    matches!(text, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operating_mode_spellings_are_the_scheduler_s() {
        assert_eq!(OperatingMode::parse("mig"), Some(OperatingMode::Mig));
        assert_eq!(
            OperatingMode::parse("hami-core"),
            Some(OperatingMode::HamiCore)
        );
        for other in ["MIG", "vgpu", "", "hami-core "] {
            assert_eq!(OperatingMode::parse(other), None, "{other:?}");
        }
        assert_eq!(OperatingMode::default(), OperatingMode::HamiCore);
        for mode in [OperatingMode::HamiCore, OperatingMode::Mig] {
            assert_eq!(OperatingMode::parse(mode.as_str()), Some(mode));
            assert_eq!(sharing_mode(&mode.to_string()), mode.as_str());
        }
    }

    fn gpu(uuid: &str, model: &str) -> RegisteredGpu {
        RegisteredGpu {
            uuid: uuid.to_owned(),
            split_count: 10,
            memory_units: 15360,
            model: model.to_owned(),
            healthy: true,
            mode: MODE_HAMI_CORE.to_owned(),
        }
    }

    #[test]
    fn every_record_ends_with_a_colon() {
        let value = encode_node_register(&[gpu("GPU-a", "Tesla T4"), gpu("GPU-b", "Tesla T4")]);
        assert_eq!(
            value,
            "GPU-a,10,15360,NVIDIA-Tesla T4,true,hami-core:GPU-b,10,15360,NVIDIA-Tesla T4,true,hami-core:"
        );
    }

    #[test]
    fn empty_inventory_encodes_as_empty_and_the_scheduler_ignores_it() {
        assert_eq!(encode_node_register(&[]), "");
        assert_eq!(decode_node_register(""), None);
    }

    #[test]
    fn separators_in_the_model_name_cannot_corrupt_the_record() {
        let value = encode_node_register(&[
            gpu("GPU-a", "Weird,Model:Name;X\n\u{7f}"),
            gpu("GPU-b", "Tesla T4"),
        ]);
        assert_eq!(
            value,
            "GPU-a,10,15360,NVIDIA-Weird-Model-Name-X--,true,hami-core:GPU-b,10,15360,NVIDIA-Tesla T4,true,\
             hami-core:"
        );
        let decoded = decode_node_register(&value).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].type_, "NVIDIA-Weird-Model-Name-X--");
        assert_eq!(decoded[0].number, 10);
        assert_eq!(decoded[1].uuid, "GPU-b");
        assert_eq!(decoded[1].index, 1);
    }

    #[test]
    fn unicode_model_names_are_kept() {
        let value = encode_node_register(&[gpu("GPU-a", "Ünïcode GPU ✓")]);
        let decoded = decode_node_register(&value).unwrap();
        assert_eq!(decoded[0].type_, "NVIDIA-Ünïcode GPU ✓");
    }

    #[test]
    fn huge_values_encode_exactly_and_decode_as_go_would() {
        let mut g = gpu("GPU-a", "Big");
        g.split_count = u32::MAX;
        g.memory_units = u64::MAX;
        let value = encode_node_register(&[g]);
        assert_eq!(
            value,
            "GPU-a,4294967295,18446744073709551615,NVIDIA-Big,true,hami-core:"
        );
        let decoded = decode_node_register(&value).unwrap();
        assert_eq!(decoded[0].number, 4_294_967_295);
        // Go's Atoi clamps an out-of-range number to MaxInt64.
        assert_eq!(decoded[0].memory, i64::MAX);
    }

    #[test]
    fn legacy_five_field_records_reject_the_whole_node() {
        let value =
            "GPU-a,10,15360,NVIDIA-Tesla T4,true,hami-core:GPU-b,10,15360,NVIDIA-Tesla T4,true:";
        assert_eq!(decode_node_register(value), None);
    }

    #[test]
    fn positions_count_elements_without_a_comma() {
        let value = "GPU-a,1,2,NVIDIA-X,true,hami-core::junk:GPU-b,3,4,NVIDIA-Y,false,mig,extra:";
        let decoded = decode_node_register(value).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].index, 0);
        assert_eq!(decoded[1].index, 3);
        assert!(!decoded[1].health);
        assert_eq!(node_mode(&decoded), MODE_MIG);
    }

    #[test]
    fn colon_without_records_is_a_node_with_no_gpus() {
        assert_eq!(decode_node_register(":"), Some(vec![]));
        assert_eq!(node_mode(&[]), MODE_HAMI_CORE);
    }

    #[test]
    fn unknown_modes_fall_back_to_hami_core_and_the_last_record_wins() {
        let decoded =
            decode_node_register("GPU-a,1,2,NVIDIA-X,true,mig:GPU-b,1,2,NVIDIA-X,true,other:")
                .unwrap();
        assert_eq!(decoded[0].mode, MODE_MIG);
        assert_eq!(decoded[1].mode, MODE_HAMI_CORE);
        assert_eq!(node_mode(&decoded), MODE_HAMI_CORE);
    }

    #[test]
    fn numbers_follow_go_atoi() {
        assert_eq!(go_atoi("10"), 10);
        assert_eq!(go_atoi("+10"), 10);
        assert_eq!(go_atoi("-10"), -10);
        assert_eq!(go_atoi(""), 0);
        assert_eq!(go_atoi("-"), 0);
        assert_eq!(go_atoi("1_0"), 0);
        assert_eq!(go_atoi(" 1"), 0);
        assert_eq!(go_atoi("1e3"), 0);
        assert_eq!(go_atoi("99999999999999999999"), i64::MAX);
        assert_eq!(go_atoi("-99999999999999999999"), i64::MIN);
        assert_eq!(go_atoi("-9223372036854775808"), i64::MIN);
    }

    #[test]
    fn booleans_follow_go_parse_bool() {
        for yes in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(go_parse_bool(yes), "{yes}");
        }
        for no in ["0", "f", "false", "yes", "tRUE", ""] {
            assert!(!go_parse_bool(no), "{no}");
        }
    }
}
