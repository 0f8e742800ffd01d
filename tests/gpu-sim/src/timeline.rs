//! Reading the kernel timelines of a simulated node (`<node file>.timeline`, layout in
//! `csrc/timeline.h`, rules in README "Kernel time model"): per GPU, the kernel time queued and
//! run, and per sample period the busy time of the GPU and of each process — the model's own
//! exact accounting, from which the fake NVML computes utilisation. Tests and benchmarks measure
//! achieved utilisation with it instead of trusting wall-clock timing.
//!
//! The C side plays the schedule lazily, by whichever process next touches the GPU (a launch, a
//! synchronisation, an NVML query); [`Timeline::read`] plays its copy forward to the moment of
//! reading with the same rules, so a snapshot is exact up to then whoever touched the GPU last.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state_layout::{MAX_GPUS, u32_at, u64_at};

/// What the fake `libcuda.so.1` appends to the node file path for the kernel timelines.
pub const TIMELINE_SUFFIX: &str = ".timeline";

const MAGIC: &[u8; 8] = b"GPUSIMTL";
const VERSION: u32 = 1;
const HEADER: u64 = 64;
const SLOTS: usize = 256;
const PERIODS: usize = 256;
const PROCS: usize = 16;
const PROC: usize = 16;
const PERIOD: usize = 24 + PROC * PROCS;
const DEVICE_HEAD: usize = 192;
const LANES: usize = 16;
const LANE_DEPTH: usize = 2048;
const LANE: usize = 56 + 8 * LANE_DEPTH;
const PERIODS_AT: usize = DEVICE_HEAD + LANE * LANES;
const DEVICE: usize = PERIODS_AT + PERIOD * PERIODS;
const SLOT: usize = 16 + 8 * MAX_GPUS;
const SIZE: u64 = HEADER + (DEVICE * MAX_GPUS) as u64 + (SLOT * SLOTS) as u64;
/// Offset of `seq` in a device record (after the 64-byte mutex).
const SEQ: usize = 64;

/// One process's kernel time in one sample period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodProcess {
    /// The pid NVML reports for it (its host pid: `getpid() + GPU_SIM_HOST_PID_OFFSET`).
    pub pid: u32,
    /// Its slot in the CUDA device state.
    pub slot: u32,
    /// Nanoseconds its kernels occupied the GPU in the period.
    pub busy_ns: u64,
}

/// One sample period of one GPU in which something ran (or was queued to run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodRecord {
    /// Period index: it covers `[index · period_ns, (index + 1) · period_ns)` of `CLOCK_REALTIME`.
    pub index: u64,
    /// Nanoseconds the GPU was busy in it.
    pub busy_ns: u64,
    /// Processes beyond the 16 recorded per period (counted in `busy_ns` only).
    pub dropped: u32,
    /// The processes that ran in it.
    pub processes: Vec<PeriodProcess>,
}

/// The timeline of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceTimeline {
    /// The schedule has been played up to here (ns since the epoch; 0: nothing ever queued).
    pub simulated_until_ns: u64,
    /// Kernel time run so far.
    pub busy_total_ns: u64,
    /// Kernel time queued so far (run or not).
    pub queued_ns: u64,
    /// Kernel time queued and not run yet.
    pub pending_ns: u64,
    /// When the last kernel completed (ns since the epoch; 0: none yet).
    pub last_end_ns: u64,
    /// Kernels (and timed graph launches) queued.
    pub kernels: u64,
    /// Recorded periods still in the ring (about the last 190 and those queued ahead), oldest
    /// first.
    pub periods: Vec<PeriodRecord>,
}

/// A process known to the timeline (one per CUDA device state slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineProcess {
    /// Its slot.
    pub slot: usize,
    /// Its own pid (`getpid()`).
    pub pid: u32,
    /// The pid NVML reports for it.
    pub host_pid: u32,
    /// Kernel time it has run on each GPU, cumulative ([`MAX_GPUS`] entries).
    pub busy_ns: Vec<u64>,
}

