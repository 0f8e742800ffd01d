#![allow(clippy::unwrap_used)]
//! The fake apiserver driven by kube-rs, the client the agent uses.

use std::pin::pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use harness::FakeApiServer;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Node, ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event as EventsV1;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Config, ResourceExt};
use serde_json::{Value, json};

async fn client(api: &FakeApiServer) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path, Some("default")).unwrap();
    let kc = Kubeconfig::read_from(&path).unwrap();
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(cfg.default_namespace, "default");
    Client::try_from(cfg).unwrap()
}

fn pod_json(name: &str, node: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "gpu" } },
        "spec": { "containers": [{
            "name": "main",
            "image": "cuda:12",
            "resources": { "limits": { "volcano.sh/vgpu-number": "1" } }
        }] }
    });
    if let Some(n) = node {
        v["spec"]["nodeName"] = json!(n);
    }
    v
}

fn pod(name: &str, node: Option<&str>) -> Pod {
    serde_json::from_value(pod_json(name, node)).unwrap()
}

fn json_patch(ops: Value) -> Patch<()> {
    Patch::Json(serde_json::from_value(ops).unwrap())
}

fn api_error(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn names(pods: &[Pod]) -> Vec<String> {
    let mut n: Vec<String> = pods.iter().map(ResourceExt::name_any).collect();
    n.sort();
    n
}

async fn next<S, T>(s: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("no event within 10 s")
        .expect("stream ended")
}

fn describe(e: &Result<watcher::Event<Pod>, watcher::Error>) -> String {
    match e {
        Ok(ev) => ev.to_string(),
        Err(watcher::Error::WatchError(s)) => format!("WatchError({}, {})", s.code, s.reason),
        Err(other) => format!("Err({other})"),
    }
}

#[tokio::test]
async fn pods_create_get_and_field_selected_list() {
    let api = FakeApiServer::start().await.unwrap();
    api.set_clock(1_700_000_000);
    let c = client(&api).await;
    let pods: Api<Pod> = Api::default_namespaced(c.clone());
    for (n, node) in [
        ("a1", Some("node-a")),
        ("a2", Some("node-a")),
        ("b1", Some("node-b")),
        ("u1", None),
    ] {
        pods.create(&PostParams::default(), &pod(n, node))
            .await
            .unwrap();
    }
    let mut other = pod("a3", Some("node-a"));
    other.metadata.namespace = Some("kube-system".into());
    Api::<Pod>::namespaced(c.clone(), "kube-system")
        .create(&PostParams::default(), &other)
        .await
        .unwrap();

    let got = pods.get("a1").await.unwrap();
    let meta = &got.metadata;
    assert_eq!(meta.uid.as_ref().map(String::len), Some(36));
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert_eq!(meta.resource_version.as_deref(), Some("2"));
    assert_eq!(
        meta.creation_timestamp.as_ref().unwrap().0.as_second(),
        1_700_000_000
    );
    let status = got.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));
    let c0 = &got.spec.as_ref().unwrap().containers[0];
    let requests = c0.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(
        requests["volcano.sh/vgpu-number"].0, "1",
        "requests default to limits"
    );

    let all: Api<Pod> = Api::all(c.clone());
    let on_a = all
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert!(on_a.items[0].metadata.uid.is_some());
    let raw = http::Request::get("/api/v1/namespaces/default/pods?limit=1")
        .body(Vec::new())
        .unwrap();
    let raw: Value = serde_json::from_str(&c.request_text(raw).await.unwrap()).unwrap();
    assert_eq!(
        (&raw["kind"], &raw["apiVersion"]),
        (&json!("PodList"), &json!("v1"))
    );
    assert!(raw["metadata"]["continue"].is_string());
    let item = raw["items"][0].as_object().unwrap();
    assert!(
        !item.contains_key("kind") && !item.contains_key("apiVersion"),
        "items carry no type meta"
    );
    assert_eq!(names(&on_a.items), ["a1", "a2", "a3"]);
    assert_eq!(
        on_a.metadata.resource_version,
        Some(api.resource_version().to_string())
    );
    let on_a_default = pods
        .list(&ListParams::default().fields("spec.nodeName==node-a"))
        .await
        .unwrap();
    assert_eq!(names(&on_a_default.items), ["a1", "a2"]);
    let unscheduled = all
        .list(&ListParams::default().fields("spec.nodeName="))
        .await
        .unwrap();
    assert_eq!(names(&unscheduled.items), ["u1"]);
    let not_a = pods
        .list(&ListParams::default().fields("spec.nodeName!=node-a,status.phase=Pending"))
        .await
        .unwrap();
    assert_eq!(names(&not_a.items), ["b1", "u1"]);
    let by_label = pods
        .list(&ListParams::default().labels("app=gpu,app!=cpu"))
        .await
        .unwrap();
    assert_eq!(by_label.items.len(), 4);
    let bad = pods
        .list(&ListParams::default().fields("spec.foo=bar"))
        .await
        .unwrap_err();
    assert_eq!(api_error(bad), (400, "BadRequest".into()));

    let missing = pods.get("nope").await.unwrap_err();
    assert_eq!(api_error(missing), (404, "NotFound".into()));
    assert!(pods.get_opt("nope").await.unwrap().is_none());
    let dup = pods
        .create(&PostParams::default(), &pod("a1", None))
        .await
        .unwrap_err();
    assert_eq!(api_error(dup), (409, "AlreadyExists".into()));
    let mut invalid = pod_json("x", None);
    invalid["spec"]["containers"] = json!([]);
    let invalid: Pod = serde_json::from_value(invalid).unwrap();
    let err = pods
        .create(&PostParams::default(), &invalid)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (422, "Invalid".into()));

    assert_eq!(api.count_verb("list", "/api/v1/pods"), 2);
    assert_eq!(api.count_verb("list", "/api/v1/namespaces/default/pods"), 5);
    let first = &api.requests()[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/api/v1/namespaces/default/pods");
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.body.as_ref().unwrap()["metadata"]["name"], "a1");
}

