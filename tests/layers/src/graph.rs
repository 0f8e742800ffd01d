//! A crate's files, which files each one uses, and the circles among them.

use crate::scan;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

/// One crate's `src/` as a graph of files.
#[derive(Debug, Clone)]
pub struct Crate {
    /// Sorted by path.
    pub files: Vec<SourceFile>,
    /// At most one per (from, to), sorted; never from a file to itself.
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Relative to the crate's directory, with `/`: `src/volcano/mod.rs`.
    pub path: String,
    /// Its module path: `[]` for `src/lib.rs` and `src/main.rs`, `["volcano"]` for `src/volcano/mod.rs`.
    pub module: Vec<String>,
}

/// File `from` uses file `to` (indices into [`Crate::files`]).
#[derive(Debug, Clone)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    /// Every place it does, in order; never empty.
    pub uses: Vec<Use>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub line: usize,
    pub text: String,
}

/// Files that reach each other through edges (a strongly connected component of more than one file).
#[derive(Debug, Clone)]
pub struct Circle {
    /// Indices into [`Crate::files`], sorted.
    pub files: Vec<usize>,
    /// Indices into [`Crate::edges`]: every edge between two of these files.
    pub edges: Vec<usize>,
}

/// The module path of a file given relative to its crate's directory (`src/a/b.rs` gives `["a", "b"]`).
pub fn module_path(path: &str) -> Result<Vec<String>, String> {
    let inner = path
        .strip_prefix("src/")
        .and_then(|p| p.strip_suffix(".rs"));
    let inner = inner.ok_or_else(|| format!("{path}: not a .rs file under src/"))?;
    if inner.starts_with("bin/") {
        return Err(format!(
            "{path}: src/bin/ holds separate crate roots, which this checker does not read"
        ));
    }
    if inner == "lib" || inner == "main" {
        return Ok(Vec::new());
    }
    let mut module: Vec<String> = inner.split('/').map(str::to_string).collect();
    if module.last().is_some_and(|m| m == "mod") {
        module.pop();
    }
    Ok(module)
}

