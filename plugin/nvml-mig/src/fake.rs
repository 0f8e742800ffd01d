//! A fake [`MigBackend`] with an A100 80GB's profile and placement table, for the unit tests of `apply`'s
//! ordering and rollback. It enforces what the driver enforces (no overlapping placements, a GPU instance
//! with compute instances cannot be destroyed, one full compute instance per GPU instance) and records
//! every mutating call.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use crate::backend::{ComputeInstance, GpuInstance, Holder, MigBackend, MigDevice, MigMode};
use crate::error::{MigError, NvmlCode};
use crate::profile::{CiProfile, GiProfile, NameSource, Placement};

#[derive(Debug, Default)]
pub struct State {
    pub supported: bool,
    pub mode: MigMode,
    /// enabling MIG mode leaves it pending (a driver that needs a GPU reset)
    pub enable_needs_reset: bool,
    /// gi id -> (profile id, placement, ci ids)
    pub gis: BTreeMap<u32, (u32, Placement, Vec<u32>)>,
    pub next_gi: u32,
    pub next_ci: u32,
    pub processes: Vec<Holder>,
    /// destroying a compute instance of these GPU instances answers NVML_ERROR_IN_USE
    pub busy_gis: BTreeSet<u32>,
    /// destroying these GPU instances fails with NVML_ERROR_UNKNOWN
    pub stuck_gis: BTreeSet<u32>,
    /// (operation, n): the n-th call (1-based) of that operation fails with NVML_ERROR_UNKNOWN
    pub fail_at: Option<(&'static str, usize)>,
    pub calls: BTreeMap<&'static str, usize>,
    /// mutating calls in order: "destroy_ci 1/1", "create_gi 19@0:1", ...
    pub log: Vec<String>,
    /// mig_devices() leaves these GPU instances' devices out
    pub hidden_devices: BTreeSet<u32>,
}

#[derive(Debug)]
pub struct FakeGpu {
    pub state: RefCell<State>,
}

fn gi(index: u32, id: u32, name: &str, slices: u32, count: u32, mem: u64) -> GiProfile {
    GiProfile {
        index,
        id,
        name: name.to_owned(),
        name_source: NameSource::Nvml,
        slices,
        instance_count: count,
        multiprocessors: slices * 14,
        memory_mib: mem,
    }
}

/// The A100-SXM4-80GB's GPU instance profiles (index, id, name, slices, instances, MiB).
pub fn a100_profiles() -> Vec<GiProfile> {
    vec![
        gi(0, 19, "1g.10gb", 1, 7, 9856),
        gi(1, 14, "2g.20gb", 2, 3, 19968),
        gi(2, 9, "3g.40gb", 3, 2, 40192),
        gi(3, 5, "4g.40gb", 4, 1, 40192),
        gi(4, 0, "7g.80gb", 7, 1, 80384),
        gi(7, 20, "1g.10gb+me", 1, 1, 9856),
        gi(9, 15, "1g.20gb", 1, 4, 19968),
    ]
}

fn placements_of(profile_id: u32) -> Vec<Placement> {
    let p = |start, size| Placement { start, size };
    match profile_id {
        19 | 20 => (0..7).map(|s| p(s, 1)).collect(),
        15 => vec![p(0, 2), p(2, 2), p(4, 2), p(6, 2)],
        14 => vec![p(0, 2), p(2, 2), p(4, 2)],
        9 => vec![p(0, 4), p(4, 4)],
        5 => vec![p(0, 4)],
        0 => vec![p(0, 8)],
        _ => vec![],
    }
}

const GPU: &str = "GPU-fake";

impl FakeGpu {
    /// An A100 80GB with MIG enabled and no instances.
    pub fn a100() -> Self {
        FakeGpu {
            state: RefCell::new(State {
                supported: true,
                mode: MigMode {
                    current: true,
                    pending: true,
                },
                next_gi: 1,
                next_ci: 0,
                ..State::default()
            }),
        }
    }

    fn nvml(function: &'static str, code: NvmlCode) -> MigError {
        MigError::Nvml {
            gpu: GPU.to_owned(),
            function,
            profile: None,
            code,
        }
    }

    /// Counts the call and fails it if `fail_at` says so.
    fn enter(&self, op: &'static str, function: &'static str) -> Result<(), MigError> {
        let mut s = self.state.borrow_mut();
        let n = {
            let c = s.calls.entry(op).or_default();
            *c += 1;
            *c
        };
        if s.fail_at == Some((op, n)) {
            return Err(Self::nvml(function, NvmlCode::UNKNOWN));
        }
        Ok(())
    }

    pub fn log(&self) -> Vec<String> {
        self.state.borrow().log.clone()
    }

    pub fn gi_count(&self) -> usize {
        self.state.borrow().gis.len()
    }

