//! Metrics per MIG device (issue #19): the real agent on a gpu-sim `mig` node with an A100 80GB already split
//! into two 3g.40gb and a T4 beside it. A scrape of `/metrics` must show one series per MIG device, labelled with
//! its parent GPU, its MIG UUID (the one Allocate hands a container) and its profile, with the MIG device's
//! memory, and none for the T4; the whole-GPU series stay as they are.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use gpu_sim::{GpuSpec, Mig, NodeSpec};
use serde_json::json;

const NODE: &str = "node-a";
const MIB: u64 = 1 << 20;

/// `(labels, value)` of every sample of `family` in a text exposition.
fn samples<'a>(text: &'a str, family: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(family)?.strip_prefix('{'))
        .map(|rest| {
            let (labels, value) = rest.rsplit_once("} ").unwrap();
            (labels, value.parse().unwrap())
        })
        .collect()
}

/// The value of `key` in a label set as the exporter writes it (`k="v",…`, no escapes in these values).
fn label<'a>(labels: &'a str, key: &str) -> &'a str {
    labels
        .split("\",")
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
        .map(|v| v.trim_end_matches('"'))
        .unwrap_or_else(|| panic!("no {key} in {labels}"))
}

async fn scrape(port: u16) -> String {
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_series_per_mig_device_with_its_parent_uuid_and_profile_and_none_for_the_t4() {
    let a100 = GpuSpec::a100_80gb(0)
        .with_mig(Mig::Enabled)
        .with_mig_instance("3g.40gb@0")
        .with_mig_instance("3g.40gb@4");
    let port = free_port();
    let c = cluster(NodeSpec::new(vec![a100, GpuSpec::t4(1)]))
        .env("METRICS_BIND_ADDRESS", format!("127.0.0.1:{port}"))
        .start_with(|_, dir| {
            let node_config = json!({"nodeconfig": [{"name": NODE, "operatingmode": "mig"}]});
            std::fs::write(dir.join("node-config.json"), node_config.to_string()).unwrap();
        })
        .await;
    let (a100, t4) = (c.uuid(0), c.uuid(1));

    let total = "vgpu_mig_device_memory_total_bytes";
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let text = scrape(port).await;
        if samples(&text, total).len() >= 2 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no MIG device series:\n{text}\n{}",
            c.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One series per MIG device in each family, all of the A100 (index 0), none of the T4.
    let totals = samples(&text, total);
    assert_eq!(totals.len(), 2, "{text}");
    let mut migs = BTreeSet::new();
    for (labels, value) in &totals {
        assert_eq!(label(labels, "gpu_uuid"), a100, "{labels}");
        assert_eq!(label(labels, "gpu_index"), "0", "{labels}");
        assert_eq!(label(labels, "profile"), "3g.40gb", "{labels}");
        assert_eq!(*value, (40192 * MIB) as f64, "{labels}");
        let mig = label(labels, "mig_uuid");
        assert!(mig.starts_with("MIG-"), "{labels}");
        migs.insert(mig.to_owned());
    }
    assert_eq!(migs.len(), 2, "two distinct MIG devices: {text}");
    for family in [
        "vgpu_mig_device_memory_used_bytes",
        "vgpu_mig_device_healthy",
    ] {
        let series = samples(&text, family);
        let labels: Vec<&str> = series.iter().map(|(l, _)| *l).collect();
        let total_labels: Vec<&str> = totals.iter().map(|(l, _)| *l).collect();
        assert_eq!(labels, total_labels, "{family}: {text}");
        let expected = if family.ends_with("healthy") {
            1.0
        } else {
            0.0
        };
        assert!(series.iter().all(|(_, v)| *v == expected), "{text}");
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("vgpu_mig_device_") && l.contains(&t4)),
        "{text}"
    );
    for family in [
        "vgpu_mig_device_memory_used_bytes",
        "vgpu_mig_device_memory_total_bytes",
        "vgpu_mig_device_healthy",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} gauge\n")),
            "{family}: {text}"
        );
    }
    assert!(
        text.contains(
            "# HELP vgpu_mig_device_healthy 1 when the MIG device's parent GPU is advertised Healthy"
        ),
        "{text}"
    );
    // The whole-GPU series are unchanged: both GPUs, the A100 with its whole memory.
    assert_eq!(samples(&text, "vgpu_gpu_memory_total_bytes").len(), 2);
    assert_eq!(
        vgpu_metrics::find_value(&text, "vgpu_gpu_healthy", &[("gpu_uuid", &t4)]),
        Some(1.0)
    );

    // The MIG UUIDs are the ones Allocate hands containers: bind both positions of the 3g.40gb geometry
    // (the layout already there is reused) and compare.
    let mut handed = BTreeSet::new();
    for (position, (name, time)) in [("g3-a", 1_787_220_000u64), ("g3-b", 1_787_220_001)]
        .into_iter()
        .enumerate()
    {
        let devices = format!("{a100}[group3-{position}],NVIDIA,40192,0:");
        c.bind(
            name,
            BindStyle::PatchThenBind,
            &[("cuda", Some(1), Some(40192), None)],
            &devices,
            &time.to_string(),
        )
        .await;
        let response = c.admit(1).await;
        handed.insert(response.envs["NVIDIA_VISIBLE_DEVICES"].clone());
    }
    assert_eq!(handed, migs, "{}", c.agent.log_text());
    // Still the same two series after the hand-offs (no repartition).
    let after = scrape(port).await;
    let after_migs: BTreeSet<String> = samples(&after, total)
        .iter()
        .map(|(l, _)| label(l, "mig_uuid").to_owned())
        .collect();
    assert_eq!(after_migs, migs, "{after}");
}
