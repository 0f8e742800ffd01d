//! Layouts, [`apply_with`] and [`current_with`] over any [`MigBackend`].

use std::collections::BTreeMap;
use std::fmt;

use crate::backend::{GpuInstance, MigBackend};
use crate::error::{MigError, Rollback};
use crate::placement::{Request, plan};
use crate::profile::{CiProfile, GiProfile, Placement, normalize_name, resolve};

/// A MIG layout: GPU instance profile names in template order (`["3g.40gb", "3g.40gb"]`), one compute
/// instance filling each. Names are kept without NVML's `"MIG "` prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    profiles: Vec<String>,
}

impl Layout {
    /// A layout of these profile names, in template order.
    pub fn new<I, S>(profiles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            profiles: profiles
                .into_iter()
                .map(|p| normalize_name(p.as_ref()).to_owned())
                .collect(),
        }
    }

    /// The profile names, in order.
    pub fn profiles(&self) -> &[String] {
        &self.profiles
    }

    /// No instance at all.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// Same profiles the same number of times, whatever the order (ASCII case-insensitive): what a caller
    /// compares [`current`](crate::current) with before deciding to repartition.
    pub fn same_profiles(&self, other: &Layout) -> bool {
        let count = |l: &Layout| {
            let mut m = BTreeMap::<String, usize>::new();
            for p in &l.profiles {
                *m.entry(p.to_ascii_lowercase()).or_default() += 1;
            }
            m
        };
        count(self) == count(other)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.profiles.join(", "))
    }
}

/// One template position of an applied layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedInstance {
    /// position in the [`Layout`]
    pub position: usize,
    /// the profile name as the GPU reports it
    pub profile: String,
    /// its GPU instance profile id
    pub profile_id: u32,
    /// where the GPU instance sits
    pub placement: Placement,
    /// GPU instance id
    pub gi_id: u32,
    /// compute instance id
    pub ci_id: u32,
    /// the MIG device's UUID (`MIG-…`)
    pub uuid: String,
    /// the MIG device's memory in bytes
    pub memory_bytes: u64,
}

/// The result of [`apply`](crate::apply): per template position, the MIG device created for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLayout {
    /// the parent GPU
    pub gpu: String,
    /// in template order
    pub instances: Vec<AppliedInstance>,
}

impl AppliedLayout {
    /// The MIG UUIDs in template order.
    pub fn uuids(&self) -> Vec<&str> {
        self.instances.iter().map(|i| i.uuid.as_str()).collect()
    }

    /// The layout that was applied.
    pub fn layout(&self) -> Layout {
        Layout::new(self.instances.iter().map(|i| &i.profile))
    }
}

/// Every GPU instance, sorted by placement (start slice), with its profile.
fn all_gpu_instances<'p, B: MigBackend + ?Sized>(
    b: &B,
    profiles: &'p [GiProfile],
) -> Result<Vec<(GpuInstance, &'p GiProfile)>, MigError> {
    let mut all = Vec::new();
    for p in profiles {
        for gi in b.gpu_instances(p)? {
            all.push((gi, p));
        }
    }
    all.sort_by_key(|(gi, _)| (gi.placement.start, gi.id));
    Ok(all)
}

/// The GPU's layout: the profile of every GPU instance, in placement order. [`MigError::MigDisabled`] when
/// MIG mode is off (no layout at all, which is not the same as an empty one).
pub fn current_with<B: MigBackend + ?Sized>(b: &B) -> Result<Layout, MigError> {
    let mode = b.mig_mode()?;
    if !mode.current {
        return Err(MigError::MigDisabled {
            gpu: b.gpu().to_owned(),
        });
    }
    let profiles = b.gi_profiles()?;
    let all = all_gpu_instances(b, &profiles)?;
    Ok(Layout::new(all.iter().map(|(_, p)| &p.name)))
}

