//! `cargo run -p layers -- [--dot] [<crate-dir>...]`: for each crate (every workspace member when none is given),
//! the files each file uses, its circles and its line counts, then a table of the counts; with `--dot`, only
//! a Graphviz graph (edges in a circle in red).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dot = args.iter().any(|a| a == "--dot");
    let mut dirs: Vec<PathBuf> = args
        .iter()
        .filter(|a| *a != "--dot")
        .map(PathBuf::from)
        .collect();
    if dirs.is_empty() {
        let root = layers::root();
        let toml = std::fs::read_to_string(root.join("Cargo.toml")).unwrap_or_default();
        match layers::members(&toml) {
            Ok(members) => dirs = members.iter().map(|m| root.join(m)).collect(),
            Err(e) => {
                eprintln!("{}: {e}", root.join("Cargo.toml").display());
                return ExitCode::FAILURE;
            }
        }
    }
    let mut failed = false;
    let mut table = Vec::new();
    for dir in &dirs {
        let name = dir
            .strip_prefix(layers::root())
            .unwrap_or(dir)
            .display()
            .to_string();
        let krate = match layers::analyze(dir) {
            Ok(krate) => krate,
            Err(e) => {
                eprintln!("{name}: {e}");
                failed = true;
                continue;
            }
        };
        let circles = krate.circles();
        if dot {
            print_dot(&name, &krate, &circles);
            continue;
        }
        println!("== {name}");
        for (f, file) in krate.files.iter().enumerate() {
            let uses: Vec<&str> = krate
                .edges
                .iter()
                .filter(|e| e.from == f)
                .map(|e| krate.files[e.to].path.as_str())
                .collect();
            println!(
                "{} -> {}",
                file.path,
                if uses.is_empty() {
                    "(nothing)".to_string()
                } else {
                    uses.join(", ")
                }
            );
        }
        if circles.is_empty() {
            println!("no circle");
        }
        for circle in &circles {
            print!("{}", krate.describe(circle));
        }
        let src = layers::count_lines(&dir.join("src"), &["rs"]);
        let tests = layers::count_lines(&dir.join("tests"), &["rs"]);
        let c = layers::count_lines(dir, &["c", "h"]);
        println!(
            "lines: src {} in {} .rs files; tests {} in {} .rs files; C {} in {} .c/.h files\n",
            src.1, src.0, tests.1, tests.0, c.1, c.0
        );
        table.push((name, src.1, tests.1, c.1, circles.len()));
    }
    if !dot {
        println!(
            "{:<22} {:>8} {:>8} {:>8} {:>8}",
            "crate", "src", "tests", "C (.c/.h)", "circles"
        );
        for (name, src, tests, c, circles) in table {
            println!("{name:<22} {src:>8} {tests:>8} {c:>8} {circles:>8}");
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_dot(name: &str, krate: &layers::Crate, circles: &[layers::Circle]) {
    let in_circle = |e: usize| circles.iter().any(|c| c.edges.contains(&e));
    println!("digraph \"{name}\" {{\n    rankdir=LR;\n    node [shape=box];");
    for file in &krate.files {
        println!("    \"{}\";", file.path);
    }
    for (k, e) in krate.edges.iter().enumerate() {
        let color = if in_circle(k) { " [color=red]" } else { "" };
        println!(
            "    \"{}\" -> \"{}\"{color};",
            krate.files[e.from].path, krate.files[e.to].path
        );
    }
    println!("}}");
}
