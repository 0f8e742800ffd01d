//! The agent's use of `nvml-mig` (issue #19): make one GPU's MIG layout the geometry group the scheduler chose,
//! repartitioning only when the current layout differs, and say which MIG device stands for each position of the
//! group.
//!
//! # Position → MIG UUID
//!
//! The scheduler counts a group's positions through its templates in order, each `count` times
//! ([`MigGeometry::templates`]; [V] `mig.go:152-170`). The wanted layout ([`wanted_layout`]) is that expansion:
//! position `p` wants the profile `profiles[p]`. The agent maps positions to MIG devices by one rule, whether
//! `apply` just created the instances or an existing matching layout is reused:
//!
//! > For each profile name, the positions that want it, in increasing order, get the GPU instances of that
//! > profile in increasing placement start (then GPU instance id); each GPU instance's MIG device is the answer.
//!
//! So a repartition and a later reuse of the same layout give the same UUID for the same position (the layout
//! does not change between them, nor do placements). [`map_positions`] is the rule, pure; [`ensure_layout`]
//! feeds it either `apply`'s instances or the existing ones ([`existing_instances`]). The Go plugin instead takes
//! the position as the NVML MIG device index ([P] `util.go:475-482`), an order NVML does not document; this rule
//! depends only on the placements, which NVML reports.

use std::collections::BTreeMap;

use nvml_mig::{Layout, MigBackend, MigError, apply_with, current_with};

use crate::volcano::mig::MigGeometry;

/// One MIG device of a GPU, as the mapping needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigInstance {
    /// The GPU instance profile name, without NVML's `MIG ` prefix (`1g.10gb`).
    pub profile: String,
    /// The GPU instance's placement start slice.
    pub start: u32,
    /// The GPU instance id.
    pub gi_id: u32,
    /// The compute instance id (within the GPU instance): with `gi_id`, it names the MIG device's capability
    /// files in `/proc/driver/nvidia-caps/mig-minors`.
    pub ci_id: u32,
    /// The MIG device's UUID (`MIG-…`).
    pub uuid: String,
}

/// Why positions cannot be mapped to the instances a GPU has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The instances do not hold exactly the wanted profiles.
    #[error("the GPU's MIG instances [{have}] are not the layout [{want}]")]
    Mismatch {
        /// The wanted profiles, in position order.
        want: String,
        /// The profiles the instances have.
        have: String,
    },
}

/// Why a GPU could not be given a geometry.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    /// `nvml-mig` refused or failed (its text names the GPU, the step and any rollback).
    #[error(transparent)]
    Mig(#[from] MigError),
    /// The instances found do not match the layout (should not happen after a successful `apply`).
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The layout differs but other containers on the GPU are alive: not repartitioned.
    #[error(
        "{gpu}: its MIG layout [{current}] is not [{wanted}], and it cannot be repartitioned while {holders}; \
         MIG layout left unchanged"
    )]
    Occupied {
        /// The GPU's UUID.
        gpu: String,
        /// The layout it has (empty when MIG mode is off).
        current: String,
        /// The layout asked for.
        wanted: String,
        /// Who holds it, as the caller described them.
        holders: String,
    },
    /// NVML has no device with the GPU's UUID.
    #[error("{gpu}: cannot open the GPU through NVML: {source}")]
    Device {
        /// The GPU's UUID.
        gpu: String,
        /// NVML's error.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
}

impl EnsureError {
    /// Whether the GPU could not be changed because something holds memory on it.
    pub fn is_in_use(&self) -> bool {
        matches!(
            self,
            Self::Mig(MigError::InUse { .. }) | Self::Occupied { .. }
        )
    }
}

/// The layout a geometry asks for: its templates in order, each `count` times (position order).
pub fn wanted_layout(geometry: &MigGeometry) -> Layout {
    Layout::new(
        geometry
            .templates
            .iter()
            .flat_map(|t| std::iter::repeat_n(t.name.as_str(), t.count as usize)),
    )
}

/// The MIG UUID of every position of `wanted` (see the module docs for the rule), or why the instances do not
/// hold exactly the wanted profiles.
pub fn map_positions(
    wanted: &Layout,
    instances: &[MigInstance],
) -> Result<Vec<String>, MappingError> {
    Ok(map_instances(wanted, instances)?
        .into_iter()
        .map(|i| i.uuid)
        .collect())
}

