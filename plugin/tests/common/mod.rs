//! Shared helpers of the agent's end-to-end tests: run the real `vgpu-device-plugin` binary against the
//! gpu-sim and a fake kubelet in a temporary directory, and read what it logs.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpu_sim::SimNode;
use harness::FakeKubelet;

pub const NUMBER: &str = "volcano.sh/vgpu-number";
pub const MEMORY: &str = "volcano.sh/vgpu-memory";
pub const CORES: &str = "volcano.sh/vgpu-cores";
pub const ALL: [&str; 3] = [NUMBER, MEMORY, CORES];

/// Generous bound for things that take milliseconds; tests assert behaviour, the benchmark measures time.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// The agent binary under test.
pub fn agent_command(sim: &SimNode, kubelet_socket: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vgpu-device-plugin"));
    cmd.envs(sim.env())
        .env("NVML_LIB", gpu_sim::nvml_library())
        .env("KUBELET_SOCKET", kubelet_socket)
        // The host-PID broker's socket goes under the lock directory: keep it in the test's own directory.
        .env(
            "VGPU_LOCK_DIR",
            kubelet_socket
                .parent()
                .unwrap_or(Path::new("/tmp"))
                .join("vgpulock"),
        )
        .env("RUST_LOG", "info")
        .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
        .env_remove("DP_DISABLE_HEALTHCHECKS")
        .env_remove("DP_ENABLE_HEALTHCHECKS")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// A running agent whose stderr is collected line by line.
pub struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("agent binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, log }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (by number) to the agent.
    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The exit status if the agent has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake kubelet in a fresh directory.
pub async fn kubelet() -> (tempfile::TempDir, FakeKubelet) {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    (dir, kubelet)
}

/// Runs the agent to completion (for refusals) and returns its exit status and stderr lines.
pub fn run_to_exit(mut cmd: Command) -> (ExitStatus, Vec<String>) {
    let mut agent = Agent::spawn({
        cmd.stdin(Stdio::null());
        cmd
    });
    let status = agent.wait_exit(PATIENCE);
    // Let the reader thread drain the pipe.
    std::thread::sleep(Duration::from_millis(50));
    (status, agent.log())
}

pub fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .collect();
    v.sort();
    v
}

/// A free loopback port for an agent's metrics listener.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on a loopback port, returning the status line and body.
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// What an agent bound to a node talks to: a fake kubelet in `<dir>/device-plugins` and a fake apiserver
/// that holds the node, reached through `<dir>/kubeconfig`.
pub struct ControlPlane {
    pub kubelet: harness::FakeKubelet,
    pub api: harness::apiserver::FakeApiServer,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    pub async fn start(dir: &Path, node: &str) -> Self {
        let kubelet_dir = dir.join("device-plugins");
        std::fs::create_dir_all(&kubelet_dir).unwrap();
        let kubelet = FakeKubelet::start(&kubelet_dir).await.unwrap();
        let api = harness::apiserver::FakeApiServer::start().await.unwrap();
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, None).unwrap();
        api.create(
            "/api/v1/nodes",
            serde_json::json!({"metadata": {"name": node}}),
        )
        .unwrap();
        Self {
            kubelet,
            api,
            kubeconfig,
        }
    }

    /// A kube-rs client of the fake apiserver, as the tests' side of the cluster.
    pub async fn client(&self) -> kube::Client {
        let config = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(config, &Default::default())
                .await
                .unwrap(),
        )
        .unwrap()
    }

    /// The agent as a node runs it (`NODE_NAME`, the kubeconfig), with its hook path, lock directory and
    /// node config under `dir`.
    pub fn agent_command(&self, sim: &SimNode, dir: &Path, node: &str) -> Command {
        let mut cmd = agent_command(sim, self.kubelet.socket());
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("NODE_NAME", node)
            .arg("--hook-path")
            .arg(dir.join("hook"))
            .arg("--lock-dir")
            .arg(dir.join("vgpulock"))
            .arg("--node-config")
            .arg(dir.join("node-config.json"));
        cmd
    }
}