/// A consistent snapshot of a node's kernel timelines (each GPU's record is copied while no
/// writer is changing it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    period_ns: u64,
    horizon_ns: u64,
    slice_ns: u64,
    devices: Vec<DeviceTimeline>,
    processes: Vec<TimelineProcess>,
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Nanoseconds since the epoch (the timeline's clock).
pub(crate) fn ns_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Timeline {
    /// Reads the timeline file at `path` (`NotFound` if no process created it yet).
    pub fn read(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len != SIZE {
            return Err(bad(format!(
                "{}: {len} bytes, a version {VERSION} timeline has {SIZE}",
                path.display()
            )));
        }
        let mut header = [0u8; HEADER as usize];
        file.read_exact_at(&mut header, 0)?;
        if &header[..8] != MAGIC
            || u32_at(&header, 8) != VERSION
            || u32_at(&header, 24) as usize != DEVICE
            || u32_at(&header, 28) as usize != SLOT
        {
            return Err(bad(format!(
                "{}: not a version {VERSION} kernel timeline",
                path.display()
            )));
        }
        let period_ns = u64_at(&header, 40);
        let horizon_ns = u64_at(&header, 48);
        let slice_ns = u64_at(&header, 56);
        if period_ns == 0 {
            return Err(bad(format!("{}: period_ns is 0", path.display())));
        }
        let now = ns_since_epoch(SystemTime::now());
        let mut devices = Vec::with_capacity(MAX_GPUS);
        let mut schedules = Vec::with_capacity(MAX_GPUS);
        for g in 0..MAX_GPUS {
            let (device, schedule) = read_device(&file, HEADER + (g * DEVICE) as u64)?;
            devices.push(device);
            schedules.push(schedule);
        }
        let mut slots = vec![0u8; SLOT * SLOTS];
        file.read_exact_at(&mut slots, HEADER + (DEVICE * MAX_GPUS) as u64)?;
        let processes = (0..SLOTS)
            .filter_map(|s| {
                let at = s * SLOT;
                let pid = u32_at(&slots, at);
                (pid != 0).then(|| TimelineProcess {
                    slot: s,
                    pid,
                    host_pid: u32_at(&slots, at + 4),
                    busy_ns: (0..MAX_GPUS)
                        .map(|g| u64_at(&slots, at + 16 + 8 * g))
                        .collect(),
                })
            })
            .collect();
        let mut timeline = Self {
            period_ns,
            horizon_ns,
            slice_ns,
            devices,
            processes,
        };
        for (gpu, schedule) in schedules.into_iter().enumerate() {
            if let Some(mut schedule) = schedule {
                timeline.play(gpu, &mut schedule, now);
            }
        }
        Ok(timeline)
    }

    /// Plays GPU `gpu`'s schedule from where the C side left it to `now`, exactly as
    /// `advance()` in `csrc/timeline.c` does: the running lane runs its oldest kernel until the
    /// kernel ends, its slice ends or `now`; a lane that ran dry or used its slice hands over
    /// to the next lane with work, round-robin.
    fn play(&mut self, gpu: usize, s: &mut Schedule, now: u64) {
        let (period, slice) = (self.period_ns, self.slice_ns);
        let d = &mut self.devices[gpu];
        let mut t = d.simulated_until_ns;
        if t == 0 || t > now {
            return;
        }
        while t < now && d.pending_ns > 0 {
            let mut li = s.rr % LANES;
            if s.slice_left == 0 || s.lanes[li].ring.is_empty() {
                match (1..=LANES)
                    .map(|i| (s.rr + i) % LANES)
                    .find(|&l| !s.lanes[l].ring.is_empty())
                {
                    Some(l) => {
                        li = l;
                        s.rr = l;
                        s.slice_left = slice;
                    }
                    None => break,
                }
            }
            let lane = &mut s.lanes[li];
            let run = lane.head_left.min(s.slice_left).min(now - t);
            let stop = t + run;
            while t < stop {
                let p = t / period;
                let end = ((p + 1) * period).min(stop);
                account(&mut d.periods, p, lane.slot, lane.host_pid, end - t);
                t = end;
            }
            if let Some(owner) = self.processes.iter_mut().find(|q| {
                q.slot as i64 == i64::from(lane.slot) && i64::from(q.pid) == i64::from(lane.owner)
            }) {
                owner.busy_ns[gpu] += run;
            }
            lane.head_left -= run;
            d.pending_ns -= run;
            d.busy_total_ns += run;
            s.slice_left -= run;
            if lane.head_left == 0 {
                lane.ring.pop_front();
                d.last_end_ns = t;
                if let Some(&next) = lane.ring.front() {
                    lane.head_left = next;
                }
            }
        }
        d.simulated_until_ns = now;
        // The ring keeps the last PERIODS periods.
        if let Some(newest) = d.periods.last().map(|p| p.index) {
            d.periods.retain(|p| p.index + PERIODS as u64 > newest);
        }
    }

    /// The sample period in nanoseconds.
    pub fn period_ns(&self) -> u64 {
        self.period_ns
    }

    /// The most kernel time one process may have pending on a GPU, in nanoseconds (its launches
    /// block beyond).
    pub fn horizon_ns(&self) -> u64 {
        self.horizon_ns
    }

    /// The time slice the GPU gives each process with pending work in turn, in nanoseconds.
    pub fn slice_ns(&self) -> u64 {
        self.slice_ns
    }

    /// The index of the period holding `t`.
    pub fn period_at(&self, t: SystemTime) -> u64 {
        ns_since_epoch(t) / self.period_ns
    }

    /// When period `index` begins.
    pub fn period_start(&self, index: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(index.saturating_mul(self.period_ns))
    }

    /// GPU `gpu`'s timeline (index in the node file); an empty one past [`MAX_GPUS`].
    pub fn device(&self, gpu: usize) -> DeviceTimeline {
        self.devices.get(gpu).cloned().unwrap_or_default()
    }

    /// Processes that initialised CUDA on the node (live, or dead and not yet replaced).
    pub fn processes(&self) -> &[TimelineProcess] {
        &self.processes
    }

    /// The process NVML reports as `host_pid`.
    pub fn process(&self, host_pid: u32) -> Option<&TimelineProcess> {
        self.processes.iter().find(|p| p.host_pid == host_pid)
    }

    fn periods(&self, gpu: usize, range: Range<u64>) -> impl Iterator<Item = &PeriodRecord> {
        self.devices
            .get(gpu)
            .into_iter()
            .flat_map(|d| d.periods.iter())
            .filter(move |p| range.contains(&p.index))
    }

    /// Nanoseconds GPU `gpu` was busy in `periods` (exact, from the model's accounting).
    pub fn device_busy_ns(&self, gpu: usize, periods: Range<u64>) -> u64 {
        self.periods(gpu, periods).map(|p| p.busy_ns).sum()
    }

    /// Nanoseconds the kernels of the process NVML reports as `host_pid` occupied GPU `gpu`
    /// in `periods`.
    pub fn process_busy_ns(&self, gpu: usize, host_pid: u32, periods: Range<u64>) -> u64 {
        self.periods(gpu, periods)
            .flat_map(|p| p.processes.iter())
            .filter(|p| p.pid == host_pid)
            .map(|p| p.busy_ns)
            .sum()
    }

    /// Busy nanoseconds of every process that ran on GPU `gpu` in `periods`, by host pid.
    pub fn processes_busy_ns(&self, gpu: usize, periods: Range<u64>) -> BTreeMap<u32, u64> {
        let mut by_pid = BTreeMap::new();
        for p in self.periods(gpu, periods).flat_map(|p| p.processes.iter()) {
            *by_pid.entry(p.pid).or_insert(0) += p.busy_ns;
        }
        by_pid
    }

    /// GPU `gpu`'s utilisation over `periods`, in percent (0 for an empty range).
    pub fn utilization(&self, gpu: usize, periods: Range<u64>) -> f64 {
        self.percent(self.device_busy_ns(gpu, periods.clone()), &periods)
    }

    /// The share of GPU `gpu` the process `host_pid` used over `periods`, in percent.
    pub fn process_utilization(&self, gpu: usize, host_pid: u32, periods: Range<u64>) -> f64 {
        self.percent(
            self.process_busy_ns(gpu, host_pid, periods.clone()),
            &periods,
        )
    }

    fn percent(&self, busy_ns: u64, periods: &Range<u64>) -> f64 {
        let span = periods.end.saturating_sub(periods.start) as f64 * self.period_ns as f64;
        if span == 0.0 {
            0.0
        } else {
            busy_ns as f64 * 100.0 / span
        }
    }

    /// Kernel time GPU `gpu` has run (up to [`Timeline::simulated_until`]).
    pub fn device_busy_total_ns(&self, gpu: usize) -> u64 {
        self.devices.get(gpu).map_or(0, |d| d.busy_total_ns)
    }

    /// Kernel time queued on GPU `gpu`, run or not.
    pub fn device_queued_ns(&self, gpu: usize) -> u64 {
        self.devices.get(gpu).map_or(0, |d| d.queued_ns)
    }

    /// How far GPU `gpu`'s schedule has been played: the snapshot is exact up to here.
    pub fn simulated_until(&self, gpu: usize) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.devices.get(gpu).map_or(0, |d| d.simulated_until_ns))
    }

    /// Kernel time the process `host_pid` has run on GPU `gpu`, cumulative.
    pub fn process_busy_total_ns(&self, host_pid: u32, gpu: usize) -> u64 {
        self.process(host_pid)
            .and_then(|p| p.busy_ns.get(gpu).copied())
            .unwrap_or(0)
    }

    /// When the last kernel on GPU `gpu` completed (the epoch: none yet).
    pub fn last_end(&self, gpu: usize) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.devices.get(gpu).map_or(0, |d| d.last_end_ns))
    }
}

