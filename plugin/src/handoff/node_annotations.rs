//! What the node tells Volcano's scheduler: `volcano.sh/node-vgpu-register` (the GPU inventory, docs/volcano-contract.md
//! §2.1) and, for schedulers up to v1.15.0, `volcano.sh/node-vgpu-handshake` (§2.3).
//!
//! The publisher watches its own Node object and writes only when what is there differs from what should be:
//! at start, on a health change, when someone else changed the value, and when an old scheduler asks for a
//! handshake. At rest, with a current scheduler, it makes no writes at all (the Go plugin made two a minute).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use vgpu_metrics::AgentMetrics;

use crate::cluster::ApiClients;
use crate::config::HandshakeMode;
use crate::config::device::VolcanoConfig;
use crate::gpu::inventory::Inventory;
use crate::volcano::handshake::{Handshake, parse_handshake, reported_value};
use crate::volcano::node_register::{RegisteredGpu, encode_node_register};
use crate::volcano::{NODE_HANDSHAKE, NODE_LOCK, NODE_REGISTER};

/// How often the Go plugin up to v1.12 heartbeated, for `--legacy-handshake=on`.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// The register annotation for the node's GPUs and their health (inventory order = minor order).
///
/// The same fields in both modes, as the Go plugin writes them: `ConvertDeviceInfo` takes the split count and
/// the GPU's whole memory over the factor whatever the mode, and only field 5 carries `config.Mode` ([P]
/// `pkg/plugin/register.go:91,100-108`); in MIG mode the scheduler sizes requests by the geometry templates, not
/// these fields ([V] `vgpu/mig.go:36-57`). The vector `node_register` "A100-40GB node in dynamic-mig mode" pins it.
pub fn register_value(inventory: &Inventory, healthy: &[bool], config: &VolcanoConfig) -> String {
    let gpus: Vec<RegisteredGpu> = inventory
        .gpus
        .iter()
        .enumerate()
        .map(|(i, gpu)| RegisteredGpu {
            uuid: gpu.uuid.clone(),
            split_count: config.sharing.split_count,
            memory_units: config.sharing.memory_units(gpu.memory_mib()),
            model: gpu.model.clone(),
            healthy: healthy.get(i).copied().unwrap_or(false),
            mode: config.operating_mode.as_str().to_owned(),
        })
        .collect();
    encode_node_register(&gpus)
}

/// What to write given what the node holds now.
pub fn handshake_reply(mode: HandshakeMode, current: Option<&str>, heartbeat_due: bool) -> bool {
    match mode {
        HandshakeMode::Off => false,
        HandshakeMode::On => {
            heartbeat_due
                || matches!(
                    parse_handshake(current),
                    Handshake::Missing | Handshake::Deleted { .. }
                )
        }
        // An old scheduler ignores a node whose key is missing or `Deleted_…`; a `Requesting_…` value is its
        // own acknowledgement and needs no answer until it expires into `Deleted_…`.
        HandshakeMode::Auto => matches!(
            parse_handshake(current),
            Handshake::Missing | Handshake::Deleted { .. }
        ),
    }
}

