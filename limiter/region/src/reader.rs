//! A read-only view of a region file for the metrics side, and the monitor's write-backs.
//!
//! Reads copy bytes with `pread` instead of mapping the file: a container can truncate its region file at any
//! moment, and touching a mapping past the new end raises SIGBUS in the node agent, while `pread` just returns
//! fewer bytes. Only the bytes that mean something are copied: the header, the tail, and the `proc_num` process
//! slots in use (a few KiB for a typical container instead of the whole 2 MB layout), which is what keeps a
//! scrape of a hundred containers in the low milliseconds. Version detection follows the monitors
//! (`docs/volcano-contract.md` §7.2): a file of exactly 1 197 897 (or 1 197 896) bytes is v0; otherwise the magic must
//! be at offset 0 and `major_version` must be 1 (any minor, as the monitors accept). Unlike the monitors we
//! refuse sizes other than the layout or layout + 1 byte and never read more than the layout.
//!
//! The monitor's priority feedback reads [`RegionReader::feedback`] (header and tail only) and writes back
//! with [`RegionReader::set_recent_kernel`], [`RegionReader::set_utilization_switch`] and
//! [`RegionReader::decay_recent_kernel`]. These use `pread`/`pwrite` of the one aligned 4-byte word too, never a
//! mapping, for the same SIGBUS reason: a hostile container truncating its file in a loop must not be able to
//! crash the node agent. The page cache is shared with the containers' mappings, so they see the stores at
//! once. The cost is that the decay is a read-then-write rather than a compare-and-swap: a launch that stores 2
//! in the microseconds between is overwritten with the decayed value, exactly as with HAMi's monitor, which does
//! a plain load and store on its mapping; the next launch restores it.

use std::fs::{File, OpenOptions};
use std::mem::offset_of;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{RegionError, Result};
use crate::layout::{
    self, CUDA_DEVICE_MAX_COUNT, MAJOR_VERSION, MULTIPROCESS_SHARED_REGION_MAGIC_FLAG,
    SHARED_REGION_MAX_PROCESS_NUM, SLOT_STATUS_EXITED, UUID_LABEL_LEN, UUID_LEN, v0,
};

/// Which layout a file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutVersion {
    /// The pre-version layout (no version words, no `last_kernel_time`).
    V0,
    /// `major_version == 1`; the minor as found (HAMi-core v1.2 writes 2).
    V1 {
        /// `minor_version`.
        minor: u32,
    },
}

/// Byte offsets of one layout version, taken from the `#[repr(C)]` structs.
#[derive(Debug, Clone, Copy)]
struct Offsets {
    size: usize,
    device_num: usize,
    uuids: usize,
    limit: usize,
    sm_limit: usize,
    sm_init_flag: usize,
    procs: usize,
    slot_size: usize,
    slot_pid: usize,
    slot_hostpid: usize,
    slot_used: usize,
    used_stride: usize,
    slot_monitorused: usize,
    slot_device_util: usize,
    util_stride: usize,
    util_sm: usize,
    slot_status: usize,
    /// The refused-allocations word (v1 only; see [`layout::SLOT_REFUSED_WORD`]).
    slot_refused: Option<usize>,
    proc_num: usize,
    utilization_switch: usize,
    recent_kernel: usize,
    priority: usize,
    last_kernel_time: Option<usize>,
}

const V1: Offsets = {
    use layout::{DeviceMemory, DeviceUtil, ProcSlot, SharedRegion};
    Offsets {
        size: size_of::<SharedRegion>(),
        device_num: offset_of!(SharedRegion, device_num),
        uuids: offset_of!(SharedRegion, uuids),
        limit: offset_of!(SharedRegion, limit),
        sm_limit: offset_of!(SharedRegion, sm_limit),
        sm_init_flag: offset_of!(SharedRegion, sm_init_flag),
        procs: offset_of!(SharedRegion, procs),
        slot_size: size_of::<ProcSlot>(),
        slot_pid: offset_of!(ProcSlot, pid),
        slot_hostpid: offset_of!(ProcSlot, hostpid),
        slot_used: offset_of!(ProcSlot, used),
        used_stride: size_of::<DeviceMemory>(),
        slot_monitorused: offset_of!(ProcSlot, monitorused),
        slot_device_util: offset_of!(ProcSlot, device_util),
        util_stride: size_of::<DeviceUtil>(),
        util_sm: offset_of!(DeviceUtil, sm_util),
        slot_status: offset_of!(ProcSlot, status),
        slot_refused: Some(offset_of!(ProcSlot, unused) + 8 * layout::SLOT_REFUSED_WORD),
        proc_num: offset_of!(SharedRegion, proc_num),
        utilization_switch: offset_of!(SharedRegion, utilization_switch),
        recent_kernel: offset_of!(SharedRegion, recent_kernel),
        priority: offset_of!(SharedRegion, priority),
        last_kernel_time: Some(offset_of!(SharedRegion, last_kernel_time)),
    }
};

