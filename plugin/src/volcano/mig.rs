//! Dynamic MIG on the wire (docs/volcano-contract.md §3.1, §4 "MIG mode", §5.2 `knownMigGeometries`): the
//! geometry model the scheduler and the agent share, the Go plugin's built-in list, the bracketed device IDs
//! `GPU-<uuid>[<group>-<position>]` the scheduler writes into `devices-to-allocate`, and the lookup from such an
//! ID to the MIG template it names. Pure: no NVML, no I/O.
//!
//! Upstream, cited below as [P] (Project-HAMi/volcano-vgpu-device-plugin at `4fb76ba`) and [V] (volcano-sh/volcano
//! at `ed72c7c81`).

use crate::volcano::{AnnotationError, DEVICES_TO_ALLOCATE};

/// The most MIG instances one GPU holds (A100, A30, H100: 7 compute slices).
pub const MAX_INSTANCES_PER_GPU: u32 = 7;

/// One MIG profile of a geometry and how many instances of it the geometry holds ([P] `pkg/config/config.go:90-94`
/// `MigTemplate`; [V] `pkg/scheduler/api/devices/config/vgpu.go:32-40`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigTemplate {
    /// The `nvidia-mig-parted` profile name, e.g. `1g.10gb` or `1g.10gb+me`.
    pub name: String,
    /// `memory`: the memory the scheduler accounts per instance, in MiB (it multiplies a request by
    /// `gpuMemoryFactor` before comparing, [V] `mig.go:36-43`).
    pub memory_mib: u32,
    /// `count`: instances of this profile in the geometry.
    pub count: u32,
}

/// One allowed partition of a GPU (`allowedGeometries[]`: [P] `config.go:102-105` `Geometry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigGeometry {
    /// `group`: the name the bracketed ID carries, e.g. `group2`.
    pub group: String,
    /// `geometries`: the profiles, in order; a position counts through them in this order.
    pub templates: Vec<MigTemplate>,
}

impl MigGeometry {
    /// The instances the geometry holds in all.
    pub fn instances(&self) -> u32 {
        self.templates.iter().map(|t| t.count).sum()
    }
}

/// The geometries of a set of GPU models (`knownMigGeometries[]`: [P] `config.go:114-117` `AllowedMigGeometries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigModelGeometries {
    /// `models`: NVML names, matched as substrings of the GPU's name.
    pub models: Vec<String>,
    /// `allowedGeometries`.
    pub geometries: Vec<MigGeometry>,
}

fn template(name: &str, memory_mib: u32, count: u32) -> MigTemplate {
    MigTemplate {
        name: name.to_owned(),
        memory_mib,
        count,
    }
}

fn geometry(group: &str, templates: Vec<MigTemplate>) -> MigGeometry {
    MigGeometry {
        group: group.to_owned(),
        templates,
    }
}

/// The Go plugin's `knownMigGeometries`: neither Go program has them in code (an absent key is an empty list to
/// both, [P] `config.go:40`, [V] `config/config.go:97-113`); they ship in the plugin's device config map,
/// identically in [P] `deployments/static/volcano-vgpu-device-plugin.yml:37-104` and the helm chart's
/// `deployments/helm/volcano-vgpu-device-plugin/values.yaml:32-99`. This agent uses them when the key is absent,
/// so an operator who drops the key gets what the shipped config map says. The duplicate `A100-SXM4-40GB` is
/// upstream's; there is no H100 entry upstream.
pub fn default_known_mig_geometries() -> Vec<MigModelGeometries> {
    let models = |names: &[&str]| names.iter().map(|&n| n.to_owned()).collect();
    vec![
        MigModelGeometries {
            models: models(&["A30"]),
            geometries: vec![
                geometry("group1", vec![template("1g.6gb", 6144, 4)]),
                geometry("group2", vec![template("2g.12gb", 12288, 2)]),
                geometry("group3", vec![template("4g.24gb", 24576, 1)]),
            ],
        },
        MigModelGeometries {
            models: models(&[
                "A100-SXM4-40GB",
                "A100-40GB-PCIe",
                "A100-PCIE-40GB",
                "A100-SXM4-40GB",
            ]),
            geometries: vec![
                geometry("group1", vec![template("1g.5gb", 5120, 7)]),
                geometry(
                    "group2",
                    vec![template("2g.10gb", 10240, 3), template("1g.5gb", 5120, 1)],
                ),
                geometry("group3", vec![template("3g.20gb", 20480, 2)]),
                geometry("group4", vec![template("7g.40gb", 40960, 1)]),
            ],
        },
        MigModelGeometries {
            models: models(&["A100-SXM4-80GB", "A100-80GB-PCIe", "A100-PCIE-80GB"]),
            geometries: vec![
                geometry("group1", vec![template("1g.10gb", 9728, 7)]),
                geometry(
                    "group2",
                    vec![template("2g.20gb", 19968, 3), template("1g.10gb", 9728, 1)],
                ),
                geometry("group3", vec![template("3g.40gb", 40192, 2)]),
                geometry("group4", vec![template("7g.80gb", 80896, 1)]),
            ],
        },
    ]
}