/// One process's pending kernels on a GPU (a copy of `struct sim_tl_lane`).
struct Lane {
    slot: i32,
    host_pid: u32,
    owner: i32,
    /// What is left of the oldest kernel.
    head_left: u64,
    /// Pending durations, oldest first (the first one's remainder is `head_left`).
    ring: VecDeque<u64>,
}

/// The state the schedule is played from (a copy of the device record's scheduler fields).
struct Schedule {
    rr: usize,
    slice_left: u64,
    lanes: Vec<Lane>,
}

fn account(periods: &mut Vec<PeriodRecord>, index: u64, slot: i32, pid: u32, ns: u64) {
    let at = match periods.binary_search_by_key(&index, |p| p.index) {
        Ok(at) => at,
        Err(at) => {
            periods.insert(
                at,
                PeriodRecord {
                    index,
                    busy_ns: 0,
                    dropped: 0,
                    processes: Vec::new(),
                },
            );
            at
        }
    };
    let record = &mut periods[at];
    record.busy_ns += ns;
    let slot = slot as u32;
    if let Some(p) = record
        .processes
        .iter_mut()
        .find(|p| p.slot == slot && p.pid == pid)
    {
        p.busy_ns += ns;
    } else if record.processes.len() < PROCS {
        record.processes.push(PeriodProcess {
            pid,
            slot,
            busy_ns: ns,
        });
    } else {
        record.dropped += 1;
    }
}

