//! GPU health: NVML critical-XID events mark a GPU `Unhealthy` on all three endpoints, a periodic probe
//! catches a GPU that stops answering without an event, and (unlike every peer) a GPU that has been quiet for
//! the recovery period and answers NVML again is `Healthy` once more.
//!
//! The monitor runs on its own OS thread because `nvmlEventSetWait` blocks; it publishes the health of every
//! GPU (inventory order) on a `watch` channel that the endpoints turn into `ListAndWatch` updates.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::HealthSettings;
use crate::gpu::inventory::Inventory;
use crate::gpu::mig::RepartitionHold;

/// XIDs that are the application's fault, not the GPU's (NVIDIA's device plugin ignores the same set).
pub const DEFAULT_IGNORED_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Which XIDs count as a GPU fault, from `DP_DISABLE_HEALTHCHECKS` and `DP_ENABLE_HEALTHCHECKS`.
///
/// `DP_DISABLE_HEALTHCHECKS` takes `all` (or `xids`) or a comma list of XIDs to ignore on top of the default
/// ones; `DP_ENABLE_HEALTHCHECKS` takes XIDs (or `all`) that count even when disabled. Unlike the Go plugin,
/// `DP_DISABLE_HEALTHCHECKS=all` with `DP_ENABLE_HEALTHCHECKS=79` watches XID 79 instead of nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XidPolicy {
    all_disabled: bool,
    all_enabled: bool,
    disabled: BTreeSet<u64>,
    enabled: BTreeSet<u64>,
}

impl XidPolicy {
    /// Builds the policy; entries that are not XIDs are returned as one warning each and otherwise ignored.
    pub fn from_env(disable: Option<&str>, enable: Option<&str>) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let mut parse = |var: &str, value: Option<&str>| {
            let mut all = false;
            let mut set = BTreeSet::new();
            for item in value.unwrap_or("").split(',') {
                let item = item.trim().to_ascii_lowercase();
                match item.as_str() {
                    "" => {}
                    "all" | "xids" => all = true,
                    _ => match item.parse::<u64>() {
                        Ok(xid) => {
                            set.insert(xid);
                        }
                        Err(_) => warnings.push(format!(
                            "{var}: ignoring {item:?}: expected `all`, `xids` or a comma-separated list of XID numbers"
                        )),
                    },
                }
            }
            (all, set)
        };
        let (all_disabled, mut disabled) = parse("DP_DISABLE_HEALTHCHECKS", disable);
        let (all_enabled, enabled) = parse("DP_ENABLE_HEALTHCHECKS", enable);
        disabled.extend(DEFAULT_IGNORED_XIDS);
        (
            Self {
                all_disabled,
                all_enabled,
                disabled,
                enabled,
            },
            warnings,
        )
    }

    /// Whether this XID marks the GPU unhealthy.
    pub fn is_critical(&self, xid: u64) -> bool {
        if self.all_enabled || self.enabled.contains(&xid) {
            return true;
        }
        !self.all_disabled && !self.disabled.contains(&xid)
    }

    /// True when no XID can ever count, so registering for events is pointless.
    pub fn watches_nothing(&self) -> bool {
        self.all_disabled && !self.all_enabled && self.enabled.is_empty()
    }

    /// For the start-up log line.
    pub fn describe(&self) -> String {
        match (self.all_enabled, self.all_disabled) {
            (true, _) => "every XID counts".to_owned(),
            (false, true) if self.enabled.is_empty() => "XID health checks disabled".to_owned(),
            (false, true) => format!("only XIDs {:?} count", self.enabled),
            (false, false) => {
                let ignored: Vec<_> = self.disabled.difference(&self.enabled).collect();
                format!("ignoring XIDs {ignored:?}")
            }
        }
    }
}

/// The health state machine, apart from NVML so it can be tested with synthetic time.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    healthy: Vec<bool>,
    last_fault: Vec<Option<Instant>>,
    quiet_period: Duration,
}

impl HealthTracker {
    /// Every GPU starts healthy.
    pub fn new(gpus: usize, quiet_period: Duration) -> Self {
        Self {
            healthy: vec![true; gpus],
            last_fault: vec![None; gpus],
            quiet_period,
        }
    }