#[tokio::test]
async fn merge_strategic_and_json_patches_of_annotations() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let pods: Api<Pod> = Api::default_namespaced(c);
    pods.create(&PostParams::default(), &pod("p", Some("n1")))
        .await
        .unwrap();
    let pp = PatchParams::default();

    let rv0 = api.resource_version();
    let p = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "1", "b": "2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p.annotations().len(), 2);
    assert_eq!(api.resource_version(), rv0 + 1);

    let p = pods
        .patch(
            "p",
            &pp,
            &Patch::Strategic(json!({"metadata": {"annotations": {"a": null, "c": "3"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        p.annotations().keys().cloned().collect::<Vec<_>>(),
        ["b", "c"]
    );

    let p = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"annotations": {"b": null}}})),
        )
        .await
        .unwrap();
    assert!(!p.annotations().contains_key("b"));

    let jp = json_patch(json!([
        {"op": "add", "path": "/metadata/annotations/volcano.sh~1bind-phase", "value": "allocating"},
        {"op": "test", "path": "/metadata/annotations/c", "value": "3"},
        {"op": "replace", "path": "/metadata/annotations/c", "value": "4"}
    ]));
    let p = pods.patch("p", &pp, &jp).await.unwrap();
    assert_eq!(p.annotations()["volcano.sh/bind-phase"], "allocating");
    assert_eq!(p.annotations()["c"], "4");

    // A failed test is a 422 and writes nothing.
    let rv = api.resource_version();
    let jp = json_patch(json!([
        {"op": "replace", "path": "/metadata/annotations/c", "value": "5"},
        {"op": "test", "path": "/metadata/annotations/volcano.sh~1bind-phase", "value": "success"}
    ]));
    let err = pods.patch("p", &pp, &jp).await.unwrap_err();
    assert_eq!(api_error(err), (422, "Invalid".into()));
    assert_eq!(api.resource_version(), rv);
    let stored = api.get_object("pods", Some("default"), "p").unwrap();
    assert_eq!(stored["metadata"]["annotations"]["c"], "4");

    // A no-op patch is not a write.
    let same = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"annotations": {"c": "4"}}})),
        )
        .await
        .unwrap();
    assert_eq!(same.resource_version(), Some(rv.to_string()));
    assert_eq!(api.resource_version(), rv);

    // JSON patch `add` under a missing map fails, as in the real apiserver.
    pods.create(&PostParams::default(), &pod("bare", None))
        .await
        .unwrap();
    let jp = json_patch(json!([
        {"op": "add", "path": "/metadata/annotations/x", "value": "1"}
    ]));
    let err = pods.patch("bare", &pp, &jp).await.unwrap_err();
    assert_eq!(api_error(err).0, 422);

    // A resourceVersion in a patch is a precondition.
    let err = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "annotations": {"d": "1"}}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (409, "Conflict".into()));

    // spec.nodeName cannot be changed by a patch; the binding is the only way.
    let err = pods
        .patch(
            "bare",
            &pp,
            &Patch::Merge(json!({"spec": {"nodeName": "n2"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (422, "Invalid".into()));

    // Apply patches are not implemented.
    let err = pods
        .patch(
            "p",
            &PatchParams::apply("test"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Pod"})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 415);

    let patches = api
        .requests()
        .iter()
        .filter(|r| r.verb() == "patch" && r.path == "/api/v1/namespaces/default/pods/p")
        .count();
    assert_eq!(patches, 8);
}

#[tokio::test]
async fn binding_sets_node_and_annotations_in_one_write() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let pods: Api<Pod> = Api::default_namespaced(c);
    let created = pods
        .create(&PostParams::default(), &pod("gpu-pod", None))
        .await
        .unwrap();
    let uid = created.uid().unwrap();
    let rv = created.resource_version().unwrap();
    let mut stream = pin!(
        pods.watch(&WatchParams::default().fields("metadata.name=gpu-pod"), &rv)
            .await
            .unwrap()
    );

    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {
            "name": "gpu-pod",
            "uid": uid,
            "annotations": { "volcano.sh/vgpu-ids-new": "GPU-0,1024,30", "volcano.sh/bind-phase": "allocating" }
        },
        "target": { "apiVersion": "v1", "kind": "Node", "name": "node-1" }
    });
    let status: Value = pods
        .create_subresource("binding", "gpu-pod", &PostParams::default(), &binding)
        .await
        .unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["status"], "Success");
    assert_eq!(status["code"], 201);

    match next(&mut stream).await.unwrap() {
        WatchEvent::Modified(p) => {
            assert_eq!(
                p.spec.as_ref().unwrap().node_name.as_deref(),
                Some("node-1")
            );
            assert_eq!(p.annotations()["volcano.sh/bind-phase"], "allocating");
            assert_eq!(p.annotations()["volcano.sh/vgpu-ids-new"], "GPU-0,1024,30");
            let conds = p.status.as_ref().unwrap().conditions.as_ref().unwrap();
            assert!(
                conds
                    .iter()
                    .any(|c| c.type_ == "PodScheduled" && c.status == "True")
            );
        }
        other => panic!("expected one MODIFIED, got {other:?}"),
    }
    assert_eq!(
        api.resource_version(),
        rv.parse::<u64>().unwrap() + 1,
        "one write"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.next())
            .await
            .is_err(),
        "exactly one event"
    );

    let again = pods
        .create_subresource::<_, Value>("binding", "gpu-pod", &PostParams::default(), &binding)
        .await
        .unwrap_err();
    assert_eq!(api_error(again), (409, "Conflict".into()));
    let missing = pods
        .create_subresource::<_, Value>("binding", "nope", &PostParams::default(), &{
            let mut b = binding.clone();
            b["metadata"]["name"] = json!("nope");
            b
        })
        .await
        .unwrap_err();
    assert_eq!(api_error(missing), (404, "NotFound".into()));
    let req = api
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/binding"))
        .unwrap();
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/api/v1/namespaces/default/pods/gpu-pod/binding");
    assert_eq!(req.body.unwrap()["target"]["name"], "node-1");
}

