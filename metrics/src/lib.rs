//! The node agent's Prometheus exporter (served on `:9394` by default).
//!
//! Two sets of series from one scrape:
//! * the **legacy** series of Volcano's `volcano-vgpu-monitor` (docs/volcano-contract.md §7.1), with their names, labels and
//!   `zone="vGPU"`, so existing Volcano and HAMi dashboards keep working — with `vdeviceid` fixed to be the
//!   GPU's index on the node instead of the index inside the container's region (always 0 upstream);
//! * a **clean** set following Prometheus conventions: units in the names, ratios instead of percents, and the
//!   usual labels (`namespace`, `pod`, `container`, `gpu_uuid`, `gpu_index`).
//!
//! Agent-level counters live in [`AgentMetrics`]; everything else is read at scrape time from a
//! [`SnapshotSource`] (NVML and the containers' shared regions, in the agent). Start at [`serve`].

mod exposition;
mod server;

pub use exposition::{
    AgentMetrics, AllocateResult, ContainerSample, GpuSample, MigDeviceSample, ObservedSample,
    Snapshot, SnapshotSource, UnaccountedSample, find_value,
};
pub use server::{
    HEADER_READ_TIMEOUT, IDLE_TIMEOUT, Limits, MAX_CONNECTIONS, parse_bind_address, serve,
    serve_with,
};
