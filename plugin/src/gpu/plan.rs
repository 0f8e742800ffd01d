//! The device lists the three endpoints advertise (docs/volcano-contract.md §1.2), and the kubelet's message-size limit.
//!
//! Per GPU: `deviceSplitCount` IDs on the number resource, `floor(MiB / gpuMemoryFactor)` on the memory
//! resource and `floor(100 × deviceCoreScaling)` on the cores resource. The kubelet only counts IDs, so their
//! spelling is ours to choose: the Go plugin's (`<UUID>-<i>`, `<UUID>-memory-<i>`, `<UUID>-core-<i>`) when the
//! list fits in one `ListAndWatch` message, and a compact one (`<minor>n<i>`, `<minor>m<i>`, `<minor>c<i>`)
//! when only that fits. A list that fits in neither is refused at start with the setting that would fit,
//! because the kubelet silently drops a message over its 4 MiB receive limit and the resource shows 0.

use kubelet_api::v1beta1::{
    Device, HEALTHY, KUBELET_MAX_RECV_MESSAGE_BYTES, NumaNode, TopologyInfo, UNHEALTHY,
};
use prost::Message;

use crate::config::{ResourceKind, SharingSettings};
use crate::gpu::inventory::{Gpu, Inventory};
use crate::volcano::node_register::OperatingMode;

/// How many IDs one GPU contributes to a resource in a node's operating mode.
///
/// The Go plugin's `apiDevices` ([P] `pkg/plugin/server.go:649-716`) does not look at `config.Mode`: in MIG mode,
/// as in hami-core mode, each GPU gets `DeviceSplitCount` number IDs (`:705-714`), `MiB / GPUMemoryFactor`
/// memory IDs (`:656-688`) and `100 × DeviceCoresScaling` core IDs (`:689-702`), the GPU being listed whole
/// (its MIG state only matters under `--mig-strategy` other than `none`, which drops MIG-enabled GPUs from the
/// list altogether, [P] `pkg/rm/device_map.go:128-134`; the node config's `migstrategy` is never read, [P]
/// `pkg/util/util.go:619-653`). The scheduler needs these non-zero to place pods at all ([V] `device_info.go:103-124`)
/// and places MIG pods by the geometry templates, not by these counts ([V] `vgpu/mig.go:36-57`).
pub fn ids_per_gpu(
    kind: ResourceKind,
    mode: OperatingMode,
    gpu_memory_mib: u64,
    sharing: &SharingSettings,
) -> u64 {
    match mode {
        OperatingMode::HamiCore | OperatingMode::Mig => kind.ids_per_gpu(gpu_memory_mib, sharing),
    }
}

/// How IDs are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdStyle {
    /// The Go plugin's IDs, built on the GPU UUID.
    Upstream,
    /// Short IDs built on the minor number, for lists that would not fit otherwise.
    Compact,
}

/// The device list of one resource on this node: which IDs exist and how they are spelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// Which resource.
    pub kind: ResourceKind,
    /// How IDs are spelled.
    pub style: IdStyle,
    /// IDs per GPU, in inventory order.
    pub per_gpu: Vec<u64>,
    /// The encoded size of the largest `ListAndWatchResponse` this plan can produce (every ID `Unhealthy`).
    pub max_message_bytes: usize,
}

/// A device list that no ID spelling fits into one kubelet message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "the {resource} device list would be {bytes} bytes, over the kubelet's {limit}-byte ListAndWatch limit \
     (the kubelet would drop it and advertise 0); {fix}"
)]
pub struct MessageTooLarge {
    /// Which resource overflowed.
    pub resource: &'static str,
    /// Its smallest possible encoding.
    pub bytes: usize,
    /// The kubelet's limit.
    pub limit: usize,
    /// The setting that would fit, worded for the operator.
    pub fix: String,
}

impl DevicePlan {
    /// Plans one resource of a hami-core node, preferring the Go plugin's IDs and falling back to compact ones.
    pub fn new(
        kind: ResourceKind,
        inventory: &Inventory,
        sharing: &SharingSettings,
    ) -> Result<Self, MessageTooLarge> {
        Self::for_mode(kind, OperatingMode::HamiCore, inventory, sharing)
    }