    /// Current health, inventory order.
    pub fn healthy(&self) -> &[bool] {
        &self.healthy
    }

    /// Records a fault; the quiet period starts again. Returns whether the GPU just became unhealthy.
    pub fn fault(&mut self, gpu: usize, now: Instant) -> bool {
        let Some(h) = self.healthy.get_mut(gpu) else {
            return false;
        };
        self.last_fault[gpu] = Some(now);
        std::mem::replace(h, false)
    }

    /// Unhealthy GPUs whose last fault is at least the quiet period ago: the ones to probe for recovery.
    pub fn due_for_recovery(&self, now: Instant) -> Vec<usize> {
        (0..self.healthy.len())
            .filter(|&i| !self.healthy[i])
            .filter(|&i| {
                self.last_fault[i]
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.quiet_period)
            })
            .collect()
    }

    /// Marks a GPU healthy after a successful recovery probe. Returns whether it changed.
    pub fn recover(&mut self, gpu: usize) -> bool {
        let Some(h) = self.healthy.get_mut(gpu) else {
            return false;
        };
        self.last_fault[gpu] = None;
        !std::mem::replace(h, true)
    }
}

/// How long one `nvmlEventSetWait` may block; bounds how fast the monitor notices a stop or a due recovery.
const WAIT_SLICE: Duration = Duration::from_millis(500);

/// Starts the monitor thread. It stops when `stop` is cancelled (within [`WAIT_SLICE`]).
pub fn spawn_monitor(
    nvml: Arc<Nvml>,
    inventory: Arc<Inventory>,
    settings: HealthSettings,
    policy: XidPolicy,
    health: watch::Sender<Vec<bool>>,
    stop: CancellationToken,
    repartitions: Arc<RepartitionHold>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gpu-health".into())
        .spawn(move || {
            let mut monitor = Monitor::new(&nvml, &inventory, &settings, &policy, &health);
            monitor.repartitions = repartitions;
            monitor.run(&stop);
        })
}

struct Monitor<'a> {
    nvml: &'a Nvml,
    inventory: &'a Inventory,
    devices: Vec<Option<Device<'a>>>,
    policy: &'a XidPolicy,
    settings: &'a HealthSettings,
    tracker: HealthTracker,
    health: &'a watch::Sender<Vec<bool>>,
    /// The event types each GPU is registered for; empty for GPUs without XID events or with XIDs off.
    event_types: Vec<EventTypes>,
    /// GPUs whose last probe failed. They are kept out of the event set: NVML fails every wait on a set that
    /// holds a lost GPU, which would blind the monitor to the others.
    lost: Vec<bool>,
    events: Option<EventSet<'a>>,
    /// Whether the last event wait failed, so a persisting failure is logged once, not every slice.
    wait_failing: bool,
    /// GPUs being repartitioned (MIG mode): their XIDs and failed probes are not counted meanwhile.
    repartitions: Arc<RepartitionHold>,
}

impl<'a> Monitor<'a> {
    fn new(
        nvml: &'a Nvml,
        inventory: &'a Inventory,
        settings: &'a HealthSettings,
        policy: &'a XidPolicy,
        health: &'a watch::Sender<Vec<bool>>,
    ) -> Self {
        let devices: Vec<Option<Device<'a>>> = inventory
            .gpus
            .iter()
            .map(|g| nvml.device_by_index(g.nvml_index).ok())
            .collect();
        let event_types = if policy.watches_nothing() {
            tracing::info!(
                "XID health checks disabled by DP_DISABLE_HEALTHCHECKS; probing GPUs only"
            );
            vec![EventTypes::empty(); devices.len()]
        } else {
            tracing::info!(policy = %policy.describe(), "watching NVML critical XID events");
            supported_events(inventory, &devices)
        };
        let gpus = inventory.gpus.len();
        let mut monitor = Self {
            nvml,
            inventory,
            devices,
            policy,
            settings,
            tracker: HealthTracker::new(gpus, settings.recovery_quiet_period),
            health,
            event_types,
            lost: vec![false; gpus],
            events: None,
            wait_failing: false,
            repartitions: Arc::default(),
        };
        monitor.rebuild_events();
        // A GPU still waiting for a reset when the agent starts (an agent restarted after the fault) is not
        // vouched for either.
        let now = Instant::now();
        for g in 0..gpus {
            if monitor.reset_pending(g) {
                tracing::warn!(
                    uuid = %inventory.gpus[g].uuid,
                    "retired pages or remapped rows wait for a GPU reset; GPU marked Unhealthy until it is reset"
                );
                monitor.tracker.fault(g, now);
            }
        }
        monitor.publish();
        monitor
    }

