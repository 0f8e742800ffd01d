//! The configuration Volcano's vGPU stack shares with the node agent, merged the way an operator expects:
//! built-in defaults, then the `volcano-vgpu-device-config` config map (`device-config.yaml`, docs/volcano-contract.md §5.2),
//! then this node's entry of the per-node `config.json` (§5.3, values > 0 or non-empty only), then flags that
//! were set explicitly. Every key is honoured, including the ones the Go plugin loads and ignores
//! (`deviceMemoryScaling`, `disableCoreLimit`, `filterdevices`). A value the agent cannot serve is refused
//! with the key, the value and what was expected, every such key is listed, and each leaves only its own key
//! at the value below it: the good keys of the same document still apply (the scheduler reads them too).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::volcano::mig::{
    MAX_INSTANCES_PER_GPU, MigGeometry, MigModelGeometries, MigTemplate,
    default_known_mig_geometries, is_group_name, is_profile_name,
};
use crate::volcano::node_register::OperatingMode;

use crate::config::{
    CORE_SCALING_RANGE, InvalidSetting, MEMORY_SCALING_RANGE, ResourceNames, SPLIT_COUNT_RANGE,
    SharingSettings,
};
pub use crate::config::{
    DEVICE_CONFIG_KEY, DEVICE_CONFIG_MAP, DEVICE_CONFIG_NAMESPACES, ExplicitFlags, NODE_CONFIG_PATH,
};

/// `device-config.yaml`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct DeviceConfigFile {
    /// The `nvidia:` section; the only one this agent reads.
    #[serde(default)]
    pub nvidia: Option<NvidiaConfig>,
    /// Other vendors' sections and anything else, kept only to be reported.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// The `nvidia:` section, every key of docs/volcano-contract.md §5.2.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct NvidiaConfig {
    pub resource_count_name: Option<String>,
    pub resource_memory_name: Option<String>,
    pub resource_memory_percentage_name: Option<String>,
    pub resource_core_name: Option<String>,
    pub resource_priority_name: Option<String>,
    pub overwrite_env: Option<bool>,
    pub default_memory: Option<i64>,
    pub default_cores: Option<i64>,
    #[serde(rename = "defaultGPUNum")]
    pub default_gpu_num: Option<i64>,
    pub device_split_count: Option<i64>,
    pub device_memory_scaling: Option<f64>,
    pub device_core_scaling: Option<f64>,
    pub disable_core_limit: Option<bool>,
    pub gpu_memory_factor: Option<i64>,
    /// Kept untyped here so one bad entry cannot make the whole document unreadable: [`merge_all`] types it
    /// entry by entry ([`check_mig_geometries`]).
    pub known_mig_geometries: Option<serde_json::Value>,
    pub pass_device_specs: Option<bool>,
    /// Keys this agent does not know (a typo such as `disablecorelimit` lands here and is reported).
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `config.json` of the per-node config map.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct NodeConfigFile {
    /// One entry per node.
    #[serde(default)]
    pub nodeconfig: Vec<NodeConfig>,
}

/// One node's overrides (docs/volcano-contract.md §5.3); all keys lower case, as the Go plugin reads them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[allow(missing_docs)]
pub struct NodeConfig {
    pub name: String,
    #[serde(default)]
    pub operatingmode: Option<String>,
    #[serde(default)]
    pub devicememoryscaling: Option<f64>,
    #[serde(default)]
    pub devicecorescaling: Option<f64>,
    #[serde(default)]
    pub devicesplitcount: Option<i64>,
    #[serde(default)]
    pub migstrategy: Option<String>,
    #[serde(default)]
    pub filterdevices: Option<FilterDevices>,
}

/// GPUs to hide from Volcano, by UUID or by NVML index.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct FilterDevices {
    /// GPU UUIDs.
    #[serde(default)]
    pub uuid: Vec<String>,
    /// NVML indices.
    #[serde(default)]
    pub index: Vec<u32>,
}

/// The merged configuration the agent serves with.
#[derive(Debug, Clone, PartialEq)]
pub struct VolcanoConfig {
    /// Resource names.
    pub resources: ResourceNames,
    /// How GPUs are cut into IDs.
    pub sharing: SharingSettings,
    /// `deviceMemoryScaling`: memory advertised is the physical memory × this; > 1 oversubscribes.
    pub memory_scaling: f64,
    /// `disableCoreLimit`: containers get `GPU_CORE_UTILIZATION_POLICY=disable`.
    pub disable_core_limit: bool,
    /// `operatingmode`: `hami-core` (the default) or `mig` (Allocate repartitions GPUs through NVML, `gpu::mig`).
    pub operating_mode: OperatingMode,
    /// `knownMigGeometries`: the MIG partitions per GPU model, the Go plugin's shipped list when absent.
    pub mig_geometries: Vec<MigModelGeometries>,
    /// GPUs hidden from Volcano.
    pub filter: FilterDevices,
    /// `passDeviceSpecs`.
    pub pass_device_specs: bool,
    /// One line per key that was present but unknown, for the start-up log.
    pub warnings: Vec<String>,
}

impl Default for VolcanoConfig {
    fn default() -> Self {
        Self {
            resources: ResourceNames::default(),
            sharing: SharingSettings::default(),
            memory_scaling: 1.0,
            disable_core_limit: false,
            operating_mode: OperatingMode::HamiCore,
            mig_geometries: default_known_mig_geometries(),
            filter: FilterDevices::default(),
            pass_device_specs: false,
            warnings: Vec::new(),
        }
    }
}