    /// Plans one resource of a node in `mode`, with the counts of [`ids_per_gpu`].
    pub fn for_mode(
        kind: ResourceKind,
        mode: OperatingMode,
        inventory: &Inventory,
        sharing: &SharingSettings,
    ) -> Result<Self, MessageTooLarge> {
        let per_gpu: Vec<u64> = inventory
            .gpus
            .iter()
            .map(|g| ids_per_gpu(kind, mode, g.memory_mib(), sharing))
            .collect();
        let mut smallest = usize::MAX;
        for style in [IdStyle::Upstream, IdStyle::Compact] {
            let bytes = max_message_len(kind, style, &inventory.gpus, &per_gpu);
            if bytes <= KUBELET_MAX_RECV_MESSAGE_BYTES {
                return Ok(Self {
                    kind,
                    style,
                    per_gpu,
                    max_message_bytes: bytes,
                });
            }
            smallest = smallest.min(bytes);
        }
        Err(MessageTooLarge {
            resource: kind.short_name(),
            bytes: smallest,
            limit: KUBELET_MAX_RECV_MESSAGE_BYTES,
            fix: fitting_setting(kind, inventory, sharing),
        })
    }

    /// The number of IDs this resource advertises on the node.
    pub fn total(&self) -> u64 {
        self.per_gpu.iter().sum()
    }

    /// The position (inventory order) of the GPU an ID of this plan belongs to.
    pub fn gpu_of(&self, inventory: &Inventory, id: &str) -> Option<usize> {
        match self.style {
            IdStyle::Upstream => inventory.gpus.iter().position(|g| {
                id.strip_prefix(g.uuid.as_str())
                    .is_some_and(|rest| rest.starts_with('-'))
            }),
            IdStyle::Compact => {
                let minor: u32 = id
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()?;
                inventory.gpus.iter().position(|g| g.minor == minor)
            }
        }
    }

    /// The full device list, each ID carrying its GPU's health (`healthy` is in inventory order).
    pub fn devices(&self, inventory: &Inventory, healthy: &[bool]) -> Vec<Device> {
        let mut out = Vec::with_capacity(usize::try_from(self.total()).unwrap_or(0));
        for (pos, (gpu, &count)) in inventory.gpus.iter().zip(&self.per_gpu).enumerate() {
            let health = if healthy.get(pos).copied().unwrap_or(false) {
                HEALTHY
            } else {
                UNHEALTHY
            };
            let topology = topology(gpu);
            for i in 0..count {
                out.push(Device {
                    id: device_id(self.kind, self.style, gpu, i),
                    health: health.to_owned(),
                    topology: topology.clone(),
                });
            }
        }
        out
    }
}

/// The encoded size of the largest `ListAndWatchResponse` one resource would need in one ID spelling, whether
/// or not it fits: the figure operators compare with the kubelet's limit.
pub fn message_len(
    kind: ResourceKind,
    style: IdStyle,
    inventory: &Inventory,
    sharing: &SharingSettings,
) -> usize {
    let per_gpu: Vec<u64> = inventory
        .gpus
        .iter()
        .map(|g| kind.ids_per_gpu(g.memory_mib(), sharing))
        .collect();
    max_message_len(kind, style, &inventory.gpus, &per_gpu)
}

/// One ID.
pub fn device_id(kind: ResourceKind, style: IdStyle, gpu: &Gpu, i: u64) -> String {
    match (style, kind) {
        (IdStyle::Upstream, ResourceKind::Number) => format!("{}-{i}", gpu.uuid),
        (IdStyle::Upstream, ResourceKind::Memory) => format!("{}-memory-{i}", gpu.uuid),
        (IdStyle::Upstream, ResourceKind::Cores) => format!("{}-core-{i}", gpu.uuid),
        (IdStyle::Compact, ResourceKind::Number) => format!("{}n{i}", gpu.minor),
        (IdStyle::Compact, ResourceKind::Memory) => format!("{}m{i}", gpu.minor),
        (IdStyle::Compact, ResourceKind::Cores) => format!("{}c{i}", gpu.minor),
    }
}

