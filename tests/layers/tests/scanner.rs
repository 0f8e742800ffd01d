//! The scanner and the graph on small fixtures.

#![allow(clippy::unwrap_used)] // fixture helpers outside #[test] functions

use layers::{Crate, analyze, analyze_sources, members, module_path, strip};
use std::fs;
use std::path::PathBuf;

fn krate(files: &[(&str, &str)]) -> Crate {
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    analyze_sources(&sources).unwrap()
}

/// Every edge as `from -> to`, sorted.
fn edges(k: &Crate) -> Vec<String> {
    k.edges
        .iter()
        .map(|e| format!("{} -> {}", k.files[e.from].path, k.files[e.to].path))
        .collect()
}

/// The `path:line: text` of every use from `from` to `to`.
fn uses(k: &Crate, from: &str, to: &str) -> Vec<String> {
    let (from, to) = (k.file(from).unwrap(), k.file(to).unwrap());
    let edge = k.edges.iter().find(|e| e.from == from && e.to == to);
    edge.map_or(Vec::new(), |e| {
        e.uses
            .iter()
            .map(|u| format!("{}: {}", u.line, u.text))
            .collect()
    })
}

#[test]
fn module_paths() {
    let m = |p| module_path(p).unwrap();
    assert!(m("src/lib.rs").is_empty());
    assert!(m("src/main.rs").is_empty());
    assert_eq!(m("src/a.rs"), ["a"]);
    assert_eq!(m("src/a/mod.rs"), ["a"]);
    assert_eq!(m("src/a/b.rs"), ["a", "b"]);
    assert!(module_path("src/bin/tool.rs").is_err());
}

#[test]
fn strip_blanks_comments_and_literals_and_keeps_lines() {
    let src = r####"// crate::a
/// crate::b
//! crate::c
/* crate::d /* nested crate::e */ still crate::f */ x
let s = "crate::g \" crate::h";
let r = r#"crate::i "quoted" crate::j"#;
let b = b"crate::k"; let br = br##"crate::l"#"##;
let q = '"'; let e = '\''; let u = '\u{22}'; keep::me
fn f<'a>(x: &'a str) -> &'a str { crate::m::n(x) }
let r#type = 1;
"####;
    let out = strip(src);
    assert_eq!(out.lines().count(), src.lines().count());
    for gone in [
        "crate::a", "crate::b", "crate::c", "crate::d", "crate::e", "crate::f", "crate::g",
        "crate::h",
    ] {
        assert!(!out.contains(gone), "{gone} survived:\n{out}");
    }
    for gone in ["crate::i", "crate::j", "crate::k", "crate::l", "quoted"] {
        assert!(!out.contains(gone), "{gone} survived:\n{out}");
    }
    for kept in [
        " x\n",
        "keep::me",
        "<'a>",
        "&'a str",
        "crate::m::n(x)",
        "r#type",
    ] {
        assert!(out.contains(kept), "{kept} lost:\n{out}");
    }
}

#[test]
fn paths_in_comments_and_strings_are_not_edges() {
    let k = krate(&[
        ("src/lib.rs", "pub mod a;\npub mod b;"),
        (
            "src/a.rs",
            r###"// use crate::b;
/* crate::b::f() */
/// [`crate::b`]
fn f() -> &'static str { "crate::b::g" }
fn g() -> &'static str { r#"crate::b::"h""# }
const C: char = '"'; // a `"` in a char must not open a string
"###,
        ),
        ("src/b.rs", "pub fn f() {}"),
    ]);
    assert!(edges(&k).is_empty(), "{:?}", edges(&k));
}

#[test]
fn use_trees_with_braces_self_globs_and_renames() {
    let k = krate(&[
        (
            "src/lib.rs",
            "pub mod a;\npub mod x;\npub const TOP: u8 = 1;",
        ),
        ("src/a/mod.rs", "pub mod b;\npub mod c;\npub fn f() {}"),
        ("src/a/b.rs", ""),
        ("src/a/c/mod.rs", "pub mod d;\npub struct E;"),
        ("src/a/c/d.rs", ""),
        (
            "src/x.rs",
            "use crate::a::{\n    b,\n    c::{d, E},\n    self,\n};\nuse crate::TOP as T;\nuse std::{fmt, io::Read};\n",
        ),
    ]);
    assert_eq!(
        edges(&k),
        [
            "src/x.rs -> src/a/b.rs",
            "src/x.rs -> src/a/c/d.rs",
            "src/x.rs -> src/a/c/mod.rs",
            "src/x.rs -> src/a/mod.rs",
            "src/x.rs -> src/lib.rs"
        ]
    );
    // Each leaf is reported at its own line, as written.
    assert_eq!(uses(&k, "src/x.rs", "src/a/b.rs"), ["2: crate::a::b"]);
    assert_eq!(
        uses(&k, "src/x.rs", "src/a/c/mod.rs"),
        ["3: crate::a::c::E"]
    );
    assert_eq!(uses(&k, "src/x.rs", "src/a/mod.rs"), ["4: crate::a"]);
    assert_eq!(uses(&k, "src/x.rs", "src/lib.rs"), ["6: crate::TOP"]);

    let glob = krate(&[
        ("src/lib.rs", "pub mod a;\npub mod x;"),
        ("src/a.rs", ""),
        ("src/x.rs", "use crate::a::*;"),
    ]);
    assert_eq!(uses(&glob, "src/x.rs", "src/a.rs"), ["1: crate::a::*"]);
}

