//! The configuration Volcano's vGPU stack shares with the node agent, merged the way an operator expects:
//! built-in defaults, then the `volcano-vgpu-device-config` config map (`device-config.yaml`, contract §5.2),
//! then this node's entry of the per-node `config.json` (§5.3, values > 0 or non-empty only), then flags that
//! were set explicitly. Every key is honoured, including the ones the Go plugin loads and ignores
//! (`deviceMemoryScaling`, `disableCoreLimit`, `filterdevices`). A value the agent cannot serve is refused
//! with the key, the value and what was expected.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{InvalidSetting, ResourceNames, SharingSettings};
use crate::inventory::Inventory;

/// The config map's name and key.
pub const DEVICE_CONFIG_MAP: &str = "volcano-vgpu-device-config";
/// The key inside the config map.
pub const DEVICE_CONFIG_KEY: &str = "device-config.yaml";
/// Namespaces searched, in order, when none is given.
pub const DEVICE_CONFIG_NAMESPACES: [&str; 2] = ["kube-system", "volcano-system"];
/// Where the DaemonSet mounts the per-node config map.
pub const NODE_CONFIG_PATH: &str = "/config/config.json";

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

/// The `nvidia:` section, every key of contract §5.2.
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

/// One node's overrides (contract §5.3); all keys lower case, as the Go plugin reads them.
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

/// Flags the operator set explicitly; they win over both config maps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExplicitFlags {
    /// `--device-split-count`.
    pub split_count: Option<u32>,
    /// `--gpu-memory-factor`.
    pub memory_factor: Option<u32>,
    /// `--device-cores-scaling`.
    pub core_scaling: Option<f64>,
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
    /// `operatingmode`: `hami-core` (the only one served today) or `mig`.
    pub operating_mode: String,
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
            operating_mode: "hami-core".to_owned(),
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

fn positive_u32(
    source: &str,
    key: &'static str,
    value: i64,
    expected: &'static str,
) -> Result<u32, ConfigError> {
    u32::try_from(value)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ConfigError::Value {
            source_name: source.to_owned(),
            setting: InvalidSetting {
                field: key,
                value: value.to_string(),
                expected,
            },
        })
}

fn scaling(
    source: &str,
    key: &'static str,
    value: f64,
    min: f64,
    max: f64,
    expected: &'static str,
) -> Result<f64, ConfigError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Value {
            source_name: source.to_owned(),
            setting: InvalidSetting {
                field: key,
                value: value.to_string(),
                expected,
            },
        })
    }
}

fn resource_name(source: &str, key: &'static str, value: &str) -> Result<String, ConfigError> {
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
        Ok(name)
    } else {
        Err(ConfigError::Value {
            source_name: source.to_owned(),
            setting: InvalidSetting {
                field: key,
                value: value.to_owned(),
                expected: "an extended resource name such as volcano.sh/vgpu-number",
            },
        })
    }
}

