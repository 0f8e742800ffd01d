//! CUDA ordinal → container device index (the `i` of `CUDA_DEVICE_MEMORY_LIMIT_<i>`, which is the
//! NVML index inside the container).
//!
//! Without `CUDA_VISIBLE_DEVICES` they are equal. With it, CUDA ordinal `k` is the `k`-th entry:
//! an integer is that index, a `GPU-…` UUID (or a unique prefix, as CUDA accepts) is looked up
//! among NVML's devices. Entries CUDA would stop at (`MIG-…`, garbage) end the list; unmapped
//! ordinals fall back to the identity. HAMi-core maps UUIDs to 0 (`atoi`); this does not.
//!
//! Computed once, on the first allocation after `cuInit` (it needs `cuDeviceGetCount`).

use crate::driver::ffi::{CUDA_SUCCESS, CUdevice, NVML_SUCCESS, NVML_UUID_BUFFER};
use crate::driver::table::real;
use crate::infra::config::{self, MAX_DEVICES};
use crate::infra::log::{ERROR, WARN, log_at};
use crate::infra::sync::InitOnce;
use crate::policy::caps;
use std::ffi::{CStr, c_char, c_int, c_uint};
use std::sync::atomic::{AtomicU8, Ordering};

/// Computed (fork- and re-entry-aware: see [`crate::infra::sync`]). Until then ordinals map to themselves.
static STATE: InitOnce = InitOnce::new();
static MAP: [AtomicU8; MAX_DEVICES] = [const { AtomicU8::new(0) }; MAX_DEVICES];
/// How many devices CUDA sees (valid once `STATE` is `READY`).
static COUNT: AtomicU8 = AtomicU8::new(0);
/// The only device's container index + 1 once the map is computed and CUDA sees exactly one
/// device; 0 otherwise (the allocation hooks' one load instead of three).
static ONLY: AtomicU8 = AtomicU8::new(0);

/// The container index of the only device CUDA sees, when it sees exactly one (the usual vGPU
/// pod): every allocation of the process lands there, so the allocation hooks need not ask the
/// driver for the current context's device. `None` with several devices or before `cuInit`.
#[inline]
pub(crate) fn only_device() -> Option<usize> {
    match ONLY.load(Ordering::Acquire) {
        0 => only_device_slow(),
        d => Some(usize::from(d - 1)),
    }
}

/// [`only_device`] before the map is computed, or with more than one device.
fn only_device_slow() -> Option<usize> {
    if !STATE.is_done() {
        compute();
        if !STATE.is_done() {
            return None;
        }
    }
    (COUNT.load(Ordering::Relaxed) == 1).then(|| usize::from(MAP[0].load(Ordering::Relaxed)))
}

/// The container index of CUDA ordinal `ordinal`; `None` beyond the 16 devices HAMi supports.
pub(crate) fn container_index(ordinal: CUdevice) -> Option<usize> {
    let o = usize::try_from(ordinal).ok().filter(|&o| o < MAX_DEVICES)?;
    if !STATE.is_done() {
        compute();
    }
    Some(if STATE.is_done() {
        usize::from(MAP[o].load(Ordering::Relaxed))
    } else {
        o
    })
}

/// The container device index of the current context's device; `None` without a context.
pub(crate) fn current_device() -> Option<usize> {
    let f = real::cuCtxGetDevice()?;
    let mut dev: CUdevice = 0;
    // SAFETY: `dev` is a valid out-pointer.
    if unsafe { f(&mut dev) } != CUDA_SUCCESS {
        return None;
    }
    container_index(dev)
}

#[cold]
fn compute() {
    // Done by another thread, or re-entered from inside this computation (the driver or NVML
    // calling back into a hook): the caller uses the identity for now.
    let Ok(claim) = STATE.claim() else {
        return;
    };
    let mut count: c_int = 0;
    let counted = real::cuDeviceGetCount().is_some_and(|f| {
        // SAFETY: `count` is a valid out-pointer for cuDeviceGetCount.
        unsafe { f(&mut count) == CUDA_SUCCESS }
    });
    if !counted {
        // Not initialised yet: identity for now, try again next time (dropping the claim).
        return;
    }
    let count = usize::try_from(count).unwrap_or(0).min(MAX_DEVICES);
    let visible = config::getenv(c"CUDA_VISIBLE_DEVICES");
    if visible.is_none() && count > 0 {
        // Without CUDA_VISIBLE_DEVICES, CUDA sees every device of the container.
        enforce_indices_below(count);
    }
    let map = map_visible(visible, count, &mut NvmlUuids::default());
    for (slot, v) in MAP.iter().zip(map) {
        slot.store(v, Ordering::Relaxed);
    }
    COUNT.store(count as u8, Ordering::Relaxed);
    claim.finish();
    if count == 1
        && let Some(only) = MAP[0].load(Ordering::Relaxed).checked_add(1)
    {
        ONLY.store(only, Ordering::Release);
    }
}