/// The geometries of a GPU model: the first entry one of whose `models` is a substring of the NVML name (so
/// `A100-SXM4-80GB` matches `NVIDIA A100-SXM4-80GB`). The plugin's `containsModel` ([P]
/// `pkg/plugin/server.go:816-823`, used at `:908-909`) and the scheduler's `extractGeometryFromType` ([V]
/// `pkg/scheduler/api/devices/nvidia/vgpu/utils.go:35-50`, on the registered type `NVIDIA-<name>`) both take the
/// first match in list order.
pub fn geometries_for_model<'a>(
    known: &'a [MigModelGeometries],
    model: &str,
) -> Option<&'a MigModelGeometries> {
    known
        .iter()
        .find(|entry| entry.models.iter().any(|m| model.contains(m.as_str())))
}

/// Whether `name` is a MIG GPU-instance profile name: `<slices>g.<GiB>gb`, optionally followed by a media
/// extension such as `+me`, `+me.all`, `-me` or `+gfx` (the forms `nvidia-smi mig -lgip` prints).
pub fn is_profile_name(name: &str) -> bool {
    let (base, suffix) = match name.find(['+', '-']) {
        Some(at) => (&name[..at], Some(&name[at + 1..])),
        None => (name, None),
    };
    let number = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|v| v > 0)
    };
    let base_ok = base.split_once("g.").is_some_and(|(slices, rest)| {
        number(slices)
            && slices
                .parse::<u32>()
                .is_ok_and(|v| v <= MAX_INSTANCES_PER_GPU)
            && rest.strip_suffix("gb").is_some_and(number)
    });
    let suffix_ok = suffix.is_none_or(|s| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.ends_with('.')
            && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'.')
    });
    base_ok && suffix_ok
}

/// Whether a group name can travel in a bracketed ID: both decoders split the bracket's content on `-` ([V]
/// `mig.go:257-260` wants exactly two parts) and every annotation is split on `,`, `:` and `;`.
pub fn is_group_name(group: &str) -> bool {
    !group.is_empty()
        && group
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"-[],:;".contains(c))
}

/// A device ID of the scheduler's MIG mode, `<parent UUID>[<group>-<position>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigDeviceId<'a> {
    /// The GPU's NVML UUID as registered, `GPU-…`.
    pub parent_uuid: &'a str,
    /// The geometry group the scheduler chose for the whole GPU.
    pub group: &'a str,
    /// The instance within the group, counting through its templates in order ([V] `mig.go:152-170`).
    pub position: u32,
}

/// Whether a device record's UUID is a MIG one; the plugin's own test ([P] `server.go:859`).
pub fn is_mig_id(uuid: &str) -> bool {
    uuid.contains('[')
}

/// The scheduler's `encodeMIGID` ([V] `pkg/scheduler/api/devices/nvidia/vgpu/mig.go:243-245`).
pub fn encode_mig_id(parent_uuid: &str, group: &str, position: u32) -> String {
    format!("{parent_uuid}[{group}-{position}]")
}

