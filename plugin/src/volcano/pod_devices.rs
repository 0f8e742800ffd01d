//! The pod-devices encoding of `volcano.sh/devices-to-allocate` and `volcano.sh/vgpu-ids-new` (docs/volcano-contract.md §3.1),
//! and the queue operations the Go plugin performs on it (§3.2 steps 5–7).
//!
//! A value is one `;`-separated segment per container with a vGPU request (in `spec.containers` order, empty
//! segments kept, no trailing `;`); a segment is a run of device records `UUID,type,memory,cores:`, each ending
//! in `:`. The encoder is byte-for-byte the scheduler's. The decoder is stricter than either Go decoder: it
//! accepts exactly what an encoder can produce (canonical unsigned numbers, cores ≤ 100, four fields, no
//! stray separators), so `encode(decode(v)) == v` for every value it accepts, and a value it refuses is reported
//! instead of being turned into zeros or negative limits.

use std::fmt::Write as _;

use super::{AnnotationError, DEVICE_TYPE_NVIDIA};

/// The largest value the decoder reads. Kubernetes caps all of an object's annotations at 256 KiB together; a
/// real queue is about 60 bytes per device, so 64 KiB is over a thousand devices and anything longer is junk.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// One device of one container.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerDevice {
    /// GPU UUID; in MIG mode with a `[group-position]` suffix.
    pub uuid: String,
    /// The request type, always `NVIDIA` from Volcano.
    pub device_type: String,
    /// Memory in `gpuMemoryFactor` units.
    pub used_mem: u32,
    /// Percent of the GPU's SMs, 0–100.
    pub used_cores: u32,
}

impl ContainerDevice {
    /// Whether the Go plugin would hand this device out (it compares the type with `NVIDIA` exactly).
    pub fn is_nvidia(&self) -> bool {
        self.device_type == DEVICE_TYPE_NVIDIA
    }
}

/// A decoded value: one list per `;` segment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodDevices(pub Vec<Vec<ContainerDevice>>);

/// What each of a record's four fields is called in errors.
const FIELD_NAMES: [&str; 4] = ["UUID", "type", "used memory", "used cores"];

impl PodDevices {
    /// Decodes a value strictly; `annotation` only names the source in errors.
    ///
    /// `""` is zero segments, `";"` two empty ones, `";X:"` is `[[], [X]]`. Refused: a value over
    /// [`MAX_VALUE_BYTES`]; a non-empty segment not ending in `:`; an empty record (`::`); a record without exactly
    /// four fields; an empty UUID or type, or one with whitespace or control characters; a memory or cores field
    /// that is not a canonical unsigned 32-bit decimal (no sign, no leading zeros); cores above 100.
    ///
    /// The Go plugin's decoder accepts `-1` (and turns any unparsable number into 0); we refuse both on purpose,
    /// since a negative or made-up limit handed to HAMi-core is worse than a failed, logged allocation.
    pub fn decode(annotation: &'static str, value: &str) -> Result<Self, AnnotationError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(AnnotationError::new(
                annotation,
                format!("whole value ({} bytes)", value.len()),
                value,
                "a value of at most 65536 bytes",
            ));
        }
        if value.is_empty() {
            return Ok(Self::default());
        }
        value
            .split(';')
            .enumerate()
            .map(|(s, segment)| decode_segment(annotation, s, segment))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Encodes exactly as the scheduler and the Go plugin do: records `uuid,type,mem,cores:` concatenated,
    /// segments joined with `;`, no trailing `;`.
    ///
    /// Like the Go encoder, a single empty segment encodes as `""`, which decodes to zero segments: both mean
    /// "nothing left", and the Go plugin writes `""` in that case too.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (s, segment) in self.0.iter().enumerate() {
            if s > 0 {
                out.push(';');
            }
            for d in segment {
                // Writing into a String cannot fail.
                let _ = write!(
                    out,
                    "{},{},{},{}:",
                    d.uuid, d.device_type, d.used_mem, d.used_cores
                );
            }
        }
        out
    }

    /// The first segment holding an NVIDIA device: the container the next Allocate call is for (upstream
    /// `GetNextDeviceRequest`).
    pub fn next_segment(&self) -> Option<usize> {
        self.0
            .iter()
            .position(|segment| segment.iter().any(ContainerDevice::is_nvidia))
    }

    /// Removes the NVIDIA devices of one segment and returns them, keeping the segment itself (now possibly
    /// empty) so later segments keep their container (upstream `EraseNextDeviceTypeFromAnnotation`). An index
    /// past the end takes nothing.
    pub fn take_segment(&mut self, index: usize) -> Vec<ContainerDevice> {
        let Some(segment) = self.0.get_mut(index) else {
            return Vec::new();
        };
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(segment)
            .into_iter()
            .partition(ContainerDevice::is_nvidia);
        *segment = kept;
        taken
    }

    /// NVIDIA devices left over all segments.
    pub fn remaining(&self) -> usize {
        self.0.iter().flatten().filter(|d| d.is_nvidia()).count()
    }
}