    fn profile(id: u32) -> Option<GiProfile> {
        a100_profiles().into_iter().find(|p| p.id == id)
    }
}

impl MigBackend for FakeGpu {
    fn gpu(&self) -> &str {
        GPU
    }

    fn mig_mode(&self) -> Result<MigMode, MigError> {
        self.enter("mig_mode", "nvmlDeviceGetMigMode")?;
        let s = self.state.borrow();
        if !s.supported {
            return Err(MigError::NotSupported {
                gpu: GPU.to_owned(),
                function: "nvmlDeviceGetMigMode",
            });
        }
        Ok(s.mode)
    }

    fn set_mig_mode(&self, enabled: bool) -> Result<(), MigError> {
        self.enter("set_mig_mode", "nvmlDeviceSetMigMode")?;
        let mut s = self.state.borrow_mut();
        s.log.push(format!("set_mig_mode {enabled}"));
        s.mode.pending = enabled;
        if !s.enable_needs_reset {
            s.mode.current = enabled;
        }
        Ok(())
    }

    fn gi_profiles(&self) -> Result<Vec<GiProfile>, MigError> {
        self.enter("gi_profiles", "nvmlDeviceGetGpuInstanceProfileInfoV")?;
        Ok(a100_profiles())
    }

    fn gi_placements(&self, profile: &GiProfile) -> Result<Vec<Placement>, MigError> {
        self.enter(
            "gi_placements",
            "nvmlDeviceGetGpuInstancePossiblePlacements_v2",
        )?;
        Ok(placements_of(profile.id))
    }

    fn gi_remaining_capacity(&self, profile: &GiProfile) -> Result<u32, MigError> {
        self.enter(
            "gi_remaining_capacity",
            "nvmlDeviceGetGpuInstanceRemainingCapacity",
        )?;
        let s = self.state.borrow();
        let taken: Vec<Placement> = s.gis.values().map(|(_, p, _)| *p).collect();
        Ok(placements_of(profile.id)
            .iter()
            .filter(|p| taken.iter().all(|t| !t.overlaps(**p)))
            .count() as u32)
    }

    fn gpu_instances(&self, profile: &GiProfile) -> Result<Vec<GpuInstance>, MigError> {
        self.enter("gpu_instances", "nvmlDeviceGetGpuInstances")?;
        let s = self.state.borrow();
        Ok(s.gis
            .iter()
            .filter(|(_, (pid, _, _))| *pid == profile.id)
            .map(|(&id, &(profile_id, placement, _))| GpuInstance {
                id,
                profile_id,
                placement,
            })
            .collect())
    }

    fn create_gpu_instance(
        &self,
        profile: &GiProfile,
        placement: Placement,
    ) -> Result<GpuInstance, MigError> {
        let function = "nvmlDeviceCreateGpuInstanceWithPlacement";
        self.enter("create_gi", function)?;
        let mut s = self.state.borrow_mut();
        if !s.mode.current {
            return Err(Self::nvml(function, NvmlCode::NOT_SUPPORTED));
        }
        if !placements_of(profile.id).contains(&placement) {
            return Err(Self::nvml(function, NvmlCode::INVALID_ARGUMENT));
        }
        if s.gis.values().any(|(_, p, _)| p.overlaps(placement)) {
            return Err(Self::nvml(function, NvmlCode::INSUFFICIENT_RESOURCES));
        }
        let id = s.next_gi;
        s.next_gi += 1;
        s.gis.insert(id, (profile.id, placement, Vec::new()));
        s.log
            .push(format!("create_gi {}@{placement} -> {id}", profile.id));
        Ok(GpuInstance {
            id,
            profile_id: profile.id,
            placement,
        })
    }

    fn destroy_gpu_instance(&self, gi: u32) -> Result<(), MigError> {
        let function = "nvmlGpuInstanceDestroy";
        self.enter("destroy_gi", function)?;
        let mut s = self.state.borrow_mut();
        if s.stuck_gis.contains(&gi) {
            return Err(Self::nvml(function, NvmlCode::UNKNOWN));
        }
        match s.gis.get(&gi) {
            None => return Err(Self::nvml(function, NvmlCode::NOT_FOUND)),
            Some((_, _, cis)) if !cis.is_empty() => {
                return Err(MigError::InUse {
                    gpu: GPU.to_owned(),
                    detail: format!("{function} returned NVML_ERROR_IN_USE"),
                    pids: Vec::new(),
                });
            }
            Some(_) => {}
        }
        s.gis.remove(&gi);
        s.log.push(format!("destroy_gi {gi}"));
        Ok(())
    }