/// Reads every `.rs` file under `crate_dir/src/`.
pub fn analyze(crate_dir: &Path) -> Result<Crate, String> {
    let mut found = Vec::new();
    rs_files(&crate_dir.join("src"), &mut found)?;
    let mut sources = Vec::new();
    for file in found {
        let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let rel = file
            .strip_prefix(crate_dir)
            .unwrap_or(&file)
            .to_string_lossy();
        let rel = rel.replace(std::path::MAIN_SEPARATOR, "/");
        sources.push((rel, text));
    }
    analyze_sources(&sources)
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_dir() {
            rs_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The graph of `(path relative to the crate's directory, text)` pairs, e.g. `("src/lib.rs", "pub mod a;")`.
pub fn analyze_sources(sources: &[(String, String)]) -> Result<Crate, String> {
    let mut sorted: Vec<&(String, String)> = sources.iter().collect();
    sorted.sort();
    let mut files = Vec::new();
    let mut modules: HashMap<Vec<String>, usize> = HashMap::new();
    for (path, _) in &sorted {
        let module = module_path(path)?;
        // The root is `src/lib.rs` (sorted before `src/main.rs`) when there is one.
        modules.entry(module.clone()).or_insert(files.len());
        files.push(SourceFile {
            path: path.clone(),
            module,
        });
    }
    let has_lib = files.iter().any(|f| f.path == "src/lib.rs");
    let mut edges: BTreeMap<(usize, usize), Vec<Use>> = BTreeMap::new();
    for (from, (path, text)) in sorted.iter().enumerate() {
        // Beside a lib.rs, main.rs is a crate root of its own: its children are only the modules it declares
        // (and a lib's module name there is the lib's, reached by the crate's name).
        let declared = (has_lib && path == "src/main.rs").then(|| scan::declared_modules(text));
        let is_module = |m: &[String]| {
            modules.contains_key(m)
                && declared
                    .as_ref()
                    .is_none_or(|d| m.first().is_none_or(|f| d.contains(f)))
        };
        let refs = scan::references(text, &files[from].module, &is_module)
            .map_err(|e| format!("{path}: {e}"))?;
        for r in refs {
            // The file that owns the longest prefix of the path: `a::b::f` is in `a/b.rs`, else `a.rs`, else the root.
            let owner = (0..=r.path.len())
                .rev()
                .find_map(|k| modules.get(&r.path[..k]).copied());
            if let Some(to) = owner.filter(|&to| to != from) {
                edges.entry((from, to)).or_default().push(Use {
                    line: r.line,
                    text: r.text,
                });
            }
        }
    }
    let edges = edges
        .into_iter()
        .map(|((from, to), uses)| Edge { from, to, uses })
        .collect();
    Ok(Crate { files, edges })
}

impl Crate {
    /// The index of the file at `path` (relative to the crate's directory).
    pub fn file(&self, path: &str) -> Option<usize> {
        self.files.iter().position(|f| f.path == path)
    }

    /// Every circle (strongly connected component of more than one file), found with Kosaraju's algorithm:
    /// files in the order a depth-first search finishes them, then, from the last finished, the files that
    /// reach each one not yet placed.
    pub fn circles(&self) -> Vec<Circle> {
        let n = self.files.len();
        let (mut forward, mut backward) = (vec![Vec::new(); n], vec![Vec::new(); n]);
        for e in &self.edges {
            forward[e.from].push(e.to);
            backward[e.to].push(e.from);
        }
        let (mut seen, mut finished) = (vec![false; n], Vec::new());
        for v in 0..n {
            finish(v, &forward, &mut seen, &mut finished);
        }
        let mut component = vec![None; n];
        for &v in finished.iter().rev() {
            place(v, v, &backward, &mut component);
        }
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (v, c) in component.iter().enumerate() {
            groups.entry(c.unwrap_or(v)).or_default().push(v);
        }
        let mut circles: Vec<Circle> = (groups.into_values().filter(|files| files.len() > 1))
            .map(|files| {
                let inside = |f: usize| files.contains(&f);
                let edges = (0..self.edges.len())
                    .filter(|&e| inside(self.edges[e].from) && inside(self.edges[e].to));
                Circle {
                    edges: edges.collect(),
                    files,
                }
            })
            .collect();
        circles.sort_by_key(|c| c.files[0]);
        circles
    }

    /// `path:line: text`, for the first place where `edge` is used, and how many more there are.
    pub fn example(&self, edge: &Edge) -> String {
        let first = &edge.uses[0];
        let more = match edge.uses.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more)"),
        };
        format!(
            "{}:{}: {}{more}",
            self.files[edge.from].path, first.line, first.text
        )
    }

    /// A circle for a reader who must break it: its files, then each edge in it with a line that makes it.
    pub fn describe(&self, circle: &Circle) -> String {
        let names: Vec<&str> = circle
            .files
            .iter()
            .map(|&f| self.files[f].path.as_str())
            .collect();
        let mut out = format!("circle of {} files: {}\n", names.len(), names.join(", "));
        for &e in &circle.edges {
            let edge = &self.edges[e];
            let (from, to) = (&self.files[edge.from].path, &self.files[edge.to].path);
            out += &format!("    {from} -> {to}    at {}\n", self.example(edge));
        }
        out
    }
}

fn finish(v: usize, adjacent: &[Vec<usize>], seen: &mut [bool], finished: &mut Vec<usize>) {
    if !seen[v] {
        seen[v] = true;
        for &w in &adjacent[v] {
            finish(w, adjacent, seen, finished);
        }
        finished.push(v);
    }
}

fn place(v: usize, id: usize, backward: &[Vec<usize>], component: &mut [Option<usize>]) {
    if component[v].is_none() {
        component[v] = Some(id);
        for &w in &backward[v] {
            place(w, id, backward, component);
        }
    }
}