const V0: Offsets = {
    use v0::{DeviceMemory, DeviceUtil, ProcSlot, SharedRegion};
    Offsets {
        size: size_of::<SharedRegion>(),
        device_num: offset_of!(SharedRegion, num),
        uuids: offset_of!(SharedRegion, uuids),
        limit: offset_of!(SharedRegion, limit),
        sm_limit: offset_of!(SharedRegion, sm_limit),
        sm_init_flag: offset_of!(SharedRegion, sm_init_flag),
        procs: offset_of!(SharedRegion, procs),
        slot_size: size_of::<ProcSlot>(),
        slot_pid: offset_of!(ProcSlot, pid),
        slot_hostpid: offset_of!(ProcSlot, hostpid),
        slot_used: offset_of!(ProcSlot, used),
        used_stride: size_of::<DeviceMemory>(),
        slot_monitorused: offset_of!(ProcSlot, monitorused),
        slot_device_util: offset_of!(ProcSlot, device_util),
        util_stride: size_of::<DeviceUtil>(),
        util_sm: offset_of!(DeviceUtil, sm_util),
        slot_status: offset_of!(ProcSlot, status),
        slot_refused: None,
        proc_num: offset_of!(SharedRegion, proc_num),
        utilization_switch: offset_of!(SharedRegion, utilization_switch),
        recent_kernel: offset_of!(SharedRegion, recent_kernel),
        priority: offset_of!(SharedRegion, priority),
        last_kernel_time: None,
    }
};

// The v0 and v1 `device_memory_t` share their first five fields' order, which the parser relies on.
const _: () =
    assert!(offset_of!(layout::DeviceMemory, total) == offset_of!(v0::DeviceMemory, total));

impl LayoutVersion {
    fn offsets(self) -> &'static Offsets {
        match self {
            Self::V0 => &V0,
            Self::V1 { .. } => &V1,
        }
    }
}

/// Bytes of one process on one device, by category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceUsage {
    /// `context_size`.
    pub context: u64,
    /// `module_size`.
    pub module: u64,
    /// `data_size` (the monitors' `bufferSize`).
    pub data: u64,
    /// `offset`.
    pub offset: u64,
    /// `total`.
    pub total: u64,
}

impl DeviceUsage {
    fn saturating_add(self, o: Self) -> Self {
        Self {
            context: self.context.saturating_add(o.context),
            module: self.module.saturating_add(o.module),
            data: self.data.saturating_add(o.data),
            offset: self.offset.saturating_add(o.offset),
            total: self.total.saturating_add(o.total),
        }
    }
}

/// One live process slot (status ≠ exited) of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUsage {
    /// Slot index.
    pub slot: usize,
    /// Container PID.
    pub pid: i32,
    /// Host PID (0 until known).
    pub hostpid: i32,
    /// 1 running, 2 suspended (other non-zero values are reported as found).
    pub status: i32,
    /// Bytes per device.
    pub used: [DeviceUsage; CUDA_DEVICE_MAX_COUNT],
    /// NVML-measured bytes per device.
    pub monitor_used: [u64; CUDA_DEVICE_MAX_COUNT],
    /// SM utilisation per device, percent.
    pub sm_util: [u64; CUDA_DEVICE_MAX_COUNT],
    /// Allocations the limiter refused to this process (all devices; see [`layout::SLOT_REFUSED_WORD`]).
    /// 0 for HAMi-core processes and v0 files. Resets when the process exits (the slot is zeroed).
    pub refused: u64,
}

