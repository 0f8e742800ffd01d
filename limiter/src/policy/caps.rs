//! The environment's caps, read once and tightened by the device map (`policy/devices.rs`): the
//! memory caps (`CUDA_DEVICE_MEMORY_LIMIT[_<i>]`, installed by `policy/state.rs`'s
//! initialisation) and the SM settings (`CUDA_DEVICE_SM_LIMIT[_<i>]`,
//! `GPU_CORE_UTILIZATION_POLICY`, `CUDA_TASK_PRIORITY`, read on first use). What is *in force*
//! also depends on the shared region: the budget combines the memory caps with the file's, the SM
//! cap's decision the stricter of these and the file's `sm_limit` (`policy/budget.rs`, `policy/sm/launch.rs`).
//!
//! Below the budget, the device map and the SM cap, so each of them can read and the device map
//! can tighten these without any of them reaching into another.

use crate::infra::config::{Limit, MAX_DEVICES, getenv};
use crate::infra::log::{ERROR, log_at};
use crate::infra::sync::InitOnce;
use crate::policy::sm::config::{self, Policy};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, Ordering};
use vgpu_region::RegionConfig;

/// A memory cap slot holding no cap.
pub(crate) const UNLIMITED: u64 = u64::MAX;

/// The environment's memory caps (`UNLIMITED` = none).
static MEMORY: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(UNLIMITED) }; MAX_DEVICES];
/// Whether the environment capped any device's memory (decides whether the region is opened).
static MEMORY_CAPPED: AtomicBool = AtomicBool::new(false);

/// Installs the environment's memory caps (once, during initialisation).
pub(crate) fn set_memory(limits: &[Limit; MAX_DEVICES]) {
    let mut any = false;
    for (slot, limit) in MEMORY.iter().zip(limits) {
        let v = match *limit {
            Limit::Unlimited => UNLIMITED,
            Limit::Bytes(b) => {
                any = true;
                b.min(UNLIMITED - 1)
            }
        };
        slot.store(v, Ordering::Release);
    }
    MEMORY_CAPPED.store(any, Ordering::Release);
}

/// Lowers device `dev`'s memory cap to at most `bytes`, never raising it (a per-device variable
/// that names a device the container does not have applies to every device).
pub(crate) fn tighten_memory(dev: usize, bytes: u64) {
    if let Some(slot) = MEMORY.get(dev) {
        slot.fetch_min(bytes.min(UNLIMITED - 1), Ordering::AcqRel);
    }
}

/// The environment's memory cap of `dev` ([`UNLIMITED`] = none); `None` beyond the devices HAMi
/// supports.
#[inline]
pub(crate) fn memory(dev: usize) -> Option<u64> {
    Some(MEMORY.get(dev)?.load(Ordering::Acquire))
}

/// Whether the environment caps any device's memory.
#[inline]
pub(crate) fn memory_capped() -> bool {
    MEMORY_CAPPED.load(Ordering::Acquire)
}

/// The memory caps as a new region records them (0 = none).
pub(crate) fn memory_for_region(cfg: &mut RegionConfig) {
    for (dst, src) in cfg.limits.iter_mut().zip(&MEMORY) {
        let v = src.load(Ordering::Acquire);
        *dst = if v == UNLIMITED { 0 } else { v };
    }
}

/// The environment's SM settings, read once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SmEnv {
    pub(crate) caps: [Option<u8>; MAX_DEVICES],
    pub(crate) policy: Policy,
    pub(crate) priority: i32,
}

static ENV_STATE: InitOnce = InitOnce::new();
static ENV_CAPS: [AtomicU8; MAX_DEVICES] = [const { AtomicU8::new(0) }; MAX_DEVICES];
static ENV_PRIORITY: AtomicI32 = AtomicI32::new(1);
static ENV_ANY_CAP: AtomicBool = AtomicBool::new(false);
static POLICY: AtomicU8 = AtomicU8::new(0);

/// The SM settings (read on first use; reports malformed values once).
pub(crate) fn sm() -> SmEnv {
    if !ENV_STATE.is_done() {
        read_env();
    }
    SmEnv {
        caps: std::array::from_fn(|d| match ENV_CAPS[d].load(Ordering::Relaxed) {
            0 => None,
            c => Some(c),
        }),
        policy: policy_of(POLICY.load(Ordering::Relaxed)),
        priority: ENV_PRIORITY.load(Ordering::Relaxed),
    }
}

#[cold]
fn read_env() {
    // Reading the environment calls no hook, so re-entry cannot happen here; a fork child whose
    // parent was half-way through reads it again (see `crate::infra::sync`).
    let Ok(claim) = ENV_STATE.claim() else {
        return;
    };
    let caps = config::sm_limits_from(getenv, |name, value, err| {
        log_at!(
            ERROR,
            "{name}={:?} is not an SM limit ({}); expected a whole percentage 0-100, e.g. 30 \
             (0 or 100 = no cap). Capping the affected devices at {}%.",
            String::from_utf8_lossy(value),
            err.describe(),
            config::FAIL_CLOSED_PERCENT
        );
    });
    for (slot, cap) in ENV_CAPS.iter().zip(caps) {
        slot.store(cap.unwrap_or(0), Ordering::Relaxed);
    }
    ENV_ANY_CAP.store(caps.iter().any(Option::is_some), Ordering::Relaxed);
    let policy = config::policy_from(getenv(c"GPU_CORE_UTILIZATION_POLICY"));
    POLICY.store(policy as u8, Ordering::Relaxed);
    ENV_PRIORITY.store(
        config::priority_from(getenv(c"CUDA_TASK_PRIORITY")),
        Ordering::Relaxed,
    );
    claim.finish();
}

fn policy_of(v: u8) -> Policy {
    match v {
        x if x == Policy::Force as u8 => Policy::Force,
        x if x == Policy::Disable as u8 => Policy::Disable,
        _ => Policy::Default,
    }
}

/// Lowers the environment's SM cap of container device `dev` to at most `percent` (a per-device
/// variable naming a device the container does not have: see `policy/devices.rs`). Runs before the
/// SM cap's decision (`policy/sm/launch.rs`), which makes sure of that by computing the device map
/// first.
pub(crate) fn tighten_sm(dev: usize, percent: u8) {
    if !ENV_STATE.is_done() {
        read_env();
    }
    if let Some(slot) = ENV_CAPS.get(dev) {
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            Some(if c == 0 { percent } else { c.min(percent) })
        });
        ENV_ANY_CAP.store(true, Ordering::Release);
    }
}

/// Whether the environment caps any device's SM time (then the region is opened even without a
/// memory cap, as HAMi-core always has one).
pub(crate) fn sm_capped() -> bool {
    if !ENV_STATE.is_done() {
        read_env();
    }
    ENV_ANY_CAP.load(Ordering::Relaxed)
}

/// Fills the SM fields of the config a new region is created with: `sm_limit` (100 = uncapped,
/// HAMi-core's value for an unset limit) and `priority`.
pub(crate) fn sm_for_region(cfg: &mut RegionConfig) {
    let env = sm();
    for (dst, cap) in cfg.sm_limits.iter_mut().zip(env.caps) {
        *dst = cap.map_or(100, u64::from);
    }
    cfg.priority = env.priority;
}

/// The policy (`GPU_CORE_UTILIZATION_POLICY`) read from the environment.
#[inline]
pub(crate) fn policy() -> Policy {
    policy_of(POLICY.load(Ordering::Relaxed))
}
