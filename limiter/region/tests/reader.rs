//! The reader on hand-made v0/v1 files, and random bytes that must never panic it.

use std::mem::offset_of;

use proptest::prelude::*;
use vgpu_region::layout::{
    self, MULTIPROCESS_SHARED_REGION_MAGIC_FLAG, REGION_FILE_SIZE, SharedRegion, v0,
};
use vgpu_region::{LayoutVersion, RegionError, RegionReader, RegionSnapshot};

fn put_i32(buf: &mut [u8], off: usize, v: i32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// A v0 file as old HAMi-core left it: one device, two slots of which one exited.
fn v0_file() -> Vec<u8> {
    let mut b = vec![0u8; v0::REGION_FILE_SIZE as usize];
    put_i32(&mut b, 0, MULTIPROCESS_SHARED_REGION_MAGIC_FLAG);
    put_u64(&mut b, offset_of!(v0::SharedRegion, num), 1);
    b[offset_of!(v0::SharedRegion, uuids)..][..8].copy_from_slice(b"GPU-old0");
    put_u64(&mut b, offset_of!(v0::SharedRegion, limit), 1 << 30);
    put_u64(&mut b, offset_of!(v0::SharedRegion, sm_limit), 30);
    put_i32(&mut b, offset_of!(v0::SharedRegion, proc_num), 2);
    put_i32(&mut b, offset_of!(v0::SharedRegion, utilization_switch), 1);
    put_i32(&mut b, offset_of!(v0::SharedRegion, recent_kernel), 2);
    put_i32(&mut b, offset_of!(v0::SharedRegion, priority), 1);
    let procs = offset_of!(v0::SharedRegion, procs);
    for (slot, (pid, status, total)) in [(41, 1, 500u64), (42, 0, 999)].into_iter().enumerate() {
        let base = procs + slot * v0::PROC_SLOT_SIZE;
        put_i32(&mut b, base + offset_of!(v0::ProcSlot, pid), pid);
        put_i32(&mut b, base + offset_of!(v0::ProcSlot, status), status);
        let used = base + offset_of!(v0::ProcSlot, used);
        put_u64(
            &mut b,
            used + offset_of!(v0::DeviceMemory, data_size),
            total,
        );
        put_u64(&mut b, used + offset_of!(v0::DeviceMemory, total), total);
        let util = base + offset_of!(v0::ProcSlot, device_util);
        put_u64(&mut b, util + offset_of!(v0::DeviceUtil, sm_util), 17);
    }
    b
}

#[test]
fn reads_a_v0_file() {
    let snap = RegionSnapshot::parse(&v0_file()).expect("v0 parses");
    assert_eq!(snap.version, LayoutVersion::V0);
    assert_eq!(snap.device_num, 1);
    assert_eq!(snap.uuid_label(0), Some("GPU-old0"));
    assert_eq!(snap.limit(0), Some(1 << 30));
    assert_eq!(snap.sm_limit(0), Some(30));
    assert_eq!(snap.proc_num, 2);
    assert_eq!(snap.processes.len(), 1, "the exited slot is skipped");
    assert_eq!(snap.processes[0].pid, 41);
    assert_eq!(snap.device_usage(0).total, 500);
    assert_eq!(snap.device_sm_util(0), 17);
    assert_eq!(snap.last_kernel_time, None);
}

#[test]
fn v0_write_backs_land_at_v0_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.cache");
    std::fs::write(&path, v0_file()).expect("write");
    let monitor = RegionReader::open_writable(&path).expect("open");
    assert_eq!(monitor.decay_recent_kernel().expect("decay"), 1);
    monitor.set_utilization_switch(0).expect("switch");
    let bytes = std::fs::read(&path).expect("read");
    let at = |off: usize| i32::from_ne_bytes(bytes[off..off + 4].try_into().expect("4"));
    assert_eq!(at(offset_of!(v0::SharedRegion, recent_kernel)), 1);
    assert_eq!(at(offset_of!(v0::SharedRegion, utilization_switch)), 0);
    assert_eq!(
        bytes.len() as u64,
        v0::REGION_FILE_SIZE,
        "write-backs never grow the file"
    );
}