/// A per-device limit variable naming index `i >= count` (the container has devices 0..count)
/// cannot mean what it says — most likely an off-by-one or a variable meant for another pod — and
/// ignoring it could leave the device it was meant for uncapped. So it is reported (one line
/// naming the variable, the value and the accepted form) and applied with its strictest meaning:
/// as a cap on every device (a malformed value: 0 bytes / the fail-closed SM share).
fn enforce_indices_below(count: usize) {
    for b in config::indexed_beyond(config::getenv, count) {
        let name = b.name.to_str().unwrap_or("?");
        let family = if b.memory {
            "CUDA_DEVICE_MEMORY_LIMIT"
        } else {
            "CUDA_DEVICE_SM_LIMIT"
        };
        log_at!(
            ERROR,
            "{name}={:?} names device {}, but this container has {count} device(s); expected \
             {family}_<i> with i from 0 to {}. Applying it to every device instead.",
            String::from_utf8_lossy(b.value),
            b.index,
            count - 1
        );
        if b.memory {
            let bytes = match config::parse_limit(b.value) {
                Ok(config::Limit::Bytes(n)) => n,
                Ok(config::Limit::Unlimited) => continue, // "no cap" restricts nothing
                Err(_) => 0,
            };
            for dev in 0..count {
                caps::tighten_memory(dev, bytes);
            }
        } else {
            let percent = match crate::policy::sm::config::parse_sm_limit(b.value) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(_) => crate::policy::sm::config::FAIL_CLOSED_PERCENT,
            };
            for dev in 0..count {
                caps::tighten_sm(dev, percent);
            }
        }
    }
}

/// The UUIDs (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`) of the devices CUDA sees, indexed by
/// container index, for the shared region's `uuids`; empty before `cuInit` or without
/// `cuDeviceGetUuid`. Indices no visible ordinal maps to are left empty.
pub(crate) fn visible_uuids() -> Vec<String> {
    let (Some(count_fn), Some(uuid_fn)) = (real::cuDeviceGetCount(), real::cuDeviceGetUuid())
    else {
        return Vec::new();
    };
    let mut count: c_int = 0;
    // SAFETY: valid out-pointer.
    if unsafe { count_fn(&mut count) } != CUDA_SUCCESS {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    for ordinal in 0..count.clamp(0, MAX_DEVICES as c_int) {
        let Some(index) = container_index(ordinal) else {
            continue;
        };
        let mut raw = [0u8; 16];
        // SAFETY: `raw` is a valid 16-byte out-buffer (`CUuuid`).
        if unsafe { uuid_fn(&mut raw, ordinal) } != CUDA_SUCCESS {
            continue;
        }
        if out.len() <= index {
            out.resize(index + 1, String::new());
        }
        out[index] = format_uuid(&raw);
    }
    out
}

/// NVML's spelling of a `CUuuid`.
pub(crate) fn format_uuid(b: &[u8; 16]) -> String {
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    )
}

/// Source of NVML device UUIDs in index order (a trait so the mapping is unit-testable).
pub(crate) trait UuidSource {
    fn index_of(&mut self, uuid_prefix: &[u8]) -> Option<u8>;
}

/// The pure mapping: entry `k` of `CUDA_VISIBLE_DEVICES` gives ordinal `k`'s index.
pub(crate) fn map_visible(
    visible: Option<&[u8]>,
    count: usize,
    uuids: &mut dyn UuidSource,
) -> [u8; MAX_DEVICES] {
    let mut map = [0u8; MAX_DEVICES];
    for (i, m) in map.iter_mut().enumerate() {
        *m = i as u8; // MAX_DEVICES = 16 fits
    }
    let Some(visible) = visible else {
        return map;
    };
    for (ordinal, entry) in visible.split(|&b| b == b',').take(count).enumerate() {
        let entry = entry.trim_ascii();
        let index = if !entry.is_empty() && entry.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(entry)
                .ok()
                .and_then(|s| s.parse::<u8>().ok())
                .filter(|&n| usize::from(n) < MAX_DEVICES)
        } else if entry.len() > 4 && entry[..4].eq_ignore_ascii_case(b"GPU-") {
            let found = uuids.index_of(entry);
            if found.is_none() {
                log_at!(
                    WARN,
                    "CUDA_VISIBLE_DEVICES entry {:?} matches no NVML device; assuming index {ordinal}",
                    String::from_utf8_lossy(entry)
                );
            }
            found.or(Some(ordinal as u8))
        } else {
            None // CUDA stops parsing at the first entry it does not understand
        };
        match index {
            Some(n) => map[ordinal] = n,
            None => break,
        }
    }
    map
}