/// Destroys every compute instance, then every GPU instance. With `stop_at_first` the first failure is
/// returned at once (the normal clear); without, everything destroyable is destroyed and the failures
/// collected (the rollback). Returns how many instances were destroyed.
fn clear<B: MigBackend + ?Sized>(
    b: &B,
    profiles: &[GiProfile],
    stop_at_first: bool,
    errors: &mut Vec<MigError>,
) -> usize {
    let mut destroyed = 0;
    let gis = match all_gpu_instances(b, profiles) {
        Ok(gis) => gis,
        Err(e) => {
            errors.push(e);
            return destroyed;
        }
    };
    let mut busy_gis = Vec::new();
    for (gi, _) in &gis {
        let cis = b.ci_profiles(gi.id).and_then(|cps| {
            let mut cis = Vec::new();
            for cp in &cps {
                cis.extend(b.compute_instances(gi.id, cp)?);
            }
            Ok(cis)
        });
        let cis = match cis {
            Ok(cis) => cis,
            Err(e) => {
                errors.push(e);
                busy_gis.push(gi.id);
                if stop_at_first {
                    return destroyed;
                }
                continue;
            }
        };
        for ci in cis {
            match b.destroy_compute_instance(gi.id, ci.id) {
                Ok(()) => destroyed += 1,
                Err(e) => {
                    errors.push(e);
                    busy_gis.push(gi.id);
                    if stop_at_first {
                        return destroyed;
                    }
                }
            }
        }
    }
    for (gi, _) in &gis {
        if busy_gis.contains(&gi.id) {
            continue; // its compute instances are still there: destroying it would fail the same way
        }
        match b.destroy_gpu_instance(gi.id) {
            Ok(()) => destroyed += 1,
            Err(e) => {
                errors.push(e);
                if stop_at_first {
                    return destroyed;
                }
            }
        }
    }
    destroyed
}

/// Clears the GPU after a failure and says how far it got.
fn roll_back<B: MigBackend + ?Sized>(b: &B, profiles: &[GiProfile]) -> Rollback {
    let mut errors = Vec::new();
    clear(b, profiles, false, &mut errors);
    match all_gpu_instances(b, profiles) {
        Ok(left) if left.is_empty() && errors.is_empty() => Rollback::Clean,
        Ok(left) => Rollback::Incomplete {
            remaining: left.iter().map(|(gi, _)| gi.id).collect(),
            errors,
        },
        Err(e) => {
            errors.push(e);
            Rollback::Incomplete {
                remaining: Vec::new(),
                errors,
            }
        }
    }
}

/// The compute instance profile that uses all of a GPU instance's slices (e.g. `3c.3g.40gb` in a
/// `3g.40gb`): the first in profile-index order with as many slices as the GPU instance.
fn full_ci_profile(profiles: &[CiProfile], gi_slices: u32) -> Option<&CiProfile> {
    profiles.iter().find(|c| c.slices == gi_slices)
}