fn topology(gpu: &Gpu) -> Option<TopologyInfo> {
    gpu.numa_node.map(|id| TopologyInfo {
        nodes: vec![NumaNode { id: i64::from(id) }],
    })
}

/// The encoded size of the `ListAndWatchResponse` holding every ID, all `Unhealthy` (the longer health string).
///
/// Computed per run of IDs of equal length rather than by building the list, so an 8 × 80 GB node at factor 1
/// (655,360 IDs) is sized in microseconds.
fn max_message_len(kind: ResourceKind, style: IdStyle, gpus: &[Gpu], per_gpu: &[u64]) -> usize {
    let mut total = 0usize;
    for (gpu, &count) in gpus.iter().zip(per_gpu) {
        let prefix_len = device_id(kind, style, gpu, 0).len() - 1;
        let mut start = 0u64;
        let mut digits = 1u32;
        while start < count {
            let end = count.min(10u64.saturating_pow(digits));
            let device = Device {
                id: "x".repeat(prefix_len + digits as usize),
                health: UNHEALTHY.to_owned(),
                topology: topology(gpu),
            };
            let len = device.encoded_len();
            // Field 1 of ListAndWatchResponse: one tag byte, the length varint, the message.
            let field = 1 + prost::length_delimiter_len(len) + len;
            total = total.saturating_add(
                field.saturating_mul(usize::try_from(end - start).unwrap_or(usize::MAX)),
            );
            start = end;
            digits += 1;
        }
    }
    total
}