/// The instance of every position of `wanted` ([`map_positions`]'s rule), with its GPU and compute instance ids.
pub fn map_instances(
    wanted: &Layout,
    instances: &[MigInstance],
) -> Result<Vec<MigInstance>, MappingError> {
    let key = |p: &str| p.to_ascii_lowercase();
    let mut by_profile: BTreeMap<String, Vec<&MigInstance>> = BTreeMap::new();
    for inst in instances {
        by_profile.entry(key(&inst.profile)).or_default().push(inst);
    }
    for list in by_profile.values_mut() {
        list.sort_by_key(|i| (i.start, i.gi_id));
        list.reverse(); // popped from the end: lowest placement first
    }
    let mismatch = || MappingError::Mismatch {
        want: wanted.profiles().join(", "),
        have: instances
            .iter()
            .map(|i| i.profile.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut out = Vec::with_capacity(wanted.profiles().len());
    for profile in wanted.profiles() {
        let inst = by_profile
            .get_mut(&key(profile))
            .and_then(Vec::pop)
            .ok_or_else(mismatch)?;
        out.push(inst.clone());
    }
    if by_profile.values().any(|l| !l.is_empty()) {
        return Err(mismatch());
    }
    Ok(out)
}

/// The GPU's MIG devices with their GPU instance's profile and placement.
pub fn existing_instances<B: MigBackend + ?Sized>(b: &B) -> Result<Vec<MigInstance>, MigError> {
    let mut gis = BTreeMap::new();
    for profile in b.gi_profiles()? {
        for gi in b.gpu_instances(&profile)? {
            gis.insert(gi.id, (profile.name.clone(), gi.placement.start));
        }
    }
    let mut out = Vec::new();
    for dev in b.mig_devices()? {
        let Some((profile, start)) = gis.get(&dev.gi_id) else {
            return Err(MigError::Unexpected {
                gpu: b.gpu().to_owned(),
                function: "nvmlDeviceGetMigDeviceHandleByIndex",
                detail: format!(
                    "MIG device {} names GPU instance {}, which no profile lists",
                    dev.uuid, dev.gi_id
                ),
            });
        };
        out.push(MigInstance {
            profile: Layout::new([profile]).profiles()[0].clone(),
            start: *start,
            gi_id: dev.gi_id,
            ci_id: dev.ci_id,
            uuid: dev.uuid,
        });
    }
    Ok(out)
}

/// A GPU given a geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioned {
    /// Whether the GPU was repartitioned (its MIG UUIDs changed) or an existing matching layout reused.
    pub repartitioned: bool,
    /// The MIG device of each position of the geometry (UUID, GPU and compute instance ids).
    pub instances: Vec<MigInstance>,
}

impl Partitioned {
    /// The MIG UUID of each position of the geometry.
    pub fn uuids(&self) -> Vec<String> {
        self.instances.iter().map(|i| i.uuid.clone()).collect()
    }
}

/// Makes the GPU's layout `geometry`: reuses the current layout when it holds the same profiles
/// ([`Layout::same_profiles`]), else repartitions with `nvml-mig`'s `apply` (which refuses with
/// [`MigError::InUse`] while a process holds memory on the GPU, enables MIG mode, and rolls back to an empty
/// layout on failure). MIG mode off counts as a different layout. `holders` describes the other containers the
/// caller knows to be alive on the GPU: when it is not empty, a repartition is refused with
/// [`EnsureError::Occupied`] and nothing is touched.
pub fn ensure_layout<B: MigBackend + ?Sized>(
    b: &B,
    geometry: &MigGeometry,
    holders: &[String],
) -> Result<Partitioned, EnsureError> {
    let wanted = wanted_layout(geometry);
    let current = match current_with(b) {
        Ok(current) if current.same_profiles(&wanted) => {
            let instances = map_instances(&wanted, &existing_instances(b)?)?;
            return Ok(Partitioned {
                repartitioned: false,
                instances,
            });
        }
        Ok(current) => current.to_string(),
        Err(MigError::MigDisabled { .. }) => "MIG mode off".to_owned(),
        Err(e) => return Err(e.into()),
    };
    if !holders.is_empty() {
        return Err(EnsureError::Occupied {
            gpu: b.gpu().to_owned(),
            current,
            wanted: wanted.to_string(),
            holders: holders.join(", "),
        });
    }
    let applied = apply_with(b, &wanted)?;
    let instances: Vec<MigInstance> = applied
        .instances
        .iter()
        .map(|i| MigInstance {
            profile: i.profile.clone(),
            start: i.placement.start,
            gi_id: i.gi_id,
            ci_id: i.ci_id,
            uuid: i.uuid.clone(),
        })
        .collect();
    Ok(Partitioned {
        repartitioned: true,
        instances: map_instances(&wanted, &instances)?,
    })
}

/// The MIG operations the hand-off needs on one GPU (by its `GPU-…` UUID): an NVML implementation
/// ([`NvmlMig`]) in the agent, a fake in unit tests.
pub trait MigControl: Send + Sync + std::fmt::Debug {
    /// [`ensure_layout`] on the GPU.
    fn ensure(
        &self,
        gpu_uuid: &str,
        geometry: &MigGeometry,
        holders: &[String],
    ) -> Result<Partitioned, EnsureError>;
    /// The UUIDs of the GPU's MIG devices now (empty when MIG mode is off).
    fn mig_uuids(&self, gpu_uuid: &str) -> Result<Vec<String>, EnsureError>;
}

/// [`MigControl`] through the agent's NVML handle. Every call marks the GPU in the [`RepartitionHold`] while it
/// runs, so the health monitor does not count what the repartition itself does to the GPU.
#[derive(Debug)]
pub struct NvmlMig {
    nvml: std::sync::Arc<nvml_wrapper::Nvml>,
    hold: std::sync::Arc<RepartitionHold>,
}

impl NvmlMig {
    /// Over the agent's NVML handle, marking repartitions in `hold`.
    pub fn new(
        nvml: std::sync::Arc<nvml_wrapper::Nvml>,
        hold: std::sync::Arc<RepartitionHold>,
    ) -> Self {
        Self { nvml, hold }
    }

    fn device(&self, gpu_uuid: &str) -> Result<nvml_wrapper::Device<'_>, EnsureError> {
        self.nvml
            .device_by_uuid(gpu_uuid)
            .map_err(|source| EnsureError::Device {
                gpu: gpu_uuid.to_owned(),
                source,
            })
    }
}