/// Everything the metrics side reads from one region, copied at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSnapshot {
    /// Layout found.
    pub version: LayoutVersion,
    /// `device_num` (≤ 16).
    pub device_num: usize,
    /// Raw UUID slots; see [`RegionSnapshot::uuid`] and [`RegionSnapshot::uuid_label`].
    pub uuids: [[u8; UUID_LEN]; CUDA_DEVICE_MAX_COUNT],
    /// Memory limit per device, bytes.
    pub limits: [u64; CUDA_DEVICE_MAX_COUNT],
    /// SM limit per device, percent.
    pub sm_limits: [u64; CUDA_DEVICE_MAX_COUNT],
    /// `sm_init_flag`.
    pub sm_init_flag: i32,
    /// `proc_num` (≤ 1024).
    pub proc_num: usize,
    /// Slots in `0..proc_num` whose status is not "exited" (what the monitors sum).
    pub processes: Vec<ProcessUsage>,
    /// `utilization_switch`.
    pub utilization_switch: i32,
    /// `recent_kernel`.
    pub recent_kernel: i32,
    /// `priority`.
    pub priority: i32,
    /// `last_kernel_time` (unix seconds); `None` in v0.
    pub last_kernel_time: Option<u64>,
}

impl RegionSnapshot {
    /// Parses a whole region file's bytes (`bytes.len()` is taken as the file size). Never panics.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let path = Path::new("<bytes>");
        let version = detect(path, bytes.len() as u64, bytes)?;
        let size = version.offsets().size;
        if bytes.len() < size {
            return Err(RegionError::Truncated {
                path: path.to_path_buf(),
                size: bytes.len() as u64,
                expected: size as u64,
            });
        }
        let view = View {
            head: bytes,
            slots: &[],
            slots_at: 0,
            tail: &[],
            tail_at: 0,
        };
        parse(path, version, &view)
    }

    /// Usage of `device` summed over live processes (saturating); zero for an out-of-range device.
    pub fn device_usage(&self, device: usize) -> DeviceUsage {
        self.processes
            .iter()
            .filter_map(|p| p.used.get(device))
            .fold(DeviceUsage::default(), |sum, u| sum.saturating_add(*u))
    }

    /// SM utilisation of `device` summed over live processes.
    pub fn device_sm_util(&self, device: usize) -> u64 {
        self.processes
            .iter()
            .filter_map(|p| p.sm_util.get(device))
            .fold(0u64, |s, u| s.saturating_add(*u))
    }

    /// Memory limit of `device`.
    pub fn limit(&self, device: usize) -> Option<u64> {
        self.limits.get(device).copied()
    }

    /// SM limit of `device`.
    pub fn sm_limit(&self, device: usize) -> Option<u64> {
        self.sm_limits.get(device).copied()
    }

    /// The UUID of `device` up to its first NUL, if non-empty UTF-8.
    pub fn uuid(&self, device: usize) -> Option<&str> {
        let raw = self.uuids.get(device)?;
        nul_terminated_str(raw)
    }

    /// The monitors' `deviceuuid` label: the first 40 bytes of the UUID slot (up to a NUL), or `None` when the
    /// slot starts with NUL or is not UTF-8 (the monitors skip such devices).
    pub fn uuid_label(&self, device: usize) -> Option<&str> {
        let raw = self.uuids.get(device)?;
        nul_terminated_str(&raw[..UUID_LABEL_LEN])
    }
}

fn nul_terminated_str(raw: &[u8]) -> Option<&str> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    if end == 0 {
        return None;
    }
    std::str::from_utf8(&raw[..end]).ok()
}

/// Read access to one region file (and, if opened writable, the monitor's write-backs).
#[derive(Debug)]
pub struct RegionReader {
    path: PathBuf,
    file: File,
    writable: bool,
}

impl RegionReader {
    /// Opens `path` read-only and checks it is a v0 or v1 region.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Opens `path` read-write, for the monitor's write-backs, and checks it is a v0 or v1 region.
    pub fn open_writable(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// Opens `path` read-only and copies its snapshot: [`Self::open`] then [`Self::snapshot`] in the fewest
    /// system calls (open, fstat, three `pread`s, close), for scrapes over many containers.
    pub fn read_snapshot(path: &Path) -> Result<RegionSnapshot> {
        let (reader, size) = Self::open_file(path, false)?;
        reader.snapshot_at_size(size)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Self> {
        let (reader, size) = Self::open_file(path, writable)?;
        reader.detect_at_size(size)?;
        Ok(reader)
    }

    /// Opens a regular file (never a symlink, never blocking on a FIFO); returns it with its size.
    fn open_file(path: &Path, writable: bool) -> Result<(Self, u64)> {
        // The file lives in a directory the container can write: never follow a symlink it planted, and never
        // block on a FIFO it put there (O_NONBLOCK changes nothing for a regular file).
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| RegionError::io("open", path, e))?;
        let metadata = file
            .metadata()
            .map_err(|e| RegionError::io("stat", path, e))?;
        if !metadata.is_file() {
            return Err(RegionError::io(
                "open",
                path,
                std::io::Error::other("not a regular file"),
            ));
        }
        let reader = Self {
            path: path.to_path_buf(),
            file,
            writable,
        };
        Ok((reader, metadata.len()))
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Layout of the file now (re-checked on every call: the file can be replaced or truncated).
    pub fn detect(&self) -> Result<LayoutVersion> {
        self.detect_at_size(self.size()?)
    }

    fn detect_at_size(&self, size: u64) -> Result<LayoutVersion> {
        let mut head = [0u8; 12];
        let n = read_at_most(&self.file, &mut head, 0)
            .map_err(|e| RegionError::io("read", &self.path, e))?;
        detect(&self.path, size, &head[..n])
    }

    fn size(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| RegionError::io("stat", &self.path, e))?
            .len())
    }