/// A config that cannot be served.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// The YAML or JSON itself does not parse.
    #[error("{source_name} is not valid {format}: {message}")]
    Syntax {
        /// Which document.
        source_name: String,
        /// YAML or JSON.
        format: &'static str,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value out of range.
    #[error("{source_name}: {setting}")]
    Value {
        /// Which document.
        source_name: String,
        /// The key, value and expectation.
        setting: InvalidSetting,
    },
    /// A `knownMigGeometries` entry that cannot be served; the path names the entry, its models and group.
    #[error("{source_name}: {path}: expected {expected}, not {value}")]
    Geometry {
        /// Which document.
        source_name: String,
        /// E.g. `knownMigGeometries[0].allowedGeometries[1] (models A100-SXM4-80GB, group group2).geometries[0].count`.
        path: String,
        /// The offending value as JSON (`"x"`, `0`, `null`).
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
}

/// Parses `device-config.yaml`; `source_name` names it in errors (e.g. `kube-system/volcano-vgpu-device-config`).
pub fn parse_device_config(source_name: &str, yaml: &str) -> Result<DeviceConfigFile, ConfigError> {
    if yaml.trim().is_empty() {
        return Ok(DeviceConfigFile::default());
    }
    serde_saphyr::from_str(yaml).map_err(|e| ConfigError::Syntax {
        source_name: source_name.to_owned(),
        format: "YAML",
        message: e.to_string(),
    })
}

/// Parses the per-node `config.json`.
pub fn parse_node_config(source_name: &str, json: &str) -> Result<NodeConfigFile, ConfigError> {
    if json.trim().is_empty() {
        return Ok(NodeConfigFile::default());
    }
    serde_json::from_str(json).map_err(|e| ConfigError::Syntax {
        source_name: source_name.to_owned(),
        format: "JSON",
        message: e.to_string(),
    })
}

/// Every value of a configuration that could not be applied, each naming its key, value and expectation.
#[derive(Debug, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects what one merge refused, so every bad key is reported and every good key still applies.
struct Checker<'a> {
    source: &'a str,
    refused: &'a mut Vec<ConfigError>,
}

impl Checker<'_> {
    fn refuse(&mut self, field: &'static str, value: String, expected: &'static str) {
        self.refused.push(ConfigError::Value {
            source_name: self.source.to_owned(),
            setting: InvalidSetting {
                field,
                value,
                expected,
            },
        });
    }

    fn split_count(&mut self, key: &'static str, value: i64) -> Option<u32> {
        let accepted = u32::try_from(value)
            .ok()
            .filter(|v| SPLIT_COUNT_RANGE.contains(v));
        if accepted.is_none() {
            self.refuse(key, value.to_string(), "a whole number from 1 to 1000");
        }
        accepted
    }

    fn scaling(
        &mut self,
        key: &'static str,
        value: f64,
        range: &std::ops::RangeInclusive<f64>,
        expected: &'static str,
    ) -> Option<f64> {
        if range.contains(&value) {
            Some(value)
        } else {
            self.refuse(key, value.to_string(), expected);
            None
        }
    }

    fn resource_name(&mut self, key: &'static str, value: &str) -> Option<String> {
        // The Go plugin forces names under `volcano.sh/`; the scheduler uses the same rule.
        let name = if value.contains('/') {
            value.to_owned()
        } else {
            format!("volcano.sh/{value}")
        };
        let valid = name.split_once('/').is_some_and(|(d, n)| {
            !d.is_empty()
                && !n.is_empty()
                && !n.contains('/')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "./-_".contains(c))
        });
        if valid {
            Some(name)
        } else {
            self.refuse(
                key,
                value.to_owned(),
                "an extended resource name such as volcano.sh/vgpu-number",
            );
            None
        }
    }

    /// Two resources under one name (or one socket file: the name after `/` picks it) would make the second
    /// endpoint replace the first in the kubelet. Both keys are refused and all three names stay at their
    /// defaults, which are distinct.
    fn distinct_names(&mut self, names: &mut ResourceNames, keys: [&'static str; 3]) {
        let list = [
            names.number.clone(),
            names.memory.clone(),
            names.cores.clone(),
        ];
        let short = |n: &str| n.rsplit('/').next().unwrap_or(n).to_owned();
        let mut clash = false;
        for i in 0..3 {
            for j in i + 1..3 {
                if list[i] == list[j] || short(&list[i]) == short(&list[j]) {
                    clash = true;
                    self.refuse(
                        keys[j],
                        format!("{} (the same as {} = {})", list[j], keys[i], list[i]),
                        "a name of its own: each resource is served on its own kubelet socket, \
                         nvidia-<name after the />.sock",
                    );
                }
            }
        }
        if clash {
            *names = ResourceNames::default();
        }
    }
}

/// Merges defaults, the device config map, this node's entry of the node config and explicit flags, and
/// refuses the result if any value could not be applied, listing every one.
pub fn merge(
    device: Option<(&str, &DeviceConfigFile)>,
    node: Option<(&str, &NodeConfigFile)>,
    node_name: Option<&str>,
    flags: &ExplicitFlags,
) -> Result<VolcanoConfig, ConfigErrors> {
    let (config, refused) = merge_all(device, node, node_name, flags);
    if refused.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(refused))
    }
}