    fn ci_profiles(&self, gi: u32) -> Result<Vec<CiProfile>, MigError> {
        self.enter(
            "ci_profiles",
            "nvmlGpuInstanceGetComputeInstanceProfileInfoV",
        )?;
        let s = self.state.borrow();
        let Some(&(profile_id, _, _)) = s.gis.get(&gi) else {
            return Err(Self::nvml(
                "nvmlDeviceGetGpuInstanceById",
                NvmlCode::NOT_FOUND,
            ));
        };
        let slices = Self::profile(profile_id).map(|p| p.slices).unwrap_or(0);
        Ok([1u32, 2, 3, 4, 7]
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c <= slices)
            .map(|(index, &c)| CiProfile {
                index: index as u32,
                id: index as u32,
                name: String::new(),
                slices: c,
                instance_count: slices / c,
                multiprocessors: c * 14,
            })
            .collect())
    }

    fn compute_instances(
        &self,
        gi: u32,
        profile: &CiProfile,
    ) -> Result<Vec<ComputeInstance>, MigError> {
        self.enter("compute_instances", "nvmlGpuInstanceGetComputeInstances")?;
        let s = self.state.borrow();
        let Some((gi_profile, _, cis)) = s.gis.get(&gi) else {
            return Err(Self::nvml(
                "nvmlDeviceGetGpuInstanceById",
                NvmlCode::NOT_FOUND,
            ));
        };
        let full = Self::profile(*gi_profile).map(|p| p.slices).unwrap_or(0);
        // every CI of this fake is the full one
        if profile.slices != full {
            return Ok(Vec::new());
        }
        Ok(cis
            .iter()
            .map(|&id| ComputeInstance {
                id,
                gi_id: gi,
                profile_id: profile.id,
                placement: Placement {
                    start: 0,
                    size: full,
                },
            })
            .collect())
    }

    fn create_compute_instance(
        &self,
        gi: u32,
        profile: &CiProfile,
    ) -> Result<ComputeInstance, MigError> {
        let function = "nvmlGpuInstanceCreateComputeInstance";
        self.enter("create_ci", function)?;
        let mut s = self.state.borrow_mut();
        let id = s.next_ci;
        let Some((_, _, cis)) = s.gis.get_mut(&gi) else {
            return Err(Self::nvml(
                "nvmlDeviceGetGpuInstanceById",
                NvmlCode::NOT_FOUND,
            ));
        };
        if !cis.is_empty() {
            return Err(Self::nvml(function, NvmlCode::INSUFFICIENT_RESOURCES));
        }
        cis.push(id);
        s.next_ci += 1;
        s.log.push(format!("create_ci {gi}/{id}"));
        Ok(ComputeInstance {
            id,
            gi_id: gi,
            profile_id: profile.id,
            placement: Placement {
                start: 0,
                size: profile.slices,
            },
        })
    }

    fn destroy_compute_instance(&self, gi: u32, ci: u32) -> Result<(), MigError> {
        let function = "nvmlComputeInstanceDestroy";
        self.enter("destroy_ci", function)?;
        let mut s = self.state.borrow_mut();
        if s.busy_gis.contains(&gi) {
            return Err(MigError::InUse {
                gpu: GPU.to_owned(),
                detail: format!("{function} returned NVML_ERROR_IN_USE"),
                pids: Vec::new(),
            });
        }
        let Some((_, _, cis)) = s.gis.get_mut(&gi) else {
            return Err(Self::nvml(function, NvmlCode::NOT_FOUND));
        };
        let before = cis.len();
        cis.retain(|&c| c != ci);
        if cis.len() == before {
            return Err(Self::nvml(function, NvmlCode::NOT_FOUND));
        }
        s.log.push(format!("destroy_ci {gi}/{ci}"));
        Ok(())
    }

    fn processes(&self) -> Result<Vec<Holder>, MigError> {
        self.enter("processes", "nvmlDeviceGetComputeRunningProcesses_v3")?;
        Ok(self.state.borrow().processes.clone())
    }

    fn mig_devices(&self) -> Result<Vec<MigDevice>, MigError> {
        self.enter("mig_devices", "nvmlDeviceGetMigDeviceHandleByIndex")?;
        let s = self.state.borrow();
        let mut out = Vec::new();
        for (&gi, (profile_id, _, cis)) in &s.gis {
            if s.hidden_devices.contains(&gi) {
                continue;
            }
            let mib = Self::profile(*profile_id)
                .map(|p| p.memory_mib)
                .unwrap_or(0);
            for &ci in cis {
                out.push(MigDevice {
                    index: out.len() as u32,
                    uuid: format!("MIG-fake-{gi}-{ci}"),
                    gi_id: gi,
                    ci_id: ci,
                    memory_bytes: mib * 1024 * 1024,
                });
            }
        }
        Ok(out)
    }
}