/// Merges defaults, the device config map, this node's entry of the node config and explicit flags.
pub fn merge(
    device: Option<(&str, &DeviceConfigFile)>,
    node: Option<(&str, &NodeConfigFile)>,
    node_name: Option<&str>,
    flags: &ExplicitFlags,
) -> Result<VolcanoConfig, ConfigError> {
    let mut out = VolcanoConfig::default();
    if let Some((source, file)) = device {
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
            if let Some(v) = &nv.resource_count_name {
                out.resources.number = resource_name(source, "nvidia.resourceCountName", v)?;
            }
            if let Some(v) = &nv.resource_memory_name {
                out.resources.memory = resource_name(source, "nvidia.resourceMemoryName", v)?;
            }
            if let Some(v) = &nv.resource_core_name {
                out.resources.cores = resource_name(source, "nvidia.resourceCoreName", v)?;
            }
            if let Some(v) = nv.device_split_count {
                out.sharing.split_count = positive_u32(
                    source,
                    "nvidia.deviceSplitCount",
                    v,
                    "a whole number of at least 1",
                )?;
            }
            if let Some(v) = nv.gpu_memory_factor {
                out.sharing.memory_factor = positive_u32(
                    source,
                    "nvidia.gpuMemoryFactor",
                    v,
                    "a whole number of MiB of at least 1",
                )?;
            }
            if let Some(v) = nv.device_core_scaling {
                out.sharing.core_scaling = scaling(
                    source,
                    "nvidia.deviceCoreScaling",
                    v,
                    0.01,
                    1000.0,
                    "a number from 0.01 to 1000",
                )?;
            }
            if let Some(v) = nv.device_memory_scaling {
                out.memory_scaling = scaling(
                    source,
                    "nvidia.deviceMemoryScaling",
                    v,
                    0.01,
                    100.0,
                    "a number from 0.01 to 100 (1 = physical memory)",
                )?;
            }
            out.disable_core_limit = nv.disable_core_limit.unwrap_or(false);
            out.pass_device_specs = nv.pass_device_specs.unwrap_or(false);
        }
    }
    if let (Some((source, file)), Some(name)) = (node, node_name)
        && let Some(entry) = file.nodeconfig.iter().find(|e| e.name == name)
    {
        // The Go plugin applies only values > 0 or non-empty.
        if let Some(mode) = entry.operatingmode.as_deref().filter(|m| !m.is_empty()) {
            if mode != "hami-core" && mode != "mig" {
                return Err(ConfigError::Value {
                    source_name: source.to_owned(),
                    setting: InvalidSetting {
                        field: "nodeconfig[].operatingmode",
                        value: mode.to_owned(),
                        expected: "hami-core or mig",
                    },
                });
            }
            out.operating_mode = mode.to_owned();
        }
        if let Some(v) = entry.devicesplitcount.filter(|v| *v > 0) {
            out.sharing.split_count = positive_u32(
                source,
                "nodeconfig[].devicesplitcount",
                v,
                "a whole number of at least 1",
            )?;
        }
        if let Some(v) = entry.devicecorescaling.filter(|v| *v > 0.0) {
            out.sharing.core_scaling = scaling(
                source,
                "nodeconfig[].devicecorescaling",
                v,
                0.01,
                1000.0,
                "a number from 0.01 to 1000",
            )?;
        }
        if let Some(v) = entry.devicememoryscaling.filter(|v| *v > 0.0) {
            out.memory_scaling = scaling(
                source,
                "nodeconfig[].devicememoryscaling",
                v,
                0.01,
                100.0,
                "a number from 0.01 to 100",
            )?;
        }
        if let Some(filter) = &entry.filterdevices {
            out.filter = filter.clone();
        }
    }
    if let Some(v) = flags.split_count {
        out.sharing.split_count = v;
    }
    if let Some(v) = flags.memory_factor {
        out.sharing.memory_factor = v;
    }
    if let Some(v) = flags.core_scaling {
        out.sharing.core_scaling = v;
    }
    out.sharing.memory_scaling = out.memory_scaling;
    Ok(out)
}

/// [`merge`], but a document that is invalid is reported (one error line naming the key, the value and the
/// expectation) and left out, so the agent keeps serving with the defaults Volcano's scheduler also falls
/// back to, instead of crash-looping. Invalid explicit flags are still refused, by `SharingSettings::validate`.
pub fn merge_lenient(
    device: Option<(&str, &DeviceConfigFile)>,
    node: Option<(&str, &NodeConfigFile)>,
    node_name: Option<&str>,
    flags: &ExplicitFlags,
) -> VolcanoConfig {
    let mut device = device;
    if let Err(error) = merge(device, None, None, &ExplicitFlags::default()) {
        tracing::error!(%error, "device config ignored; using the built-in defaults for it");
        device = None;
    }
    let mut node = node;
    if let Err(error) = merge(device, node, node_name, &ExplicitFlags::default()) {
        tracing::error!(%error, "node config ignored");
        node = None;
    }
    match merge(device, node, node_name, flags) {
        Ok(config) => config,
        // Unreachable with both documents checked above, but never worth a panic.
        Err(error) => {
            tracing::error!(%error, "configuration ignored");
            VolcanoConfig::default()
        }
    }
}

/// Removes the GPUs `filterdevices` names (by UUID or NVML index), logging each.
pub fn apply_filter(inventory: &mut Inventory, filter: &FilterDevices) {
    inventory.gpus.retain(|g| {
        let hidden = filter.uuid.iter().any(|u| u.eq_ignore_ascii_case(&g.uuid))
            || filter.index.contains(&g.nvml_index);
        if hidden {
            tracing::info!(uuid = %g.uuid, index = g.nvml_index, "GPU hidden by filterdevices");
        }
        !hidden
    });
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
        let flags = ExplicitFlags {
            split_count: Some(2),
            memory_factor: Some(1),
            core_scaling: None,
        };
        let c = merge(
            Some(("cm", &file)),
            Some(("config.json", &node)),
            Some("n1"),
            &flags,
        )
        .unwrap();
        assert_eq!((c.sharing.split_count, c.sharing.memory_factor), (2, 1));
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
    fn short_resource_names_get_the_volcano_prefix() {
        let file = parse_device_config("cm", "nvidia:\n  resourceCountName: vgpu-count\n").unwrap();
        let c = merge(Some(("cm", &file)), None, None, &ExplicitFlags::default()).unwrap();
        assert_eq!(c.resources.number, "volcano.sh/vgpu-count");
    }
}