/// The merge, key by key: a value that cannot be served is listed and leaves that key at what the layer below
/// set (the default, or the device config map under the node entry); every other key applies. Never half a
/// document silently: the caller logs every refused key.
pub fn merge_all(
    device: Option<(&str, &DeviceConfigFile)>,
    node: Option<(&str, &NodeConfigFile)>,
    node_name: Option<&str>,
    flags: &ExplicitFlags,
) -> (VolcanoConfig, Vec<ConfigError>) {
    let mut out = VolcanoConfig::default();
    let mut refused = Vec::new();
    // The device config map's own gpuMemoryFactor: the one the scheduler reads from the same document.
    let mut shared_factor = None;
    if let Some((source, file)) = device {
        let mut check = Checker {
            source,
            refused: &mut refused,
        };
        for key in file.other.keys() {
            if key != "nvidia" {
                out.warnings.push(format!(
                    "{source}: section {key:?} is not read by this agent"
                ));
            }
        }
        if let Some(nv) = &file.nvidia {
            for key in nv.unknown.keys() {
                out.warnings.push(format!("{source}: unknown key nvidia.{key} ignored (keys are case-sensitive, e.g. disableCoreLimit)"));
            }
            const KEYS: [&str; 3] = [
                "nvidia.resourceCountName",
                "nvidia.resourceMemoryName",
                "nvidia.resourceCoreName",
            ];
            if let Some(v) = nv.resource_count_name.as_deref()
                && let Some(name) = check.resource_name(KEYS[0], v)
            {
                out.resources.number = name;
            }
            if let Some(v) = nv.resource_memory_name.as_deref()
                && let Some(name) = check.resource_name(KEYS[1], v)
            {
                out.resources.memory = name;
            }
            if let Some(v) = nv.resource_core_name.as_deref()
                && let Some(name) = check.resource_name(KEYS[2], v)
            {
                out.resources.cores = name;
            }
            check.distinct_names(&mut out.resources, KEYS);
            if let Some(v) = nv.device_split_count
                && let Some(v) = check.split_count("nvidia.deviceSplitCount", v)
            {
                out.sharing.split_count = v;
            }
            if let Some(v) = nv.gpu_memory_factor {
                match u32::try_from(v).ok().filter(|v| *v > 0) {
                    Some(v) => {
                        out.sharing.memory_factor = v;
                        shared_factor = Some(v);
                    }
                    None => check.refuse(
                        "nvidia.gpuMemoryFactor",
                        v.to_string(),
                        "a whole number of MiB of at least 1",
                    ),
                }
            }
            if let Some(v) = nv.device_core_scaling
                && let Some(v) = check.scaling(
                    "nvidia.deviceCoreScaling",
                    v,
                    &CORE_SCALING_RANGE,
                    "a number from 0.01 to 10",
                )
            {
                out.sharing.core_scaling = v;
            }
            if let Some(v) = nv.device_memory_scaling
                && let Some(v) = check.scaling(
                    "nvidia.deviceMemoryScaling",
                    v,
                    &MEMORY_SCALING_RANGE,
                    "a number from 0.01 to 100 (1 = physical memory)",
                )
            {
                out.memory_scaling = v;
            }
            if let Some(raw) = nv.known_mig_geometries.as_ref().filter(|v| !v.is_null())
                && let Some(known) = check_mig_geometries(source, raw, check.refused)
            {
                out.mig_geometries = known;
            }
            out.disable_core_limit = nv.disable_core_limit.unwrap_or(false);
            out.pass_device_specs = nv.pass_device_specs.unwrap_or(false);
        }
    }
    if let (Some((source, file)), Some(name)) = (node, node_name)
        && let Some(entry) = file.nodeconfig.iter().find(|e| e.name == name)
    {
        let mut check = Checker {
            source,
            refused: &mut refused,
        };
        // The Go plugin applies only values > 0 or non-empty.
        if let Some(mode) = entry.operatingmode.as_deref().filter(|m| !m.is_empty()) {
            if let Some(mode) = OperatingMode::parse(mode) {
                out.operating_mode = mode;
            } else {
                check.refuse(
                    "nodeconfig[].operatingmode",
                    mode.to_owned(),
                    "hami-core or mig",
                );
            }
        }
        if let Some(v) = entry.devicesplitcount.filter(|v| *v > 0)
            && let Some(v) = check.split_count("nodeconfig[].devicesplitcount", v)
        {
            out.sharing.split_count = v;
        }
        if let Some(v) = entry.devicecorescaling.filter(|v| *v > 0.0)
            && let Some(v) = check.scaling(
                "nodeconfig[].devicecorescaling",
                v,
                &CORE_SCALING_RANGE,
                "a number from 0.01 to 10",
            )
        {
            out.sharing.core_scaling = v;
        }
        if let Some(v) = entry.devicememoryscaling.filter(|v| *v > 0.0)
            && let Some(v) = check.scaling(
                "nodeconfig[].devicememoryscaling",
                v,
                &MEMORY_SCALING_RANGE,
                "a number from 0.01 to 100",
            )
        {
            out.memory_scaling = v;
        }
        if let Some(filter) = &entry.filterdevices {
            out.filter = filter.clone();
        }
    }
    if let Some(v) = flags.split_count {
        out.sharing.split_count = v;
    }
    if let Some(v) = flags.memory_factor {
        match shared_factor {
            // Pods ask for memory in units of the config map's factor: serving another one would give every
            // container a different amount of memory than its pod asked for. The config map's stays.
            Some(shared) if shared != v => Checker {
                source: "flags",
                refused: &mut refused,
            }
            .refuse(
                "--gpu-memory-factor",
                format!("{v} (the device config map's gpuMemoryFactor is {shared})"),
                "the device config map's gpuMemoryFactor, which the scheduler reads too; change it there, or \
                 leave the flag unset",
            ),
            _ => out.sharing.memory_factor = v,
        }
    }
    if let Some(v) = flags.core_scaling {
        out.sharing.core_scaling = v;
    }
    out.sharing.memory_scaling = out.memory_scaling;
    (out, refused)
}