/// Makes the GPU's MIG layout `layout`, see [`apply`](crate::apply).
pub fn apply_with<B: MigBackend + ?Sized>(
    b: &B,
    layout: &Layout,
) -> Result<AppliedLayout, MigError> {
    let gpu = b.gpu().to_owned();

    // 1. MIG mode: refuse a GPU without MIG, or one waiting for a reset.
    let mode = b.mig_mode()?;
    if mode.current != mode.pending {
        return Err(MigError::ResetPending {
            gpu,
            current: mode.current,
            pending: mode.pending,
        });
    }

    // 2. Nothing may run on the GPU or its MIG devices: a process list per device is one cheap query each,
    // and it refuses before anything changes, where NVML's own NVML_ERROR_IN_USE only comes from the
    // destroy call (after other instances may already be gone) or from the mode switch.
    let holders = b.processes()?;
    if !holders.is_empty() {
        let detail = holders
            .iter()
            .map(|h| format!("pid {} on {}", h.pid, h.device))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MigError::InUse {
            gpu,
            detail,
            pids: holders.iter().map(|h| h.pid).collect(),
        });
    }

    // 3. MIG mode on, if it is off. A driver that needs a reset for it leaves it pending: say so. This comes
    // before the profile queries because NVML documents NVML_ERROR_NOT_SUPPORTED for them while MIG mode
    // is off; an enabled GPU without instances is the empty layout, which is also what a rollback leaves.
    if !mode.current {
        b.set_mig_mode(true)?;
        let after = b.mig_mode()?;
        if !after.current {
            return Err(MigError::ResetPending {
                gpu,
                current: after.current,
                pending: after.pending,
            });
        }
    }

    // 4. The profiles and the placements, all on paper: an unknown name or a layout that does not fit is
    // refused before any instance is touched.
    let profiles = b.gi_profiles()?;
    let mut wanted: Vec<&GiProfile> = Vec::with_capacity(layout.profiles().len());
    for name in layout.profiles() {
        match resolve(&profiles, name) {
            Some(p) => wanted.push(p),
            None => {
                return Err(MigError::UnknownProfile {
                    gpu,
                    profile: name.clone(),
                    available: profiles.iter().map(|p| p.name.clone()).collect(),
                });
            }
        }
    }
    let mut table: BTreeMap<u32, Vec<Placement>> = BTreeMap::new();
    for p in &wanted {
        if let std::collections::btree_map::Entry::Vacant(e) = table.entry(p.id) {
            e.insert(b.gi_placements(p)?);
        }
    }
    let requests: Vec<Request<'_>> = wanted
        .iter()
        .map(|p| Request {
            slices: p.slices,
            placements: table.get(&p.id).map(Vec::as_slice).unwrap_or(&[]),
        })
        .collect();
    let Some(placements) = plan(&requests) else {
        let listed = wanted
            .iter()
            .map(|p| {
                let ps = table.get(&p.id).map(Vec::as_slice).unwrap_or(&[]);
                let ps: Vec<String> = ps.iter().map(ToString::to_string).collect();
                format!("{} at {{{}}}", p.name, ps.join(" "))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MigError::Impossible {
            gpu,
            layout: layout.to_string(),
            reason: format!("no non-overlapping choice among the possible placements ({listed})"),
        });
    };

    // 5. Destroy the existing compute instances, then GPU instances. If the very first destroy is refused
    // (a process appeared since step 2), nothing changed: say so. Past that, roll back to empty.
    let mut errors = Vec::new();
    let destroyed = clear(b, &profiles, true, &mut errors);
    if let Some(cause) = errors.pop() {
        if destroyed == 0 {
            return Err(cause);
        }
        let rollback = Box::new(roll_back(b, &profiles));
        return Err(MigError::Aborted {
            gpu,
            layout: layout.to_string(),
            step: "destroying the existing instances".to_owned(),
            cause: Box::new(cause),
            rollback,
        });
    }

    // 6. Create, in template order, each GPU instance at its placement and one compute instance filling it.
    let abort = |step: String, cause: MigError| MigError::Aborted {
        gpu: gpu.clone(),
        layout: layout.to_string(),
        step,
        cause: Box::new(cause),
        rollback: Box::new(roll_back(b, &profiles)),
    };
    let mut created = Vec::with_capacity(wanted.len());
    for (position, (profile, placement)) in wanted.iter().zip(&placements).enumerate() {
        let step = || {
            format!(
                "creating position {position} ({} at {placement})",
                profile.name
            )
        };
        let gi = match b.create_gpu_instance(profile, *placement) {
            Ok(gi) => gi,
            Err(e) => return Err(abort(step(), e)),
        };
        let ci_profiles = match b.ci_profiles(gi.id) {
            Ok(c) => c,
            Err(e) => return Err(abort(step(), e)),
        };
        let Some(ci_profile) = full_ci_profile(&ci_profiles, profile.slices) else {
            let e = MigError::NoFullComputeProfile {
                gpu: gpu.clone(),
                gi: gi.id,
                profile: Some(profile.name.clone()),
            };
            return Err(abort(step(), e));
        };
        let ci = match b.create_compute_instance(gi.id, ci_profile) {
            Ok(ci) => ci,
            Err(e) => return Err(abort(step(), e)),
        };
        created.push((position, *profile, gi, ci));
    }

    // 7. Map each (GPU instance, compute instance) to its MIG device.
    let devices = match b.mig_devices() {
        Ok(d) => d,
        Err(e) => return Err(abort("listing the MIG devices".to_owned(), e)),
    };
    let mut instances = Vec::with_capacity(created.len());
    for (position, profile, gi, ci) in created {
        let Some(dev) = devices
            .iter()
            .find(|d| d.gi_id == gi.id && d.ci_id == ci.id)
        else {
            let e = MigError::MissingMigDevice {
                gpu: gpu.clone(),
                gi: gi.id,
                ci: ci.id,
                profile: Some(profile.name.clone()),
            };
            return Err(abort("listing the MIG devices".to_owned(), e));
        };
        instances.push(AppliedInstance {
            position,
            profile: profile.name.clone(),
            profile_id: profile.id,
            placement: gi.placement,
            gi_id: gi.id,
            ci_id: ci.id,
            uuid: dev.uuid.clone(),
            memory_bytes: dev.memory_bytes,
        });
    }
    Ok(AppliedLayout { gpu, instances })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_normalizes_and_compares_as_a_multiset() {
        let a = Layout::new(["MIG 3g.40gb", "1g.10gb", "1g.10gb"]);
        assert_eq!(a.profiles(), ["3g.40gb", "1g.10gb", "1g.10gb"]);
        assert!(a.same_profiles(&Layout::new(["1g.10gb", "3G.40GB", "1g.10gb"])));
        assert!(!a.same_profiles(&Layout::new(["1g.10gb", "3g.40gb"])));
        assert_eq!(a.to_string(), "3g.40gb, 1g.10gb, 1g.10gb");
        assert!(Layout::default().is_empty());
    }
}

