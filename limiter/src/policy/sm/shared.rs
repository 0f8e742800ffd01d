//! What the SM cap's launch path and its watcher share: the caps in force, one gate per device,
//! and the shared region cached for launches (set by the decision in `launch.rs`).

use crate::infra::config::MAX_DEVICES;
use crate::infra::fork::ChildReset;
use crate::policy::caps;
use crate::policy::sm::config::Policy;
use crate::policy::sm::gate::Gate;
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use vgpu_region::Region;

/// Effective cap per container device index, percent; 0 = none.
pub(crate) static CAPS: [AtomicU8; MAX_DEVICES] = [const { AtomicU8::new(0) }; MAX_DEVICES];
/// One gate per container device index.
pub(crate) static GATES: [Gate; MAX_DEVICES] = [const { Gate::new() }; MAX_DEVICES];
/// The region (leaked by the budget, never freed), cached for the launch path; null = none.
static REGION: AtomicPtr<Region> = AtomicPtr::new(std::ptr::null_mut());

/// Fork child: the gates start over (registered by the first decision). Atomics only.
pub(crate) static GATES_RESET: ChildReset = ChildReset::new(|| {
    for g in &GATES {
        g.reset();
    }
});

/// Caches the region for the launch path and the watcher.
pub(crate) fn set_region(region: &'static Region) {
    REGION.store(std::ptr::from_ref(region).cast_mut(), Ordering::Release);
}

/// The region cached for the launch path, if any.
pub(crate) fn region() -> Option<&'static Region> {
    // SAFETY: non-null pointers are the budget's leaked region, never freed.
    unsafe { REGION.load(Ordering::Acquire).as_ref() }
}

/// Whether the policy caps at this moment.
pub(crate) fn capping_now(region: Option<&Region>) -> bool {
    match caps::policy() {
        Policy::Force => true,
        Policy::Disable => false,
        Policy::Default => region.is_none_or(|r| r.utilization_switch() != 0),
    }
}
