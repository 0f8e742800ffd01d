//! The agent's view of the cluster: the Kubernetes client, and the configuration it reads at start.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use crate::config::AgentConfig;
use crate::device_config::{
    ConfigError, DEVICE_CONFIG_KEY, DEVICE_CONFIG_NAMESPACES, DeviceConfigFile, NodeConfigFile,
    VolcanoConfig, merge_lenient, parse_device_config, parse_node_config,
};

/// Why the cluster side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No kubeconfig and not in a cluster.
    #[error(
        "cannot build a Kubernetes client (set KUBECONFIG, or run in a pod with a service account)"
    )]
    Client(#[source] kube::Error),
    /// The apiserver did not answer within the start-up wait.
    #[error("the apiserver did not answer within {waited:?} while reading {what}")]
    Unreachable {
        /// How long we tried.
        waited: Duration,
        /// What we were reading.
        what: String,
        /// The last error.
        #[source]
        source: kube::Error,
    },
    /// A config map or file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A client from `KUBECONFIG`, `~/.kube/config` or the pod's service account.
pub async fn client() -> Result<Client, ClusterError> {
    Client::try_default().await.map_err(ClusterError::Client)
}

/// Retries `op` on errors that are not an answer (connection refused, timeouts, 5xx) until `wait` passes.
pub async fn retry_unreachable<T, F, Fut>(
    wait: Duration,
    what: &str,
    mut op: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(error) if is_unreachable(&error) && start.elapsed() < wait => {
                tracing::warn!(%error, what, retry_in_ms = backoff.as_millis() as u64, "apiserver not answering");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(source) => {
                return Err(ClusterError::Unreachable {
                    waited: start.elapsed(),
                    what: what.to_owned(),
                    source,
                });
            }
        }
    }
}

/// Whether an error means "no answer" rather than an answer we must act on.
pub fn is_unreachable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::Service(_) | kube::Error::HyperError(_) => true,
        _ => false,
    }
}

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
    for ns in &namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let what = format!("config map {ns}/{}", settings.device_config_name);
        let found = retry_unreachable(settings.apiserver_wait, &what, || {
            api.get_opt(&settings.device_config_name)
        })
        .await;
        let found = match found {
            // A 403 means RBAC does not let us read this namespace: say so, and treat it as absent.
            Err(ClusterError::Unreachable {
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