#[test]
fn rejects_what_the_monitor_would_not_map() {
    let mut no_magic = v0_file();
    put_i32(&mut no_magic, 0, 7);
    assert!(matches!(
        RegionSnapshot::parse(&no_magic),
        Err(RegionError::BadMagic { found: 7, .. })
    ));

    let mut v1 = vec![0u8; REGION_FILE_SIZE as usize];
    put_i32(&mut v1, 0, MULTIPROCESS_SHARED_REGION_MAGIC_FLAG);
    assert!(matches!(
        RegionSnapshot::parse(&v1),
        Err(RegionError::UnsupportedVersion { major: 0, .. })
    ));
    put_i32(&mut v1, 4, 1);
    assert_eq!(
        RegionSnapshot::parse(&v1).expect("v1").version,
        LayoutVersion::V1 { minor: 0 }
    );

    put_i32(&mut v1, offset_of!(SharedRegion, proc_num), 1025);
    assert!(matches!(
        RegionSnapshot::parse(&v1),
        Err(RegionError::Corrupt {
            field: "proc_num",
            ..
        })
    ));
    put_i32(&mut v1, offset_of!(SharedRegion, proc_num), 0);
    put_u64(&mut v1, offset_of!(SharedRegion, device_num), 17);
    assert!(matches!(
        RegionSnapshot::parse(&v1),
        Err(RegionError::Corrupt {
            field: "device_num",
            ..
        })
    ));

    assert!(matches!(
        RegionSnapshot::parse(&v1[..1000]),
        Err(RegionError::Truncated { .. })
    ));
    let mut big = v1.clone();
    big.push(0);
    assert!(matches!(
        RegionSnapshot::parse(&big),
        Err(RegionError::Oversized { .. })
    ));

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.cache");
    std::fs::write(&path, b"").expect("write");
    assert!(matches!(
        RegionReader::open(&path),
        Err(RegionError::Truncated { size: 0, .. })
    ));
}

/// A valid, empty v1.2 file (or `sizeof` bytes when `extra` is false).
fn valid_v1(extra: bool) -> Vec<u8> {
    let mut b = vec![0u8; layout::REGION_SIZE + usize::from(extra)];
    put_i32(&mut b, 0, MULTIPROCESS_SHARED_REGION_MAGIC_FLAG);
    put_i32(&mut b, 4, 1);
    put_i32(&mut b, 8, 2);
    b
}

