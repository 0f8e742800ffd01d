//! The committed `src/generated/v1beta1.rs` must be exactly what the vendored `api.proto` generates.
//!
//! Run with `KUBELET_API_REGENERATE=1` to rewrite the committed module after changing the proto.

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out_dir: &Path) -> PathBuf {
    let proto_dir = crate_dir().join("proto");
    let fds = protox::compile(["v1beta1/api.proto"], [&proto_dir])
        .expect("api.proto compiles with protox");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_fds(fds)
        .expect("tonic-prost-build generates the module");
    out_dir.join("v1beta1.rs")
}

#[test]
fn committed_module_matches_the_vendored_proto() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let fresh = std::fs::read_to_string(generate(tmp.path())).expect("generated file");
    let committed_path = crate_dir().join("src/generated/v1beta1.rs");

    if std::env::var_os("KUBELET_API_REGENERATE").is_some() {
        std::fs::write(&committed_path, &fresh).expect("write committed module");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).expect("committed module exists");
    assert!(
        committed == fresh,
        "{} is stale: regenerate it with `KUBELET_API_REGENERATE=1 cargo test -p kubelet-api --test generated_code`",
        committed_path.display()
    );
}
