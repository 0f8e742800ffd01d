//! A simulated GPU node for the device-list-strategy and CDI tests: `harness::cluster` with a fake
//! `--dev-root` tree and driver directory, plus a Volcano master-style bind of whole GPUs.
#![allow(dead_code, clippy::unwrap_used)]

use std::ops::Deref;

use gpu_sim::NodeSpec;
#[allow(unused_imports)]
pub use harness::cluster::{NODE, NS, mounts, real_device_nodes};

use crate::common::*;

/// The fixture's cluster with the fake device tree.
pub struct SimCluster(Cluster);

impl Deref for SimCluster {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl SimCluster {
    /// Starts the agent with `args`; `{root}` in an argument is replaced by the temporary directory.
    pub async fn start(spec: NodeSpec, args: &[&str]) -> Self {
        let cluster = cluster(spec).device_tree().args(args).start().await;
        cluster.wait_until_watched().await;
        Self(cluster)
    }

    /// Binds a pod the way Volcano master does (annotations inside the Binding). `containers` are
    /// (name, GPU UUIDs); each device gets 1000 MiB and 30 % of the cores.
    pub async fn bind(&self, name: &str, containers: &[(&str, Vec<String>)]) {
        let specs: Vec<Ctr<'_>> = containers
            .iter()
            .map(|(n, uuids)| (*n, Some(uuids.len() as u64), Some(1000), None))
            .collect();
        let queue: String = containers
            .iter()
            .map(|(_, uuids)| {
                uuids
                    .iter()
                    .map(|u| format!("{u},NVIDIA,1000,30:"))
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(";");
        self.0
            .bind(name, BindStyle::InBinding, &specs, &queue, "1787220000")
            .await;
    }
}