    /// Copies the region's meaningful bytes (header, tail, the process slots in use) and parses them.
    pub fn snapshot(&self) -> Result<RegionSnapshot> {
        self.snapshot_at_size(self.size()?)
    }

    fn snapshot_at_size(&self, size: u64) -> Result<RegionSnapshot> {
        // The header of either layout in one read; the version is detected from its first bytes.
        let mut header = vec![0u8; V1.procs.max(V0.procs)];
        let n = self.read(&mut header, 0)?;
        let version = detect(&self.path, size, &header[..n])?;
        let o = version.offsets();
        // A short read means the file shrank since the stat: report its size now.
        let truncated = || RegionError::Truncated {
            path: self.path.clone(),
            size: self.size().unwrap_or(size),
            expected: o.size as u64,
        };
        if n < o.procs {
            return Err(truncated());
        }
        header.truncate(o.procs);
        let mut tail = vec![0u8; o.size - o.proc_num];
        let n = self.read(&mut tail, o.proc_num as u64)?;
        if n < tail.len() {
            return Err(truncated());
        }
        // Only `procs[0..proc_num)` mean anything; `parse` rejects an out-of-range `proc_num` itself.
        let proc_num = i32_at(&tail, 0)
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| *p <= SHARED_REGION_MAX_PROCESS_NUM)
            .unwrap_or(0);
        let mut slots = vec![0u8; proc_num * o.slot_size];
        let n = self.read(&mut slots, o.procs as u64)?;
        if n < slots.len() {
            return Err(truncated());
        }
        let view = View {
            head: &header,
            slots: &slots,
            slots_at: o.procs,
            tail: &tail,
            tail_at: o.proc_num,
        };
        parse(&self.path, version, &view)
    }

    /// The fields the monitor's priority feedback needs (header and tail only; no process slots).
    pub fn feedback(&self) -> Result<FeedbackFields> {
        let size = self.size()?;
        let mut head = [0u8; 12];
        let n = self.read(&mut head, 0)?;
        let version = detect(&self.path, size, &head[..n])?;
        let o = version.offsets();
        let mut header = vec![0u8; o.limit];
        // proc_num … priority, and last_kernel_time where the layout has it.
        let tail_len = o.last_kernel_time.map_or(16, |t| t + 8 - o.proc_num);
        let mut tail = vec![0u8; tail_len];
        let (h, t) = (
            self.read(&mut header, 0)?,
            self.read(&mut tail, o.proc_num as u64)?,
        );
        if h < header.len() || t < tail.len() {
            return Err(RegionError::Truncated {
                path: self.path.clone(),
                size,
                expected: o.size as u64,
            });
        }
        let device_num =
            checked_device_num(&self.path, u64_at(&header, o.device_num).unwrap_or(0))?;
        let uuids = (0..device_num)
            .filter_map(|d| {
                let start = o.uuids + d * UUID_LEN;
                nul_terminated_str(header.get(start..start + UUID_LEN)?).map(str::to_owned)
            })
            .collect();
        let field = |off: usize| i32_at(&tail, off - o.proc_num).unwrap_or(0);
        Ok(FeedbackFields {
            version,
            uuids,
            utilization_switch: field(o.utilization_switch),
            recent_kernel: field(o.recent_kernel),
            priority: field(o.priority),
            last_kernel_time: o
                .last_kernel_time
                .and_then(|off| u64_at(&tail, off - o.proc_num)),
        })
    }

    /// Sets `recent_kernel` (the monitor writes −1 to block a lower-priority container's launches and 0 to
    /// unblock it).
    pub fn set_recent_kernel(&self, value: i32) -> Result<()> {
        let at = self.tail_field(|o| o.recent_kernel)?;
        self.write_i32(at, value)
    }

    /// Sets `utilization_switch` (the monitor writes 1 = throttle under contention, 0 = run free).
    pub fn set_utilization_switch(&self, value: i32) -> Result<()> {
        let at = self.tail_field(|o| o.utilization_switch)?;
        self.write_i32(at, value)
    }

    /// The monitor's per-round decay: if `recent_kernel > 0`, decrement it. Returns the value after the step;
    /// the container counts as active when it is still > 0. (A read then a write; see the module doc.)
    pub fn decay_recent_kernel(&self) -> Result<i32> {
        let at = self.tail_field(|o| o.recent_kernel)?;
        let mut word = [0u8; 4];
        if self.read(&mut word, at)? < word.len() {
            return Err(RegionError::Truncated {
                path: self.path.clone(),
                size: at,
                expected: at + 4,
            });
        }
        let current = i32::from_ne_bytes(word);
        if current <= 0 {
            return Ok(current);
        }
        self.write_i32(at, current - 1)?;
        Ok(current - 1)
    }

    /// The file offset of a tail field, after checking the file is (still) a region we may write to.
    fn tail_field(&self, field: fn(&Offsets) -> usize) -> Result<u64> {
        if !self.writable {
            return Err(RegionError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(field(self.detect()?.offsets()) as u64)
    }

    /// One aligned 4-byte store. If the file was truncated since [`Self::detect`], this extends it (sparsely)
    /// rather than fault: harmless, and nothing here can raise SIGBUS.
    fn write_i32(&self, at: u64, value: i32) -> Result<()> {
        self.file
            .write_all_at(&value.to_ne_bytes(), at)
            .map_err(|e| RegionError::io("write", &self.path, e))
    }

    fn read(&self, buf: &mut [u8], at: u64) -> Result<usize> {
        read_at_most(&self.file, buf, at).map_err(|e| RegionError::io("read", &self.path, e))
    }
}

/// What the monitor's priority feedback reads from one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackFields {
    /// Layout found.
    pub version: LayoutVersion,
    /// The non-empty UTF-8 UUIDs of devices `0..device_num`, in order.
    pub uuids: Vec<String>,
    /// `utilization_switch`.
    pub utilization_switch: i32,
    /// `recent_kernel`.
    pub recent_kernel: i32,
    /// `priority` (HAMi: 0 high, 1 low; any value is read as found).
    pub priority: i32,
    /// `last_kernel_time` (unix seconds); `None` in v0.
    pub last_kernel_time: Option<u64>,
}