/// The nearest setting that fits, for the refusal message.
fn fitting_setting(kind: ResourceKind, inventory: &Inventory, sharing: &SharingSettings) -> String {
    let fits = |s: &SharingSettings| {
        let per_gpu: Vec<u64> = inventory
            .gpus
            .iter()
            .map(|g| kind.ids_per_gpu(g.memory_mib(), s))
            .collect();
        max_message_len(kind, IdStyle::Compact, &inventory.gpus, &per_gpu)
            <= KUBELET_MAX_RECV_MESSAGE_BYTES
    };
    match kind {
        ResourceKind::Memory => {
            // Fewer IDs with every step of the factor: binary-search the smallest factor that fits.
            let (mut lo, mut hi) = (sharing.memory_factor, u32::MAX);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if fits(&SharingSettings {
                    memory_factor: mid,
                    ..*sharing
                }) {
                    hi = mid
                } else {
                    lo = mid + 1
                }
            }
            format!(
                "set gpuMemoryFactor (--gpu-memory-factor) to {lo} or more (it is {}), in the device config map \
                 for the scheduler too",
                sharing.memory_factor
            )
        }
        ResourceKind::Number => {
            let (mut lo, mut hi) = (1u32, sharing.split_count);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if fits(&SharingSettings {
                    split_count: mid,
                    ..*sharing
                }) {
                    lo = mid
                } else {
                    hi = mid - 1
                }
            }
            format!(
                "set deviceSplitCount (--device-split-count) to {lo} or less (it is {})",
                sharing.split_count
            )
        }
        ResourceKind::Cores => {
            let mut scaling = sharing.core_scaling;
            while scaling > 0.01
                && !fits(&SharingSettings {
                    core_scaling: scaling,
                    ..*sharing
                })
            {
                scaling = (scaling * 0.9 * 100.0).floor() / 100.0;
            }
            format!(
                "set deviceCoreScaling (--device-cores-scaling) to {scaling} or less (it is {})",
                sharing.core_scaling
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubelet_api::v1beta1::ListAndWatchResponse;
    use std::collections::HashSet;

    fn gpu(minor: u32, mib: u64, numa: Option<u32>) -> Gpu {
        Gpu {
            nvml_index: minor,
            uuid: format!("GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d14{minor:02}"),
            model: "NVIDIA A100-SXM4-80GB".into(),
            memory_bytes: mib << 20,
            minor,
            numa_node: numa,
            pci_bus_id: format!("00000000:{:02X}:00.0", minor + 7),
        }
    }

    fn node(n: u32, mib: u64) -> Inventory {
        Inventory {
            gpus: (0..n).map(|m| gpu(m, mib, Some(m / 4))).collect(),
        }
    }

    #[test]
    fn mig_mode_advertises_what_the_go_plugin_does_the_whole_gpu() {
        // [P] server.go:649-716 has no mode branch: a 40 GB A100 at split 10, factor 1, scaling 1 lists
        // 10 / 40960 / 100 IDs in MIG mode too (the vector "A100-40GB node in dynamic-mig mode").
        let inv = node(2, 40960);
        let s = SharingSettings::default();
        for (kind, each) in [
            (ResourceKind::Number, 10),
            (ResourceKind::Memory, 40960),
            (ResourceKind::Cores, 100),
        ] {
            assert_eq!(
                ids_per_gpu(kind, OperatingMode::Mig, 40960, &s),
                each,
                "{kind:?}"
            );
            let mig = DevicePlan::for_mode(kind, OperatingMode::Mig, &inv, &s).unwrap();
            assert_eq!(mig.per_gpu, vec![each, each], "{kind:?}");
            assert_eq!(mig, DevicePlan::new(kind, &inv, &s).unwrap(), "{kind:?}");
        }
    }

    #[test]
    fn counts_follow_the_contract() {
        let inv = node(2, 15360);
        let s = SharingSettings {
            split_count: 10,
            memory_factor: 1,
            core_scaling: 1.5,
            ..Default::default()
        };
        assert_eq!(
            DevicePlan::new(ResourceKind::Number, &inv, &s)
                .unwrap()
                .total(),
            20
        );
        assert_eq!(
            DevicePlan::new(ResourceKind::Memory, &inv, &s)
                .unwrap()
                .total(),
            30720
        );
        assert_eq!(
            DevicePlan::new(ResourceKind::Cores, &inv, &s)
                .unwrap()
                .total(),
            300
        );
        let s = SharingSettings {
            memory_factor: 10,
            ..s
        };
        // 81559 MiB at factor 10 is 8155 units (the H100 vector).
        assert_eq!(
            DevicePlan::new(ResourceKind::Memory, &node(1, 81559), &s)
                .unwrap()
                .total(),
            8155
        );
    }

    #[test]
    fn ids_match_the_go_plugin_when_they_fit() {
        let inv = node(1, 81920);
        let s = SharingSettings {
            split_count: 3,
            ..Default::default()
        };
        let plan = DevicePlan::new(ResourceKind::Number, &inv, &s).unwrap();
        assert_eq!(plan.style, IdStyle::Upstream);
        let ids: Vec<String> = plan
            .devices(&inv, &[true])
            .into_iter()
            .map(|d| d.id)
            .collect();
        let uuid = &inv.gpus[0].uuid;
        assert_eq!(
            ids,
            vec![
                format!("{uuid}-0"),
                format!("{uuid}-1"),
                format!("{uuid}-2")
            ]
        );
        let g = &inv.gpus[0];
        assert_eq!(
            device_id(ResourceKind::Memory, IdStyle::Upstream, g, 81919),
            format!("{uuid}-memory-81919")
        );
        assert_eq!(
            device_id(ResourceKind::Cores, IdStyle::Upstream, g, 99),
            format!("{uuid}-core-99")
        );
    }

    #[test]
    fn computed_size_is_the_real_encoded_size() {
        for (n, mib, factor) in [(1u32, 15360u64, 1u32), (2, 81920, 10), (3, 40960, 7)] {
            let inv = node(n, mib);
            let s = SharingSettings {
                memory_factor: factor,
                ..Default::default()
            };
            for kind in ResourceKind::ALL {
                let plan = DevicePlan::new(kind, &inv, &s).unwrap();
                let all_bad = vec![false; inv.gpus.len()];
                let real = ListAndWatchResponse {
                    devices: plan.devices(&inv, &all_bad),
                }
                .encoded_len();
                assert_eq!(
                    plan.max_message_bytes, real,
                    "{kind:?} n={n} factor={factor}"
                );
                let all_good = vec![true; inv.gpus.len()];
                let healthy = ListAndWatchResponse {
                    devices: plan.devices(&inv, &all_good),
                }
                .encoded_len();
                assert!(healthy < real);
            }
        }
    }

    #[test]
    fn ids_are_unique_and_short_enough_in_both_styles() {
        let inv = node(8, 2000);
        for kind in ResourceKind::ALL {
            let s = SharingSettings::default();
            for style in [IdStyle::Upstream, IdStyle::Compact] {
                let plan = DevicePlan {
                    style,
                    ..DevicePlan::new(kind, &inv, &s).unwrap()
                };
                let devices = plan.devices(&inv, &[true; 8]);
                let ids: HashSet<&str> = devices.iter().map(|d| d.id.as_str()).collect();
                assert_eq!(
                    ids.len(),
                    devices.len(),
                    "{kind:?} {style:?} IDs are unique"
                );
                assert!(
                    ids.iter().all(|id| id.len() <= 63),
                    "{kind:?} {style:?} IDs fit the 63-char rule"
                );
            }
        }
    }

    #[test]
    fn large_memory_lists_switch_to_compact_ids_then_refuse_with_the_factor_that_fits() {
        // 4 × 80 GB at factor 4: 81,920 IDs; too many for UUID IDs (~69 bytes each), fine compact.
        let inv = node(4, 81920);
        let s = SharingSettings {
            memory_factor: 4,
            ..Default::default()
        };
        let plan = DevicePlan::new(ResourceKind::Memory, &inv, &s).unwrap();
        assert_eq!(plan.style, IdStyle::Compact);
        assert!(plan.max_message_bytes <= KUBELET_MAX_RECV_MESSAGE_BYTES);

        // 8 × 80 GB at factor 1 fits in no spelling; the error names the smallest factor that does.
        let inv = node(8, 81920);
        let err =
            DevicePlan::new(ResourceKind::Memory, &inv, &SharingSettings::default()).unwrap_err();
        assert!(err.bytes > KUBELET_MAX_RECV_MESSAGE_BYTES);
        let factor: u32 = err
            .fix
            .split("to ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no factor in {:?}", err.fix));
        let fits = SharingSettings {
            memory_factor: factor,
            ..Default::default()
        };
        assert!(DevicePlan::new(ResourceKind::Memory, &inv, &fits).is_ok());
        let too_small = SharingSettings {
            memory_factor: factor - 1,
            ..Default::default()
        };
        assert!(DevicePlan::new(ResourceKind::Memory, &inv, &too_small).is_err());
    }

    #[test]
    fn every_id_maps_back_to_its_gpu_in_both_styles() {
        let inv = node(3, 300);
        for kind in ResourceKind::ALL {
            for style in [IdStyle::Upstream, IdStyle::Compact] {
                let plan = DevicePlan {
                    style,
                    ..DevicePlan::new(kind, &inv, &SharingSettings::default()).unwrap()
                };
                let devices = plan.devices(&inv, &[true; 3]);
                let mut start = 0;
                for (g, count) in plan.per_gpu.iter().enumerate() {
                    for d in &devices[start..start + *count as usize] {
                        assert_eq!(
                            plan.gpu_of(&inv, &d.id),
                            Some(g),
                            "{kind:?} {style:?} {}",
                            d.id
                        );
                    }
                    start += *count as usize;
                }
                assert_eq!(plan.gpu_of(&inv, "GPU-unknown-1"), None);
            }
        }
    }

    #[test]
    fn unhealthy_gpu_marks_only_its_own_ids() {
        let inv = node(2, 100);
        let plan =
            DevicePlan::new(ResourceKind::Memory, &inv, &SharingSettings::default()).unwrap();
        let devices = plan.devices(&inv, &[true, false]);
        assert!(devices[..100].iter().all(|d| d.health == HEALTHY));
        assert!(devices[100..].iter().all(|d| d.health == UNHEALTHY));
        assert_eq!(
            devices[0].topology,
            Some(TopologyInfo {
                nodes: vec![NumaNode { id: 0 }]
            })
        );
    }
}