/// Runs until aborted. Watches this Node on `clients.watches` (bounded, so a silent apiserver is noticed and
/// the watch restarted) and writes on `clients.requests`. A write that fails or gets no answer is retried with
/// backoff (at most [`crate::cluster::RETRY_MAX`] apart) until it lands, not left until the next change: a
/// health change during an apiserver outage reaches the scheduler within
/// [`crate::cluster::ApiBounds::write_recovery`] of the apiserver answering again.
pub async fn publish(
    clients: ApiClients,
    node: String,
    inventory: Arc<Inventory>,
    config: Arc<VolcanoConfig>,
    mut health: watch::Receiver<Vec<bool>>,
    mode: HandshakeMode,
    metrics: Arc<AgentMetrics>,
) {
    let api: Api<Node> = Api::all(clients.requests.clone());
    let nodes = watcher(
        Api::<Node>::all(clients.watches.clone()),
        watcher::Config::default()
            .fields(&format!("metadata.name={node}"))
            .timeout(clients.bounds.watch_timeout_secs()),
    )
    .backoff(crate::cluster::WatchBackoff::default())
    .applied_objects();
    let mut nodes = std::pin::pin!(nodes);
    let mut latest: Option<Node> = None;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch_failing = false;
    // Set while a write has failed: when to try again, and the pause after that.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    let mut heartbeat_pending = false;
    let limit = clients.bounds.request;
    loop {
        let retry_at = retry.map(|(at, _)| at);
        tokio::select! {
            event = nodes.next() => match event {
                Some(Ok(n)) => {
                    if watch_failing { tracing::info!("node watch recovered"); }
                    watch_failing = false;
                    latest = Some(n);
                }
                Some(Err(error)) => {
                    if !watch_failing { tracing::warn!(%error, "node watch failed; retrying with backoff"); }
                    watch_failing = true;
                    continue;
                }
                None => return,
            },
            changed = health.changed() => if changed.is_err() { return },
            _ = heartbeat.tick(), if mode == HandshakeMode::On => heartbeat_pending = true,
            () = sleep_until_opt(retry_at), if retry_at.is_some() => {}
        }
        let Some(current) = latest.as_ref() else {
            continue;
        };
        let annotations = current.metadata.annotations.clone().unwrap_or_default();
        let desired = register_value(&inventory, &health.borrow(), &config);
        let mut patch = serde_json::Map::new();
        if annotations.get(NODE_REGISTER) != Some(&desired) {
            patch.insert(NODE_REGISTER.to_owned(), desired.into());
        }
        if handshake_reply(
            mode,
            annotations.get(NODE_HANDSHAKE).map(String::as_str),
            heartbeat_pending,
        ) {
            patch.insert(
                NODE_HANDSHAKE.to_owned(),
                reported_value(SystemTime::now()).into(),
            );
        }
        if patch.is_empty() {
            retry = None;
            heartbeat_pending = false;
            continue;
        }
        let keys: Vec<String> = patch.keys().cloned().collect();
        let body = serde_json::json!({ "metadata": { "annotations": patch } });
        let written = crate::cluster::bounded(
            "write node annotations",
            limit,
            api.patch(&node, &PatchParams::default(), &Patch::Merge(&body)),
        )
        .await;
        match written {
            Ok(updated) => {
                metrics.node_write();
                if retry.is_some() {
                    tracing::info!(?keys, "node annotations written after retrying");
                } else {
                    tracing::info!(?keys, "node annotations written");
                }
                latest = Some(updated);
                retry = None;
                heartbeat_pending = false;
            }
            Err(error) => {
                let pause = retry.map_or(RETRY_START, |(_, pause)| {
                    (pause * 2).min(crate::cluster::RETRY_MAX)
                });
                tracing::warn!(%error, ?keys, retry_in_ms = pause.as_millis() as u64, "cannot write node annotations; retrying");
                retry = Some((tokio::time::Instant::now() + pause, pause));
            }
        }
    }
}