    fn run(mut self, stop: &CancellationToken) {
        let mut next_probe = Instant::now() + self.settings.probe_interval;
        while !stop.is_cancelled() {
            let waited = self
                .events
                .as_ref()
                .map(|set| set.wait(WAIT_SLICE.as_millis() as u32));
            match waited {
                Some(Ok(event)) => {
                    self.wait_failing = false;
                    self.on_event(event);
                }
                Some(Err(NvmlError::Timeout)) => self.wait_failing = false,
                Some(Err(error)) => self.on_wait_error(&error),
                None => std::thread::sleep(WAIT_SLICE),
            }
            let now = Instant::now();
            if now >= next_probe {
                self.probe_all(now);
                next_probe = now + self.settings.probe_interval;
            }
            self.try_recover(now);
        }
    }

    fn on_event(&mut self, event: nvml_wrapper::struct_wrappers::event::EventData<'_>) {
        let gpu = self.position_of(&event.device);
        let uuid = gpu.map(|g| self.inventory.gpus[g].uuid.as_str());
        if !event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            tracing::warn!(gpu = ?uuid, event = ?event.event_type, "NVML ECC event");
            return;
        }
        let xid = match event.event_data {
            Some(XidError::Value(xid)) => xid,
            Some(XidError::Unknown) | None => {
                tracing::warn!(gpu = ?uuid, "critical XID event without an XID number; ignored");
                return;
            }
        };
        if !self.policy.is_critical(xid) {
            tracing::info!(xid, gpu = ?uuid, "XID ignored (application error or disabled)");
            return;
        }
        let now = Instant::now();
        if let Some(g) = gpu
            && self.repartitions.is_held(&self.inventory.gpus[g].uuid, now)
        {
            tracing::info!(xid, uuid = %self.inventory.gpus[g].uuid, "XID during a MIG repartition of this GPU; ignored");
            return;
        }
        match gpu {
            Some(g) => {
                if self.tracker.fault(g, now) {
                    tracing::warn!(xid, uuid = %self.inventory.gpus[g].uuid, "critical XID; GPU marked Unhealthy");
                }
            }
            None => {
                tracing::error!(
                    xid,
                    "critical XID on a GPU NVML cannot identify; marking every GPU Unhealthy"
                );
                for g in 0..self.inventory.gpus.len() {
                    self.tracker.fault(g, now);
                }
            }
        }
        self.publish();
    }

    /// The wait itself failed. Find the GPUs that no longer answer and rebuild the set without them; if every
    /// GPU answers, nothing can be vouched for (the Go plugin's rule) until they recover.
    fn on_wait_error(&mut self, error: &NvmlError) {
        let now = Instant::now();
        let lost_before = self.lost.iter().filter(|l| **l).count();
        self.probe_all(now);
        let lost_now = self.lost.iter().filter(|l| **l).count();
        if lost_now > lost_before {
            self.rebuild_events();
            return;
        }
        if !self.wait_failing {
            tracing::error!(%error, "NVML event wait failed with every GPU answering; marking every GPU Unhealthy");
        }
        self.wait_failing = true;
        for g in 0..self.inventory.gpus.len() {
            self.tracker.fault(g, now);
        }
        self.publish();
        self.rebuild_events();
        std::thread::sleep(WAIT_SLICE);
    }

    /// Finds the GPU an event came from: by UUID, then by NVML index (a lost GPU may not answer the first).
    fn position_of(&self, device: &Device<'_>) -> Option<usize> {
        if let Ok(uuid) = device.uuid() {
            return self.inventory.gpus.iter().position(|g| g.uuid == uuid);
        }
        let index = device.index().ok()?;
        self.inventory
            .gpus
            .iter()
            .position(|g| g.nvml_index == index)
    }

    /// A cheap question to every GPU not already known lost; one that cannot answer is lost and unhealthy.
    fn probe_all(&mut self, now: Instant) {
        let mut changed = false;
        for g in 0..self.inventory.gpus.len() {
            if self.lost[g] || self.repartitions.is_held(&self.inventory.gpus[g].uuid, now) {
                continue;
            }
            if let Err(error) = self.probe(g) {
                tracing::warn!(uuid = %self.inventory.gpus[g].uuid, %error, "GPU stopped answering NVML; marked Unhealthy");
                self.lost[g] = true;
                self.tracker.fault(g, now);
                changed = true;
            }
        }
        if changed {
            self.publish();
        }
    }

    fn try_recover(&mut self, now: Instant) {
        let mut recovered = false;
        for g in self.tracker.due_for_recovery(now) {
            match self.probe(g) {
                // Quiet and answering, but a memory repair waits for a reset: not healthy yet.
                Ok(()) if self.reset_pending(g) => {
                    tracing::warn!(
                        uuid = %self.inventory.gpus[g].uuid,
                        "GPU quiet and answering NVML, but retired pages or remapped rows wait for a GPU \
                         reset; it stays Unhealthy until the GPU is reset"
                    );
                    self.tracker.fault(g, now);
                }
                Ok(()) => {
                    self.tracker.recover(g);
                    tracing::info!(uuid = %self.inventory.gpus[g].uuid, "GPU quiet and answering NVML; marked Healthy again");
                    recovered = true;
                }
                // Still failing: the quiet period starts over.
                Err(_) => {
                    self.tracker.fault(g, now);
                }
            }
        }
        if recovered {
            self.publish();
            if self.lost.iter().any(|l| *l) {
                // Recovered GPUs that were lost go back into the event set.
                for g in 0..self.lost.len() {
                    self.lost[g] &= !self.tracker.healthy()[g];
                }
                self.rebuild_events();
            }
        }
    }

    /// Whether NVML says a memory repair of GPU `g` waits for a GPU reset: rows remapped after an
    /// uncorrectable ECC error (Ampere and later) or pages to retire (earlier GPUs) take effect only then,
    /// and the GPU keeps answering NVML meanwhile. Unknown (not supported, an error) counts as no.
    fn reset_pending(&self, g: usize) -> bool {
        use nvml_wrapper::enums::device::SampleValue;
        use nvml_wrapper::structs::device::FieldId;
        use nvml_wrapper::sys_exports::field_id::{
            NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_RETIRED_PENDING,
        };
        let Some(device) = self.devices[g].as_ref() else {
            return false;
        };
        let fields = [
            FieldId(NVML_FI_DEV_REMAPPED_PENDING),
            FieldId(NVML_FI_DEV_RETIRED_PENDING),
        ];
        device.field_values_for(&fields).is_ok_and(|samples| {
            samples.iter().flatten().any(|s| {
                matches!(
                    s.value,
                    Ok(SampleValue::U32(1..) | SampleValue::U64(1..) | SampleValue::I64(1..))
                )
            })
        })
    }

    fn probe(&self, g: usize) -> Result<(), NvmlError> {
        let device = self.devices[g].as_ref().ok_or(NvmlError::GpuLost)?;
        device.memory_info().map(drop)
    }

    fn publish(&self) {
        let now = self.tracker.healthy().to_vec();
        self.health.send_if_modified(|current| {
            let changed = *current != now;
            *current = now;
            changed
        });
    }

    /// (Re)creates the event set with every event-capable GPU that is not lost. `nvmlDeviceRegisterEvents`
    /// frees the set when it fails, so a GPU that fails to register is left out and the set built again.
    fn rebuild_events(&mut self) {
        self.events = None;
        let mut wanted: Vec<usize> = (0..self.devices.len())
            .filter(|&g| {
                !self.event_types[g].is_empty() && !self.lost[g] && self.devices[g].is_some()
            })
            .collect();
        while !wanted.is_empty() {
            let mut set = match self.nvml.create_event_set() {
                Ok(set) => Some(set),
                Err(error) => {
                    tracing::error!(%error, "cannot create an NVML event set; GPU health comes from probes only");
                    return;
                }
            };
            let mut failed = None;
            for (i, &g) in wanted.iter().enumerate() {
                let (Some(device), Some(current)) = (self.devices[g].as_ref(), set.take()) else {
                    break;
                };
                match device.register_events(self.event_types[g], current) {
                    Ok(s) => set = Some(s),
                    Err(error) => {
                        tracing::warn!(uuid = %self.inventory.gpus[g].uuid, error = %error.error, "cannot register for XID events; probing it only for now");
                        failed = Some(i);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    self.events = set;
                    return;
                }
                Some(i) => {
                    wanted.remove(i);
                }
            }
        }
    }
}