/// Decodes a bracketed ID. Strict where the Go decoders are loose, so an ID the agent accepts means the same to
/// both of them: the plugin's `ExtractMigTemplatesFromUUID` ([P] `pkg/util/util.go:537-567`) ignores what follows
/// `]` and a third `-` part and trims the group; the scheduler's `decodeMIGID` ([V] `mig.go:247-269`) wants
/// exactly two `-` parts. Here: a non-empty parent, one `[`, a group [`is_group_name`], `-`, decimal digits,
/// `]` at the very end.
pub fn decode_mig_id(id: &str) -> Result<MigDeviceId<'_>, AnnotationError> {
    let err = |expected| AnnotationError::new(DEVICES_TO_ALLOCATE, "MIG device ID", id, expected);
    let (parent_uuid, rest) = id
        .split_once('[')
        .ok_or_else(|| err("a MIG device ID <GPU UUID>[<group>-<position>] (no '[')"))?;
    let inner = rest
        .strip_suffix(']')
        .ok_or_else(|| err("a MIG device ID ending in ']'"))?;
    let (group, position) = inner
        .split_once('-')
        .ok_or_else(|| err("a MIG device ID with <group>-<position> inside the brackets"))?;
    if parent_uuid.is_empty() || parent_uuid.contains([']', ',', ':', ';']) {
        return Err(err("a MIG device ID whose parent GPU UUID is not empty"));
    }
    if !is_group_name(group) {
        return Err(err(
            "a MIG device ID whose group is a name without '-', brackets, separators or spaces",
        ));
    }
    let position = Some(position)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| err("a MIG device ID whose position is a decimal number"))?;
    Ok(MigDeviceId {
        parent_uuid,
        group,
        position,
    })
}

/// What a bracketed ID names in the configured geometries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigSlot<'a> {
    /// The index of the group in the model's `allowedGeometries` (the scheduler's `MigUsage.Index`).
    pub group_index: usize,
    /// The whole geometry: what the GPU must be partitioned into (the plugin applies every template of the group
    /// with its count, [P] `server.go:933-958`).
    pub geometry: &'a MigGeometry,
    /// The index of the template within the geometry.
    pub template_index: usize,
    /// The template the position falls in.
    pub template: &'a MigTemplate,
    /// The instance among that template's `count` (the scheduler's "in-resource index").
    pub instance: u32,
}

/// Why a bracketed ID names nothing in the configured geometries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigLookupError {
    /// No `knownMigGeometries` entry matches the GPU's model.
    #[error("no knownMigGeometries entry lists a model contained in {model:?}")]
    UnknownModel {
        /// The GPU's NVML name.
        model: String,
    },
    /// The model has no such group.
    #[error("knownMigGeometries for {model:?} has no group {group:?}")]
    UnknownGroup {
        /// The GPU's NVML name.
        model: String,
        /// The group the ID named.
        group: String,
    },
    /// The position is past the group's instances.
    #[error("position {position} is outside group {group:?}, which holds {instances} instances")]
    PositionOutOfRange {
        /// The group.
        group: String,
        /// The position the ID named.
        position: u32,
        /// The instances the group holds.
        instances: u32,
    },
}