/// The first pause before rewriting node annotations after a failed write.
const RETRY_START: Duration = Duration::from_millis(500);

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Removes the scheduler's `hamivgpu` node lock if it is there (docs/volcano-contract.md §2.2): after a successful or failed
/// allocation, and when no pending pod matches. Reads first, so a node without the lock costs no write; the removal
/// is a JSON patch that `test`s the value read, so a lock the scheduler took again meanwhile (for another pod,
/// between our read and our write) is left in place. Returns whether it wrote. Each of its two calls runs under
/// `limit` (the request bound of [`crate::cluster::ApiBounds`]), like every apiserver call on the Allocate path: a
/// lock we cannot release expires in 5 minutes.
pub async fn release_node_lock(api: &Api<Node>, node: &str, limit: Duration) -> bool {
    let held = match tokio::time::timeout(limit, api.get_opt(node)).await {
        Ok(Ok(Some(n))) => n.metadata.annotations.and_then(|mut a| a.remove(NODE_LOCK)),
        Ok(Ok(None)) => None,
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the node to release its lock");
            return false;
        }
        Err(_) => {
            tracing::warn!("no answer reading the node to release its lock");
            return false;
        }
    };
    let Some(value) = held else {
        return false;
    };
    match tokio::time::timeout(
        limit,
        api.patch(
            node,
            &PatchParams::default(),
            &Patch::Json::<()>(lock_removal(&value)),
        ),
    )
    .await
    {
        Ok(Ok(_)) => {
            tracing::info!("node lock {NODE_LOCK} released");
            return true;
        }
        Ok(Err(kube::Error::Api(status))) if status.code == 422 || status.code == 409 => {
            tracing::info!(
                "node lock {NODE_LOCK} changed since it was read (taken again for another pod); left in place"
            )
        }
        Ok(Err(error)) => tracing::warn!(%error, "cannot release the node lock"),
        Err(_) => tracing::warn!("no answer releasing the node lock"),
    }
    false
}

/// The release of a lock read as `value`: `test` that it still holds `value`, then `remove` it.
pub fn lock_removal(value: &str) -> json_patch::Patch {
    use json_patch::{PatchOperation, RemoveOperation, TestOperation};
    let path = json_patch::jsonptr::PointerBuf::from_tokens(["metadata", "annotations", NODE_LOCK]);
    json_patch::Patch(vec![
        PatchOperation::Test(TestOperation {
            path: path.clone(),
            value: value.into(),
        }),
        PatchOperation::Remove(RemoveOperation { path }),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::inventory::Gpu;
    use crate::volcano::node_register::{MODE_MIG, OperatingMode, decode_node_register, node_mode};

    #[test]
    fn mig_mode_registers_the_whole_gpu_with_mode_mig() {
        // The vector "A100-40GB node in dynamic-mig mode" of tests/data/volcano-vectors.json.
        let inventory = Inventory {
            gpus: vec![Gpu {
                nvml_index: 0,
                uuid: "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448".into(),
                model: "NVIDIA A100-PCIE-40GB".into(),
                memory_bytes: 42_949_672_960,
                minor: 0,
                numa_node: None,
                pci_bus_id: "00000000:07:00.0".into(),
            }],
        };
        let mig = VolcanoConfig {
            operating_mode: OperatingMode::Mig,
            ..VolcanoConfig::default()
        };
        let value = register_value(&inventory, &[true], &mig);
        assert_eq!(
            value,
            "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448,10,40960,NVIDIA-NVIDIA A100-PCIE-40GB,true,mig:"
        );
        assert_eq!(node_mode(&decode_node_register(&value).unwrap()), MODE_MIG);
        let hami = register_value(&inventory, &[true], &VolcanoConfig::default());
        assert_eq!(
            hami,
            value.replace(",mig:", ",hami-core:"),
            "only field 5 differs"
        );
    }

    #[test]
    fn auto_handshake_answers_only_an_old_scheduler_that_asks() {
        let auto = |v: Option<&str>| handshake_reply(HandshakeMode::Auto, v, false);
        assert!(
            auto(None),
            "missing: an old scheduler ignores the node until it is there"
        );
        assert!(auto(Some("Deleted_2026.08.20 10:01:01")));
        assert!(
            !auto(Some("Requesting_2026.08.20 10:00:00")),
            "the scheduler's own mark needs no answer"
        );
        assert!(!auto(Some("Reported 2026-08-20 10:00:00 +0000 UTC")));
        assert!(!handshake_reply(HandshakeMode::Off, None, true));
        assert!(handshake_reply(
            HandshakeMode::On,
            Some("Requesting_2026.08.20 10:00:00"),
            true
        ));
        assert!(!handshake_reply(
            HandshakeMode::On,
            Some("Requesting_2026.08.20 10:00:00"),
            false
        ));
    }
}