/// Copies one GPU's record while no writer changes it (even `seq`, the same before and after).
fn read_device(file: &File, at: u64) -> io::Result<(DeviceTimeline, Option<Schedule>)> {
    let mut head = [0u8; DEVICE_HEAD];
    for _ in 0..10_000 {
        file.read_exact_at(&mut head, at)?;
        let seq = u64_at(&head, SEQ);
        if seq % 2 == 1 {
            std::thread::yield_now();
            continue;
        }
        let kernels = u64_at(&head, 88);
        if kernels == 0 {
            return Ok((DeviceTimeline::default(), None));
        }
        let mut record = vec![0u8; DEVICE];
        file.read_exact_at(&mut record, at)?;
        let mut again = [0u8; 8];
        file.read_exact_at(&mut again, at + SEQ as u64)?;
        if u64_at(&record, SEQ) != seq || u64::from_le_bytes(again) != seq {
            continue;
        }
        return Ok((parse_device(&record), Some(parse_schedule(&record))));
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "a GPU's timeline kept changing while being read",
    ))
}

fn parse_schedule(record: &[u8]) -> Schedule {
    let lanes = (0..LANES)
        .map(|l| {
            let at = DEVICE_HEAD + l * LANE;
            let head = u32_at(record, at + 12) as usize;
            let count = u32_at(record, at + 16) as usize;
            Lane {
                slot: u32_at(record, at) as i32,
                host_pid: u32_at(record, at + 4),
                owner: u32_at(record, at + 8) as i32,
                head_left: u64_at(record, at + 40),
                ring: (0..count.min(LANE_DEPTH))
                    .map(|k| u64_at(record, at + 56 + 8 * ((head + k) % LANE_DEPTH)))
                    .collect(),
            }
        })
        .collect();
    Schedule {
        rr: u32_at(record, 120) as usize,
        slice_left: u64_at(record, 128),
        lanes,
    }
}

fn parse_device(record: &[u8]) -> DeviceTimeline {
    let mut periods: Vec<PeriodRecord> = (0..PERIODS)
        .filter_map(|i| {
            let at = PERIODS_AT + i * PERIOD;
            let epoch = u64_at(record, at);
            (epoch != 0).then(|| {
                let count = (u32_at(record, at + 16) as usize).min(PROCS);
                PeriodRecord {
                    index: epoch - 1,
                    busy_ns: u64_at(record, at + 8),
                    dropped: u32_at(record, at + 20),
                    processes: (0..count)
                        .map(|k| {
                            let p = at + 24 + k * PROC;
                            PeriodProcess {
                                pid: u32_at(record, p),
                                slot: u32_at(record, p + 4),
                                busy_ns: u64_at(record, p + 8),
                            }
                        })
                        .collect(),
                }
            })
        })
        .collect();
    periods.sort_by_key(|p| p.index);
    DeviceTimeline {
        simulated_until_ns: u64_at(record, 72),
        busy_total_ns: u64_at(record, 80),
        kernels: u64_at(record, 88),
        queued_ns: u64_at(record, 96),
        pending_ns: u64_at(record, 104),
        last_end_ns: u64_at(record, 112),
        periods,
    }
}