#[test]
fn names_bound_by_use_resolve_later_paths() {
    let k = krate(&[
        ("src/lib.rs", "pub mod a;\npub mod x;"),
        ("src/a/mod.rs", "pub mod b;"),
        ("src/a/b.rs", "pub fn f() {}"),
        (
            "src/x.rs",
            "use crate::a;\nuse crate::a as z;\nfn g() {\n    a::b::f();\n    z::b::f();\n}\n",
        ),
    ]);
    assert_eq!(
        uses(&k, "src/x.rs", "src/a/b.rs"),
        ["4: a::b::f", "5: z::b::f"]
    );
}

#[test]
fn super_and_self_inside_inline_modules() {
    let k = krate(&[
        ("src/lib.rs", "pub mod a;\npub mod z;"),
        ("src/a/mod.rs", "pub mod b;\npub fn top() {}"),
        ("src/z.rs", ""),
        (
            "src/a/b.rs",
            "pub fn f() {}\n\
             #[cfg(test)]\n\
             mod tests {\n\
                 use super::f;\n\
                 use super::super::top;\n\
                 fn t() { self::helper(); super::f(); }\n\
                 fn helper() {}\n\
                 mod deeper {\n\
                     use super::super::super::top;\n\
                 }\n\
             }\n\
             use super::top as again;\n",
        ),
    ]);
    // `super` in `mod tests` is b itself (no self-edge); `super::super` there is a.
    assert_eq!(edges(&k), ["src/a/b.rs -> src/a/mod.rs"]);
    assert_eq!(
        uses(&k, "src/a/b.rs", "src/a/mod.rs"),
        [
            "5: super::super::top",
            "9: super::super::super::top",
            "12: super::top"
        ]
    );
}

#[test]
fn bare_paths_into_child_modules() {
    let k = krate(&[
        (
            "src/lib.rs",
            "pub mod a;\nfn f() { a::g(); std::mem::drop(1); tracing::info!(\"a::g\"); }",
        ),
        (
            "src/a/mod.rs",
            "mod b;\nmod c;\npub use b::X;\npub fn g() { c::h(); }\nmod tests { fn t() { b::y(); } }",
        ),
        ("src/a/b.rs", "pub struct X;"),
        ("src/a/c.rs", "pub fn h() {}"),
    ]);
    assert_eq!(
        edges(&k),
        [
            "src/a/mod.rs -> src/a/b.rs",
            "src/a/mod.rs -> src/a/c.rs",
            "src/lib.rs -> src/a/mod.rs"
        ]
    );
    assert_eq!(
        uses(&k, "src/a/mod.rs", "src/a/b.rs"),
        ["3: b::X", "5: b::y"]
    );
}

#[test]
fn declarations_self_edges_visibility_and_precise_captures_are_not_edges() {
    let k = krate(&[
        ("src/lib.rs", "pub mod a;\npub mod b;"),
        (
            "src/a.rs",
            "pub(in crate::b) fn f() {}\nfn g() { crate::a::f() }\nfn h() -> impl Sized + use<> {}\n",
        ),
        ("src/b.rs", ""),
    ]);
    assert!(edges(&k).is_empty(), "{:?}", edges(&k));
}

#[test]
fn lifetimes_do_not_hide_the_code_after_them() {
    let k = krate(&[
        ("src/lib.rs", "pub mod a;\npub mod b;"),
        (
            "src/a.rs",
            "fn f<'a>(x: &'a str) -> &'a str { 'outer: loop { break 'outer; } crate::b::g(x) }",
        ),
        ("src/b.rs", "pub fn g(x: &str) -> &str { x }"),
    ]);
    assert_eq!(edges(&k), ["src/a.rs -> src/b.rs"]);
}

