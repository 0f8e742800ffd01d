//! The shipped manifests (`volcano-config/`), read as JSON values, and the parts of the DaemonSet that say
//! how the agent runs: its flags, environment and host paths.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

/// The workspace root (this crate is `tests/sim-node`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `volcano-config/` in the workspace.
pub fn manifests_dir() -> PathBuf {
    workspace_root().join("volcano-config")
}

/// Every document of a (multi-document) YAML file, empty documents left out.
pub fn load(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| anyhow!("{} is not valid YAML: {e}", path.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The document of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("no {kind} {name:?} in the manifests"))
}

/// A string value of a config map's `data`.
pub fn config_map_data<'a>(config_map: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    config_map["data"][key].as_str().ok_or_else(|| {
        anyhow!(
            "config map {} has no data key {key:?}",
            config_map["metadata"]["name"]
        )
    })
}

/// A volume of the DaemonSet mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// The volume's name.
    pub name: String,
    /// Where it appears in the container.
    pub mount_path: String,
    /// The host path, for hostPath volumes.
    pub host_path: Option<String>,
    /// The config map, for configMap volumes.
    pub config_map: Option<String>,
}

/// One container of the agent's DaemonSet.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The container's name.
    pub name: String,
    /// Its image.
    pub image: String,
    /// `command`.
    pub command: Vec<String>,
    /// `args`.
    pub args: Vec<String>,
    /// Literal environment variables (name, value).
    pub env: Vec<(String, String)>,
    /// Variables from the downward API (name, field path).
    pub env_fields: Vec<(String, String)>,
    /// Its volumes, with their sources.
    pub mounts: Vec<Mounted>,
    /// Container ports (name, number).
    pub ports: Vec<(String, u16)>,
}

impl ContainerSpec {
    /// The value of `--flag=value` (or `--flag value`) among the args.
    pub fn flag(&self, flag: &str) -> Option<&str> {
        let prefix = format!("{flag}=");
        self.args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix(&prefix).or_else(|| {
                (a == flag)
                    .then(|| self.args.get(i + 1).map(String::as_str))
                    .flatten()
            })
        })
    }

    /// The mount at `mount_path`.
    pub fn mount(&self, mount_path: &str) -> Option<&Mounted> {
        self.mounts.iter().find(|m| m.mount_path == mount_path)
    }
}

/// The agent's DaemonSet: its init container and its agent container.
#[derive(Debug, Clone)]
pub struct AgentDaemonSet {
    /// The raw object.
    pub object: Value,
    /// `install-hook`.
    pub init: ContainerSpec,
    /// `agent`.
    pub agent: ContainerSpec,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn container(pod_spec: &Value, list: &str, name: &str) -> anyhow::Result<ContainerSpec> {
    let c = pod_spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .ok_or_else(|| anyhow!("the DaemonSet has no {list} entry named {name:?}"))?;
    let volumes = pod_spec["volumes"].as_array().cloned().unwrap_or_default();
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vname = m["name"].as_str().unwrap_or_default();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == vname)
            .ok_or_else(|| anyhow!("volumeMount {vname:?} of {name} has no volume"))?;
        mounts.push(Mounted {
            name: vname.to_owned(),
            mount_path: m["mountPath"].as_str().unwrap_or_default().to_owned(),
            host_path: volume["hostPath"]["path"].as_str().map(str::to_owned),
            config_map: volume["configMap"]["name"].as_str().map(str::to_owned),
        });
    }
    let mut env = Vec::new();
    let mut env_fields = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let ename = e["name"].as_str().unwrap_or_default().to_owned();
        if let Some(v) = e["value"].as_str() {
            env.push((ename, v.to_owned()));
        } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            env_fields.push((ename, f.to_owned()));
        } else {
            bail!("env {ename} of {name}: only literal values and fieldRef are expected");
        }
    }
    let ports = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["containerPort"].as_u64().unwrap_or(0) as u16,
            )
        })
        .collect();
    Ok(ContainerSpec {
        name: name.to_owned(),
        image: c["image"].as_str().unwrap_or_default().to_owned(),
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        env,
        env_fields,
        mounts,
        ports,
    })
}

/// Reads `vgpu-device-plugin.yaml`'s DaemonSet.
pub fn agent_daemonset(dir: &Path) -> anyhow::Result<AgentDaemonSet> {
    let docs = load(&dir.join("vgpu-device-plugin.yaml"))?;
    let ds = find(&docs, "DaemonSet", "volcano-device-plugin")?.clone();
    let spec = &ds["spec"]["template"]["spec"];
    Ok(AgentDaemonSet {
        init: container(spec, "initContainers", "install-hook")?,
        agent: container(spec, "containers", "agent")?,
        object: ds,
    })
}
