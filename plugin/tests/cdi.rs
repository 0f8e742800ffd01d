//! The CDI strategies end to end (issue #8): the spec file the agent writes is valid against the CDI
//! reference implementation's JSON schema and a stricter one written from its code (`tests/data/cdi/`), the
//! reference library itself (run through `tests/data/cdi/check/main.go`) loads it and injects, for every set
//! of CDI names Allocate returns, the container's GPU device nodes plus the limiter; and a GPU's health change
//! is reflected in it.

#![allow(clippy::unwrap_used)]

mod common;
mod handoff;

use std::path::Path;

use common::*;
use gpu_sim::{GpuSpec, NodeSpec};
use handoff::*;
use serde_json::Value;

const SPEC_FILE: &str = "cdi/volcano.sh-vgpu.json";
/// Debian's packaged CDI reference library, which the checker is built against (GOPATH mode).
const CDI_LIBRARY_PACKAGE: &str =
    "golang-github-container-orchestrated-devices-container-device-interface-dev";
const CDI_LIBRARY_DIR: &str = "/usr/share/gocode/src/github.com/container-orchestrated-devices/container-device-interface/pkg/cdi";
/// `sh -c` body: `$1` the fake `dev` directory of links to `/dev/null`, `$2` the checker, then its arguments.
/// A tmpfs over the directory, one empty file per link, `/dev/null` bound onto each: in this namespace only.
const DEVICE_NODES_IN_A_NAMESPACE: &str = r#"set -e
dev=$1 checker=$2
shift 2
names=$(ls "$dev")
mount -t tmpfs none "$dev"
for name in $names; do
  : > "$dev/$name"
  mount --bind /dev/null "$dev/$name"
done
exec "$checker" "$@""#;
/// What a missing prerequisite's message tells the reader to run.
const INSTALL: &str = "run tests/prereqs/install.sh (as root, or it prints the apt-get command), or \
    `sudo apt-get install golang-go golang-github-container-orchestrated-devices-container-device-interface-dev`";

fn data(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/cdi")
        .join(path)
}

fn json_file(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(path)).unwrap()).unwrap()
}

/// The reference implementation's schema (v0.5.2, verbatim; `schema.json` refers to `defs.json`).
fn upstream_schema() -> jsonschema::Validator {
    let base = "https://cdi.invalid/schema/";
    let registry = jsonschema::Registry::new()
        .add(format!("{base}defs.json"), json_file("defs.json"))
        .unwrap()
        .prepare()
        .unwrap();
    jsonschema::options()
        .with_base_uri(format!("{base}schema.json"))
        .with_registry(&registry)
        .build(&json_file("schema.json"))
        .unwrap()
}

/// The strict 0.5.0 schema written from the reference library's code (names, versions, unknown fields).
fn strict_schema() -> jsonschema::Validator {
    jsonschema::validator_for(&json_file("strict.schema.json")).unwrap()
}

