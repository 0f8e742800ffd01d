//! The monitor duty of tidying the per-container cache directories (`<cache-root>/<pod-uid>_<container>`):
//! a directory is removed only when its pod has been gone from this node for the whole grace period, as seen
//! by the pod watch **and** confirmed by a fresh node-scoped read just before removal, so a lagging or
//! broken watch can never make the agent delete a directory a running container has mounted.
//!
//! The node's record of a container ([`crate::handoff::record`]) goes with its directory, and a record whose pod is
//! confirmed gone goes too even without one (an Allocate that recorded and then failed).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::handoff::pod_cache::PodCache;
use crate::handoff::record::{RecordStore, records_of_gone_pods};
use crate::monitor::feedback::container_dirs;

/// Removes orphaned cache directories every `interval`, after `grace`. Runs until aborted.
pub async fn run(pods: PodCache, root: PathBuf, grace: Duration, interval: Duration) {
    let mut absent_since: HashMap<PathBuf, Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        sweep(&pods, &root, grace, &mut absent_since, Instant::now()).await;
    }
}

/// One pass; returns the directories removed.
pub async fn sweep(
    pods: &PodCache,
    root: &Path,
    grace: Duration,
    absent_since: &mut HashMap<PathBuf, Instant>,
    now: Instant,
) -> Vec<PathBuf> {
    let cached: HashSet<String> = pods
        .cached()
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let mut due = Vec::new();
    let mut seen = HashSet::new();
    for (dir, uid, _) in container_dirs(root) {
        seen.insert(dir.clone());
        if cached.contains(&uid) {
            absent_since.remove(&dir);
            continue;
        }
        let since = *absent_since.entry(dir.clone()).or_insert(now);
        if now.saturating_duration_since(since) >= grace {
            due.push((dir, uid));
        }
    }
    absent_since.retain(|dir, _| seen.contains(dir));
    let store = RecordStore::beside(root);
    let records = store.load();
    // Records without a directory whose pod the watch no longer has: confirmed below like directories.
    let orphan_records = records_of_gone_pods(&records, &cached);
    let orphan_records: Vec<String> = orphan_records
        .into_iter()
        .filter(|key| !seen.contains(&root.join(key)))
        .collect();
    if due.is_empty() && orphan_records.is_empty() {
        return Vec::new();
    }
    // Confirm with the apiserver before removing anything: the watch may lag or be down.
    let live: HashSet<String> = match pods.list_direct().await {
        Ok(list) => list.into_iter().filter_map(|p| p.metadata.uid).collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot confirm which pods are gone; keeping their cache directories for now");
            return Vec::new();
        }
    };
    for key in orphan_records {
        if records
            .get(&key)
            .is_some_and(|r| !live.contains(&r.pod_uid))
        {
            store.remove(&key);
        }
    }
    let mut removed = Vec::new();
    for (dir, uid) in due {
        if live.contains(&uid) {
            absent_since.remove(&dir);
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed the cache directory of a pod that is gone");
                if let Some(key) = dir.file_name().and_then(|n| n.to_str()) {
                    store.remove(key);
                }
                absent_since.remove(&dir);
                removed.push(dir);
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove a stale cache directory")
            }
        }
    }
    removed
}