/// Types `knownMigGeometries` entry by entry, the way every other key is checked: a bad model entry is dropped,
/// a group with a bad template is dropped (a partial group would partition the GPU differently from what the
/// scheduler accounts), every such problem is listed with its path, and the good entries are kept. `None`
/// when the value is not a list at all: the key then keeps the value below it (the Go plugin's list).
///
/// Types as upstream reads them ([P] `pkg/config/config.go:90-117`, [V] `config/vgpu.go:32-80`): `models` a
/// list of strings, `allowedGeometries` a list of `{group: string, geometries: [{name: string, memory: int,
/// count: int}]}`.
pub fn check_mig_geometries(
    source: &str,
    raw: &serde_json::Value,
    refused: &mut Vec<ConfigError>,
) -> Option<Vec<MigModelGeometries>> {
    let mut refuse = |path: String, value: &serde_json::Value, expected: &'static str| {
        refused.push(ConfigError::Geometry {
            source_name: source.to_owned(),
            path,
            value: quote_json(value),
            expected,
        });
    };
    let Some(entries) = raw.as_array() else {
        refuse(
            "nvidia.knownMigGeometries".to_owned(),
            raw,
            "a list of {models: [...], allowedGeometries: [...]}",
        );
        return None;
    };
    let mut out = Vec::new();
    'entries: for (e, entry) in entries.iter().enumerate() {
        let at = format!("knownMigGeometries[{e}]");
        let Some(fields) = entry.as_object() else {
            refuse(at, entry, "a map with models and allowedGeometries");
            continue;
        };
        let models_raw = fields.get("models").unwrap_or(&serde_json::Value::Null);
        let models: Option<Vec<String>> = models_raw.as_array().and_then(|list| {
            list.iter()
                .map(|m| {
                    m.as_str()
                        .filter(|m| !m.trim().is_empty())
                        .map(str::to_owned)
                })
                .collect()
        });
        let Some(models) = models.filter(|m| !m.is_empty()) else {
            refuse(
                format!("{at}.models"),
                models_raw,
                "a non-empty list of GPU model names, e.g. [A100-SXM4-80GB]",
            );
            continue;
        };
        for key in fields.keys() {
            if key != "models" && key != "allowedGeometries" {
                refuse(
                    format!("{at} (models {}).{key}", models.join(", ")),
                    &fields[key],
                    "only the keys models and allowedGeometries (keys are case-sensitive)",
                );
                continue 'entries;
            }
        }
        let groups_raw = fields
            .get("allowedGeometries")
            .unwrap_or(&serde_json::Value::Null);
        let Some(groups) = groups_raw.as_array() else {
            refuse(
                format!("{at} (models {}).allowedGeometries", models.join(", ")),
                groups_raw,
                "a list of {group, geometries}",
            );
            continue;
        };
        let mut geometries: Vec<MigGeometry> = Vec::new();
        for (g, group_raw) in groups.iter().enumerate() {
            let name = group_raw.get("group").and_then(serde_json::Value::as_str);
            let at = format!(
                "{at}.allowedGeometries[{g}] (models {}, group {})",
                models.join(", "),
                name.unwrap_or("?")
            );
            if let Some(geometry) = check_group(&at, group_raw, &mut refuse) {
                if geometries.iter().any(|k| k.group == geometry.group) {
                    refuse(
                        format!("{at}.group"),
                        &group_raw["group"],
                        "a group name not used before for the same models (the first one would always win)",
                    );
                    continue;
                }
                geometries.push(geometry);
            }
        }
        out.push(MigModelGeometries { models, geometries });
    }
    Some(out)
}