#[tokio::test]
async fn watcher_with_field_selector_sees_objects_move_in_and_out() {
    let api = FakeApiServer::start().await.unwrap();
    for (n, node) in [("a1", "node-a"), ("a2", "node-a"), ("b1", "node-b")] {
        api.create("/api/v1/namespaces/default/pods", pod_json(n, Some(node)))
            .unwrap();
    }
    let c = client(&api).await;
    let all: Api<Pod> = Api::all(c.clone());
    let pods: Api<Pod> = Api::default_namespaced(c);
    let mut w = pin!(watcher(
        all,
        watcher::Config::default().fields("spec.nodeName=node-a")
    ));
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(describe(&next(&mut w).await));
    }
    assert_eq!(seen, ["Init", "InitApply(a1)", "InitApply(a2)", "InitDone"]);

    // The reflector flow: a paged LIST, then a WATCH from the list's resourceVersion (the
    // watcher only watches once polled again; a3 is replayed from the history).
    let list_rv = api.resource_version().to_string();
    pods.create(&PostParams::default(), &pod("a3", Some("node-a")))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b2", Some("node-b")))
        .await
        .unwrap();
    assert_eq!(describe(&next(&mut w).await), "Apply(a3)");
    assert_eq!(api.active_watches(), 1);
    let reqs = api.requests();
    let list = reqs.iter().find(|r| r.verb() == "list").unwrap();
    assert_eq!(list.path, "/api/v1/pods");
    assert_eq!(list.param("limit").as_deref(), Some("500"));
    assert_eq!(
        list.param("fieldSelector").as_deref(),
        Some("spec.nodeName=node-a")
    );
    let watch = reqs.iter().find(|r| r.verb() == "watch").unwrap();
    assert_eq!(watch.path, "/api/v1/pods");
    assert_eq!(watch.param("resourceVersion"), Some(list_rv));
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));

    pods.patch(
        "a1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    assert_eq!(describe(&next(&mut w).await), "Apply(a1)");

    // Moving out of the selector is a DELETED for this watcher; moving in an ADDED.
    api.patch_object(
        "pods",
        Some("default"),
        "a2",
        json!({"spec": {"nodeName": "node-b"}}),
    )
    .unwrap();
    match next(&mut w).await.unwrap() {
        watcher::Event::Delete(p) => {
            assert_eq!(p.name_any(), "a2");
            assert_eq!(
                p.resource_version(),
                Some(api.resource_version().to_string())
            );
        }
        other => panic!("expected Delete(a2), got {other}"),
    }
    api.patch_object(
        "pods",
        Some("default"),
        "b1",
        json!({"spec": {"nodeName": "node-a"}}),
    )
    .unwrap();
    assert_eq!(describe(&next(&mut w).await), "Apply(b1)");

    // A bound pod is deleted gracefully: first a deletionTimestamp, gone after grace 0.
    pods.delete("a3", &DeleteParams::default()).await.unwrap();
    match next(&mut w).await.unwrap() {
        watcher::Event::Apply(p) => {
            assert_eq!(p.name_any(), "a3");
            assert!(p.metadata.deletion_timestamp.is_some());
            assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
        }
        other => panic!("expected Apply(a3) with deletionTimestamp, got {other}"),
    }
    pods.delete("a3", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert_eq!(describe(&next(&mut w).await), "Delete(a3)");
    assert!(api.get_object("pods", Some("default"), "a3").is_none());
    assert_eq!(api.count_verb("list", "/api/v1/namespaces/default/pods"), 0);
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_and_bookmark() {
    let api = FakeApiServer::start().await.unwrap();
    api.create(
        "/api/v1/namespaces/default/pods",
        pod_json("a1", Some("node-a")),
    )
    .unwrap();
    let c = client(&api).await;
    let mut w = pin!(watcher(
        Api::<Pod>::all(c),
        watcher::Config::default()
            .fields("spec.nodeName=node-a")
            .streaming_lists()
    ));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next(&mut w).await));
    }
    assert_eq!(seen, ["Init", "InitApply(a1)", "InitDone"]);
    let reqs = api.requests();
    assert_eq!(reqs.len(), 1, "no LIST: {reqs:?}");
    assert_eq!(reqs[0].param("sendInitialEvents").as_deref(), Some("true"));
    api.create(
        "/api/v1/namespaces/default/pods",
        pod_json("a2", Some("node-a")),
    )
    .unwrap();
    assert_eq!(describe(&next(&mut w).await), "Apply(a2)");
}