fn assert_valid(spec: &Value) {
    for (name, validator) in [("upstream", upstream_schema()), ("strict", strict_schema())] {
        let errors: Vec<String> = validator
            .iter_errors(spec)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{name} schema: {errors:#?}\n{spec:#}");
    }
}

/// The CDI reference library's registry (what containerd 1.7 and CRI-O use), run as `check/main.go`: loads
/// `dir`, resolves `names` and returns what it injects. Built once per test binary with Go in GOPATH mode
/// against Debian's packaged library (both in `tests/prereqs/apt.txt`; `tests/prereqs/install.sh` installs
/// them). A missing prerequisite fails the test with the command that installs it.
///
/// The library, like runc, accepts only real device nodes. Root gets them (`mknod`); without root the fake
/// `--dev-root` holds links to `/dev/null`, and the checker runs in a user and mount namespace of its own where
/// each is shadowed by a bind mount of `/dev/null`, a real character device (1:3, as root's nodes are).
fn reference_library(c: &SimCluster, names: &[&str]) -> Value {
    let dir = c.root().join("cdi");
    static CHECKER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let checker = CHECKER.get_or_init(|| {
        let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cdi-check");
        let src = work.join("gopath/src/cdicheck");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::copy(data("check/main.go"), src.join("main.go")).unwrap();
        let binary = work.join("cdicheck");
        let library = Path::new(CDI_LIBRARY_DIR);
        assert!(
            library.is_dir(),
            "{} is missing: the CDI checker builds against Debian's {CDI_LIBRARY_PACKAGE}; {INSTALL}",
            library.display()
        );
        let gopath = format!("{}:/usr/share/gocode", work.join("gopath").display());
        let built = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .current_dir(&src)
            .env("GO111MODULE", "off")
            .env("GOPATH", gopath)
            .env("GOCACHE", work.join("gocache"))
            .env("GOFLAGS", "")
            .output()
            .unwrap_or_else(|e| panic!("cannot run go ({e}): the CDI checker needs golang-go; {INSTALL}"));
        assert!(
            built.status.success(),
            "building the CDI checker against {CDI_LIBRARY_DIR} failed:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        binary
    });
    let mut command = if real_device_nodes(&c.root()) {
        std::process::Command::new(checker)
    } else {
        let mut unshare = std::process::Command::new("unshare");
        unshare
            .args([
                "--user",
                "--map-root-user",
                "--mount",
                "sh",
                "-c",
                DEVICE_NODES_IN_A_NAMESPACE,
                "sh",
            ])
            .arg(c.root().join("devroot/dev"))
            .arg(checker);
        unshare
    };
    let out = command.arg(&dir).args(names).output().unwrap_or_else(|e| {
        panic!("cannot run the CDI checker ({e}): unshare comes with util-linux; {INSTALL}")
    });
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("unshare: "),
        "without root the CDI checker runs in a user namespace, which this machine refuses: run the tests as \
         root (as CI does), or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        out.status.success() && result["errors"] == serde_json::json!([]),
        "the CDI reference library refuses the spec: {result:#}"
    );
    result
}

fn read_spec(c: &SimCluster) -> Value {
    serde_json::from_str(&std::fs::read_to_string(c.root().join(SPEC_FILE)).unwrap()).unwrap()
}

fn device_names(spec: &Value) -> Vec<String> {
    spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

/// What a CDI runtime injects for these fully qualified names: the spec-wide edits plus each device's, as
/// (device node container path, host path) and (mount container path, host path, options).
#[allow(clippy::type_complexity)]
fn resolve(
    spec: &Value,
    names: &[&str],
) -> (Vec<(String, String)>, Vec<(String, String, Vec<String>)>) {
    let kind = spec["kind"].as_str().unwrap();
    let mut edits = vec![spec["containerEdits"].clone()];
    for name in names {
        let (k, device) = name.split_once('=').unwrap();
        assert_eq!(k, kind, "{name}");
        let found = spec["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == device)
            .unwrap_or_else(|| panic!("{name} is not in the spec:\n{spec:#}"));
        edits.push(found["containerEdits"].clone());
    }
    let mut nodes = Vec::new();
    let mut mounts = Vec::new();
    for e in edits {
        for n in e["deviceNodes"].as_array().into_iter().flatten() {
            assert_eq!(n["permissions"], "rw");
            nodes.push((
                n["path"].as_str().unwrap().to_owned(),
                n["hostPath"].as_str().unwrap().to_owned(),
            ));
        }
        for m in e["mounts"].as_array().into_iter().flatten() {
            let options = m["options"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_str().unwrap().to_owned())
                .collect();
            mounts.push((
                m["containerPath"].as_str().unwrap().to_owned(),
                m["hostPath"].as_str().unwrap().to_owned(),
                options,
            ));
        }
    }
    (nodes, mounts)
}

#[test]
fn the_vendored_schemas_reject_what_the_specification_forbids() {
    let (upstream, strict) = (upstream_schema(), strict_schema());
    let good: Value = serde_json::json!({
        "cdiVersion": "0.5.0", "kind": "volcano.sh/vgpu",
        "devices": [{"name": "GPU-1", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}]
    });
    assert_valid(&good);
    // Both: required fields, and the defs.json reference is followed (major must be an integer).
    let mut no_kind = good.clone();
    no_kind.as_object_mut().unwrap().remove("kind");
    let mut no_edits = good.clone();
    no_edits["devices"][0]
        .as_object_mut()
        .unwrap()
        .remove("containerEdits");
    let mut bad_major = good.clone();
    bad_major["devices"][0]["containerEdits"]["deviceNodes"][0]["major"] = "195".into();
    for bad in [&no_kind, &no_edits, &bad_major] {
        assert!(!upstream.is_valid(bad), "upstream accepts {bad:#}");
        assert!(!strict.is_valid(bad), "strict accepts {bad:#}");
    }
    // Strict only: what the library checks in code.
    let mut bad_name = good.clone();
    bad_name["devices"][0]["name"] = "GPU 1".into();
    let mut unknown_field = good.clone();
    unknown_field["devices"][0]["containerEdits"]["deviceNodes"][0]["hostpath"] =
        "/dev/nvidia0".into();
    let mut bad_env = good.clone();
    bad_env["containerEdits"] = serde_json::json!({"env": ["NO_EQUALS_SIGN"]});
    let mut newer = good.clone();
    newer["cdiVersion"] = "0.6.0".into();
    for bad in [bad_name, unknown_field, bad_env, newer] {
        assert!(upstream.is_valid(&bad), "upstream is looser: {bad:#}");
        assert!(!strict.is_valid(&bad), "strict accepts {bad:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdi_annotations_name_devices_the_valid_spec_resolves_to_the_gpus_and_limiter() {
    let c = SimCluster::start(
        NodeSpec::new(vec![GpuSpec::t4(2), GpuSpec::t4(0), GpuSpec::t4(1)]),
        &[
            "--device-list-strategy",
            "cdi-annotations",
            "--cdi-spec-dir",
            "{root}/cdi",
            "--dev-root",
            "{root}/devroot",
            "--driver-host-path",
            "{root}/driver",
        ],
    )
    .await;
    let spec = read_spec(&c);
    assert_valid(&spec);
    assert_eq!(spec["cdiVersion"], "0.5.0");
    assert_eq!(spec["kind"], "volcano.sh/vgpu");
    // Devices follow the inventory: sorted by minor number (NVML order is minors 2, 0, 1).
    let mut expected: Vec<String> = [1, 2, 0].iter().map(|&i| c.uuid(i)).collect();
    expected.push("hami-core-preload".into());
    assert_eq!(device_names(&spec), expected);
    assert_eq!(
        spec["containerEdits"]["env"],
        serde_json::json!(["LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib"])
    );

    let (a, b, d) = (c.uuid(1), c.uuid(0), c.uuid(2));
    c.bind(
        "p1",
        &[
            ("one", vec![a.clone()]),
            ("two", vec![b.clone(), d.clone()]),
        ],
    )
    .await;
    let dev = c.root().join("devroot/dev");
    let hook = c.root().join("hook");
    for (uuids, size) in [(vec![a], 1), (vec![b, d], 2)] {
        let r = c.admit(size).await;
        assert_eq!(r.annotations.len(), 1, "{:?}", r.annotations);
        let (key, value) = r.annotations.iter().next().unwrap();
        assert!(key.starts_with("cdi.k8s.io/vgpu-device-plugin_"), "{key}");
        let names: Vec<&str> = value.split(',').collect();
        let mut want: Vec<String> = uuids
            .iter()
            .map(|u| format!("volcano.sh/vgpu={u}"))
            .collect();
        want.push("volcano.sh/vgpu=hami-core-preload".into());
        assert_eq!(names, want);
        assert!(r.cdi_devices.is_empty());

        let (nodes, cdi_mounts) = resolve(&spec, &names);
        let host = |n: &str| dev.join(n).display().to_string();
        let mut want_nodes = vec![
            ("/dev/nvidiactl".to_owned(), host("nvidiactl")),
            ("/dev/nvidia-uvm".to_owned(), host("nvidia-uvm")),
        ];
        for u in &uuids {
            let node = format!("nvidia{}", c.minor(u));
            want_nodes.push((format!("/dev/{node}"), host(&node)));
        }
        assert_eq!(nodes, want_nodes);

        // The CDI reference library accepts the spec and injects exactly these nodes, mounts and env.
        let injected = reference_library(&c, &names);
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let strings = |key: &str, field: &str| -> Vec<String> {
            injected[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x[field].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            sorted(strings("deviceNodes", "path")),
            sorted(want_nodes.iter().map(|n| n.0.clone()).collect())
        );
        assert!(
            injected["deviceNodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["type"] == "c"),
            "{injected:#}"
        );
        assert_eq!(
            sorted(strings("mounts", "destination")),
            sorted(cdi_mounts.iter().map(|m| m.0.clone()).collect())
        );
        assert_eq!(
            injected["env"],
            serde_json::json!(["LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib"])
        );

        let by_path = |p: &str| {
            cdi_mounts
                .iter()
                .find(|m| m.0 == p)
                .unwrap_or_else(|| panic!("{p} not mounted: {cdi_mounts:?}"))
        };
        assert_eq!(
            by_path("/usr/local/vgpu/libvgpu.so").1,
            hook.join("libvgpu.so").display().to_string()
        );
        assert!(
            by_path("/usr/local/vgpu/libvgpu.so")
                .2
                .contains(&"ro".to_owned())
        );
        assert_eq!(
            by_path("/etc/ld.so.preload").1,
            hook.join("ld.so.preload").display().to_string()
        );
        assert_eq!(
            by_path("/tmp/vgpulock").1,
            c.root().join("vgpulock").display().to_string()
        );
        assert!(by_path("/tmp/vgpulock").2.contains(&"rw".to_owned()));
        assert_eq!(
            by_path("/usr/local/nvidia").1,
            c.root().join("driver").display().to_string()
        );

        // The per-container part still comes from Allocate: limits, cache file, cache directory.
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "void");
        assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
        assert_eq!(r.envs["CUDA_DEVICE_SM_LIMIT"], "30");
        assert!(r.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"].starts_with("/tmp/vgpu/"));
        let paths: Vec<String> = mounts(&r).into_iter().map(|m| m.0).collect();
        assert_eq!(
            paths,
            vec!["/tmp/vgpu".to_owned()],
            "the rest is in the spec"
        );
        assert!(r.devices.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdi_cri_puts_the_names_in_the_cdi_devices_field() {
    let c = SimCluster::start(
        NodeSpec::uniform(2, GpuSpec::t4),
        &[
            "--device-list-strategy",
            "envvar,cdi-cri",
            "--cdi-spec-dir",
            "{root}/cdi",
            "--dev-root",
            "{root}/devroot",
        ],
    )
    .await;
    let spec = read_spec(&c);
    assert_valid(&spec);
    let (a, b) = (c.uuid(0), c.uuid(1));
    c.bind(
        "p1",
        &[
            ("one", vec![a.clone()]),
            ("two", vec![b.clone(), a.clone()]),
        ],
    )
    .await;
    for (uuids, size) in [(vec![a.clone()], 1), (vec![b.clone(), a.clone()], 2)] {
        let r = c.admit(size).await;
        let names: Vec<&str> = r.cdi_devices.iter().map(|d| d.name.as_str()).collect();
        let mut want: Vec<String> = uuids
            .iter()
            .map(|u| format!("volcano.sh/vgpu={u}"))
            .collect();
        want.push("volcano.sh/vgpu=hami-core-preload".into());
        assert_eq!(names, want);
        assert!(r.annotations.is_empty());
        let (nodes, _) = resolve(&spec, &names);
        let injected = reference_library(&c, &names);
        assert_eq!(
            injected["deviceNodes"].as_array().unwrap().len(),
            nodes.len(),
            "{injected:#}"
        );
        for u in &uuids {
            let path = format!("/dev/nvidia{}", c.minor(u));
            assert!(nodes.iter().any(|n| n.0 == path), "{path} in {nodes:?}");
        }
        // Combined with envvar, a runtime without CDI still gets the GPUs and the limiter.
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], uuids.join(","));
        assert!(mounts(&r).iter().any(|m| m.0 == "/etc/ld.so.preload"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_gpu_leaves_the_spec_and_returns_when_it_recovers() {
    let c = SimCluster::start(
        NodeSpec::uniform(2, GpuSpec::t4),
        &[
            "--device-list-strategy",
            "cdi-cri",
            "--cdi-spec-dir",
            "{root}/cdi",
            "--dev-root",
            "{root}/devroot",
            "--health-recovery-period",
            "2s",
            "--health-probe-interval",
            "200ms",
        ],
    )
    .await;
    let (good, bad) = (c.uuid(0), c.uuid(1));
    let wait_for = |want: Vec<String>, what: &str| {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let spec = read_spec(&c);
            if device_names(&spec) == want {
                assert_valid(&spec);
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: spec has {:?}\n{}",
                device_names(&spec),
                c.agent.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let preload = "hami-core-preload".to_owned();
    wait_for(
        vec![good.clone(), bad.clone(), preload.clone()],
        "both GPUs at start",
    );
    c.sim.inject_xid(&bad, 79).unwrap();
    wait_for(
        vec![good.clone(), preload.clone()],
        "the GPU with XID 79 removed",
    );
    wait_for(
        vec![good, bad, preload],
        "the GPU back after the quiet period",
    );
    let leftovers: Vec<_> = std::fs::read_dir(c.root().join("cdi"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        leftovers,
        vec!["volcano.sh-vgpu.json".to_owned()],
        "no temporary files left"
    );
}

#[test]
fn an_unwritable_cdi_directory_is_refused_at_start_with_the_flag_named() {
    let sim = gpu_sim::SimNode::new(NodeSpec::uniform(1, GpuSpec::t4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let mut cmd = agent_command(&sim, &dir.path().join("kubelet.sock"));
    cmd.args(["--device-list-strategy", "cdi-cri", "--cdi-spec-dir"])
        .arg(blocker.join("cdi"));
    let (status, log) = run_to_exit(cmd);
    assert!(!status.success(), "{log:?}");
    let errors: Vec<&String> = log.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log:#?}");
    assert!(
        errors[0].contains("cannot write the CDI spec") && errors[0].contains("--cdi-spec-dir"),
        "{}",
        errors[0]
    );
    assert!(
        common::sockets_in(dir.path()).is_empty(),
        "nothing was served"
    );
}