/// One `allowedGeometries[]` entry, or `None` after refusing what is wrong in it.
fn check_group(
    at: &str,
    raw: &serde_json::Value,
    refuse: &mut impl FnMut(String, &serde_json::Value, &'static str),
) -> Option<MigGeometry> {
    let Some(fields) = raw.as_object() else {
        refuse(at.to_owned(), raw, "a map with group and geometries");
        return None;
    };
    let mut ok = true;
    for key in fields.keys() {
        if key != "group" && key != "geometries" {
            refuse(
                format!("{at}.{key}"),
                &fields[key],
                "only the keys group and geometries (keys are case-sensitive)",
            );
            ok = false;
        }
    }
    let group_raw = fields.get("group").unwrap_or(&serde_json::Value::Null);
    let group = group_raw.as_str().filter(|g| is_group_name(g));
    if group.is_none() {
        refuse(
            format!("{at}.group"),
            group_raw,
            "a group name such as group1, without '-', brackets, ',', ':', ';' or spaces (it travels in device \
             IDs <GPU UUID>[<group>-<position>])",
        );
        ok = false;
    }
    let list_raw = fields.get("geometries").unwrap_or(&serde_json::Value::Null);
    let Some(list) = list_raw.as_array().filter(|l| !l.is_empty()) else {
        refuse(
            format!("{at}.geometries"),
            list_raw,
            "a non-empty list of {name, memory, count}",
        );
        return None;
    };
    let mut templates = Vec::new();
    for (t, item) in list.iter().enumerate() {
        let at = format!("{at}.geometries[{t}]");
        let Some(fields) = item.as_object() else {
            refuse(at, item, "a map with name, memory and count");
            ok = false;
            continue;
        };
        for key in fields.keys() {
            if !matches!(key.as_str(), "name" | "memory" | "count") {
                refuse(
                    format!("{at}.{key}"),
                    &fields[key],
                    "only the keys name, memory and count (keys are case-sensitive)",
                );
                ok = false;
            }
        }
        let null = serde_json::Value::Null;
        let name_raw = fields.get("name").unwrap_or(&null);
        let name = name_raw.as_str().filter(|n| is_profile_name(n));
        if name.is_none() {
            refuse(
                format!("{at}.name"),
                name_raw,
                "a MIG profile name <slices>g.<GiB>gb with 1 to 7 slices, e.g. 1g.10gb or 1g.10gb+me",
            );
        }
        let memory_raw = fields.get("memory").unwrap_or(&null);
        let memory = memory_raw
            .as_u64()
            .and_then(|m| u32::try_from(m).ok())
            .filter(|m| *m > 0 && i32::try_from(*m).is_ok());
        if memory.is_none() {
            refuse(
                format!("{at}.memory"),
                memory_raw,
                "a whole number of MiB from 1 to 2147483647",
            );
        }
        let count_raw = fields.get("count").unwrap_or(&null);
        let count = count_raw
            .as_u64()
            .and_then(|c| u32::try_from(c).ok())
            .filter(|c| (1..=MAX_INSTANCES_PER_GPU).contains(c));
        if count.is_none() {
            refuse(
                format!("{at}.count"),
                count_raw,
                "a whole number from 1 to 7",
            );
        }
        match (name, memory, count) {
            (Some(name), Some(memory_mib), Some(count)) => templates.push(MigTemplate {
                name: name.to_owned(),
                memory_mib,
                count,
            }),
            _ => ok = false,
        }
    }
    let total: u32 = templates.iter().map(|t| t.count).sum();
    if ok && total > MAX_INSTANCES_PER_GPU {
        refuse(
            format!("{at}.geometries"),
            &serde_json::Value::from(total),
            "counts that add up to at most 7 (a GPU holds at most 7 MIG instances)",
        );
        ok = false;
    }
    (ok).then(|| MigGeometry {
        group: group.unwrap_or_default().to_owned(),
        templates,
    })
}

/// A JSON value as an error quotes it, cut like annotation values so a huge value cannot flood the log.
fn quote_json(value: &serde_json::Value) -> String {
    crate::volcano::quote(&value.to_string())
}

/// [`merge_all`] for serving: every value that cannot be served is logged (one error line per key, naming the
/// key, the value and what was expected) and left at the value below it, and every other key applies, so the
/// agent keeps the names and settings the scheduler reads from the same document instead of crash-looping or
/// dropping the whole document. Invalid explicit flags are still refused, by `SharingSettings::validate`.
pub fn merge_lenient(
    device: Option<(&str, &DeviceConfigFile)>,
    node: Option<(&str, &NodeConfigFile)>,
    node_name: Option<&str>,
    flags: &ExplicitFlags,
) -> VolcanoConfig {
    let (config, refused) = merge_all(device, node, node_name, flags);
    for error in &refused {
        tracing::error!(%error, "configuration value refused; that key keeps its default (or the device config map's value)");
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
nvidia:
  resourceCountName: volcano.sh/vgpu-number
  resourceMemoryName: volcano.sh/vgpu-memory
  resourceMemoryPercentageName: volcano.sh/vgpu-memory-percentage
  resourceCoreName: volcano.sh/vgpu-cores
  overwriteEnv: false
  defaultMemory: 0
  defaultCores: 0
  defaultGPUNum: 1
  deviceSplitCount: 4
  deviceMemoryScaling: 1.5
  deviceCoreScaling: 2
  disableCoreLimit: true
  gpuMemoryFactor: 10
  knownMigGeometries:
  - models: ["A100-SXM4-40GB"]
    allowedGeometries: []
"#;

    #[test]
    fn every_key_of_the_device_config_is_honoured() {
        let file = parse_device_config("cm", FULL).unwrap();
        let c = merge(Some(("cm", &file)), None, None, &ExplicitFlags::default()).unwrap();
        assert_eq!(c.sharing.split_count, 4);
        assert_eq!(c.sharing.memory_factor, 10);
        assert_eq!(c.sharing.core_scaling, 2.0);
        assert_eq!(c.memory_scaling, 1.5);
        assert_eq!(c.sharing.memory_scaling, 1.5);
        assert!(c.disable_core_limit);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(
            c.mig_geometries,
            vec![MigModelGeometries {
                models: vec!["A100-SXM4-40GB".into()],
                geometries: vec![]
            }],
            "a present list replaces the defaults"
        );
    }

    fn merged_geometries(yaml: &str) -> (VolcanoConfig, Vec<String>) {
        let file = parse_device_config("cm", yaml).unwrap();
        let (c, refused) = merge_all(Some(("cm", &file)), None, None, &ExplicitFlags::default());
        (c, refused.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn absent_mig_geometries_are_the_go_plugin_s_shipped_list() {
        let (c, refused) = merged_geometries("nvidia:\n  deviceSplitCount: 4\n");
        assert!(refused.is_empty());
        assert_eq!(c.mig_geometries, default_known_mig_geometries());
        let models: Vec<&str> = c
            .mig_geometries
            .iter()
            .flat_map(|e| e.models.iter().map(String::as_str))
            .collect();
        assert_eq!(
            models,
            [
                "A30",
                "A100-SXM4-40GB",
                "A100-40GB-PCIe",
                "A100-PCIE-40GB",
                "A100-SXM4-40GB",
                "A100-SXM4-80GB",
                "A100-80GB-PCIe",
                "A100-PCIE-80GB"
            ]
        );
        let (c, refused) = merged_geometries("nvidia:\n  knownMigGeometries: []\n");
        assert!(refused.is_empty());
        assert!(
            c.mig_geometries.is_empty(),
            "an empty list is no geometry, as in Go"
        );
    }

    #[test]
    fn a_typed_geometry_list_parses_with_upstream_keys() {
        let yaml = r#"
nvidia:
  knownMigGeometries:
  - models: [ "A100-SXM4-80GB", "A100-80GB-PCIe" ]
    allowedGeometries:
      - group: "group2"
        geometries:
        - name: 2g.20gb
          memory: 19968
          count: 3
        - name: 1g.10gb+me
          memory: 9728
          count: 1
"#;
        let (c, refused) = merged_geometries(yaml);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            c.mig_geometries,
            vec![MigModelGeometries {
                models: vec!["A100-SXM4-80GB".into(), "A100-80GB-PCIe".into()],
                geometries: vec![MigGeometry {
                    group: "group2".into(),
                    templates: vec![
                        MigTemplate {
                            name: "2g.20gb".into(),
                            memory_mib: 19968,
                            count: 3
                        },
                        MigTemplate {
                            name: "1g.10gb+me".into(),
                            memory_mib: 9728,
                            count: 1
                        },
                    ],
                }],
            }]
        );
    }

    #[test]
    fn a_bad_geometry_names_model_group_and_field_and_the_good_ones_stay() {
        let yaml = r#"
nvidia:
  deviceSplitCount: 4
  knownMigGeometries:
  - models: [A100-SXM4-80GB]
    allowedGeometries:
      - group: group1
        geometries:
        - {name: 1g.10gb, memory: 9728, count: 7}
      - group: group2
        geometries:
        - {name: 2g.20gb, memory: 19968, count: "x"}
      - group: group3
        geometries:
        - {name: 3G.40GB, memory: 0, count: 2}
      - group: group-4
        geometries:
        - {name: 7g.80gb, memory: 80896, count: 1}
      - group: group5
        geometries:
        - {name: 1g.10gb, memory: 9728, count: 7}
        - {name: 1g.10gb, memory: 9728, count: 1}
      - group: group1
        geometries:
        - {name: 7g.80gb, memory: 80896, count: 1}
  - models: []
    allowedGeometries: []
  - models: [A30]
    allowedGeometries:
      - group: g
        geometries:
        - {name: 4g.24gb, memory: 24576, count: 1, Memory: 1}
"#;
        let (c, refused) = merged_geometries(yaml);
        assert_eq!(c.sharing.split_count, 4, "the rest of the document applies");
        let expected = [
            "cm: knownMigGeometries[0].allowedGeometries[1] (models A100-SXM4-80GB, group group2).geometries[0].count: \
             expected a whole number from 1 to 7, not \"x\"",
            "cm: knownMigGeometries[0].allowedGeometries[2] (models A100-SXM4-80GB, group group3).geometries[0].name: \
             expected a MIG profile name <slices>g.<GiB>gb with 1 to 7 slices, e.g. 1g.10gb or 1g.10gb+me, not \"3G.40GB\"",
            "cm: knownMigGeometries[0].allowedGeometries[2] (models A100-SXM4-80GB, group group3).geometries[0].memory: \
             expected a whole number of MiB from 1 to 2147483647, not 0",
            "cm: knownMigGeometries[0].allowedGeometries[3] (models A100-SXM4-80GB, group group-4).group: expected a \
             group name such as group1, without '-', brackets, ',', ':', ';' or spaces (it travels in device IDs \
             <GPU UUID>[<group>-<position>]), not \"group-4\"",
            "cm: knownMigGeometries[0].allowedGeometries[4] (models A100-SXM4-80GB, group group5).geometries: \
             expected counts that add up to at most 7 (a GPU holds at most 7 MIG instances), not 8",
            "cm: knownMigGeometries[0].allowedGeometries[5] (models A100-SXM4-80GB, group group1).group: expected a \
             group name not used before for the same models (the first one would always win), not \"group1\"",
            "cm: knownMigGeometries[1].models: expected a non-empty list of GPU model names, e.g. [A100-SXM4-80GB], \
             not []",
            "cm: knownMigGeometries[2].allowedGeometries[0] (models A30, group g).geometries[0].Memory: expected only \
             the keys name, memory and count (keys are case-sensitive), not 1",
        ];
        assert_eq!(refused, expected);
        // The good group of the first entry stays; the A30 entry stays without its bad group.
        assert_eq!(c.mig_geometries.len(), 2);
        let groups: Vec<&str> = c.mig_geometries[0]
            .geometries
            .iter()
            .map(|g| g.group.as_str())
            .collect();
        assert_eq!(groups, ["group1"]);
        assert_eq!(c.mig_geometries[1].models, ["A30"]);
        assert!(c.mig_geometries[1].geometries.is_empty());
        // merge() refuses the document, listing every bad geometry.
        let file = parse_device_config("cm", yaml).unwrap();
        let err = merge(Some(("cm", &file)), None, None, &ExplicitFlags::default()).unwrap_err();
        assert_eq!(err.0.len(), expected.len());
    }

    #[test]
    fn a_geometry_list_of_the_wrong_shape_keeps_the_defaults() {
        let (c, refused) = merged_geometries("nvidia:\n  knownMigGeometries: {models: [A30]}\n");
        assert_eq!(c.mig_geometries, default_known_mig_geometries());
        assert_eq!(
            refused,
            [
                "cm: nvidia.knownMigGeometries: expected a list of {models: [...], allowedGeometries: [...]}, not \
              {\"models\":[\"A30\"]}"
            ]
        );
    }

    #[test]
    fn operatingmode_mig_is_typed() {
        let node = parse_node_config(
            "config.json",
            r#"{"nodeconfig":[{"name":"n1","operatingmode":"mig"}]}"#,
        )
        .unwrap();
        let c = merge(
            None,
            Some(("config.json", &node)),
            Some("n1"),
            &ExplicitFlags::default(),
        )
        .unwrap();
        assert_eq!(c.operating_mode, OperatingMode::Mig);
        let c = merge(
            None,
            Some(("config.json", &node)),
            Some("n2"),
            &ExplicitFlags::default(),
        )
        .unwrap();
        assert_eq!(
            c.operating_mode,
            OperatingMode::HamiCore,
            "another node's entry"
        );
    }

    #[test]
    fn a_missing_config_map_means_the_documented_defaults() {
        let c = merge(None, None, Some("n1"), &ExplicitFlags::default()).unwrap();
        assert_eq!(c, VolcanoConfig::default());
        assert_eq!((c.sharing.split_count, c.sharing.memory_factor), (10, 1));
    }

    #[test]
    fn node_entry_overrides_only_positive_values_and_flags_win() {
        let file = parse_device_config("cm", FULL).unwrap();
        let node = parse_node_config(
            "config.json",
            r#"{"nodeconfig":[{"name":"other","devicesplitcount":99},
                {"name":"n1","operatingmode":"hami-core","devicememoryscaling":0,"devicecorescaling":1,
                 "devicesplitcount":6,"migstrategy":"none","filterdevices":{"uuid":["GPU-x"],"index":[3]}}]}"#,
        )
        .unwrap();
        let c = merge(
            Some(("cm", &file)),
            Some(("config.json", &node)),
            Some("n1"),
            &ExplicitFlags::default(),
        )
        .unwrap();
        assert_eq!(c.sharing.split_count, 6);
        assert_eq!(c.sharing.core_scaling, 1.0);
        assert_eq!(c.memory_scaling, 1.5, "0 does not override");
        assert_eq!(
            c.filter,
            FilterDevices {
                uuid: vec!["GPU-x".into()],
                index: vec![3]
            }
        );
        // A flag wins (a factor flag only when it agrees with the config map: see the test below).
        let flags = ExplicitFlags {
            split_count: Some(2),
            memory_factor: Some(10),
            core_scaling: None,
        };
        let c = merge(
            Some(("cm", &file)),
            Some(("config.json", &node)),
            Some("n1"),
            &flags,
        )
        .unwrap();
        assert_eq!((c.sharing.split_count, c.sharing.memory_factor), (2, 10));
    }

    #[test]
    fn invalid_values_name_the_key_the_value_and_the_expectation() {
        let cases = [
            ("nvidia:\n  gpuMemoryFactor: 0\n", "nvidia.gpuMemoryFactor"),
            (
                "nvidia:\n  deviceSplitCount: -3\n",
                "nvidia.deviceSplitCount",
            ),
            (
                "nvidia:\n  deviceMemoryScaling: 1e9\n",
                "nvidia.deviceMemoryScaling",
            ),
            (
                "nvidia:\n  resourceCountName: 'a/b/c'\n",
                "nvidia.resourceCountName",
            ),
        ];
        for (yaml, key) in cases {
            let file = parse_device_config("kube-system/volcano-vgpu-device-config", yaml).unwrap();
            let err = merge(
                Some(("kube-system/volcano-vgpu-device-config", &file)),
                None,
                None,
                &ExplicitFlags::default(),
            )
            .expect_err(yaml);
            let text = err.to_string();
            assert!(
                text.contains(key) && text.contains("expected") && text.contains("kube-system"),
                "{text}"
            );
        }
        let err = parse_device_config("cm", "nvidia: [unclosed").expect_err("bad yaml");
        assert!(err.to_string().contains("not valid YAML"), "{err}");
        let err =
            parse_device_config("cm", "nvidia:\n  gpuMemoryFactor: ten\n").expect_err("bad type");
        assert!(
            err.to_string().contains("gpuMemoryFactor") || err.to_string().contains("ten"),
            "{err}"
        );
    }

    #[test]
    fn unknown_and_miscased_keys_are_reported() {
        let file =
            parse_device_config("cm", "nvidia:\n  disablecorelimit: true\nmlu:\n  x: 1\n").unwrap();
        let c = merge(Some(("cm", &file)), None, None, &ExplicitFlags::default()).unwrap();
        assert!(!c.disable_core_limit);
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("nvidia.disablecorelimit"))
        );
    }

    #[test]
    fn one_bad_key_keeps_the_good_keys_and_every_bad_key_is_listed() {
        let yaml = "nvidia:\n  resourceCountName: example.com/gpu-count\n  deviceSplitCount: 100000\n  \
                    deviceCoreScaling: 1000\n  gpuMemoryFactor: 10\n  deviceMemoryScaling: -2\n";
        let file = parse_device_config("kube-system/volcano-vgpu-device-config", yaml).unwrap();
        let device = Some(("kube-system/volcano-vgpu-device-config", &file));
        let (c, refused) = merge_all(device, None, None, &ExplicitFlags::default());
        assert_eq!(
            c.resources.number, "example.com/gpu-count",
            "a good key applies"
        );
        assert_eq!(c.sharing.memory_factor, 10, "a good key applies");
        assert_eq!(
            (
                c.sharing.split_count,
                c.sharing.core_scaling,
                c.memory_scaling
            ),
            (10, 1.0, 1.0),
            "each bad key keeps its default"
        );
        let fields: Vec<&str> = refused
            .iter()
            .map(|e| match e {
                ConfigError::Value { setting, .. } => setting.field,
                ConfigError::Syntax { .. } => "syntax",
                ConfigError::Geometry { .. } => "geometry",
            })
            .collect();
        assert_eq!(
            fields,
            [
                "nvidia.deviceSplitCount",
                "nvidia.deviceCoreScaling",
                "nvidia.deviceMemoryScaling"
            ]
        );
        let text = merge(device, None, None, &ExplicitFlags::default())
            .unwrap_err()
            .to_string();
        for expected in ["100000", "from 1 to 1000", "1000", "from 0.01 to 10", "-2"] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    #[test]
    fn node_entry_keeps_the_device_value_for_a_bad_key() {
        let file = parse_device_config("cm", "nvidia:\n  deviceSplitCount: 4\n").unwrap();
        let node = parse_node_config(
            "config.json",
            r#"{"nodeconfig":[{"name":"n1","devicesplitcount":5000,"devicecorescaling":2,"operatingmode":"vgpu"}]}"#,
        )
        .unwrap();
        let (c, refused) = merge_all(
            Some(("cm", &file)),
            Some(("config.json", &node)),
            Some("n1"),
            &ExplicitFlags::default(),
        );
        assert_eq!(c.sharing.split_count, 4, "the device config map's value");
        assert_eq!(c.sharing.core_scaling, 2.0, "the good key of the entry");
        assert_eq!(c.operating_mode, OperatingMode::HamiCore);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0]
                .to_string()
                .contains("invalid nodeconfig[].operatingmode = vgpu: expected hami-core or mig"),
            "{}",
            refused[0]
        );
    }

    #[test]
    fn two_resources_under_one_name_or_socket_are_refused() {
        for (yaml, key) in [
            (
                "nvidia:\n  resourceMemoryName: volcano.sh/vgpu-number\n",
                "nvidia.resourceMemoryName",
            ),
            (
                "nvidia:\n  resourceCoreName: example.com/vgpu-memory\n",
                "nvidia.resourceCoreName",
            ),
            (
                "nvidia:\n  resourceCountName: a.io/gpu\n  resourceCoreName: gpu\n",
                "nvidia.resourceCoreName",
            ),
        ] {
            let file = parse_device_config("cm", yaml).unwrap();
            let (c, refused) =
                merge_all(Some(("cm", &file)), None, None, &ExplicitFlags::default());
            assert_eq!(c.resources, ResourceNames::default(), "{yaml}");
            assert_eq!(refused.len(), 1, "{yaml}: {refused:?}");
            let text = refused[0].to_string();
            assert!(
                text.contains(key)
                    && text.contains("the same as")
                    && text.contains("its own kubelet socket"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_factor_flag_that_contradicts_the_config_map_is_refused_and_the_config_map_s_kept() {
        let file = parse_device_config("cm", "nvidia:\n  gpuMemoryFactor: 10\n").unwrap();
        let flags = |memory_factor| ExplicitFlags {
            memory_factor,
            ..Default::default()
        };
        let merged = |f| merge_all(Some(("cm", &file)), None, None, &flags(f));
        assert_eq!(merged(Some(10)).0.sharing.memory_factor, 10);
        assert!(merged(Some(10)).1.is_empty());
        let (c, refused) = merged(Some(5));
        assert_eq!(
            c.sharing.memory_factor, 10,
            "the scheduler's factor is served"
        );
        let text = refused[0].to_string();
        assert!(
            text.contains("--gpu-memory-factor") && text.contains("gpuMemoryFactor is 10"),
            "{text}"
        );
        // Without a factor in the config map the flag stands alone (the Go plugin's rule).
        let (c, refused) = merge_all(None, None, None, &flags(Some(5)));
        assert_eq!((c.sharing.memory_factor, refused.len()), (5, 0));
    }

    #[test]
    fn short_resource_names_get_the_volcano_prefix() {
        let file = parse_device_config("cm", "nvidia:\n  resourceCountName: vgpu-count\n").unwrap();
        let c = merge(Some(("cm", &file)), None, None, &ExplicitFlags::default()).unwrap();
        assert_eq!(c.resources.number, "volcano.sh/vgpu-count");
    }
}