/// Writes random 8-byte values over `b`: a third at the fields most likely to drive indexing, the rest anywhere.
fn apply_mutations(b: &mut [u8], mutations: &[(usize, u64)]) {
    let hot = [
        offset_of!(SharedRegion, proc_num),
        offset_of!(SharedRegion, device_num),
        offset_of!(SharedRegion, uuids),
        offset_of!(SharedRegion, procs) + offset_of!(layout::ProcSlot, status),
        offset_of!(SharedRegion, procs) + offset_of!(layout::ProcSlot, used) + 32,
    ];
    for &(selector, value) in mutations {
        let off = if selector % 3 == 0 {
            hot[selector / 3 % hot.len()]
        } else {
            selector % (b.len() - 8)
        };
        let off = off.min(b.len() - 8);
        b[off..off + 8].copy_from_slice(&value.to_ne_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_short_buffers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = RegionSnapshot::parse(&bytes);
    }

    #[test]
    fn random_fields_in_a_valid_header_never_panic(
        mutations in proptest::collection::vec((any::<usize>(), any::<u64>()), 0..32),
        extra in any::<bool>(),
        fill in any::<u8>(),
        proc_num in 0..=1024i32,
        device_num in 0..=16u64,
    ) {
        let mut b = valid_v1(extra);
        put_i32(&mut b, offset_of!(SharedRegion, proc_num), proc_num);
        put_u64(&mut b, offset_of!(SharedRegion, device_num), device_num);
        apply_mutations(&mut b, &mutations);
        // Fill the slot area of the first few slots with one random byte so sums overflow and statuses vary.
        let procs = offset_of!(SharedRegion, procs);
        for x in &mut b[procs..procs + 4 * layout::PROC_SLOT_SIZE] {
            *x = fill;
        }
        let parsed = RegionSnapshot::parse(&b);
        if mutations.is_empty() {
            prop_assert!(parsed.is_ok(), "a valid header with any slot bytes parses: {parsed:?}");
        }
        if let Ok(snap) = parsed {
            for d in 0..20 {
                let _ = snap.device_usage(d);
                let _ = snap.device_sm_util(d);
                let _ = snap.uuid(d);
                let _ = snap.uuid_label(d);
            }
        }
    }

    #[test]
    fn random_v0_sized_files_never_panic(mutations in proptest::collection::vec((any::<usize>(), any::<u64>()), 0..32)) {
        let mut b = v0_file();
        for (off, value) in mutations {
            let off = off % (b.len() - 8);
            b[off..off + 8].copy_from_slice(&value.to_ne_bytes());
        }
        if let Ok(snap) = RegionSnapshot::parse(&b) {
            let _ = snap.device_usage(0);
        }
    }
}

/// A v1.2 file with three slots (one exited) and two devices, every field the reader copies non-zero.
fn busy_v1() -> Vec<u8> {
    let mut b = valid_v1(true);
    put_u64(&mut b, offset_of!(SharedRegion, device_num), 2);
    b[offset_of!(SharedRegion, uuids)..][..9].copy_from_slice(b"GPU-aaaa0");
    b[offset_of!(SharedRegion, uuids) + layout::UUID_LEN..][..9].copy_from_slice(b"GPU-bbbb1");
    put_u64(&mut b, offset_of!(SharedRegion, limit) + 8, 7 << 30);
    put_u64(&mut b, offset_of!(SharedRegion, sm_limit) + 8, 40);
    put_i32(&mut b, offset_of!(SharedRegion, proc_num), 3);
    put_i32(&mut b, offset_of!(SharedRegion, utilization_switch), 0);
    put_i32(&mut b, offset_of!(SharedRegion, recent_kernel), -1);
    put_i32(&mut b, offset_of!(SharedRegion, priority), 0);
    put_u64(
        &mut b,
        offset_of!(SharedRegion, last_kernel_time),
        1_700_000_000,
    );
    let procs = offset_of!(SharedRegion, procs);
    for (slot, status) in [1, 0, 2].into_iter().enumerate() {
        let base = procs + slot * layout::PROC_SLOT_SIZE;
        put_i32(&mut b, base, 100 + slot as i32);
        put_i32(&mut b, base + offset_of!(layout::ProcSlot, status), status);
        let used = base + offset_of!(layout::ProcSlot, used) + size_of::<layout::DeviceMemory>();
        put_u64(&mut b, used + 32, (slot as u64 + 1) << 20);
        let util = base
            + offset_of!(layout::ProcSlot, device_util)
            + size_of::<layout::DeviceUtil>()
            + offset_of!(layout::DeviceUtil, sm_util);
        put_u64(&mut b, util, 10 + slot as u64);
        put_u64(&mut b, base + offset_of!(layout::ProcSlot, unused), 3);
    }
    // Garbage beyond proc_num must never be read.
    let beyond = procs + 3 * layout::PROC_SLOT_SIZE;
    put_i32(&mut b, beyond + offset_of!(layout::ProcSlot, status), 1);
    b
}

#[test]
fn a_file_reads_exactly_like_its_whole_bytes_while_copying_only_the_used_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in [("v1.cache", busy_v1()), ("v0.cache", v0_file())] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).expect("write");
        let from_file = RegionReader::open(&path)
            .expect("open")
            .snapshot()
            .expect("snapshot");
        assert_eq!(
            from_file,
            RegionSnapshot::parse(&bytes).expect("parse"),
            "{name}"
        );
        assert_eq!(
            RegionReader::read_snapshot(&path).expect("read_snapshot"),
            from_file
        );
    }
    let snap = RegionSnapshot::parse(&busy_v1()).expect("parse");
    let pids: Vec<i32> = snap.processes.iter().map(|p| p.pid).collect();
    assert_eq!(
        pids,
        [100, 102],
        "the exited slot and the slot past proc_num are skipped"
    );
    assert_eq!(snap.device_usage(1).total, (1 << 20) + (3 << 20));
    assert_eq!(snap.device_sm_util(1), 10 + 12);
    assert_eq!(snap.limit(1), Some(7 << 30));
    assert_eq!(snap.last_kernel_time, Some(1_700_000_000));
    assert_eq!(snap.processes.iter().map(|p| p.refused).sum::<u64>(), 6);
}