impl MigControl for NvmlMig {
    fn ensure(
        &self,
        gpu_uuid: &str,
        geometry: &MigGeometry,
        holders: &[String],
    ) -> Result<Partitioned, EnsureError> {
        let device = self.device(gpu_uuid)?;
        let _held = self.hold.hold(gpu_uuid);
        ensure_layout(&nvml_mig::MigGpu::new(&device), geometry, holders)
    }

    fn mig_uuids(&self, gpu_uuid: &str) -> Result<Vec<String>, EnsureError> {
        let device = self.device(gpu_uuid)?;
        let gpu = nvml_mig::MigGpu::new(&device);
        if !gpu.mig_mode()?.current {
            return Ok(Vec::new());
        }
        Ok(gpu.mig_devices()?.into_iter().map(|d| d.uuid).collect())
    }
}

/// The GPUs being repartitioned now, and when the last repartition of each ended: the health monitor ignores
/// a GPU's XID events and failed probes while it is held and for [`RepartitionHold::SETTLE`] after (destroying
/// and creating instances makes the driver report events and briefly refuse queries on the parent GPU; a
/// fault that outlasts the hold is still seen by the next probe).
#[derive(Debug, Default)]
pub struct RepartitionHold {
    state: std::sync::Mutex<BTreeMap<String, HoldState>>,
}

#[derive(Debug, Clone, Copy)]
enum HoldState {
    Running(u32),
    EndedAt(std::time::Instant),
}

/// Releases a GPU from the [`RepartitionHold`] when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    hold: &'a RepartitionHold,
    gpu: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut state = self.hold.lock();
        let now = std::time::Instant::now();
        let next = match state.get(&self.gpu) {
            Some(HoldState::Running(n)) if *n > 1 => HoldState::Running(n - 1),
            _ => HoldState::EndedAt(now),
        };
        state.insert(self.gpu.clone(), next);
    }
}