#[test]
fn a_three_file_circle_is_found_and_described() {
    let k = krate(&[
        (
            "src/lib.rs",
            "pub mod a;\npub mod b;\npub mod c;\npub mod d;",
        ),
        ("src/a.rs", "use crate::b::B;"),
        ("src/b.rs", "pub struct B;\nfn f() { crate::c::g() }"),
        ("src/c.rs", "pub fn g() {}\n\n\nuse crate::a;"),
        ("src/d.rs", "use crate::a::*;"),
    ]);
    let circles = k.circles();
    assert_eq!(circles.len(), 1);
    let text = k.describe(&circles[0]);
    assert!(
        text.starts_with("circle of 3 files: src/a.rs, src/b.rs, src/c.rs\n"),
        "{text}"
    );
    for line in [
        "src/a.rs -> src/b.rs    at src/a.rs:1: crate::b::B",
        "at src/b.rs:2: crate::c::g",
        "at src/c.rs:4: crate::a",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(!text.contains("src/d.rs"), "{text}");
}

#[test]
fn mod_rs_re_exports() {
    // A user of a re-export depends on mod.rs, and mod.rs on the file it re-exports: no circle...
    let files = [
        ("src/lib.rs", "pub mod user;\npub mod v;"),
        ("src/user.rs", "use crate::v::Thing;"),
        (
            "src/v/mod.rs",
            "mod inner;\npub use self::inner::Thing;\npub use inner::Other;",
        ),
        ("src/v/inner.rs", "pub struct Thing;\npub struct Other;"),
    ];
    let k = krate(&files);
    assert_eq!(
        edges(&k),
        [
            "src/user.rs -> src/v/mod.rs",
            "src/v/mod.rs -> src/v/inner.rs"
        ]
    );
    assert!(k.circles().is_empty());
    // ...until the re-exported file uses something of mod.rs.
    let mut files = files.to_vec();
    files[3] = (
        "src/v/inner.rs",
        "pub struct Thing;\npub struct Other(super::Shared);",
    );
    let k = krate(&files);
    let circles = k.circles();
    assert_eq!(circles.len(), 1);
    assert!(
        k.describe(&circles[0])
            .contains("at src/v/inner.rs:2: super::Shared")
    );
}

#[test]
fn main_rs_beside_a_lib_sees_only_its_own_modules() {
    let k = krate(&[
        ("src/lib.rs", "pub mod cli;"),
        ("src/cli.rs", ""),
        (
            "src/main.rs",
            "mod bench;\nfn main() { cli::run(); bench::go(); }\nuse my_crate::cli;",
        ),
        ("src/bench.rs", ""),
    ]);
    assert_eq!(edges(&k), ["src/main.rs -> src/bench.rs"]);
}

#[test]
fn a_path_attribute_is_an_error() {
    let sources = [(
        "src/lib.rs".to_string(),
        "#[path = \"other.rs\"]\nmod a;".to_string(),
    )];
    let err = analyze_sources(&sources).unwrap_err();
    assert!(
        err.contains("src/lib.rs") && err.contains("#[path]"),
        "{err}"
    );
}

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("layers-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn write(&self, path: &str, text: &str) {
        let path = self.0.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn analyze_reads_a_crate_directory() {
    let dir = TempDir::new("analyze");
    dir.write("src/lib.rs", "pub mod a;\npub mod b;");
    dir.write("src/a/mod.rs", "pub mod deep;\nuse crate::b::f;");
    dir.write("src/a/deep.rs", "use crate::a::*;");
    dir.write("src/b.rs", "pub fn f() { crate::a::deep::g() }");
    dir.write("src/notes.txt", "crate::b");
    dir.write("tests/t.rs", "use my_crate::a;");
    let k = analyze(&dir.0).unwrap();
    let paths: Vec<&str> = k.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["src/a/deep.rs", "src/a/mod.rs", "src/b.rs", "src/lib.rs"]
    );
    assert_eq!(
        edges(&k),
        [
            "src/a/deep.rs -> src/a/mod.rs",
            "src/a/mod.rs -> src/b.rs",
            "src/b.rs -> src/a/deep.rs"
        ]
    );
    assert_eq!(k.circles().len(), 1);
    assert_eq!(layers::count_lines(&dir.0.join("src"), &["rs"]), (4, 6));
}

#[test]
fn workspace_members_are_read_from_the_root_manifest() {
    let toml = "[package]\nmembers = [\"not-this\"]\n\n[workspace]\nresolver = \"3\"\nmembers = [\n    \"plugin\", # the agent\n    \"tests/layers\",\n]\n\n[workspace.package]\n";
    assert_eq!(members(toml).unwrap(), ["plugin", "tests/layers"]);
    assert_eq!(
        members("[workspace]\nmembers = [\"a\", \"b\"]\n").unwrap(),
        ["a", "b"]
    );
    assert!(members("[workspace]\n").is_err());
}