/// The bytes of a region that were read: the header from offset 0, the used process slots at `slots_at`, the
/// tail at `tail_at`. A whole file is a `head` with nothing else.
struct View<'a> {
    head: &'a [u8],
    slots: &'a [u8],
    slots_at: usize,
    tail: &'a [u8],
    tail_at: usize,
}

impl View<'_> {
    fn get(&self, off: usize, len: usize) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if end <= self.head.len() {
            return self.head.get(off..end);
        }
        for (at, part) in [(self.slots_at, self.slots), (self.tail_at, self.tail)] {
            if off >= at && end - at <= part.len() {
                return part.get(off - at..end - at);
            }
        }
        None
    }

    fn i32_at(&self, off: usize) -> Option<i32> {
        Some(i32::from_ne_bytes(self.get(off, 4)?.try_into().ok()?))
    }

    fn u64_at(&self, off: usize) -> Option<u64> {
        Some(u64::from_ne_bytes(self.get(off, 8)?.try_into().ok()?))
    }
}

/// Reads up to `buf.len()` bytes at `offset`, stopping early at end of file.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Classifies a file of `size` bytes starting with `head` (at least 12 bytes when available).
fn detect(path: &Path, size: u64, head: &[u8]) -> Result<LayoutVersion> {
    let magic = i32_at(head, 0);
    let check_magic = |found: Option<i32>| match found {
        Some(MULTIPROCESS_SHARED_REGION_MAGIC_FLAG) => Ok(()),
        found => Err(RegionError::BadMagic {
            path: path.to_path_buf(),
            found: found.unwrap_or(0),
            expected: MULTIPROCESS_SHARED_REGION_MAGIC_FLAG,
        }),
    };
    if size == v0::REGION_FILE_SIZE || size == v0::REGION_SIZE as u64 {
        check_magic(magic)?;
        return Ok(LayoutVersion::V0);
    }
    if size < layout::REGION_SIZE as u64 {
        return Err(RegionError::Truncated {
            path: path.to_path_buf(),
            size,
            expected: layout::REGION_SIZE as u64,
        });
    }
    if size > layout::REGION_FILE_SIZE {
        return Err(RegionError::Oversized {
            path: path.to_path_buf(),
            size,
            expected: layout::REGION_FILE_SIZE,
        });
    }
    check_magic(magic)?;
    let (major, minor) = (u32_at(head, 4).unwrap_or(0), u32_at(head, 8).unwrap_or(0));
    if major != MAJOR_VERSION {
        return Err(RegionError::UnsupportedVersion {
            path: path.to_path_buf(),
            major,
            minor,
            supported: "0 or 1.x",
        });
    }
    Ok(LayoutVersion::V1 { minor })
}