#[test]
fn feedback_reads_uuids_priority_and_the_two_monitor_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = dir.path().join("v1.cache");
    std::fs::write(&v1, busy_v1()).expect("write");
    let f = RegionReader::open(&v1)
        .expect("open")
        .feedback()
        .expect("feedback");
    assert_eq!(f.version, LayoutVersion::V1 { minor: 2 });
    assert_eq!(f.uuids, ["GPU-aaaa0", "GPU-bbbb1"]);
    assert_eq!(f.last_kernel_time, Some(1_700_000_000));
    assert_eq!(
        (f.priority, f.recent_kernel, f.utilization_switch),
        (0, -1, 0)
    );

    let v0 = dir.path().join("v0.cache");
    std::fs::write(&v0, v0_file()).expect("write");
    let f = RegionReader::open(&v0)
        .expect("open")
        .feedback()
        .expect("feedback");
    assert_eq!(f.version, LayoutVersion::V0);
    assert_eq!(f.uuids, ["GPU-old0"]);
    assert_eq!(f.last_kernel_time, None);
    assert_eq!(
        (f.priority, f.recent_kernel, f.utilization_switch),
        (1, 2, 1)
    );

    // An out-of-range device_num is refused by the file paths as by `parse`, not clamped.
    let mut corrupt = busy_v1();
    put_u64(&mut corrupt, offset_of!(SharedRegion, device_num), 17);
    let bad = dir.path().join("bad.cache");
    std::fs::write(&bad, corrupt).expect("write");
    let reader = RegionReader::open(&bad).expect("open");
    for found in [
        reader.feedback().map(|_| ()),
        RegionReader::read_snapshot(&bad).map(|_| ()),
    ] {
        assert!(
            matches!(
                found,
                Err(RegionError::Corrupt {
                    field: "device_num",
                    value: 17,
                    ..
                })
            ),
            "{found:?}"
        );
    }
}

#[test]
fn a_region_truncated_under_the_monitor_is_an_error_never_a_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shrinks.cache");
    std::fs::write(&path, busy_v1()).expect("write");
    let monitor = RegionReader::open_writable(&path).expect("open");
    // The container truncates its file between two monitor rounds (a mapping would SIGBUS here).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(4096)
        .expect("truncate");
    assert!(matches!(
        monitor.decay_recent_kernel(),
        Err(RegionError::Truncated { size: 4096, .. })
    ));
    assert!(matches!(
        monitor.set_utilization_switch(1),
        Err(RegionError::Truncated { .. })
    ));
    assert!(matches!(
        monitor.snapshot(),
        Err(RegionError::Truncated { .. })
    ));
    assert!(matches!(
        monitor.feedback(),
        Err(RegionError::Truncated { .. })
    ));
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        4096,
        "a refused write-back never grows the file"
    );
}

#[test]
fn a_fifo_or_a_symlink_in_place_of_a_region_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo.cache");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    // A blocking open of a FIFO without a writer would hang here forever.
    assert!(matches!(
        RegionReader::open(&fifo),
        Err(RegionError::Io { op: "open", .. })
    ));
    assert!(RegionReader::open_writable(&fifo).is_err());

    let target = dir.path().join("target.cache");
    std::fs::write(&target, busy_v1()).expect("write");
    let link = dir.path().join("link.cache");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    assert!(RegionReader::open(&target).is_ok());
    assert!(matches!(
        RegionReader::open_writable(&link),
        Err(RegionError::Io { op: "open", .. })
    ));
}
