//! Benchmark (not a test): what `libvgpu.so` costs a process that never touches CUDA. HAMi's
//! device plugin lists the library in the container's `/etc/ld.so.preload`, so every shell, `ps`,
//! `python -c`, every short-lived tool of a GPU container loads it.
//!
//! `cargo run --release -p vgpu-limiter --example exec_bench [-- <rounds> [<program>] [<library>...]]`
//!
//! Builds `libvgpu.so` in release (as `examples/bench.rs` does), compiles `benches/c/exec.c` and a
//! one-function `empty.so`, then times fork + execve + exit + wait of `<program>` (default
//! `/bin/true`) `rounds` times (default 2000) for each variant, interleaved round by round: no
//! preload, `empty.so` preloaded (what any preloaded file costs: the floor), our `libvgpu.so`, and
//! each further `<library>` (e.g. the glibc-2.17 build `target/x86_64-unknown-linux-gnu/release/libvgpu.so`
//! from `limiter/build-portable.sh`, or HAMi-core's `libvgpu.so`). Prints per variant the median
//! µs, the added µs against no preload, the child's minor page faults, and for each library its
//! `DT_NEEDED` list, the relocations the dynamic loader processed for it (`LD_DEBUG=statistics`,
//! minus those of a run without it) and the pages of it resident in a process that did nothing
//! (`/proc/self/smaps` of `cat`).

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/mod.rs"]
mod support;

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: u32 = args
        .next()
        .map(|r| {
            r.parse()
                .unwrap_or_else(|_| panic!("rounds: expected a positive number, got {r:?}"))
        })
        .unwrap_or(2000);
    let program = args.next().unwrap_or_else(|| "/bin/true".to_owned());
    let extra: Vec<PathBuf> = args.map(PathBuf::from).collect();

    let lib = support::build_libvgpu(&support::workspace_target());
    let dir = tempfile::tempdir().expect("temporary directory");
    let exec = support::compile_plain(dir.path(), "benches/c/exec.c", "exec");
    let empty = empty_library(dir.path());

    let mut variants: Vec<(String, Option<PathBuf>)> = vec![
        ("no preload".into(), None),
        ("empty.so (any preload)".into(), Some(empty)),
        (
            "libvgpu.so (this tree)".into(),
            Some(std::fs::canonicalize(&lib).expect("libvgpu.so built")),
        ),
    ];
    for e in extra {
        let abs = std::fs::canonicalize(&e)
            .unwrap_or_else(|err| panic!("library {}: {err}", e.display()));
        variants.push((e.display().to_string(), Some(abs)));
    }

    let out = Command::new(&exec)
        .arg(rounds.to_string())
        .arg(&program)
        .args(variants.iter().map(|(_, lib)| {
            lib.as_ref()
                .map_or_else(|| "none".into(), |l| l.as_os_str().to_owned())
        }))
        .output()
        .expect("run exec");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exec failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(f64, f64)> = stdout
        .lines()
        .map(|l| (field(l, "median_us="), field(l, "minflt=")))
        .collect();
    assert_eq!(rows.len(), variants.len(), "one line per variant: {stdout}");

    let base_stats = loader_statistics(&program, None);
    println!("fork + exec of {program}, {rounds} rounds interleaved, medians:");
    println!(
        "{:<48} {:>10} {:>10} {:>8} {:>14} {:>9}",
        "variant", "µs", "added µs", "minflt", "relocations", "resident"
    );
    for ((name, lib), (us, flt)) in variants.iter().zip(&rows) {
        let (relocs, resident) = match lib {
            None => (String::from("-"), String::from("-")),
            Some(l) => {
                let s = loader_statistics(&program, Some(l));
                (
                    format!("{}+{}", s.0 - base_stats.0, s.1 - base_stats.1),
                    format!("{} KiB", resident_kib(l)),
                )
            }
        };
        println!(
            "{name:<48} {us:>10.1} {:>+10.1} {flt:>8.0} {relocs:>14} {resident:>9}",
            us - rows[0].0
        );
    }
    println!("(relocations: symbol + relative, as counted by the dynamic loader)");
    for (name, lib) in &variants {
        if let Some(l) = lib {
            println!("{name}: needs {}", support::needed(l).join(", "));
        }
    }
}

fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// A shared object with one empty function: the cost of preloading any file at all.
fn empty_library(dir: &Path) -> PathBuf {
    let src = dir.join("empty.c");
    std::fs::write(&src, "void vgpu_exec_bench_empty(void) {}\n").expect("write empty.c");
    let out = dir.join("empty.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(cc)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling empty.so failed");
    out
}

/// (symbol relocations, relative relocations) the dynamic loader processed for `program`.
fn loader_statistics(program: &str, lib: Option<&Path>) -> (i64, i64) {
    let mut cmd = Command::new(program);
    cmd.env("LD_DEBUG", "statistics").env_remove("LD_PRELOAD");
    if let Some(l) = lib {
        cmd.env("LD_PRELOAD", l);
    }
    let out = cmd.output().expect("run program");
    let text = String::from_utf8_lossy(&out.stderr);
    let count = |name: &str| -> i64 {
        text.lines()
            .filter_map(|l| l.split_once(name).map(|(_, v)| v.trim()))
            .filter_map(|v| v.parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no {name:?} in LD_DEBUG output: {text}"))
    };
    (
        count("final number of relocations:"),
        count("number of relative relocations:"),
    )
}

/// KiB of `lib` resident in a `cat` that only printed its own mappings.
fn resident_kib(lib: &Path) -> u64 {
    let out = Command::new("cat")
        .arg("/proc/self/smaps")
        .env("LD_PRELOAD", lib)
        .output()
        .expect("run cat");
    let smaps = String::from_utf8_lossy(&out.stdout);
    let target = lib.to_string_lossy();
    let mut ours = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            ours = line.ends_with(target.as_ref());
        } else if ours && let Some(v) = line.strip_prefix("Rss:") {
            kib += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    kib
}