#[tokio::test]
async fn expired_resource_version_is_410_and_watcher_relists() {
    let api = FakeApiServer::start().await.unwrap();
    api.set_history_limit(5);
    api.create(
        "/api/v1/namespaces/default/pods",
        pod_json("a1", Some("node-a")),
    )
    .unwrap();
    let c = client(&api).await;
    let pods: Api<Pod> = Api::default_namespaced(c.clone());

    // Raw: a watch from before the window gets one ERROR event with a 410 Status.
    for i in 0..6 {
        api.create(
            "/api/v1/namespaces/default/configmaps",
            json!({"metadata": {"name": format!("c{i}")}}),
        )
        .unwrap();
        api.patch_object(
            "pods",
            Some("default"),
            "a1",
            json!({"metadata": {"labels": {"i": i.to_string()}}}),
        )
        .unwrap();
    }
    let mut raw = pin!(pods.watch(&WatchParams::default(), "2").await.unwrap());
    match next(&mut raw).await.unwrap() {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
            assert!(
                e.message.starts_with("too old resource version: 2 ("),
                "{}",
                e.message
            );
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), raw.next())
        .await
        .unwrap();
    assert!(end.is_none(), "the stream ends after the error");
    // Still inside the window: replayed.
    let recent = (api.resource_version() - 2).to_string();
    let mut replay = pin!(pods.watch(&WatchParams::default(), &recent).await.unwrap());
    assert!(matches!(
        next(&mut replay).await.unwrap(),
        WatchEvent::Modified(_)
    ));

    // The watcher: synced, then its watch breaks while the history moves on.
    let mut w = pin!(watcher(
        Api::<Pod>::all(c),
        watcher::Config::default().fields("spec.nodeName=node-a")
    ));
    for want in ["Init", "InitApply(a1)", "InitDone"] {
        assert_eq!(describe(&next(&mut w).await), want);
    }
    assert!(
        api.wait_for(Duration::from_secs(5), |a| a.active_watches() >= 1)
            .await
    );
    api.create(
        "/api/v1/namespaces/default/pods",
        pod_json("b1", Some("node-b")),
    )
    .unwrap();
    api.create(
        "/api/v1/namespaces/default/pods",
        pod_json("a2", Some("node-a")),
    )
    .unwrap();
    assert_eq!(describe(&next(&mut w).await), "Apply(a2)");
    api.create(
        "/api/v1/namespaces/default/pods",
        pod_json("b2", Some("node-b")),
    )
    .unwrap();
    api.compact();
    api.close_watches();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(describe(&next(&mut w).await));
    }
    assert_eq!(
        seen,
        [
            "WatchError(410, Expired)",
            "Init",
            "InitApply(a1)",
            "InitApply(a2)",
            "InitDone"
        ]
    );
    assert_eq!(api.count_verb("list", "/api/v1/pods"), 2, "relisted once");
}