/// `apply` and `current` driven through the fake backend: ordering, refusals and rollback.
#[cfg(test)]
mod apply_tests {
    use super::*;
    use crate::backend::{Holder, MigMode};
    use crate::error::NvmlCode;
    use crate::fake::FakeGpu;

    fn seven_small() -> Layout {
        Layout::new(["1g.10gb"; 7])
    }

    fn assert_empty(gpu: &FakeGpu) {
        assert_eq!(gpu.gi_count(), 0, "GPU not empty: {:?}", gpu.log());
        assert_eq!(current_with(gpu).expect("current"), Layout::default());
    }

    #[test]
    fn applies_seven_small_instances_and_reports_each_position() {
        let gpu = FakeGpu::a100();
        let applied = apply_with(&gpu, &seven_small()).expect("apply");
        assert_eq!(applied.instances.len(), 7);
        for (i, inst) in applied.instances.iter().enumerate() {
            assert_eq!(inst.position, i);
            assert_eq!(inst.profile, "1g.10gb");
            assert_eq!(inst.profile_id, 19);
            assert_eq!(
                inst.placement,
                Placement {
                    start: i as u32,
                    size: 1
                }
            );
            assert_eq!(inst.uuid, format!("MIG-fake-{}-{}", inst.gi_id, inst.ci_id));
            assert_eq!(inst.memory_bytes, 9856 * 1024 * 1024);
        }
        let mut uuids = applied.uuids();
        uuids.dedup();
        assert_eq!(uuids.len(), 7);
        assert_eq!(applied.layout(), seven_small());
        assert_eq!(current_with(&gpu).expect("current"), seven_small());
    }

    #[test]
    fn repartitioning_destroys_every_compute_instance_before_any_gpu_instance() {
        let gpu = FakeGpu::a100();
        apply_with(&gpu, &seven_small()).expect("first apply");
        let before = gpu.log().len();
        let two = Layout::new(["3g.40gb", "3g.40gb"]);
        let applied = apply_with(&gpu, &two).expect("second apply");
        let log = gpu.log()[before..].to_vec();
        let first_gi_destroy = log
            .iter()
            .position(|l| l.starts_with("destroy_gi"))
            .expect("GIs destroyed");
        let last_ci_destroy = log
            .iter()
            .rposition(|l| l.starts_with("destroy_ci"))
            .expect("CIs destroyed");
        assert_eq!(
            log.iter().filter(|l| l.starts_with("destroy_ci")).count(),
            7
        );
        assert_eq!(
            log.iter().filter(|l| l.starts_with("destroy_gi")).count(),
            7
        );
        assert!(last_ci_destroy < first_gi_destroy, "{log:?}");
        assert_eq!(
            applied
                .instances
                .iter()
                .map(|i| i.placement)
                .collect::<Vec<_>>(),
            [
                Placement { start: 0, size: 4 },
                Placement { start: 4, size: 4 }
            ]
        );
        assert_eq!(current_with(&gpu).expect("current"), two);
    }

