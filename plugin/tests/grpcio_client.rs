//! A gRPC client nobody here wrote: Python `grpcio` (gRPC C-core) with default channel options, against the real
//! agent binary. C-core from 1.57 sends the percent-encoded socket path as `:authority`, which h2 alone resets
//! with PROTOCOL_ERROR. The Python stubs are generated at test time from the vendored `api.proto` with
//! `grpc_tools.protoc`; the interpreter is the test venv's (`target/test-venv`, filled by
//! `tests/prereqs/install.sh` from the pins in `tests/prereqs/requirements.txt`).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec, SimNode};

/// Calls `GetDevicePluginOptions` and reads the first `ListAndWatch` message on each socket given, with a
/// channel built the way a user would (`grpc.insecure_channel("unix:<path>")`, no options), and prints one
/// JSON line per socket.
const CLIENT: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import grpc
import api_pb2, api_pb2_grpc

for socket in sys.argv[2:]:
    with grpc.insecure_channel("unix:" + socket) as channel:
        stub = api_pb2_grpc.DevicePluginStub(channel)
        options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=10)
        stream = stub.ListAndWatch(api_pb2.Empty(), timeout=10)
        first = next(stream)
        stream.cancel()
        print(json.dumps({
            "socket": socket,
            "grpc": grpc.__version__,
            "pre_start_required": options.pre_start_required,
            "devices": len(first.devices),
            "healthy": sum(1 for d in first.devices if d.health == "Healthy"),
        }))
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The venv's interpreter, failing (never skipping) with the command that installs it when it is missing.
fn venv_python() -> PathBuf {
    let python = workspace().join("target/test-venv/bin/python");
    let usable = python.exists()
        && Command::new(&python)
            .args(["-c", "import grpc, grpc_tools.protoc, google.protobuf"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        usable,
        "{} with grpcio, grpcio-tools and protobuf is needed for this test; run tests/prereqs/install.sh \
         (it installs the pins of tests/prereqs/requirements.txt into target/test-venv)",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_with_default_options_gets_options_and_the_first_device_list() {
    let python = venv_python();
    let stubs = tempfile::tempdir().unwrap();
    let proto_dir = workspace().join("plugin/kubelet-api/proto/v1beta1");
    let out = Command::new(&python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_dir.display()))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg("api.proto")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpc_tools.protoc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let sim = SimNode::new(NodeSpec::uniform(2, GpuSpec::t4)).unwrap();
    let (_dir, kubelet) = kubelet().await;
    let agent = Agent::spawn(agent_command(&sim, kubelet.socket()));
    kubelet
        .wait_for_resources(&ALL, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));

    let sockets = [
        "nvidia-vgpu-number.sock",
        "nvidia-vgpu-memory.sock",
        "nvidia-vgpu-cores.sock",
    ]
    .map(|s| kubelet.dir().join(s));
    let script = stubs.path().join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&script)
            .arg(stubs.path())
            .args(&sockets)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the grpcio client failed ({}):\n{stderr}\nagent log:\n{}",
        run.status,
        agent.log_text()
    );
    let answers: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 3, "{stdout}");
    for (answer, expected) in answers.iter().zip([20, 2 * 15360, 200]) {
        assert_eq!(answer["devices"], expected, "{answer}");
        assert_eq!(answer["healthy"], expected, "{answer}");
        assert_eq!(answer["pre_start_required"], false, "{answer}");
    }
    assert!(!agent.log_text().contains("panicked"));
}