#[tokio::test]
async fn put_with_stale_resource_version_conflicts() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.clone());
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "vgpu-config"},
        "data": {"config.yaml": "a: 1"}
    }))
    .unwrap();
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();
    let mut first = created.clone();
    first
        .data
        .as_mut()
        .unwrap()
        .insert("config.yaml".into(), "a: 2".into());
    let updated = cms
        .replace("vgpu-config", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(updated.resource_version(), created.resource_version());
    assert_eq!(updated.uid(), created.uid());
    assert_eq!(
        updated.metadata.creation_timestamp,
        created.metadata.creation_timestamp
    );

    let mut stale = created.clone();
    stale
        .data
        .as_mut()
        .unwrap()
        .insert("config.yaml".into(), "a: 3".into());
    let err = cms
        .replace("vgpu-config", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(
                s.message.contains("the object has been modified"),
                "{}",
                s.message
            );
        }
        other => panic!("{other:?}"),
    }
    // Without a resourceVersion the update is unconditional.
    stale.metadata.resource_version = None;
    let forced = cms
        .replace("vgpu-config", &PostParams::default(), &stale)
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["config.yaml"], "a: 3");
    // PUT of a missing object is a 404 (no create-on-update for configmaps).
    let mut other = cm.clone();
    other.metadata.name = Some("other".into());
    let err = cms
        .replace("other", &PostParams::default(), &other)
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 404);
    // Deleting a configmap answers a success Status.
    let gone = cms
        .delete("vgpu-config", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone.is_right());
    assert!(cms.get_opt("vgpu-config").await.unwrap().is_none());
}

