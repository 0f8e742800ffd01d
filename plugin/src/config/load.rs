//! Reading the configuration Volcano shares with the agent at start: the device config map from the
//! apiserver and this node's entry of the per-node `config.json`, merged with the flags ([`super::device`]).

use std::path::Path;
use std::time::Instant;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use crate::cluster::{ClusterError, retry_unreachable};
use crate::config::AgentConfig;
use crate::config::device::{
    DEVICE_CONFIG_KEY, DEVICE_CONFIG_NAMESPACES, DeviceConfigFile, NodeConfigFile, VolcanoConfig,
    merge_lenient, parse_device_config, parse_node_config,
};

/// Reads the device config map (namespace given, or `kube-system` then `volcano-system`) and the per-node
/// `config.json`, and merges them with the explicit flags. A missing config map means defaults.
pub async fn load_config(
    client: &Client,
    config: &AgentConfig,
) -> Result<VolcanoConfig, ClusterError> {
    let settings = &config.cluster;
    let namespaces: Vec<String> = match &settings.device_config_namespace {
        Some(ns) => vec![ns.clone()],
        None => DEVICE_CONFIG_NAMESPACES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let mut device: Option<(String, DeviceConfigFile)> = None;
    // One --apiserver-wait for every namespace searched, not one each.
    let deadline = Instant::now() + settings.apiserver_wait;
    for ns in &namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let what = format!("config map {ns}/{}", settings.device_config_name);
        let wait = deadline.saturating_duration_since(Instant::now());
        let found =
            retry_unreachable(wait, &what, || api.get_opt(&settings.device_config_name)).await;
        let found = match found {
            // A 403 means RBAC does not let us read this namespace: say so, and treat it as absent.
            Err(ClusterError::Refused {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 403 => {
                tracing::warn!(%what, message = %status.message, "not allowed to read the device config map here");
                None
            }
            other => other?,
        };
        if let Some(cm) = found {
            let yaml = cm
                .data
                .as_ref()
                .and_then(|d| d.get(DEVICE_CONFIG_KEY))
                .cloned()
                .unwrap_or_default();
            let source = format!("{ns}/{}[{DEVICE_CONFIG_KEY}]", settings.device_config_name);
            match parse_device_config(&source, &yaml) {
                Ok(parsed) => {
                    tracing::info!(config_map = %source, "device config read");
                    device = Some((source, parsed));
                }
                Err(error) => {
                    tracing::error!(%error, "device config ignored; using the built-in defaults for it")
                }
            }
            break;
        }
    }
    if device.is_none() {
        tracing::info!(
            name = %settings.device_config_name, namespaces = ?namespaces,
            "no device config map; using defaults (split 10, factor 1, scaling 1) and flags"
        );
    }
    let node = read_node_config(&settings.node_config_path);
    let merged = merge_lenient(
        device.as_ref().map(|(s, f)| (s.as_str(), f)),
        node.as_ref().map(|(s, f)| (s.as_str(), f)),
        config.node_name.as_deref(),
        &config.explicit,
    );
    for warning in &merged.warnings {
        tracing::warn!("{warning}");
    }
    Ok(merged)
}

/// The per-node config file, if it exists and parses; a file that cannot be read or parsed is reported once
/// and left out.
pub fn read_node_config(path: &Path) -> Option<(String, NodeConfigFile)> {
    let source = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => match parse_node_config(&source, &text) {
            Ok(parsed) => Some((source, parsed)),
            Err(error) => {
                tracing::error!(%error, "node config ignored");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            tracing::error!(path = %source, %error, "cannot read the node config; ignored");
            None
        }
    }
}
