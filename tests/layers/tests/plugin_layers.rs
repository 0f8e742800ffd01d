//! The plugin's files obey the layer rule written in `plugin/src/lib.rs`; and that rule's reading on fixtures.

#![allow(clippy::unwrap_used)] // fixture helpers outside #[test] functions

use layers::{analyze_sources, check_layers, parse_layers};
use std::fs;

#[test]
fn plugin_layers() {
    let plugin = layers::root().join("plugin");
    let lib_rs = fs::read_to_string(plugin.join("src/lib.rs")).unwrap();
    let rule = parse_layers(&lib_rs).unwrap_or_else(|e| panic!("plugin/src/lib.rs: {e}"));
    let krate = layers::analyze(&plugin).unwrap();
    let problems = check_layers(&krate, &rule);
    assert!(
        problems.is_empty(),
        "plugin breaks the layers of plugin/src/lib.rs:\n{}",
        problems.join("\n")
    );
}

const LIB_RS: &str = "//! The crate.
//!
//! ```text
//! layers (a file may use files of its own module, and of modules on lower lines; never a module on its own line or above):
//! agent cli     | composition root; flags into config
//! kubelet gpu   | the kubelet side
//! config        | settings
//! ```
//!
//! More doc.

pub mod agent;
";

#[test]
fn the_rule_is_parsed_from_the_doc_block() {
    let rule = parse_layers(LIB_RS).unwrap();
    assert_eq!(
        rule,
        [vec!["agent", "cli"], vec!["kubelet", "gpu"], vec!["config"]]
    );
}

#[test]
fn a_missing_or_broken_block_is_an_error() {
    let err = |text: &str| parse_layers(text).unwrap_err();
    assert!(err("//! The crate.\npub mod agent;\n").contains("no layers block"));
    assert!(
        err("//! ```text\n//! something else\n//! a | b\n//! ```\n").contains("no layers block")
    );
    assert!(err("//! ```text\n//! layers:\n//! agent cli\n//! ```\n").contains("without `|`"));
    assert!(
        err("//! ```text\n//! layers:\n//!  | nothing\n//! ```\n")
            .contains("without a module name")
    );
    assert!(err("//! ```text\n//! layers:\n//! a | b\n").contains("no closing"));
}

fn crate_of(files: &[(&str, &str)]) -> layers::Crate {
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    analyze_sources(&sources).unwrap()
}

#[test]
fn uses_downward_and_within_a_module_pass() {
    let rule = parse_layers(LIB_RS).unwrap();
    let krate = crate_of(&[
        (
            "src/lib.rs",
            "pub mod agent; pub mod cli; pub mod kubelet; pub mod gpu; pub mod config;\npub use cli::main;",
        ),
        (
            "src/agent.rs",
            "use crate::kubelet::endpoint;\nuse crate::config::Settings;",
        ),
        (
            "src/cli.rs",
            "use crate::config::Settings;\npub fn main() {}",
        ),
        (
            "src/kubelet/mod.rs",
            "pub mod endpoint;\nuse crate::config;",
        ),
        (
            "src/kubelet/endpoint.rs",
            "use super::*;\nuse crate::kubelet::X;",
        ),
        ("src/gpu.rs", "use crate::config::Settings;"),
        (
            "src/config.rs",
            "pub struct Settings;\nfn f() { crate::main() }",
        ),
    ]);
    assert_eq!(check_layers(&krate, &rule), Vec::<String>::new());
}

#[test]
fn uses_upward_and_along_a_line_are_reported_with_their_lines() {
    let rule = parse_layers(LIB_RS).unwrap();
    let krate = crate_of(&[
        (
            "src/lib.rs",
            "pub mod agent; pub mod cli; pub mod kubelet; pub mod gpu; pub mod config;",
        ),
        ("src/agent.rs", "pub fn error_chain() {}"),
        ("src/cli.rs", "\nfn f() { crate::agent::error_chain() }"),
        ("src/kubelet/mod.rs", "pub mod endpoint;"),
        ("src/kubelet/endpoint.rs", "use crate::gpu::Plan;"),
        ("src/gpu.rs", "pub struct Plan;"),
        (
            "src/config.rs",
            "use crate::kubelet::endpoint;\n\nuse crate::agent::error_chain;",
        ),
    ]);
    let problems = check_layers(&krate, &rule);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems[0].starts_with("src/cli.rs:2: `crate::agent::error_chain` uses src/agent.rs"),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("src/kubelet/endpoint.rs:1: `crate::gpu::Plan`"))
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("src/config.rs:1: `crate::kubelet::endpoint`"))
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("src/config.rs:3: `crate::agent::error_chain`"))
    );
}

#[test]
fn the_rule_must_name_every_module_once_and_only_modules_that_exist() {
    let rule = parse_layers(LIB_RS).unwrap();
    let krate = crate_of(&[
        (
            "src/lib.rs",
            "pub mod agent; pub mod cli; pub mod kubelet; pub mod config; pub mod extra;",
        ),
        ("src/agent.rs", ""),
        ("src/cli.rs", ""),
        ("src/kubelet.rs", ""),
        ("src/config.rs", ""),
        ("src/extra.rs", ""),
    ]);
    assert_eq!(
        check_layers(&krate, &rule),
        [
            "layers: top-level module `extra` is on no line",
            "layers: `gpu` is listed but there is no such module"
        ]
    );
    let twice = vec![
        vec!["agent".to_string()],
        vec![
            "agent".to_string(),
            "cli".to_string(),
            "kubelet".to_string(),
            "config".to_string(),
            "extra".to_string(),
        ],
    ];
    assert_eq!(
        check_layers(&krate, &twice),
        ["layers: `agent` is on more than one line"]
    );
}