#[tokio::test]
async fn paged_lists_are_consistent_snapshots() {
    let api = FakeApiServer::start().await.unwrap();
    for i in 0..5 {
        api.create(
            "/api/v1/namespaces/default/configmaps",
            json!({"metadata": {"name": format!("cm{i}")}, "data": {"i": i.to_string()}}),
        )
        .unwrap();
    }
    let c = client(&api).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c);
    let page1 = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page1.items.len(), 2);
    assert_eq!(page1.metadata.remaining_item_count, Some(3));
    let token = page1.metadata.continue_.clone().unwrap();
    // A write between pages does not show in the rest of the list.
    api.delete_object("configmaps", Some("default"), "cm3");
    api.patch_object(
        "configmaps",
        Some("default"),
        "cm4",
        json!({"data": {"i": "changed"}}),
    )
    .unwrap();
    let page2 = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let names: Vec<String> = page2.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["cm2", "cm3"]);
    assert_eq!(
        page2.metadata.resource_version,
        page1.metadata.resource_version
    );
    let page3 = cms
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page2.metadata.continue_.as_ref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(page3.items[0].data.as_ref().unwrap()["i"], "4");
    assert!(page3.metadata.continue_.is_none());
    // An expired token is a 410.
    api.compact();
    let err = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (410, "Expired".into()));
}

#[tokio::test]
async fn down_slow_and_injected_failures() {
    let api = FakeApiServer::start().await.unwrap();
    api.create("/api/v1/nodes", json!({"metadata": {"name": "node-1"}}))
        .unwrap();
    let c = client(&api).await;
    let nodes: Api<Node> = Api::all(c.clone());
    nodes.get("node-1").await.unwrap();

    api.set_latency(Duration::from_millis(300));
    let t = Instant::now();
    nodes.get("node-1").await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    api.set_latency(Duration::ZERO);

    let mut w = pin!(nodes.watch(&WatchParams::default(), "0").await.unwrap());
    assert!(matches!(next(&mut w).await.unwrap(), WatchEvent::Added(_)));
    assert_eq!(api.active_watches(), 1);

    api.set_down(true).await;
    assert!(api.is_down());
    let refused = tokio::net::TcpStream::connect(api.addr())
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = nodes.get("node-1").await.unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap();
    assert!(!matches!(ended, Some(Ok(_))), "the watch is cut: {ended:?}");
    assert!(
        api.wait_for(Duration::from_secs(5), |a| a.active_watches() == 0)
            .await
    );

    api.set_down(false).await;
    assert_eq!(nodes.get("node-1").await.unwrap().name_any(), "node-1");

    api.fail_next("GET", "/api/v1/nodes/node-1", 500);
    let err = nodes.get("node-1").await.unwrap_err();
    assert_eq!(api_error(err), (500, "InternalError".into()));
    nodes.get("node-1").await.unwrap();

    // kube-rs retries a 503 by itself.
    api.clear_requests();
    api.fail_next("get", "/api/v1/nodes/node-1", 503);
    nodes.get("node-1").await.unwrap();
    assert_eq!(api.count("GET", "/api/v1/nodes/node-1"), 2);

    // Without the token the apiserver says 401.
    let raw = http::Request::get("/api/v1/nodes")
        .body(Vec::new())
        .unwrap();
    assert!(c.request_text(raw).await.is_ok());
    let mut cfg = Config::new(api.url().parse().unwrap());
    cfg.default_namespace = "default".into();
    let anonymous = Client::try_from(cfg).unwrap();
    let err = Api::<Node>::all(anonymous)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (401, "Unauthorized".into()));
}

