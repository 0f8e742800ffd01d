//! The start-up checks that only matter with the Volcano hand-off on: the node exists, and the directories
//! Allocate hands to containers can be created and written.

use std::path::PathBuf;

use crate::config::AgentConfig;

/// A flag that names a node or a directory the agent cannot use, found at start before anything is served.
#[derive(Debug, thiserror::Error)]
pub enum StartCheckError {
    /// `--hook-path` or `--cache-root` cannot be created, or the cache root cannot be written.
    #[error(
        "{flag} = {}: cannot {action}: {os_error}; mount a writable host directory there (the DaemonSet mounts \
         /usr/local/vgpu) or point {flag} at one",
        path.display()
    )]
    Directory {
        /// The flag and its environment variable.
        flag: &'static str,
        /// The directory.
        path: PathBuf,
        /// What failed: creating it, or writing in it.
        action: &'static str,
        /// The OS error, in the message (not a `#[source]`, which would print it twice).
        os_error: std::io::Error,
    },
    /// The apiserver answered that this node does not exist.
    #[error(
        "--node-name (NODE_NAME) = {node:?}: the apiserver has no Node of that name; in the DaemonSet it comes from \
         the downward API (fieldRef spec.nodeName); run by hand, use a name `kubectl get nodes` lists"
    )]
    NoSuchNode {
        /// The name given.
        node: String,
    },
    /// The node could not be read (other than not existing) within `--apiserver-wait`.
    #[error("--node-name (NODE_NAME) = {node:?}: cannot read the Node")]
    NodeUnreadable {
        /// The name given.
        node: String,
        /// Why.
        #[source]
        source: crate::cluster::ClusterError,
    },
}

/// The start-up checks that only matter with the Volcano hand-off on (a node name and an apiserver): the node
/// exists, and the directories Allocate hands to containers can be created and written. Run before the
/// endpoints are served, so a typo is one clear line at start instead of failed pods later.
pub async fn check_handoff_start(
    client: &kube::Client,
    config: &AgentConfig,
) -> Result<(), StartCheckError> {
    check_handoff_paths(config)?;
    let Some(node) = config.node_name.as_deref() else {
        return Ok(());
    };
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let what = format!("node {node}");
    let found = crate::cluster::retry_unreachable(config.cluster.apiserver_wait, &what, || {
        api.get_opt(node)
    })
    .await;
    match found {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(StartCheckError::NoSuchNode {
            node: node.to_owned(),
        }),
        Err(source) => Err(StartCheckError::NodeUnreadable {
            node: node.to_owned(),
            source,
        }),
    }
}

/// `--hook-path` and `--cache-root` exist (created if needed), and the cache root takes new directories, as
/// every Allocate makes one there.
pub fn check_handoff_paths(config: &AgentConfig) -> Result<(), StartCheckError> {
    let hook = &config.hook_path;
    std::fs::create_dir_all(hook).map_err(|os_error| StartCheckError::Directory {
        flag: "--hook-path (HOOK_PATH)",
        path: hook.clone(),
        action: "create the directory",
        os_error,
    })?;
    let cache = config.cache_root();
    let flag = "--cache-root (VGPU_CACHE_ROOT)";
    std::fs::create_dir_all(&cache).map_err(|os_error| StartCheckError::Directory {
        flag,
        path: cache.clone(),
        action: "create the directory",
        os_error,
    })?;
    // A read-only mount passes create_dir_all when the directory exists; only a real directory proves it.
    let probe = cache.join(format!(".start-check-{}", std::process::id()));
    let made = match std::fs::create_dir(&probe) {
        // Left by an earlier agent with the same PID that was killed mid-check.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    };
    made.and_then(|()| std::fs::remove_dir(&probe))
        .map_err(|os_error| StartCheckError::Directory {
            flag,
            path: cache.clone(),
            action: "create a container's directory in it",
            os_error,
        })
}
