//! The layer rule written in a crate root's doc (`plugin/src/lib.rs`), and the check of a graph against it.

use crate::graph::Crate;
use std::collections::{BTreeSet, HashMap};

/// The layers of the doc block in `lib_rs`, topmost first, each the top-level module names of one line:
///
/// ```text
/// //! ```text
/// //! layers (a file may use files of its own module, and of modules on lower lines; …):
/// //! agent cli       | composition root; flags into config
/// //! error volcano   | …
/// //! ```
/// ```
pub fn parse_layers(lib_rs: &str) -> Result<Vec<Vec<String>>, String> {
    let doc: Vec<&str> = lib_rs
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let start =
        (1..doc.len()).find(|&k| doc[k - 1].trim() == "```text" && doc[k].starts_with("layers"));
    let start = start
        .ok_or("no layers block: a `//! ```text` block whose first line starts with `layers`")?;
    let mut layers = Vec::new();
    for line in &doc[start + 1..] {
        if line.trim() == "```" {
            return if layers.is_empty() {
                Err("the layers block lists no layer".to_string())
            } else {
                Ok(layers)
            };
        }
        let (names, _description) = line
            .split_once('|')
            .ok_or_else(|| format!("layer line without `|`: {line}"))?;
        let names: Vec<String> = names.split_whitespace().map(str::to_string).collect();
        if names.is_empty() {
            return Err(format!("layer line without a module name: {line}"));
        }
        layers.push(names);
    }
    Err("the layers block has no closing ```".to_string())
}

/// Everything in `krate` that breaks `layers`: a top-level module on no line, a name on two lines or naming no
/// module, and each use (`path:line: text`) of a file of another top-level module that is not on a lower line.
/// The crate root (`src/lib.rs`, `src/main.rs`) may use anything.
pub fn check_layers(krate: &Crate, layers: &[Vec<String>]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut level: HashMap<&str, usize> = HashMap::new();
    for (k, names) in layers.iter().enumerate() {
        for name in names {
            if level.insert(name, k).is_some() {
                problems.push(format!("layers: `{name}` is on more than one line"));
            }
        }
    }
    let top = |f: usize| krate.files[f].module.first().map(String::as_str);
    let tops: BTreeSet<&str> = (0..krate.files.len()).filter_map(top).collect();
    for t in &tops {
        if !level.contains_key(t) {
            problems.push(format!("layers: top-level module `{t}` is on no line"));
        }
    }
    let mut listed: Vec<&&str> = level.keys().filter(|n| !tops.contains(*n)).collect();
    listed.sort();
    problems.extend(
        listed
            .into_iter()
            .map(|n| format!("layers: `{n}` is listed but there is no such module")),
    );
    for edge in &krate.edges {
        let (Some(x), Some(y)) = (top(edge.from), top(edge.to)) else {
            continue;
        };
        let (Some(&lx), Some(&ly)) = (level.get(x), level.get(y)) else {
            continue;
        };
        if x != y && ly <= lx {
            let (from, to) = (&krate.files[edge.from].path, &krate.files[edge.to].path);
            for u in &edge.uses {
                problems.push(format!(
                    "{from}:{}: `{}` uses {to}: `{x}` (layer {}) may not use `{y}` (layer {}, not lower)",
                    u.line,
                    u.text,
                    lx + 1,
                    ly + 1
                ));
            }
        }
    }
    problems
}
