//! The import checker kept in CI (issue #17): no circle between the files of any crate
//! (`tests/no_import_circles.rs`), and the layer rule written in `plugin/src/lib.rs` (`tests/plugin_layers.rs`).
//! `cargo run -p layers -- <crate-dir>...` prints each crate's graph, circles and line counts (`--dot`: Graphviz).
//!
//! How a crate is read ([`analyze`]): every `.rs` file under `src/` is a module (`src/lib.rs` and `src/main.rs`
//! the root, `src/a.rs` and `src/a/mod.rs` `a`, `src/a/b.rs` `a::b`). Its comments and literals are blanked
//! ([`strip`]), then every path into the crate is taken from `use` trees (braces, `self`, globs, `as`) and from
//! expressions and types: `crate::…`, `super::…` and `self::…` (relative to the inline `mod name { … }` the path
//! is in, tracked by braces), a bare path whose first segment is a child module (`child::f()` in the parent), or
//! a name a `use` bound (`use crate::a; a::b::f()`). Each path belongs to the file that owns its longest module
//! prefix (`crate::a::b::f` is in `src/a/b.rs`, else `src/a.rs`, else the root); `mod x;` uses nothing, and a file
//! using itself is no edge. Circles are Tarjan's strongly connected components of more than one file.
//!
//! Known approximations (this is a lexical reading, not the compiler's):
//! * `#[path]` is not used in this workspace's `src/` trees, so it is not followed: a file with one is an error.
//! * `src/bin/` (separate crate roots) is an error too; `src/main.rs` is read as the root, like `src/lib.rs`.
//! * Paths built by macros are seen only as written in the macro's definition (`$crate::x` as `crate::x`, in
//!   the file defining the macro); paths inside strings (`#[serde(with = "crate::x")]`) are not seen at all.
//! * A name a `use` binds counts in the whole file, whatever block the `use` is in; a bare path inside an
//!   inline module also tries the children of the file's module (as if reached through `use super::*`).
//! * Glob imports bind no names, so `use crate::a::*; b::f()` (with `a::b` a module) misses `a::b`.
//! * A local item or variable with the name of a child module, followed by `::`, is read as that module.

mod graph;
mod layers;
mod scan;
mod workspace;

pub use graph::{Circle, Crate, Edge, SourceFile, Use, analyze, analyze_sources, module_path};
pub use layers::{check_layers, parse_layers};
pub use scan::{Reference, declared_modules, references, strip};
pub use workspace::{count_lines, members, root};