/// `device_num` as found, or [`RegionError::Corrupt`] beyond [`CUDA_DEVICE_MAX_COUNT`].
fn checked_device_num(path: &Path, raw: u64) -> Result<usize> {
    if raw > CUDA_DEVICE_MAX_COUNT as u64 {
        return Err(RegionError::Corrupt {
            path: path.to_path_buf(),
            field: "device_num",
            value: i64::try_from(raw).unwrap_or(i64::MAX),
            max: CUDA_DEVICE_MAX_COUNT as i64,
        });
    }
    Ok(raw as usize)
}

fn parse(path: &Path, version: LayoutVersion, bytes: &View<'_>) -> Result<RegionSnapshot> {
    let o = version.offsets();
    let u64_or_0 = |off: usize| bytes.u64_at(off).unwrap_or(0);
    let i32_or_0 = |off: usize| bytes.i32_at(off).unwrap_or(0);

    let device_num = checked_device_num(path, u64_or_0(o.device_num))?;
    let raw_proc_num = i32_or_0(o.proc_num);
    if !(0..=SHARED_REGION_MAX_PROCESS_NUM as i32).contains(&raw_proc_num) {
        return Err(RegionError::Corrupt {
            path: path.to_path_buf(),
            field: "proc_num",
            value: i64::from(raw_proc_num),
            max: SHARED_REGION_MAX_PROCESS_NUM as i64,
        });
    }
    let proc_num = raw_proc_num as usize;

    let uuids = std::array::from_fn(|d| {
        let start = o.uuids + d * UUID_LEN;
        let mut uuid = [0u8; UUID_LEN];
        if let Some(src) = bytes.get(start, UUID_LEN) {
            uuid.copy_from_slice(src);
        }
        uuid
    });
    let limits = std::array::from_fn(|d| u64_or_0(o.limit + 8 * d));
    let sm_limits = std::array::from_fn(|d| u64_or_0(o.sm_limit + 8 * d));

    let processes = (0..proc_num)
        .filter_map(|slot| {
            let base = o.procs + slot * o.slot_size;
            let status = i32_or_0(base + o.slot_status);
            if status == SLOT_STATUS_EXITED {
                return None;
            }
            let used = std::array::from_fn(|d| {
                let m = base + o.slot_used + d * o.used_stride;
                DeviceUsage {
                    context: u64_or_0(m),
                    module: u64_or_0(m + 8),
                    data: u64_or_0(m + 16),
                    offset: u64_or_0(m + 24),
                    total: u64_or_0(m + 32),
                }
            });
            Some(ProcessUsage {
                slot,
                pid: i32_or_0(base + o.slot_pid),
                hostpid: i32_or_0(base + o.slot_hostpid),
                status,
                used,
                monitor_used: std::array::from_fn(|d| u64_or_0(base + o.slot_monitorused + 8 * d)),
                sm_util: std::array::from_fn(|d| {
                    u64_or_0(base + o.slot_device_util + d * o.util_stride + o.util_sm)
                }),
                refused: o.slot_refused.map_or(0, |off| u64_or_0(base + off)),
            })
        })
        .collect();

    Ok(RegionSnapshot {
        version,
        device_num,
        uuids,
        limits,
        sm_limits,
        sm_init_flag: i32_or_0(o.sm_init_flag),
        proc_num,
        processes,
        utilization_switch: i32_or_0(o.utilization_switch),
        recent_kernel: i32_or_0(o.recent_kernel),
        priority: i32_or_0(o.priority),
        last_kernel_time: o.last_kernel_time.map(u64_or_0),
    })
}

fn i32_at(bytes: &[u8], off: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(
        bytes.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        bytes.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(bytes: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        bytes.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}
