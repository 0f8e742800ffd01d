//! The `DT_NEEDED` list of a shared object, read with `readelf -d` (binutils). Shared by the
//! benchmarks (`examples/support`) and the tests (`tests/common`).

use std::path::Path;
use std::process::Command;

/// The libraries `lib` needs at load time, in `DT_NEEDED` order.
pub fn needed(lib: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(lib)
        .output()
        .expect("run readelf (binutils)");
    assert!(out.status.success(), "readelf -d {}", lib.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1))
        .map(|l| l.trim_end_matches(']').to_owned())
        .collect()
}