    #[test]
    fn processes_refuse_before_anything_changes() {
        let gpu = FakeGpu::a100();
        apply_with(&gpu, &seven_small()).expect("apply");
        let before = gpu.log();
        gpu.state.borrow_mut().processes = vec![Holder {
            device: "MIG-fake-3-2".to_owned(),
            pid: 4242,
        }];
        let err = apply_with(&gpu, &Layout::new(["7g.80gb"])).expect_err("in use");
        match &err {
            MigError::InUse { pids, detail, .. } => {
                assert_eq!(pids, &[4242]);
                assert!(detail.contains("MIG-fake-3-2"), "{detail}");
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        assert!(err.is_in_use());
        assert_eq!(gpu.log(), before);
    }

    #[test]
    fn unknown_profile_and_impossible_layout_change_nothing() {
        let gpu = FakeGpu::a100();
        apply_with(&gpu, &seven_small()).expect("apply");
        let before = gpu.log();
        match apply_with(&gpu, &Layout::new(["3g.40gb", "5g.50gb"])) {
            Err(MigError::UnknownProfile {
                profile, available, ..
            }) => {
                assert_eq!(profile, "5g.50gb");
                assert!(available.contains(&"3g.40gb".to_owned()));
            }
            other => panic!("expected UnknownProfile, got {other:?}"),
        }
        match apply_with(&gpu, &Layout::new(["3g.40gb", "3g.40gb", "1g.10gb"])) {
            Err(MigError::Impossible { layout, reason, .. }) => {
                assert_eq!(layout, "3g.40gb, 3g.40gb, 1g.10gb");
                assert!(reason.contains("3g.40gb at {0:4 4:4}"), "{reason}");
            }
            other => panic!("expected Impossible, got {other:?}"),
        }
        assert_eq!(gpu.log(), before);
        assert_eq!(current_with(&gpu).expect("current"), seven_small());
    }

    #[test]
    fn mig_mode_is_enabled_when_off() {
        let gpu = FakeGpu::a100();
        gpu.state.borrow_mut().mode = MigMode::default();
        assert!(matches!(
            current_with(&gpu),
            Err(MigError::MigDisabled { .. })
        ));
        let applied = apply_with(&gpu, &Layout::new(["7g.80gb"])).expect("apply");
        assert_eq!(
            applied.instances[0].placement,
            Placement { start: 0, size: 8 }
        );
        assert_eq!(gpu.log()[0], "set_mig_mode true");
    }

    #[test]
    fn a_mode_switch_waiting_for_a_reset_is_reported_not_hidden() {
        let gpu = FakeGpu::a100();
        {
            let mut s = gpu.state.borrow_mut();
            s.mode = MigMode::default();
            s.enable_needs_reset = true;
        }
        match apply_with(&gpu, &seven_small()) {
            Err(MigError::ResetPending {
                current, pending, ..
            }) => assert!(!current && pending),
            other => panic!("expected ResetPending, got {other:?}"),
        }
        assert_eq!(gpu.log(), ["set_mig_mode true"]);
        // and asked again before the reset: refused up front, no second switch
        assert!(matches!(
            apply_with(&gpu, &seven_small()),
            Err(MigError::ResetPending { .. })
        ));
        assert_eq!(gpu.log(), ["set_mig_mode true"]);
    }

    #[test]
    fn not_supported_gpu() {
        let gpu = FakeGpu::a100();
        gpu.state.borrow_mut().supported = false;
        assert!(matches!(
            apply_with(&gpu, &seven_small()),
            Err(MigError::NotSupported { .. })
        ));
        assert!(matches!(
            current_with(&gpu),
            Err(MigError::NotSupported { .. })
        ));
    }

    #[test]
    fn a_failure_midway_rolls_back_to_an_empty_layout() {
        let gpu = FakeGpu::a100();
        apply_with(&gpu, &seven_small()).expect("apply");
        // the 7 first creations are the first apply's; fail the third of the next one
        gpu.state.borrow_mut().fail_at = Some(("create_gi", 10));
        let err = apply_with(&gpu, &Layout::new(["2g.20gb"; 3])).expect_err("fails");
        match &err {
            MigError::Aborted {
                step,
                cause,
                rollback,
                ..
            } => {
                assert!(step.contains("position 2 (2g.20gb at 4:2)"), "{step}");
                assert_eq!(cause.nvml_code(), Some(NvmlCode::UNKNOWN), "{cause:?}");
                assert!(matches!(**rollback, Rollback::Clean), "{rollback:?}");
            }
            other => panic!("expected Aborted, got {other:?}"),
        }
        assert!(
            err.to_string().contains("rolled back to an empty layout"),
            "{err}"
        );
        assert_empty(&gpu);
    }

    #[test]
    fn a_failed_compute_instance_rolls_back_its_gpu_instance_too() {
        let gpu = FakeGpu::a100();
        gpu.state.borrow_mut().fail_at = Some(("create_ci", 1));
        let err = apply_with(&gpu, &Layout::new(["4g.40gb", "3g.40gb"])).expect_err("fails");
        assert!(matches!(err.rollback(), Some(Rollback::Clean)), "{err:?}");
        assert_empty(&gpu);
    }

    #[test]
    fn a_rollback_that_cannot_finish_says_what_is_left() {
        let gpu = FakeGpu::a100();
        {
            let mut s = gpu.state.borrow_mut();
            // GI ids start at 1: the first created GI cannot be destroyed, the second's CI fails
            s.stuck_gis.insert(1);
            s.fail_at = Some(("create_ci", 2));
        }
        let err = apply_with(&gpu, &Layout::new(["3g.40gb", "3g.40gb"])).expect_err("fails");
        match err.rollback() {
            Some(Rollback::Incomplete { remaining, errors }) => {
                assert_eq!(remaining, &[1]);
                assert_eq!(errors.len(), 1);
                assert_eq!(errors[0].nvml_code(), Some(NvmlCode::UNKNOWN));
            }
            other => panic!("expected an incomplete rollback, got {other:?}"),
        }
        assert!(err.to_string().contains("rollback INCOMPLETE"), "{err}");
    }

    #[test]
    fn in_use_at_the_first_destroy_changes_nothing() {
        let gpu = FakeGpu::a100();
        apply_with(&gpu, &Layout::new(["3g.40gb", "3g.40gb"])).expect("apply");
        let before = gpu.log();
        // a process the process lists did not show: NVML refuses the destroy itself
        gpu.state.borrow_mut().busy_gis.insert(1);
        let err = apply_with(&gpu, &seven_small()).expect_err("in use");
        assert!(matches!(err, MigError::InUse { .. }), "{err:?}");
        assert_eq!(gpu.log(), before);
        assert_eq!(gpu.gi_count(), 2);
    }

    #[test]
    fn in_use_after_some_destroys_rolls_back_what_it_can() {
        let gpu = FakeGpu::a100();
        apply_with(&gpu, &Layout::new(["3g.40gb", "3g.40gb"])).expect("apply");
        gpu.state.borrow_mut().busy_gis.insert(2);
        let err = apply_with(&gpu, &seven_small()).expect_err("in use");
        match err.rollback() {
            Some(Rollback::Incomplete { remaining, .. }) => {
                assert_eq!(remaining, &[2]);
            }
            other => panic!("expected Aborted with GI 2 left, got {other:?}"),
        }
        assert!(err.is_in_use());
        assert_eq!(gpu.gi_count(), 1);
    }

    #[test]
    fn a_compute_instance_without_a_mig_device_is_a_failure_not_a_silent_gap() {
        let gpu = FakeGpu::a100();
        gpu.state.borrow_mut().hidden_devices.insert(2);
        let err = apply_with(&gpu, &Layout::new(["3g.40gb", "3g.40gb"])).expect_err("fails");
        match &err {
            MigError::Aborted {
                cause, rollback, ..
            } => {
                assert!(
                    matches!(**cause, MigError::MissingMigDevice { gi: 2, .. }),
                    "{cause:?}"
                );
                assert!(matches!(**rollback, Rollback::Clean));
            }
            other => panic!("expected Aborted, got {other:?}"),
        }
        assert_empty(&gpu);
    }

    #[test]
    fn an_empty_layout_clears_the_gpu() {
        let gpu = FakeGpu::a100();
        apply_with(&gpu, &seven_small()).expect("apply");
        let applied = apply_with(&gpu, &Layout::default()).expect("clear");
        assert!(applied.instances.is_empty());
        assert_empty(&gpu);
    }

    #[test]
    fn remaining_capacity_follows_occupied_slices() {
        let gpu = FakeGpu::a100();
        let profiles = gpu.gi_profiles().expect("profiles");
        let three = resolve(&profiles, "3g.40gb").expect("3g");
        assert_eq!(gpu.gi_remaining_capacity(three).expect("capacity"), 2);
        apply_with(&gpu, &Layout::new(["4g.40gb"])).expect("apply");
        assert_eq!(gpu.gi_remaining_capacity(three).expect("capacity"), 1);
    }
}