/// The plugin's template lookup for one bracketed ID on a GPU of `model`: the model's entry
/// ([`geometries_for_model`]), its first group of that name ([P] `server.go:918-929`, [V] `mig.go:272-273`), and
/// the template and instance the position falls in, counting through the templates in order ([V]
/// `mig.go:232-241` `findPosition`). The plugin itself uses the position only as the NVML MIG device index
/// ([P] `util.go:475-482`) and never checks it against the group; this lookup refuses a position past the group.
pub fn lookup_mig_slot<'a>(
    known: &'a [MigModelGeometries],
    model: &str,
    id: &MigDeviceId<'_>,
) -> Result<MigSlot<'a>, MigLookupError> {
    let entry = geometries_for_model(known, model).ok_or_else(|| MigLookupError::UnknownModel {
        model: model.to_owned(),
    })?;
    let (group_index, geometry) = entry
        .geometries
        .iter()
        .enumerate()
        .find(|(_, g)| g.group == id.group)
        .ok_or_else(|| MigLookupError::UnknownGroup {
            model: model.to_owned(),
            group: id.group.to_owned(),
        })?;
    let mut before = 0u32;
    for (template_index, template) in geometry.templates.iter().enumerate() {
        let end = before.saturating_add(template.count);
        if id.position < end {
            return Ok(MigSlot {
                group_index,
                geometry,
                template_index,
                template,
                instance: id.position - before,
            });
        }
        before = end;
    }
    Err(MigLookupError::PositionOutOfRange {
        group: id.group.to_owned(),
        position: id.position,
        instances: geometry.instances(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448";

    #[test]
    fn ids_round_trip_through_encode_and_decode() {
        let id = encode_mig_id(A, "group2", 3);
        assert_eq!(id, format!("{A}[group2-3]"));
        assert_eq!(
            decode_mig_id(&id).unwrap(),
            MigDeviceId {
                parent_uuid: A,
                group: "group2",
                position: 3
            }
        );
        assert!(is_mig_id(&id));
        assert!(!is_mig_id(A));
    }

    #[test]
    fn malformed_ids_are_refused_with_the_expected_form() {
        for bad in [
            A,
            "[group1-0]",
            &format!("{A}[group1-0"),
            &format!("{A}[group1-0]x"),
            &format!("{A}[group1]"),
            &format!("{A}[-0]"),
            &format!("{A}[group1-]"),
            &format!("{A}[group1-+1]"),
            &format!("{A}[group1--1]"),
            &format!("{A}[group1-0-1]"),
            &format!("{A}[gr oup-0]"),
            &format!("{A}[group1-99999999999]"),
        ] {
            let err = decode_mig_id(bad).expect_err(bad);
            assert_eq!(err.annotation, DEVICES_TO_ALLOCATE);
            assert!(err.expected.starts_with("a MIG device ID"), "{bad}: {err}");
        }
    }

    #[test]
    fn lookup_counts_positions_through_the_templates_in_order() {
        let known = default_known_mig_geometries();
        let model = "NVIDIA A100-SXM4-80GB";
        let slot = |group, position| {
            lookup_mig_slot(
                &known,
                model,
                &MigDeviceId {
                    parent_uuid: A,
                    group,
                    position,
                },
            )
        };
        // [V] mig.go:152-170: in group2 (3 × 2g.20gb, 1 × 1g.10gb) position 3 is the 1g.10gb.
        let s = slot("group2", 3).unwrap();
        assert_eq!((s.group_index, s.template_index, s.instance), (1, 1, 0));
        assert_eq!(s.template.name, "1g.10gb");
        assert_eq!(s.geometry.instances(), 4);
        let s = slot("group2", 2).unwrap();
        assert_eq!((s.template.name.as_str(), s.instance), ("2g.20gb", 2));
        let s = slot("group1", 6).unwrap();
        assert_eq!((s.template.name.as_str(), s.instance), ("1g.10gb", 6));
        assert_eq!(
            slot("group2", 4).unwrap_err(),
            MigLookupError::PositionOutOfRange {
                group: "group2".into(),
                position: 4,
                instances: 4
            }
        );
        assert!(matches!(
            slot("group9", 0).unwrap_err(),
            MigLookupError::UnknownGroup { .. }
        ));
        let err = lookup_mig_slot(
            &known,
            "Tesla T4",
            &MigDeviceId {
                parent_uuid: A,
                group: "group1",
                position: 0,
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no knownMigGeometries entry lists a model contained in \"Tesla T4\""
        );
    }

    #[test]
    fn models_match_as_substrings_first_entry_first() {
        let known = default_known_mig_geometries();
        let a30 = geometries_for_model(&known, "NVIDIA A30").unwrap();
        assert_eq!(a30.geometries[0].templates[0].name, "1g.6gb");
        let pcie40 = geometries_for_model(&known, "NVIDIA A100-PCIE-40GB").unwrap();
        assert_eq!(pcie40.geometries[3].templates[0].name, "7g.40gb");
        let sxm80 = geometries_for_model(&known, "NVIDIA-NVIDIA A100-SXM4-80GB").unwrap();
        assert_eq!(sxm80.geometries[0].templates[0].memory_mib, 9728);
        assert!(geometries_for_model(&known, "NVIDIA H100 80GB HBM3").is_none());
    }

    #[test]
    fn the_defaults_are_valid_by_our_own_rules() {
        for entry in default_known_mig_geometries() {
            for g in &entry.geometries {
                assert!(is_group_name(&g.group), "{}", g.group);
                assert!(g.instances() <= MAX_INSTANCES_PER_GPU, "{}", g.group);
                for t in &g.templates {
                    assert!(is_profile_name(&t.name), "{}", t.name);
                    assert!(t.memory_mib > 0 && t.count > 0);
                }
            }
        }
    }

    #[test]
    fn profile_names_follow_nvidia_s_form() {
        for good in [
            "1g.5gb",
            "7g.80gb",
            "1g.10gb+me",
            "1g.20gb+me.all",
            "1g.10gb-me",
            "4g.24gb+gfx",
        ] {
            assert!(is_profile_name(good), "{good}");
        }
        for bad in [
            "",
            "1g",
            "1g.5",
            "1g.5GB",
            "g.5gb",
            "0g.5gb",
            "8g.80gb",
            "1g.0gb",
            "1g.5gb+",
            "1g.5gb+ME",
            "x1g.5gb",
            "1g.5gb+me.",
            " 1g.5gb",
        ] {
            assert!(!is_profile_name(bad), "{bad}");
        }
    }
}