#[tokio::test]
async fn nodes_status_subresource_and_strategic_merge_of_conditions() {
    let api = FakeApiServer::start().await.unwrap();
    api.create(
        "/api/v1/nodes",
        json!({
            "metadata": {"name": "node-1", "labels": {"gpu": "true"}},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "MemoryPressure", "status": "False"}
            ], "capacity": {"volcano.sh/vgpu-number": "10"}}
        }),
    )
    .unwrap();
    let c = client(&api).await;
    let nodes: Api<Node> = Api::all(c);
    let n = nodes
        .patch_status(
            "node-1",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
        )
        .await
        .unwrap();
    let conds = n.status.unwrap().conditions.unwrap();
    assert_eq!(conds.len(), 2, "merged by type");
    assert_eq!(conds[0].status, "False");
    // A write to the main resource cannot change status.
    let n = nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {"volcano.sh/node-vgpu-register": "GPU-0,10,24576,100,NVIDIA-A10,0,true:"}},
                "status": {"capacity": {"volcano.sh/vgpu-number": "0"}}
            })),
        )
        .await
        .unwrap();
    assert_eq!(
        n.status.as_ref().unwrap().capacity.as_ref().unwrap()["volcano.sh/vgpu-number"].0,
        "10"
    );
    assert!(
        n.annotations()
            .contains_key("volcano.sh/node-vgpu-register")
    );
    let on = nodes
        .list(
            &ListParams::default()
                .labels("gpu=true")
                .fields("metadata.name=node-1"),
        )
        .await
        .unwrap();
    assert_eq!(on.items.len(), 1);
    assert_eq!(api.count_verb("patch", "/api/v1/nodes/node-1"), 1);
    assert_eq!(api.count_verb("patch", "/api/v1/nodes/node-1/status"), 1);
}

#[tokio::test]
async fn events_from_the_recorder_show_in_both_apis() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let pods: Api<Pod> = Api::default_namespaced(c.clone());
    let p = pods
        .create(&PostParams::default(), &pod("p", Some("n1")))
        .await
        .unwrap();
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        uid: p.metadata.uid.clone(),
        ..ObjectReference::default()
    };
    let recorder = Recorder::new(
        c.clone(),
        Reporter {
            controller: "volcano.sh/vgpu-device-plugin".into(),
            instance: Some("node-1".into()),
        },
    );
    let ev = RecorderEvent {
        type_: EventType::Warning,
        reason: "AllocateFailed".into(),
        note: Some("no GPU memory".into()),
        action: "Allocate".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();

    let stored = api.events();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(stored[0]["series"]["count"], 2);
    let v1: Api<EventsV1> = Api::default_namespaced(c.clone());
    let listed = v1.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items[0].reason.as_deref(), Some("AllocateFailed"));
    let core: Api<CoreEvent> = Api::default_namespaced(c.clone());
    let listed = core
        .list(&ListParams::default().fields("involvedObject.name=p,type=Warning"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].message.as_deref(), Some("no GPU memory"));
    assert_eq!(
        listed.items[0].reporting_component.as_deref(),
        Some("volcano.sh/vgpu-device-plugin")
    );

    // Core events with generateName.
    let e: CoreEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "p."},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
        "reason": "Scheduled", "message": "ok", "type": "Normal"
    }))
    .unwrap();
    let created = core.create(&PostParams::default(), &e).await.unwrap();
    let name = created.name_any();
    assert!(name.starts_with("p.") && name.len() == 7, "{name}");
    assert_eq!(api.events().len(), 2);
    // The event/involvedObject namespace rule.
    let wrong: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "x"},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "kube-system"},
        "reason": "R", "type": "Normal"
    }))
    .unwrap();
    let err = core
        .create(&PostParams::default(), &wrong)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (422, "Invalid".into()));
}