impl RepartitionHold {
    /// How long after a repartition its GPU's events and probe failures are still ignored.
    pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, HoldState>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `gpu` until the returned guard is dropped.
    pub fn hold(&self, gpu: &str) -> Held<'_> {
        let mut state = self.lock();
        let next = match state.get(gpu) {
            Some(HoldState::Running(n)) => HoldState::Running(n + 1),
            _ => HoldState::Running(1),
        };
        state.insert(gpu.to_owned(), next);
        Held {
            hold: self,
            gpu: gpu.to_owned(),
        }
    }

    /// Whether `gpu`'s health signals are ignored at `now`: it is being repartitioned, or was less than
    /// [`Self::SETTLE`] ago.
    pub fn is_held(&self, gpu: &str, now: std::time::Instant) -> bool {
        match self.lock().get(gpu) {
            Some(HoldState::Running(_)) => true,
            Some(HoldState::EndedAt(at)) => now.saturating_duration_since(*at) < Self::SETTLE,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volcano::mig::{MigTemplate, default_known_mig_geometries};

    fn inst(profile: &str, start: u32, gi_id: u32, uuid: &str) -> MigInstance {
        MigInstance {
            profile: profile.to_owned(),
            start,
            gi_id,
            ci_id: 0,
            uuid: uuid.to_owned(),
        }
    }

    fn a100_80(group: &str) -> MigGeometry {
        default_known_mig_geometries()
            .into_iter()
            .find(|m| m.models.iter().any(|n| n == "A100-SXM4-80GB"))
            .unwrap()
            .geometries
            .into_iter()
            .find(|g| g.group == group)
            .unwrap()
    }

    #[test]
    fn the_wanted_layout_expands_the_templates_in_order() {
        assert_eq!(
            wanted_layout(&a100_80("group2")).profiles(),
            ["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"]
        );
        assert_eq!(wanted_layout(&a100_80("group1")).profiles().len(), 7);
        let empty = MigGeometry {
            group: "g".to_owned(),
            templates: vec![MigTemplate {
                name: "1g.10gb".to_owned(),
                memory_mib: 1,
                count: 0,
            }],
        };
        assert!(wanted_layout(&empty).is_empty());
    }

    #[test]
    fn positions_of_one_profile_follow_placement_start_whatever_order_the_instances_come_in() {
        let wanted = wanted_layout(&a100_80("group2"));
        // Listed out of order (as NVML may list MIG devices); the 1g sits at slice 6.
        let instances = [
            inst("1g.10gb", 6, 9, "MIG-d"),
            inst("2g.20gb", 4, 5, "MIG-c"),
            inst("2g.20gb", 0, 3, "MIG-a"),
            inst("2g.20gb", 2, 4, "MIG-b"),
        ];
        assert_eq!(
            map_positions(&wanted, &instances).unwrap(),
            ["MIG-a", "MIG-b", "MIG-c", "MIG-d"]
        );
        // The same instances in another order give the same answer: the rule depends on placements only.
        let mut shuffled = instances.to_vec();
        shuffled.reverse();
        assert_eq!(
            map_positions(&wanted, &shuffled).unwrap(),
            map_positions(&wanted, &instances).unwrap()
        );
    }

    #[test]
    fn a_profile_before_another_in_the_template_keeps_its_positions_whatever_the_placements() {
        // Template order 2g,2g,2g,1g but the 1g placed first: position 3 is still the 1g.
        let wanted = wanted_layout(&a100_80("group2"));
        let instances = [
            inst("1g.10gb", 0, 1, "MIG-one"),
            inst("2g.20gb", 2, 2, "MIG-x"),
            inst("2g.20gb", 4, 3, "MIG-y"),
            inst("2g.20gb", 6, 4, "MIG-z"),
        ];
        assert_eq!(
            map_positions(&wanted, &instances).unwrap(),
            ["MIG-x", "MIG-y", "MIG-z", "MIG-one"]
        );
    }

    #[test]
    fn profile_names_compare_without_case_and_a_different_layout_is_a_mismatch() {
        let wanted = wanted_layout(&a100_80("group3"));
        let ok = [
            inst("3G.40GB", 4, 2, "MIG-2"),
            inst("3g.40gb", 0, 1, "MIG-1"),
        ];
        assert_eq!(map_positions(&wanted, &ok).unwrap(), ["MIG-1", "MIG-2"]);
        let short = [inst("3g.40gb", 0, 1, "MIG-1")];
        let err = map_positions(&wanted, &short).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the GPU's MIG instances [3g.40gb] are not the layout [3g.40gb, 3g.40gb]"
        );
        let extra = [
            inst("3g.40gb", 0, 1, "MIG-1"),
            inst("3g.40gb", 4, 2, "MIG-2"),
            inst("1g.10gb", 7, 3, "MIG-3"),
        ];
        assert!(map_positions(&wanted, &extra).is_err());
        assert!(map_positions(&wanted, &[]).is_err());
    }

    #[test]
    fn a_gpu_is_held_while_repartitioned_and_for_the_settle_time_after() {
        let hold = RepartitionHold::default();
        let now = std::time::Instant::now();
        assert!(!hold.is_held("GPU-a", now));
        {
            let _outer = hold.hold("GPU-a");
            {
                let _inner = hold.hold("GPU-a");
            }
            // Still running: the outer hold is alive, whatever the time.
            assert!(hold.is_held("GPU-a", now + RepartitionHold::SETTLE * 10));
            assert!(!hold.is_held("GPU-b", now));
        }
        let after = std::time::Instant::now();
        assert!(hold.is_held("GPU-a", after));
        assert!(!hold.is_held("GPU-a", after + RepartitionHold::SETTLE));
    }
}