fn decode_segment(
    annotation: &'static str,
    s: usize,
    segment: &str,
) -> Result<Vec<ContainerDevice>, AnnotationError> {
    if segment.is_empty() {
        return Ok(Vec::new());
    }
    let Some(records) = segment.strip_suffix(':') else {
        return Err(AnnotationError::new(
            annotation,
            format!("segment {s}"),
            segment,
            "device records each ending in ':' (UUID,type,memory,cores:)",
        ));
    };
    records
        .split(':')
        .enumerate()
        .map(|(r, record)| decode_record(annotation, s, r, record))
        .collect()
}

fn decode_record(
    annotation: &'static str,
    s: usize,
    r: usize,
    record: &str,
) -> Result<ContainerDevice, AnnotationError> {
    let fields: Vec<&str> = record.split(',').collect();
    let [uuid, device_type, used_mem, used_cores] = fields.as_slice() else {
        return Err(AnnotationError::new(
            annotation,
            format!("segment {s}, record {r}"),
            record,
            "a device record of 4 fields UUID,type,memory,cores",
        ));
    };
    let field_error = |f: usize, text: &str, expected: &'static str| {
        AnnotationError::new(
            annotation,
            format!("segment {s}, record {r}, field {f} ({})", FIELD_NAMES[f]),
            text,
            expected,
        )
    };
    if !is_token(uuid) {
        return Err(field_error(
            0,
            uuid,
            "a device UUID (non-empty, without spaces)",
        ));
    }
    if !is_token(device_type) {
        return Err(field_error(
            1,
            device_type,
            "a device type such as NVIDIA (non-empty, without spaces)",
        ));
    }
    let Some(used_mem_value) = parse_canonical_u32(used_mem) else {
        return Err(field_error(
            2,
            used_mem,
            "a memory size in units: a decimal number from 0 to 4294967295 without sign or leading zeros",
        ));
    };
    let Some(used_cores_value) = parse_canonical_u32(used_cores).filter(|&c| c <= 100) else {
        return Err(field_error(
            3,
            used_cores,
            "a percentage of cores: a decimal number from 0 to 100 without sign or leading zeros",
        ));
    };
    Ok(ContainerDevice {
        uuid: (*uuid).to_owned(),
        device_type: (*device_type).to_owned(),
        used_mem: used_mem_value,
        used_cores: used_cores_value,
    })
}