#[tokio::test]
async fn ten_thousand_pods_field_selected_list() {
    let api = FakeApiServer::start().await.unwrap();
    let t = Instant::now();
    for i in 0..10_000 {
        let ns = if i % 2 == 0 { "default" } else { "team-b" };
        api.create(
            &format!("/api/v1/namespaces/{ns}/pods"),
            pod_json(&format!("pod-{i:05}"), Some(&format!("node-{}", i % 10))),
        )
        .unwrap();
    }
    println!("seeded 10,000 pods in {:?}", t.elapsed());
    assert_eq!(api.count_objects("pods"), 10_000);
    let c = client(&api).await;

    let raw = || {
        http::Request::get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-3")
            .body(Vec::new())
            .unwrap()
    };
    c.request_text(raw()).await.unwrap();
    let t = Instant::now();
    let text = c.request_text(raw()).await.unwrap();
    let raw_time = t.elapsed();
    let all: Api<Pod> = Api::all(c.clone());
    let t = Instant::now();
    let on3 = all
        .list(&ListParams::default().fields("spec.nodeName=node-3"))
        .await
        .unwrap();
    let typed_time = t.elapsed();
    assert_eq!(on3.items.len(), 1_000);
    assert!(
        on3.items
            .iter()
            .all(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("node-3"))
    );
    println!(
        "field-selected LIST of 1,000 of 10,000 pods: {raw_time:?} raw ({} KiB), {typed_time:?} with kube-rs decoding",
        text.len() / 1024
    );
    assert!(typed_time < Duration::from_secs(10));
    let lp = ListParams::default().fields("spec.nodeName=node-4");
    let in_default = Api::<Pod>::namespaced(c.clone(), "default")
        .list(&lp)
        .await
        .unwrap();
    assert_eq!(in_default.items.len(), 1_000);
    let in_b = Api::<Pod>::namespaced(c, "team-b").list(&lp).await.unwrap();
    assert!(in_b.items.is_empty());
}

#[tokio::test]
async fn bookmarks_timeouts_metadata_and_future_resource_versions() {
    let api = FakeApiServer::start().await.unwrap();
    api.set_bookmark_interval(Duration::from_millis(200));
    api.create(
        "/api/v1/namespaces/default/pods",
        pod_json("p1", Some("n1")),
    )
    .unwrap();
    let c = client(&api).await;
    let pods: Api<Pod> = Api::default_namespaced(c.clone());

    // A bookmark carries the latest resourceVersion even when nothing matched; the stream
    // ends at timeoutSeconds.
    let start = api.resource_version().to_string();
    let t = Instant::now();
    let mut w = pin!(
        pods.watch(
            &WatchParams::default().fields("spec.nodeName=n2").timeout(3),
            &start
        )
        .await
        .unwrap()
    );
    api.patch_object(
        "pods",
        Some("default"),
        "p1",
        json!({"metadata": {"labels": {"a": "b"}}}),
    )
    .unwrap();
    let mut bookmarks = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
    {
        match ev.unwrap() {
            WatchEvent::Bookmark(b) => bookmarks.push(b.metadata.resource_version),
            other => panic!("nothing matches n2: {other:?}"),
        }
    }
    assert!(t.elapsed() >= Duration::from_secs(3) && t.elapsed() < Duration::from_secs(5));
    assert!(!bookmarks.is_empty());
    assert_eq!(
        bookmarks.last().unwrap(),
        &api.resource_version().to_string()
    );

    // Metadata-only reads and watches.
    let metas = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metas.items[0].metadata.name.as_deref(), Some("p1"));
    let raw = http::Request::get("/api/v1/namespaces/default/pods")
        .header(
            "accept",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        .body(Vec::new())
        .unwrap();
    let raw: Value = serde_json::from_str(&c.request_text(raw).await.unwrap()).unwrap();
    assert_eq!(raw["kind"], "PartialObjectMetadataList");
    assert!(raw["items"][0].get("spec").is_none());
    assert_eq!(raw["items"][0]["metadata"]["name"], "p1");
    let meta_api: Api<kube::core::PartialObjectMeta<Pod>> = Api::default_namespaced(c.clone());
    let mut mw = pin!(watcher(meta_api, watcher::Config::default()));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut mw).await.unwrap().to_string());
    }
    assert_eq!(seen, ["Init", "InitApply(p1)", "InitDone"]);

    // A list at a resourceVersion the server has not reached waits for it.
    let future = (api.resource_version() + 1).to_string();
    let writer = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        api.create("/api/v1/namespaces/default/pods", pod_json("p2", None))
            .unwrap();
    };
    let lp = ListParams::default()
        .at(&future)
        .matching(kube::api::VersionMatch::NotOlderThan);
    let (listed, ()) = tokio::join!(pods.list(&lp), writer);
    assert_eq!(listed.unwrap().items.len(), 2);
}
