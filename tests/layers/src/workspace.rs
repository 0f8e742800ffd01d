//! The workspace around the crates: its members, and line counts.

use std::fs;
use std::path::{Path, PathBuf};

/// The workspace root: two levels above this crate (`tests/layers`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `members` array of a root `Cargo.toml`'s `[workspace]` table (a tiny reading: `#` comments dropped,
/// then the quoted strings between the `[` and `]` after a line that starts with `members`).
pub fn members(cargo_toml: &str) -> Result<Vec<String>, String> {
    let text: Vec<&str> = cargo_toml
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect();
    let text = format!("\n{}", text.join("\n"));
    let table = text
        .split("\n[")
        .find(|t| t.starts_with("workspace]"))
        .ok_or("no [workspace]")?;
    let start = table
        .find("\nmembers")
        .ok_or("no `members` in [workspace]")?;
    let array = table[start..]
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'));
    let array = array.ok_or("`members` is not a closed array")?.0;
    let names = array
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string());
    Ok(names.filter(|m| !m.is_empty()).collect())
}

/// How many files with one of `extensions` are under `dir`, and their lines; `target/` and directories that are
/// crates of their own (with a `Cargo.toml`) are left out. A missing `dir` counts (0, 0).
pub fn count_lines(dir: &Path, extensions: &[&str]) -> (usize, usize) {
    let (mut files, mut lines) = (0, 0);
    let Ok(entries) = fs::read_dir(dir) else {
        return (0, 0);
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") || path.join("Cargo.toml").exists() {
                continue;
            }
            let (f, l) = count_lines(&path, extensions);
            files += f;
            lines += l;
        } else if path
            .extension()
            .is_some_and(|x| extensions.iter().any(|e| x == *e))
        {
            files += 1;
            lines += fs::read_to_string(&path).map_or(0, |t| t.lines().count());
        }
    }
    (files, lines)
}