/// Non-empty, and nothing a runtime env or a log line would mangle.
fn is_token(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Decimal digits only, no leading zero except `0` itself, within `u32`: exactly what the encoder prints, so
/// the decoded value re-encodes to the same text.
fn parse_canonical_u32(text: &str) -> Option<u32> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical { text.parse().ok() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volcano::DEVICES_TO_ALLOCATE;

    const A: &str = "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448";
    const B: &str = "GPU-8664316c-6888-5063-1e4d-f2a09cfbf180";

    fn dev(uuid: &str, mem: u32, cores: u32) -> ContainerDevice {
        ContainerDevice {
            uuid: uuid.to_owned(),
            device_type: DEVICE_TYPE_NVIDIA.to_owned(),
            used_mem: mem,
            used_cores: cores,
        }
    }

    fn decode(value: &str) -> Result<PodDevices, AnnotationError> {
        PodDevices::decode(DEVICES_TO_ALLOCATE, value)
    }

    #[test]
    fn empty_value_is_zero_segments_and_separators_keep_empty_segments() {
        assert_eq!(decode("").unwrap(), PodDevices(vec![]));
        assert_eq!(decode(";").unwrap(), PodDevices(vec![vec![], vec![]]));
        assert_eq!(decode(";;").unwrap().0.len(), 3);
        let value = format!(";{A},NVIDIA,1000,0:");
        assert_eq!(
            decode(&value).unwrap(),
            PodDevices(vec![vec![], vec![dev(A, 1000, 0)]])
        );
    }

    #[test]
    fn encode_matches_the_scheduler_format() {
        let pd = PodDevices(vec![
            vec![dev(A, 3000, 30)],
            vec![dev(B, 2000, 0), dev(A, 2000, 0)],
        ]);
        let value = pd.encode();
        assert_eq!(
            value,
            format!("{A},NVIDIA,3000,30:;{B},NVIDIA,2000,0:{A},NVIDIA,2000,0:")
        );
        assert_eq!(decode(&value).unwrap(), pd);
        assert_eq!(PodDevices(vec![vec![], vec![]]).encode(), ";");
        assert_eq!(PodDevices(vec![vec![]]).encode(), "");
        assert_eq!(PodDevices::default().encode(), "");
    }

    #[test]
    fn queue_walk_keeps_empty_segments() {
        let mut pd = decode(&format!(
            "{A},NVIDIA,3000,30:;{B},NVIDIA,2000,0:{A},NVIDIA,2000,0:"
        ))
        .unwrap();
        assert_eq!(pd.remaining(), 3);
        assert_eq!(pd.next_segment(), Some(0));
        assert_eq!(pd.take_segment(0), vec![dev(A, 3000, 30)]);
        assert_eq!(
            pd.encode(),
            format!(";{B},NVIDIA,2000,0:{A},NVIDIA,2000,0:")
        );
        assert_eq!(pd.remaining(), 2);
        assert_eq!(pd.next_segment(), Some(1));
        assert_eq!(pd.take_segment(1).len(), 2);
        assert_eq!(pd.encode(), ";");
        assert_eq!(pd.remaining(), 0);
        assert_eq!(pd.next_segment(), None);
        assert_eq!(pd.take_segment(1), vec![]);
        assert_eq!(pd.take_segment(7), vec![]);
    }

    #[test]
    fn other_device_types_are_neither_taken_nor_counted() {
        let mut pd = decode(&format!("MLU-1,MLU,10,0:;{A},NVIDIA,1,0:MLU-2,MLU,1,0:")).unwrap();
        assert_eq!(pd.remaining(), 1);
        assert_eq!(pd.next_segment(), Some(1));
        assert_eq!(pd.take_segment(1), vec![dev(A, 1, 0)]);
        assert_eq!(pd.encode(), "MLU-1,MLU,10,0:;MLU-2,MLU,1,0:");
        assert_eq!(pd.next_segment(), None);
    }

    #[test]
    fn mig_uuids_with_brackets_are_accepted() {
        let value = format!("{A}[group2-3],NVIDIA,19968,0:");
        let pd = decode(&value).unwrap();
        assert_eq!(pd.0[0][0].uuid, format!("{A}[group2-3]"));
        assert_eq!(pd.encode(), value);
    }

    #[test]
    fn largest_numbers_are_accepted() {
        let value = format!("{A},NVIDIA,4294967295,100:");
        assert_eq!(decode(&value).unwrap().0[0][0].used_mem, u32::MAX);
    }

    /// Each field wrong in turn: the error names the field and quotes it.
    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (",NVIDIA,1,0:", "field 0 (UUID)", ""),
            ("GPU A,NVIDIA,1,0:", "field 0 (UUID)", "GPU A"),
            ("GPU-\t,NVIDIA,1,0:", "field 0 (UUID)", "GPU-\t"),
            ("GPU-a,,1,0:", "field 1 (type)", ""),
            ("GPU-a,NVI DIA,1,0:", "field 1 (type)", "NVI DIA"),
            ("GPU-a,NVIDIA,-1,0:", "field 2 (used memory)", "-1"),
            ("GPU-a,NVIDIA,+1,0:", "field 2 (used memory)", "+1"),
            ("GPU-a,NVIDIA,01,0:", "field 2 (used memory)", "01"),
            ("GPU-a,NVIDIA,,0:", "field 2 (used memory)", ""),
            ("GPU-a,NVIDIA,1.5,0:", "field 2 (used memory)", "1.5"),
            ("GPU-a,NVIDIA, 1,0:", "field 2 (used memory)", " 1"),
            (
                "GPU-a,NVIDIA,4294967296,0:",
                "field 2 (used memory)",
                "4294967296",
            ),
            (
                "GPU-a,NVIDIA,99999999999999999999999999,0:",
                "field 2 (used memory)",
                "99999999999999999999999999",
            ),
            ("GPU-a,NVIDIA,1,101:", "field 3 (used cores)", "101"),
            ("GPU-a,NVIDIA,1,-1:", "field 3 (used cores)", "-1"),
            ("GPU-a,NVIDIA,1,x:", "field 3 (used cores)", "x"),
        ];
        for (value, position, quoted) in cases {
            let err = decode(value).unwrap_err();
            assert_eq!(err.annotation, DEVICES_TO_ALLOCATE);
            assert_eq!(
                err.position,
                format!("segment 0, record 0, {position}"),
                "{value}"
            );
            assert_eq!(err.value, quoted, "{value}");
            assert!(err.to_string().contains(err.expected), "{err}");
        }
    }

    #[test]
    fn wrong_record_shapes_and_separators_are_refused() {
        let cases = [
            ("GPU-a,NVIDIA,1,0", "segment 0"),
            ("GPU-a,NVIDIA,1,0;", "segment 0"),
            (";GPU-a,NVIDIA,1,0", "segment 1"),
            ("GPU-a,NVIDIA,1:", "segment 0, record 0"),
            ("GPU-a,NVIDIA,1,0,5:", "segment 0, record 0"),
            ("GPU-a;NVIDIA;1;0:", "segment 0"),
            ("GPU-a,NVIDIA,1,0::", "segment 0, record 1"),
            (":", "segment 0, record 0"),
            ("GPU-a,NVIDIA,1,0:GPU-b,NVIDIA,1:", "segment 0, record 1"),
            ("GPU-a NVIDIA 1 0:", "segment 0, record 0"),
        ];
        for (value, position) in cases {
            let err = decode(value).unwrap_err();
            assert_eq!(err.position, position, "{value}: {err}");
        }
    }

    #[test]
    fn huge_values_are_refused_before_parsing() {
        let record = format!("{A},NVIDIA,1,0:");
        let at_limit: String = ";".repeat(MAX_VALUE_BYTES);
        assert_eq!(decode(&at_limit).unwrap().0.len(), MAX_VALUE_BYTES + 1);
        let huge = record.repeat(MAX_VALUE_BYTES / record.len() + 1);
        let err = decode(&huge).unwrap_err();
        assert!(err.position.starts_with("whole value"), "{err}");
        assert!(err.value.chars().count() <= 65, "{err}");
    }
}