/// UUIDs from the real NVML (initialised for the lookup and shut down afterwards).
#[derive(Debug, Default)]
struct NvmlUuids {
    /// `None` until loaded; then up to 16 NUL-padded UUID strings.
    loaded: Option<Vec<[u8; NVML_UUID_BUFFER]>>,
}

impl NvmlUuids {
    fn load() -> Vec<[u8; NVML_UUID_BUFFER]> {
        let mut out = Vec::new();
        let (Some(init), Some(count_fn), Some(by_index), Some(uuid_fn)) = (
            real::nvmlInit_v2(),
            real::nvmlDeviceGetCount_v2(),
            real::nvmlDeviceGetHandleByIndex_v2(),
            real::nvmlDeviceGetUUID(),
        ) else {
            return out;
        };
        // SAFETY: nvmlInit_v2 takes no arguments.
        if unsafe { init() } != NVML_SUCCESS {
            return out;
        }
        let mut count: c_uint = 0;
        // SAFETY: valid out-pointer.
        if unsafe { count_fn(&mut count) } == NVML_SUCCESS {
            for i in 0..count.min(MAX_DEVICES as c_uint) {
                let mut handle = std::ptr::null_mut();
                let mut buf = [0u8; NVML_UUID_BUFFER];
                // SAFETY: valid out-pointers; the buffer length is passed.
                let ok = unsafe {
                    by_index(i, &mut handle) == NVML_SUCCESS
                        && uuid_fn(
                            handle,
                            buf.as_mut_ptr().cast::<c_char>(),
                            buf.len() as c_uint,
                        ) == NVML_SUCCESS
                };
                if !ok {
                    buf = [0; NVML_UUID_BUFFER];
                }
                out.push(buf);
            }
        }
        if let Some(shutdown) = real::nvmlShutdown() {
            // SAFETY: balances the nvmlInit_v2 above.
            unsafe { shutdown() };
        }
        out
    }
}

impl UuidSource for NvmlUuids {
    fn index_of(&mut self, prefix: &[u8]) -> Option<u8> {
        let uuids = self.loaded.get_or_insert_with(Self::load);
        let mut matches = uuids.iter().enumerate().filter(|(_, u)| {
            let s = CStr::from_bytes_until_nul(&u[..]).map_or(&[][..], CStr::to_bytes);
            s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
        });
        let first = matches.next()?;
        matches.next().is_none().then_some(first.0 as u8) // an ambiguous prefix matches nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(&'static [&'static str]);
    impl UuidSource for Fake {
        fn index_of(&mut self, prefix: &[u8]) -> Option<u8> {
            let p = std::str::from_utf8(prefix).ok()?.to_ascii_lowercase();
            let hits: Vec<usize> = (0..self.0.len())
                .filter(|&i| self.0[i].to_ascii_lowercase().starts_with(&p))
                .collect();
            (hits.len() == 1).then(|| hits[0] as u8)
        }
    }

    const UUIDS: &[&str] = &[
        "GPU-aaaaaaaa-0000-0000-0000-000000000000",
        "GPU-bbbbbbbb-0000-0000-0000-000000000000",
        "GPU-cccccccc-0000-0000-0000-000000000000",
    ];

    #[test]
    fn unset_is_identity() {
        let m = map_visible(None, 3, &mut Fake(UUIDS));
        assert_eq!(&m[..3], &[0, 1, 2]);
    }

    #[test]
    fn indices_and_uuids_both_map() {
        let m = map_visible(
            Some(b"2, GPU-aaaaaaaa-0000-0000-0000-000000000000"),
            2,
            &mut Fake(UUIDS),
        );
        assert_eq!(&m[..2], &[2, 0]);
        let m = map_visible(Some(b"gpu-BBBB"), 1, &mut Fake(UUIDS));
        assert_eq!(m[0], 1, "prefix, case-insensitive");
    }

    #[test]
    fn parsing_stops_at_an_invalid_entry() {
        let m = map_visible(Some(b"1,MIG-xyz,0"), 3, &mut Fake(UUIDS));
        assert_eq!(&m[..3], &[1, 1, 2]);
    }

    #[test]
    fn uuids_are_spelled_like_nvml() {
        let raw = [
            0x0f, 0xc3, 0xed, 0xa5, 0xe9, 0x8b, 0xa2, 0x5b, 0x5b, 0x0d, 0xcf, 0x5c, 0x85, 0x5d,
            0x14, 0x48,
        ];
        assert_eq!(
            super::format_uuid(&raw),
            "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448"
        );
    }
}