/// The event types to register per GPU: the critical-XID and ECC events it supports, or none (with one
/// warning) for a GPU that has no XID events, which is then watched by probes only.
fn supported_events(inventory: &Inventory, devices: &[Option<Device<'_>>]) -> Vec<EventTypes> {
    let wanted = EventTypes::CRITICAL_XID_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
        | EventTypes::SINGLE_BIT_ECC_ERROR;
    devices
        .iter()
        .zip(&inventory.gpus)
        .map(|(device, gpu)| {
            let Some(device) = device else { return EventTypes::empty() };
            match device.supported_event_types() {
                Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => types & wanted,
                Ok(_) | Err(NvmlError::NotSupported) => {
                    tracing::warn!(uuid = %gpu.uuid, "GPU does not report XID events; its health comes from NVML probes only");
                    EventTypes::empty()
                }
                Err(error) => {
                    tracing::warn!(uuid = %gpu.uuid, %error, "cannot read the GPU's event support; probing it only");
                    EventTypes::empty()
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_ignores_application_xids_only() {
        let (p, warnings) = XidPolicy::from_env(None, None);
        assert!(warnings.is_empty());
        for xid in DEFAULT_IGNORED_XIDS {
            assert!(!p.is_critical(xid), "{xid}");
        }
        assert!(p.is_critical(79) && p.is_critical(48) && p.is_critical(94));
        assert!(!p.watches_nothing());
    }

    #[test]
    fn disable_list_adds_to_the_defaults_and_enable_overrides() {
        let (p, _) = XidPolicy::from_env(Some("79, 48"), Some("13"));
        assert!(!p.is_critical(79) && !p.is_critical(48) && !p.is_critical(31));
        assert!(
            p.is_critical(13),
            "explicitly enabled beats the default list"
        );
        assert!(p.is_critical(94));
    }

    #[test]
    fn disable_all_with_an_enabled_xid_watches_that_xid() {
        let (p, _) = XidPolicy::from_env(Some("ALL"), Some("79"));
        assert!(p.is_critical(79));
        assert!(!p.is_critical(48));
        assert!(!p.watches_nothing());
        let (p, _) = XidPolicy::from_env(Some("xids"), None);
        assert!(p.watches_nothing());
        let (p, _) = XidPolicy::from_env(None, Some("all"));
        assert!(p.is_critical(13));
    }

    #[test]
    fn malformed_entries_are_named_and_skipped() {
        let (p, warnings) = XidPolicy::from_env(Some("79,abc,,-1"), None);
        assert!(!p.is_critical(79));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("DP_DISABLE_HEALTHCHECKS") && warnings[0].contains("\"abc\""));
    }

    #[test]
    fn a_gpu_recovers_only_after_a_full_quiet_period() {
        let t0 = Instant::now();
        let quiet = Duration::from_secs(60);
        let mut t = HealthTracker::new(2, quiet);
        assert!(t.fault(1, t0));
        assert!(
            !t.fault(1, t0 + Duration::from_secs(30)),
            "second fault does not re-flip"
        );
        assert_eq!(t.healthy(), &[true, false]);
        assert!(
            t.due_for_recovery(t0 + Duration::from_secs(80)).is_empty(),
            "quiet period restarted at t0+30"
        );
        assert_eq!(t.due_for_recovery(t0 + Duration::from_secs(90)), vec![1]);
        assert!(t.recover(1));
        assert!(!t.recover(1));
        assert_eq!(t.healthy(), &[true, true]);
    }
}
