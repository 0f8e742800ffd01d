//! A fake Kubernetes apiserver on loopback, for pointing the real agent (kube-rs) at.
//!
//! [`FakeApiServer`] is a plain-HTTP/1.1 (and h2c) server on `127.0.0.1` at a random port that
//! stores objects as `serde_json::Value` and answers the way the real kube-apiserver answers,
//! as far as a client can tell. Write a kubeconfig with [`FakeApiServer::write_kubeconfig`] and
//! hand it to the agent or to `kube::Config::from_custom_kubeconfig`.
//!
//! # Resources
//! `pods` (with the `status` and `binding` subresources), `nodes` (with `status`), `configmaps`,
//! and `events` through both `/api/v1` and `/apis/events.k8s.io/v1`: what the agent and the
//! shipped RBAC (`volcano-config/vgpu-device-plugin.yaml`) use, and what the tests write. The
//! two event APIs share one collection, as in the real apiserver: an Event is stored as written
//! and converted when read through the other API. Anything else is the apiserver's generic 404
//! `Status`.
//!
//! # Behaviour implemented
//! * Metadata: `uid` (UUID v4 shape), `resourceVersion` from one global counter bumped on every
//!   write, `creationTimestamp` from [`FakeApiServer::set_clock`] or real time, `namespace` for
//!   namespaced kinds, `kind`/`apiVersion` on every object and list. `generateName` (with the
//!   apiserver's retry on collision). No-op writes (the result equals the stored object) are
//!   skipped as etcd3's `GuaranteedUpdate` skips them: same resourceVersion, no watch event.
//! * Errors are `Status` objects with the real reasons and messages: `NotFound`,
//!   `AlreadyExists`, `Conflict` (stale `resourceVersion` on PUT/PATCH, binding an already bound
//!   pod, failed DELETE preconditions), `Invalid` (422, with causes), `BadRequest`, `Expired`
//!   (410), `MethodNotAllowed`, `UnsupportedMediaType`, `Timeout` (504 for a too-large
//!   resourceVersion), `Unauthorized` (a missing or wrong bearer token).
//! * LIST: `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`), `fieldSelector`
//!   (`=`, `==`, `!=`; only the field labels the real apiserver supports per kind, others are a
//!   400: pods `metadata.name`, `metadata.namespace`, `spec.nodeName`, `spec.restartPolicy`,
//!   `spec.schedulerName`, `spec.serviceAccountName`, `spec.hostNetwork`, `status.phase`,
//!   `status.podIP`, `status.nominatedNodeName`; nodes `metadata.name`, `spec.unschedulable`;
//!   configmaps `metadata.*`; events `involvedObject.*`/`regarding.*`, `reason`, `type`,
//!   `source`, `reportingComponent`/`reportingController`). `limit`/`continue` are implemented
//!   as etcd does: pages come in key order (`namespace/name`), every page of one list is served
//!   at the first page's resourceVersion (the state is rebuilt from the change history), and a
//!   token older than the history window is a 410. `remainingItemCount` is set when there is no
//!   selector. As in the real apiserver, list items carry no `kind`/`apiVersion` (the list
//!   does; single GETs and watch events do). `resourceVersion` semantics: unset and `0` serve the current state; `N` with
//!   `NotOlderThan` (or no match) waits up to 3 s for the counter to reach `N` and is then a
//!   504 `ResourceVersionTooLarge` as in the real cacher; `Exact` serves the state at `N`
//!   rebuilt from the history (410 if outside the window; a future `N` waits likewise). List `metadata.resourceVersion` is the snapshot's counter.
//! * WATCH (`watch=true|1`, on a collection or a single object): chunked newline-delimited
//!   JSON events. `resourceVersion` unset or `0` sends synthetic ADDED events for the current
//!   matching objects first; `N` replays the history after `N`, and an `N` older than the
//!   window (the last 1000 changes *per resource*, like the per-resource watch cache; see
//!   [`FakeApiServer::set_history_limit`] and [`FakeApiServer::compact`]) gets one
//!   `{"type":"ERROR","object":<Status 410 Expired>}` event on a 200 response, then the stream
//!   ends. `sendInitialEvents=true` (with `resourceVersionMatch=NotOlderThan` and bookmarks, as
//!   the apiserver requires) ends the initial events with a BOOKMARK annotated
//!   `k8s.io/initial-events-end`. Selectors filter as the cacher does: an object that stops
//!   matching after a write is sent as DELETED (its previous state, with the new
//!   resourceVersion), one that starts matching as ADDED. With `allowWatchBookmarks=true`,
//!   BOOKMARK events carry the latest resourceVersion the watcher has seen, every minute (see
//!   [`FakeApiServer::set_bookmark_interval`]) and 2 s before the deadline, never later than
//!   that (so a watch with `timeoutSeconds` ≤ 2 gets none), as the cacher schedules them. The stream closes
//!   after `timeoutSeconds` (default 30 min). A watcher too slow to keep up with 4096 queued
//!   changes is closed, as the apiserver closes slow watchers.
//! * PATCH: `application/merge-patch+json` (RFC 7386), `application/json-patch+json` (RFC
//!   6902, all six ops; a failed op, including `test` and `add` under a missing parent as with
//!   evanphx/json-patch, is a 422 and changes nothing), `application/strategic-merge-patch+json`
//!   (maps merge and `null` deletes; lists with a `patchStrategy:"merge"` in the Kubernetes API
//!   merge by their key: containers/volumes/env by `name`, `status.conditions` and node
//!   `status.addresses` by `type`, `ownerReferences` by `uid`, `finalizers` as a set; every
//!   other list is replaced wholesale; `$patch`, `$retainKeys` and `$deleteFromPrimitiveList`
//!   are honoured, `$setElementOrder` ignored). A `metadata.resourceVersion` in the patch is a
//!   precondition, as in the real apiserver.
//! * Strategies: pods get API defaulting (restart/DNS policy, scheduler, grace period, container
//!   pull policy and termination message fields, requests defaulted from limits) and the
//!   admission defaults (service account, priority, not-ready/unreachable tolerations); a POSTed
//!   pod's `status` is reset to `Pending` with its `qosClass`. Writes to a pod or node drop
//!   `status` changes, writes to `/status` drop `spec` changes. Pod updates may only change
//!   what the apiserver allows (images, tolerations, activeDeadlineSeconds, ...); everything
//!   else, including `spec.nodeName`, is a 422 (use the binding). ConfigMaps with
//!   `immutable: true` reject data changes. Name, label, annotation, container and
//!   extended-resource (requests must equal limits, integers) validation; events.k8s.io/v1
//!   create validation (eventTime, reportingController, reportingInstance, action, reason,
//!   type) and the event/regarding namespace rule.
//! * Binding: `POST .../pods/{name}/binding` sets `spec.nodeName`, merges the Binding's
//!   annotations and sets the `PodScheduled=True` condition in one write (one MODIFIED event);
//!   409 if the pod is bound, being deleted or gated; UID/resourceVersion preconditions from the
//!   Binding's metadata; answers `Status{Success, code 201}`.
//! * DELETE: `DeleteOptions` from the body or `gracePeriodSeconds` in the query.
//!   A pod bound to a node and not terminal is deleted gracefully as the real apiserver does
//!   (it gets `deletionTimestamp`/`deletionGracePeriodSeconds` and stays until a DELETE with
//!   `gracePeriodSeconds=0`, which is the kubelet's job; there is no kubelet here, so tests do
//!   that or call [`FakeApiServer::delete_object`]). Objects with finalizers stay until an
//!   update empties them. Pods answer with the object, other kinds with a success `Status`.
//! * `as=PartialObjectMetadata[List]` in `Accept` is served (kube-rs's metadata API and
//!   `metadata_watcher`).
//!
//! # Deliberately not implemented
//! What neither the agent nor a test uses, refused rather than half-done so that a new use fails
//! loudly: `dryRun` (a 400), DELETE on a collection (deletecollection, a 405), the legacy
//! `bindings` collection, discovery (`/api`, `/apis`, ...), `/version` and the health endpoints
//! (404s). Server-side apply (`application/apply-patch+yaml` is a 415), YAML and protobuf bodies
//! (415; responses are always JSON), `managedFields`, `metadata.generation`, namespaces as
//! objects (any namespace name is accepted; the NamespaceLifecycle admission check is not
//! done), RBAC (any request with the right token is allowed), garbage collection of dependents
//! (`propagationPolicy` is ignored), event TTL, Table output, the deprecated
//! `/api/v1/watch/...` paths, label selector `>`/`<` operators, and the rest of pod spec
//! validation beyond the checks listed above.
//!
//! # Test hooks
//! In-process writes ([`FakeApiServer::create`], [`FakeApiServer::patch_object`],
//! [`FakeApiServer::delete_object`]) bump the resourceVersion and notify watchers exactly like
//! HTTP writes. `create` runs the HTTP create path (defaulting, validation) except that a pod
//! keeps the `status` it was given; `patch_object` and `delete_object` act with the powers of every controller at once: they
//! skip strategies and validation (so they can set `spec.nodeName` or `status.phase`) and
//! delete immediately. Every HTTP request is recorded ([`FakeApiServer::requests`]).
//!
//! Fault injection: [`FakeApiServer::set_down`] closes the listening socket (new connections
//! are refused) and drops every open connection, watches included, as a crashed apiserver
//! would; a request already being read when it went down is answered 503. Bringing it back
//! up listens on the same port again. [`FakeApiServer::set_latency`] delays every response;
//! [`FakeApiServer::fail_next`] answers one matching request with an error `Status` (note that
//! kube-rs retries 429, 503 and 504 by itself). [`FakeApiServer::set_hung`] makes it accept
//! connections and read requests but never answer them, and silences every open watch (no
//! bytes, no close at the deadline), as an apiserver stuck on etcd or a black-holed path does: a
//! request or watch caught in the hang stays unanswered even after the hang ends, until the
//! client gives up on it. [`FakeApiServer::silence_watches`] does that to the open watches only.
//! [`FakeApiServer::hang_next`] and [`FakeApiServer::reset_next`] never answer, or drop the
//! connection (TCP RST) instead of answering, one matching request.
//!
//! Scale: the store is a `BTreeMap` per resource behind one `std::sync::Mutex`; lists scan,
//! but each stored object keeps its field-label values precomputed (as the watch cache does),
//! so the scan compares short strings instead of walking JSON. Measured on the 2-core dev
//! machine with 10,000 pods, selecting 1,000 by `spec.nodeName`: the scan takes 0.24 ms and
//! scan plus the 1 MiB response body 5.4 ms in a release build (1.3 ms and 55 ms in a debug
//! build); through kube-rs in a debug build the whole LIST is about 80 ms raw and 130 ms with
//! decoding into `Pod`s (`tests/apiserver.rs` prints these).

mod patch;
mod resource;
mod selector;
mod status;
mod store;
mod util;

/// `metav1.Time` text of now: what the kubelet writes into `status.startTime` when it starts a pod.
pub fn now_rfc3339() -> String {
    util::rfc3339(util::unix_now())
}

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures::StreamExt;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use resource::{Resource, View, api_version, group, present};
use status::{ApiError, Cause, success};
use store::{
    DeleteOpts, Deleted, Filter, ListQuery, PatchType, RvMatch, Store, Sub, partial, watch_event,
};
use util::{parse_bool, parse_query};

type Body = BoxBody<Bytes, Infallible>;

/// The bearer token the fake accepts (and [`FakeApiServer::write_kubeconfig`] writes).
pub const TOKEN: &str = "fake-apiserver-token";

/// One HTTP request the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE`, ...
    pub method: String,
    /// The path, e.g. `/api/v1/namespaces/default/pods/p1`.
    pub path: String,
    /// The raw query string without `?` (empty when there is none).
    pub query: String,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body, when it was JSON.
    pub body: Option<Value>,
}

impl RecordedRequest {
    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Whether this was a watch.
    pub fn is_watch(&self) -> bool {
        self.method == "GET" && self.param("watch").as_deref().and_then(parse_bool) == Some(true)
    }

    /// The Kubernetes verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, or `other` (unknown paths).
    pub fn verb(&self) -> &'static str {
        match route(&self.path) {
            Some(Route::Collection { .. }) => match self.method.as_str() {
                "GET" if self.is_watch() => "watch",
                "GET" => "list",
                "POST" => "create",
                "DELETE" => "deletecollection",
                _ => "other",
            },
            Some(Route::Item { .. } | Route::Status { .. }) => match self.method.as_str() {
                "GET" if self.is_watch() => "watch",
                "GET" => "get",
                "PUT" => "update",
                "PATCH" => "patch",
                "DELETE" => "delete",
                _ => "other",
            },
            Some(Route::Binding { .. }) if self.method == "POST" => "create",
            _ => "other",
        }
    }
}

#[derive(Debug, Clone)]
struct Fault {
    method: String,
    path_substring: String,
    kind: FaultKind,
}

/// What an injected fault does to the request it matches.
#[derive(Debug, Clone, Copy)]
enum FaultKind {
    /// An error `Status` with this code.
    Status(u16),
    /// No answer, ever (the connection stays open until the client closes it).
    Hang,
    /// The connection is dropped with a TCP RST instead of an answer.
    Reset,
}

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    log: Mutex<Vec<RecordedRequest>>,
    faults: Mutex<Vec<Fault>>,
    latency: Mutex<Duration>,
    bookmark_interval: Mutex<Duration>,
    down: AtomicBool,
    /// While true, requests are read and never answered and open watches send nothing.
    hung: watch::Sender<bool>,
    /// Bumped to silence every open watch for good.
    silence_watches: watch::Sender<u64>,
    /// Bumped to drop every open connection.
    kill: watch::Sender<u64>,
    /// Bumped to end every open watch cleanly.
    close_watches: watch::Sender<u64>,
    active_watches: Arc<AtomicUsize>,
    addr: SocketAddr,
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("fake apiserver store")
    }
}

/// A fake Kubernetes apiserver; see the module docs.
#[derive(Debug)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
    accept: Mutex<Option<JoinHandle<()>>>,
    down_lock: tokio::sync::Mutex<()>,
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Without it a response's last small write can wait for the client's delayed ACK (40 ms on
                // Linux): the fake's own latency would swamp what the benchmarks measure.
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(Arc::clone(&inner), stream));
            }
            Err(e) => {
                tracing::debug!("fake apiserver accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: TcpStream) {
    let mut kill = inner.kill.subscribe();
    // A `reset_next` fault drops this connection with an RST: SO_LINGER 0 on close does that.
    let reset = Arc::new(tokio::sync::Notify::new());
    let raw = socket2::SockRef::from(&stream).try_clone().ok();
    let on_reset = Arc::clone(&reset);
    let svc = service_fn(move |req| {
        let inner = Arc::clone(&inner);
        let reset = Arc::clone(&on_reset);
        async move { Ok::<_, Infallible>(handle(inner, req, reset).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::trace!("fake apiserver connection: {e}");
            }
        }
        _ = kill.changed() => {}
        () = reset.notified() => {
            if let Some(raw) = raw {
                let _ = raw.set_linger(Some(Duration::ZERO));
            }
        }
    }
}

impl FakeApiServer {
    /// Listens on `127.0.0.1` at a random port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener =
            listen(SocketAddr::from(([127, 0, 0, 1], 0))).context("bind fake apiserver")?;
        let addr = listener.local_addr()?;
        let (kill, _) = watch::channel(0);
        let (close_watches, _) = watch::channel(0);
        let (hung, _) = watch::channel(false);
        let (silence_watches, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::new()),
            log: Mutex::default(),
            faults: Mutex::default(),
            latency: Mutex::default(),
            bookmark_interval: Mutex::new(Duration::from_secs(60)),
            down: AtomicBool::new(false),
            hung,
            silence_watches,
            kill,
            close_watches,
            active_watches: Arc::default(),
            addr,
        });
        let task = tokio::spawn(accept_loop(Arc::clone(&inner), listener));
        Ok(Self {
            inner,
            accept: Mutex::new(Some(task)),
            down_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// A kubeconfig: cluster `server` = [`Self::url`], `insecure-skip-tls-verify`, a token user,
    /// and a current context with `namespace` if given.
    fn kubeconfig_yaml(&self, namespace: Option<&str>) -> String {
        let ns = namespace
            .map(|n| format!("    namespace: {n}\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake-apiserver\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\nusers:\n- name: fake-user\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context:\n    cluster: fake-apiserver\n    user: fake-user\n{ns}current-context: fake\npreferences: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`Self::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path, namespace: Option<&str>) -> anyhow::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(namespace))
            .with_context(|| format!("write {}", path.display()))
    }

    // ---- the store, in process ----

    fn resource(kind: &str) -> Resource {
        Resource::from_any(kind).unwrap_or_else(|| {
            panic!("fake apiserver: unknown kind {kind:?} (pods, nodes, configmaps, events)")
        })
    }

    fn scope(res: Resource, namespace: Option<&str>) -> Option<&str> {
        if res.namespaced() { namespace } else { None }
    }

    /// Creates an object as a POST to `resource_path` (a collection path such as
    /// `/api/v1/namespaces/default/pods` or `/api/v1/nodes`) would, except that a pod keeps the
    /// `status` it is given. Returns the stored object.
    pub fn create(&self, resource_path: &str, object: Value) -> anyhow::Result<Value> {
        let Some(Route::Collection { res, view, ns }) = route(resource_path) else {
            bail!("not a collection path the fake serves: {resource_path}");
        };
        if res.namespaced() && ns.is_none() {
            bail!("{resource_path}: creating a namespaced object needs a namespaced path");
        }
        let created = self
            .inner
            .store()
            .create(res, view, ns.as_deref(), object, true)
            .map_err(|e| anyhow!("create {resource_path}: {}", e.to_status()))?;
        Ok(created.as_ref().clone())
    }

    /// The stored object (`kind`: `pods`/`Pod`, `nodes`, `configmaps`, `events`; `namespace`
    /// is ignored for nodes).
    ///
    /// # Panics
    /// On an unknown kind.
    pub fn get_object(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let res = Self::resource(kind);
        self.inner
            .store()
            .get(res, Self::scope(res, namespace), name)
            .map(|o| o.as_ref().clone())
    }

    /// Applies an RFC 7386 merge patch to the whole object (status and spec alike, no
    /// validation), as a write: new resourceVersion, one MODIFIED watch event (none if nothing
    /// changed).
    ///
    /// # Panics
    /// On an unknown kind.
    pub fn patch_object(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        merge_patch: Value,
    ) -> anyhow::Result<Value> {
        self.update_object(kind, namespace, name, |o| {
            patch::merge_patch(o, &merge_patch)
        })
    }

    /// Changes the stored object with `f` (identity and system metadata are kept), as a write.
    ///
    /// # Panics
    /// On an unknown kind.
    fn update_object(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> anyhow::Result<Value> {
        let res = Self::resource(kind);
        self.inner
            .store()
            .force_update(res, Self::scope(res, namespace), name, f)
            .map(|o| o.as_ref().clone())
            .ok_or_else(|| anyhow!("{} {name:?} not found", res.plural()))
    }

    /// Removes the object now (no grace period, finalizers ignored), as a write: one DELETED
    /// watch event. Returns its last state.
    ///
    /// # Panics
    /// On an unknown kind.
    pub fn delete_object(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let res = Self::resource(kind);
        self.inner
            .store()
            .force_delete(res, Self::scope(res, namespace), name)
            .map(|o| o.as_ref().clone())
    }

    /// Every stored object of a kind, in key (`namespace/name`) order.
    ///
    /// # Panics
    /// On an unknown kind.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let res = Self::resource(kind);
        self.inner
            .store()
            .all(res)
            .map(|o| o.as_ref().clone())
            .collect()
    }

    /// How many objects of a kind are stored.
    ///
    /// # Panics
    /// On an unknown kind.
    pub fn count_objects(&self, kind: &str) -> usize {
        self.inner.store().len(Self::resource(kind))
    }

    /// Every Event, as written (core `v1` or `events.k8s.io/v1`, per its `apiVersion`).
    pub fn events(&self) -> Vec<Value> {
        self.objects("events")
    }

    /// The current resourceVersion counter.
    pub fn resource_version(&self) -> u64 {
        self.inner.store().rv
    }

    /// Fixes the clock used for `creationTimestamp`, `deletionTimestamp` and condition times.
    pub fn set_clock(&self, unix_seconds: i64) {
        self.inner.store().clock = Some(unix_seconds);
    }

    /// How many changes per resource the watch window keeps (default 1000). Watching or
    /// continuing a list from before the window is a 410.
    pub fn set_history_limit(&self, changes: usize) {
        self.inner.store().set_history_cap(changes);
    }

    /// Empties the change history, as an etcd compaction: any resourceVersion older than the
    /// current one is now expired for watches, exact lists and continue tokens.
    pub fn compact(&self) {
        self.inner.store().compact();
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (default 60 s).
    /// Applies to watches started afterwards.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self
            .inner
            .bookmark_interval
            .lock()
            .expect("fake apiserver bookmark interval") = every;
    }

    /// Ends every open watch stream cleanly, as the apiserver does at a watch's timeout.
    pub fn close_watches(&self) {
        self.inner.close_watches.send_modify(|n| *n += 1);
    }

    /// How many watch streams are open.
    pub fn active_watches(&self) -> usize {
        self.inner.active_watches.load(Ordering::SeqCst)
    }

    /// Waits until `cond` holds (checked on every write and every 20 ms); false on timeout.
    pub async fn wait_for(&self, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut rx = self.inner.store().rv_tx.subscribe();
        loop {
            if cond(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            let _ = tokio::time::timeout(wait, rx.changed()).await;
        }
    }

    // ---- the request log ----

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.log.lock().expect("fake apiserver log").clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.inner.log.lock().expect("fake apiserver log").clear();
    }

    /// How many requests had this method (case-insensitive) and exactly this path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.inner
            .log
            .lock()
            .expect("fake apiserver log")
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path == path)
            .count()
    }

    /// How many requests had this Kubernetes verb (see [`RecordedRequest::verb`]) on exactly
    /// this path.
    pub fn count_verb(&self, verb: &str, path: &str) -> usize {
        self.inner
            .log
            .lock()
            .expect("fake apiserver log")
            .iter()
            .filter(|r| r.path == path && r.verb() == verb)
            .count()
    }

    // ---- faults ----

    /// Down: closes the listening socket (connection refused) and drops every open connection
    /// and watch. Up: listens on the same port again.
    ///
    /// # Panics
    /// If the port cannot be bound again within 5 s.
    pub async fn set_down(&self, down: bool) {
        let _serial = self.down_lock.lock().await;
        if self.inner.down.load(Ordering::SeqCst) == down {
            return;
        }
        if down {
            self.inner.down.store(true, Ordering::SeqCst);
            let task = self.accept.lock().expect("fake apiserver accept").take();
            if let Some(task) = task {
                task.abort();
                let _ = task.await;
            }
            self.inner.kill.send_modify(|n| *n += 1);
        } else {
            let deadline = Instant::now() + Duration::from_secs(5);
            let listener = loop {
                match listen(self.inner.addr) {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("fake apiserver rebind {}: {e}", self.inner.addr);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!(
                        "fake apiserver: cannot listen on {} again: {e}",
                        self.inner.addr
                    ),
                }
            };
            self.inner.down.store(false, Ordering::SeqCst);
            let task = tokio::spawn(accept_loop(Arc::clone(&self.inner), listener));
            *self.accept.lock().expect("fake apiserver accept") = Some(task);
        }
    }

    /// Whether [`Self::set_down`] put it down.
    pub fn is_down(&self) -> bool {
        self.inner.down.load(Ordering::SeqCst)
    }

    /// Delays every response (a watch: its start) by `delay`.
    pub fn set_latency(&self, delay: Duration) {
        *self.inner.latency.lock().expect("fake apiserver latency") = delay;
    }

    /// Answers the next request whose method is `method` (case-insensitive; `*` for any) and
    /// whose path-and-query contains `path_substring` with `status_code` and a `Status` body
    /// of the matching reason. One-shot; several queue up in order.
    pub fn fail_next(&self, method: &str, path_substring: &str, status_code: u16) {
        self.push_fault(method, path_substring, FaultKind::Status(status_code));
    }

    /// Like [`Self::fail_next`], but the request is never answered (the connection stays open).
    pub fn hang_next(&self, method: &str, path_substring: &str) {
        self.push_fault(method, path_substring, FaultKind::Hang);
    }

    /// Like [`Self::fail_next`], but the connection is dropped with a TCP RST instead of an
    /// answer (every other request on that connection is lost with it, as in a real reset).
    pub fn reset_next(&self, method: &str, path_substring: &str) {
        self.push_fault(method, path_substring, FaultKind::Reset);
    }

    fn push_fault(&self, method: &str, path_substring: &str, kind: FaultKind) {
        self.inner
            .faults
            .lock()
            .expect("fake apiserver faults")
            .push(Fault {
                method: method.to_ascii_uppercase(),
                path_substring: path_substring.into(),
                kind,
            });
    }

    /// Hung (`true`): connections are accepted and requests read (and recorded), but none is
    /// answered, and every open watch stops sending, deadline and bookmarks included. What was
    /// caught in the hang stays unanswered after it ends (`false`); only new requests and
    /// watches are served again.
    pub fn set_hung(&self, hung: bool) {
        self.inner.hung.send_replace(hung);
    }

    /// Every watch open now goes silent for good (no events, bookmarks or close) while the
    /// connection stays up: what a client sees behind a proxy that lost the stream.
    pub fn silence_watches(&self) {
        self.inner.silence_watches.send_modify(|n| *n += 1);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Ok(mut task) = self.accept.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
        self.inner.kill.send_modify(|n| *n += 1);
        self.inner.close_watches.send_modify(|n| *n += 1);
    }
}

// ---- routing ----

#[derive(Debug, Clone, PartialEq)]
enum Route {
    Collection {
        res: Resource,
        view: View,
        ns: Option<String>,
    },
    Item {
        res: Resource,
        view: View,
        ns: Option<String>,
        name: String,
    },
    Status {
        res: Resource,
        ns: Option<String>,
        name: String,
    },
    Binding {
        ns: String,
        name: String,
    },
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (view, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => (View::Core, rest),
        ["apis", "events.k8s.io", "v1", rest @ ..] => (View::EventsV1, rest),
        _ => return None,
    };
    let ok = |res: Resource| view == View::Core || res == Resource::Events;
    match rest {
        ["namespaces", ns, plural, tail @ ..] => {
            let res = Resource::from_plural(plural).filter(|r| r.namespaced() && ok(*r))?;
            let ns_name = (*ns).to_string();
            let ns = Some(ns_name.clone());
            match tail {
                [] => Some(Route::Collection { res, view, ns }),
                [name] => Some(Route::Item {
                    res,
                    view,
                    ns,
                    name: (*name).into(),
                }),
                [name, "status"] if res == Resource::Pods => Some(Route::Status {
                    res,
                    ns,
                    name: (*name).into(),
                }),
                [name, "binding"] if res == Resource::Pods => Some(Route::Binding {
                    ns: ns_name,
                    name: (*name).into(),
                }),
                _ => None,
            }
        }
        [plural, tail @ ..] => {
            let res = Resource::from_plural(plural).filter(|r| ok(*r))?;
            match tail {
                [] => Some(Route::Collection {
                    res,
                    view,
                    ns: None,
                }),
                [name] if !res.namespaced() => Some(Route::Item {
                    res,
                    view,
                    ns: None,
                    name: (*name).into(),
                }),
                [name, "status"] if res == Resource::Nodes => Some(Route::Status {
                    res,
                    ns: None,
                    name: (*name).into(),
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

// ---- responses ----

fn full(code: u16, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    full(code, Bytes::from(serde_json::to_vec(v).unwrap_or_default()))
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if matches!(e.code, 429 | 503 | 504) {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn show(obj: &Value, partial_meta: bool) -> Value {
    if partial_meta {
        partial(obj)
    } else {
        obj.clone()
    }
}

fn list_body(res: Resource, view: View, l: &store::ListResult, partial_meta: bool) -> Bytes {
    let mut md = json!({ "resourceVersion": l.rv.to_string() });
    if let Some(c) = &l.cont {
        md["continue"] = json!(c);
    }
    if let Some(n) = l.remaining {
        md["remainingItemCount"] = json!(n);
    }
    let (kind, av) = if partial_meta {
        ("PartialObjectMetadataList".to_string(), "meta.k8s.io/v1")
    } else {
        (format!("{}List", res.kind()), api_version(view))
    };
    let mut out = Vec::with_capacity(256 + l.items.len() * 1024);
    out.extend_from_slice(
        format!(
            "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{},\"items\":[",
            json!(kind),
            json!(av),
            md
        )
        .as_bytes(),
    );
    for (i, item) in l.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let written = if partial_meta {
            write_list_item(&mut out, &partial(item))
        } else {
            write_list_item(&mut out, item)
        };
        if let Err(e) = written {
            tracing::warn!("fake apiserver: serialize list item: {e}");
        }
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

/// A list item as the apiserver writes it: without `kind` and `apiVersion` (only the list has
/// them; kubernetes/kubernetes#3030).
fn write_list_item(out: &mut Vec<u8>, item: &Value) -> serde_json::Result<()> {
    let Value::Object(m) = item else {
        return serde_json::to_writer(out, item);
    };
    out.push(b'{');
    let mut first = true;
    for (k, v) in m {
        if k == "kind" || k == "apiVersion" {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, k)?;
        out.push(b':');
        serde_json::to_writer(&mut *out, v)?;
    }
    out.push(b'}');
    Ok(())
}

fn event_line(typ: &str, obj: &Value) -> Bytes {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(typ.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    if serde_json::to_writer(&mut out, obj).is_err() {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn bookmark(res: Resource, view: View, rv: u64, initial_end: bool, partial_meta: bool) -> Bytes {
    let (kind, av) = if partial_meta {
        ("PartialObjectMetadata", "meta.k8s.io/v1")
    } else {
        (res.kind(), api_version(view))
    };
    let mut md = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
    if initial_end {
        md["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        &json!({ "kind": kind, "apiVersion": av, "metadata": md }),
    )
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    r
}

// ---- request handling ----

#[derive(Debug)]
struct Req {
    method: Method,
    query: Vec<(String, String)>,
    content_type: String,
    accept: String,
    body: Bytes,
}

impl Req {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.param(name).and_then(parse_bool).unwrap_or(false)
    }

    /// `dryRun` is refused: nothing uses it, and a fake that ignored it would write.
    fn no_dry_run(&self) -> Result<(), ApiError> {
        match self.param("dryRun") {
            None | Some("") => Ok(()),
            Some(_) => Err(ApiError::bad_request(
                "dryRun is not implemented by the fake apiserver",
            )),
        }
    }

    fn partial_meta(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        let ct = self.content_type.split(';').next().unwrap_or("").trim();
        if !ct.is_empty() && ct != "application/json" && ct != "*/*" {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json (the fake apiserver does not accept {ct})"
            )));
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json: {e}"
            ))
        })
    }
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    reset: Arc<tokio::sync::Notify>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let header = |h| {
        parts
            .headers
            .get(h)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let path = parts.uri.path().to_string();
    let raw_query = parts.uri.query().unwrap_or("").to_string();
    let content_type = header(CONTENT_TYPE);
    tracing::debug!(method = %parts.method, %path, query = %raw_query, "fake apiserver request");
    inner
        .log
        .lock()
        .expect("fake apiserver log")
        .push(RecordedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: raw_query.clone(),
            content_type: content_type.clone(),
            body: serde_json::from_slice(&body).ok(),
        });
    if *inner.hung.borrow() {
        // Never answered, even once the hang ends: the client has to give up on it.
        std::future::pending::<()>().await;
    }
    let latency = *inner.latency.lock().expect("fake apiserver latency");
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if inner.down.load(Ordering::SeqCst) {
        return error_response(&ApiError::from_code(503, None));
    }
    let r = route(&path);
    let auth = header(AUTHORIZATION).unwrap_or_default();
    if auth != format!("Bearer {TOKEN}") {
        return error_response(&ApiError::from_code(401, None));
    }
    let path_and_query = if raw_query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{raw_query}")
    };
    let fault = {
        let mut faults = inner.faults.lock().expect("fake apiserver faults");
        let pos = faults.iter().position(|f| {
            (f.method == "*" || f.method == parts.method.as_str())
                && path_and_query.contains(&f.path_substring)
        });
        pos.map(|i| faults.remove(i))
    };
    if let Some(f) = fault {
        match f.kind {
            FaultKind::Status(code) => return error_response(&ApiError::from_code(code, None)),
            FaultKind::Hang => std::future::pending::<()>().await,
            FaultKind::Reset => {
                reset.notify_one();
                std::future::pending::<()>().await;
            }
        }
    }
    let req = Req {
        method: parts.method.clone(),
        query: parse_query(&raw_query),
        content_type: content_type.unwrap_or_default(),
        accept: header(ACCEPT).unwrap_or_default(),
        body,
    };
    let Some(r) = r else {
        return error_response(&ApiError::no_route());
    };
    match dispatch(&inner, r, &req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

async fn dispatch(inner: &Arc<Inner>, r: Route, req: &Req) -> Result<Response<Body>, ApiError> {
    let m = &req.method;
    match r {
        Route::Collection { res, view, ns } => match *m {
            Method::GET if req.flag("watch") => start_watch(inner, res, view, ns, None, req),
            Method::GET => list(inner, res, view, ns, req).await,
            Method::POST if ns.is_some() || !res.namespaced() => {
                let body = req.json_body()?;
                req.no_dry_run()?;
                let obj = inner
                    .store()
                    .create(res, view, ns.as_deref(), body, false)?;
                Ok(json_response(201, &show(&obj, req.partial_meta())))
            }
            _ => Err(ApiError::method_not_allowed()),
        },
        Route::Item {
            res,
            view,
            ns,
            name,
        } => item(inner, res, view, ns, &name, Sub::Main, req),
        Route::Status { res, ns, name } => {
            item(inner, res, View::Core, ns, &name, Sub::Status, req)
        }
        Route::Binding { ns, name } => {
            if *m != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let body = req.json_body()?;
            req.no_dry_run()?;
            inner.store().bind(&ns, &name, body)?;
            Ok(json_response(201, &success(201, None)))
        }
    }
}

fn item(
    inner: &Arc<Inner>,
    res: Resource,
    view: View,
    ns: Option<String>,
    name: &str,
    sub: Sub,
    req: &Req,
) -> Result<Response<Body>, ApiError> {
    let partial_meta = req.partial_meta();
    match req.method {
        Method::GET if sub == Sub::Main && req.flag("watch") => {
            start_watch(inner, res, view, ns, Some(name), req)
        }
        Method::GET => {
            let store = inner.store();
            let obj = store
                .get(res, ns.as_deref(), name)
                .ok_or_else(|| ApiError::not_found(res.qualified(view), name))?;
            let shown = present(res, view, obj);
            drop(store);
            Ok(json_response(200, &show(&shown, partial_meta)))
        }
        Method::PUT => {
            let body = req.json_body()?;
            req.no_dry_run()?;
            let (obj, created) = inner
                .store()
                .update(res, view, ns.as_deref(), name, sub, body)?;
            Ok(json_response(
                if created { 201 } else { 200 },
                &show(&present(res, view, &obj), partial_meta),
            ))
        }
        Method::PATCH => {
            let ct = req.content_type.split(';').next().unwrap_or("").trim();
            let ptype = match ct {
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/json-patch+json" => PatchType::Json,
                "application/apply-patch+yaml" => {
                    return Err(ApiError::unsupported_media_type(
                        "server-side apply (application/apply-patch+yaml) is not implemented by the fake apiserver",
                    ));
                }
                _ => {
                    return Err(ApiError::unsupported_media_type(format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"
                    )));
                }
            };
            let patch: Value = serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            req.no_dry_run()?;
            let obj = inner
                .store()
                .patch(res, view, ns.as_deref(), name, sub, ptype, &patch)?;
            Ok(json_response(
                200,
                &show(&present(res, view, &obj), partial_meta),
            ))
        }
        Method::DELETE if sub == Sub::Main => {
            let opts = delete_opts(req)?;
            let out = inner
                .store()
                .delete(res, view, ns.as_deref(), name, &opts)?;
            Ok(match out {
                Deleted::Pending(obj) => {
                    json_response(200, &show(&present(res, view, &obj), partial_meta))
                }
                Deleted::Now(obj) if res == Resource::Pods => {
                    json_response(200, &show(&present(res, view, &obj), partial_meta))
                }
                Deleted::Now(obj) => {
                    let mut details = json!({
                        "name": name,
                        "kind": res.plural(),
                        "uid": resource::meta_str(&obj, "uid").unwrap_or(""),
                    });
                    if !group(view).is_empty() {
                        details["group"] = json!(group(view));
                    }
                    json_response(200, &success(200, Some(details)))
                }
            })
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn delete_opts(req: &Req) -> Result<DeleteOpts, ApiError> {
    req.no_dry_run()?;
    let mut opts = DeleteOpts::default();
    if let Some(g) = req.param("gracePeriodSeconds") {
        opts.grace = Some(
            g.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?,
        );
    }
    if !req.body.is_empty() {
        let body: Value = serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        if let Some(g) = body.get("gracePeriodSeconds").and_then(Value::as_i64) {
            opts.grace = Some(g);
        }
        if let Some(p) = body.get("preconditions") {
            opts.uid = p.get("uid").and_then(Value::as_str).map(str::to_string);
            opts.rv = p
                .get("resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if body.get("dryRun").is_some() {
            return Err(ApiError::bad_request(
                "dryRun is not implemented by the fake apiserver",
            ));
        }
    }
    Ok(opts)
}

fn parse_rv(s: Option<&str>) -> Result<Option<u64>, ApiError> {
    match s {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "invalid resource version: strconv.ParseUint: parsing {v:?}: invalid syntax"
            ))
        }),
    }
}

fn list_options_invalid(causes: Vec<Cause>) -> ApiError {
    ApiError::invalid("ListOptions", "meta.k8s.io", "", causes)
}

async fn list(
    inner: &Arc<Inner>,
    res: Resource,
    view: View,
    ns: Option<String>,
    req: &Req,
) -> Result<Response<Body>, ApiError> {
    let filter = Filter::new(
        res,
        view,
        ns,
        req.param("labelSelector").unwrap_or(""),
        req.param("fieldSelector").unwrap_or(""),
    )?;
    let rv = parse_rv(req.param("resourceVersion"))?;
    let rv_match = match req.param("resourceVersionMatch") {
        None | Some("") => None,
        Some("NotOlderThan") => Some(RvMatch::NotOlderThan),
        Some("Exact") => Some(RvMatch::Exact),
        Some(other) => {
            return Err(list_options_invalid(vec![Cause::unsupported(
                "resourceVersionMatch",
                other,
                &["Exact", "NotOlderThan", ""],
            )]));
        }
    };
    let limit = match req.param("limit") {
        None | Some("") | Some("0") => None,
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
    };
    let cont = req
        .param("continue")
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let mut causes = Vec::new();
    if rv_match.is_some() && rv.is_none() {
        causes.push(Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    if cont.is_some() && rv.is_some_and(|r| r != 0) {
        causes.push(Cause::forbidden(
            "resourceVersion",
            "specifying resource version is not allowed when using continue",
        ));
    }
    if rv_match.is_some() && cont.is_some() {
        causes.push(Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden when continue is provided",
        ));
    }
    if rv_match == Some(RvMatch::Exact) && rv == Some(0) {
        causes.push(Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        ));
    }
    if !causes.is_empty() {
        return Err(list_options_invalid(causes));
    }
    // The cacher waits (3 s) for a resourceVersion it has not seen yet.
    if let Some(want) = rv.filter(|_| cont.is_none()) {
        let mut rx = inner.store().rv_tx.subscribe();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let current = *rx.borrow_and_update();
            if current >= want {
                break;
            }
            if Instant::now() >= deadline
                || tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
            {
                let current = inner.store().rv;
                if current >= want {
                    break;
                }
                return Err(ApiError::too_large_resource_version(want, current));
            }
        }
    }
    let q = ListQuery {
        filter,
        limit,
        cont,
        rv,
        rv_match,
    };
    let result = inner.store().list(&q)?;
    Ok(full(200, list_body(res, view, &result, req.partial_meta())))
}

fn start_watch(
    inner: &Arc<Inner>,
    res: Resource,
    view: View,
    ns: Option<String>,
    name: Option<&str>,
    req: &Req,
) -> Result<Response<Body>, ApiError> {
    let mut filter = Filter::new(
        res,
        view,
        ns,
        req.param("labelSelector").unwrap_or(""),
        req.param("fieldSelector").unwrap_or(""),
    )?;
    if let Some(n) = name {
        filter.require_field("metadata.name", n);
    }
    let rv = parse_rv(req.param("resourceVersion"))?;
    let send_initial = match req.param("sendInitialEvents") {
        None | Some("") => None,
        Some(v) => Some(
            parse_bool(v)
                .ok_or_else(|| ApiError::bad_request(format!("invalid sendInitialEvents {v:?}")))?,
        ),
    };
    let bookmarks = req.flag("allowWatchBookmarks");
    let rv_match = req.param("resourceVersionMatch").filter(|s| !s.is_empty());
    let mut causes = Vec::new();
    match (send_initial, rv_match) {
        (None, Some(_)) => causes.push(Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        )),
        (Some(_), Some("NotOlderThan")) => {}
        (Some(_), Some(other)) => causes.push(Cause::unsupported(
            "resourceVersionMatch",
            other,
            &["NotOlderThan"],
        )),
        (Some(_), None) => causes.push(Cause::forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
        )),
        (None, None) => {}
    }
    if send_initial == Some(true) && !bookmarks {
        causes.push(Cause::forbidden(
            "allowWatchBookmarks",
            "allowWatchBookmarks must be set to true when sendInitialEvents is true",
        ));
    }
    if !causes.is_empty() {
        return Err(list_options_invalid(causes));
    }
    let timeout = match req.param("timeoutSeconds") {
        // Unset (or 0): the apiserver picks a timeout in [minRequestTimeout, 2x) = 30-60 min.
        None | Some("" | "0") => Duration::from_secs(1800),
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
    };
    let partial_meta = req.partial_meta();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let started = inner.store().watch(&filter, rv, send_initial);
    let start = match started {
        Ok(s) => s,
        Err(e) if e.code == 410 => {
            let line = event_line("ERROR", &e.to_status());
            let _ = tx.try_send(line);
            return Ok(streaming(rx));
        }
        Err(e) => return Err(e),
    };
    let every = *inner
        .bookmark_interval
        .lock()
        .expect("fake apiserver bookmark interval");
    let close = inner.close_watches.subscribe();
    let kill = inner.kill.subscribe();
    let mut hung = inner.hung.subscribe();
    hung.mark_unchanged();
    let mut silence = inner.silence_watches.subscribe();
    silence.mark_unchanged();
    let count = Arc::clone(&inner.active_watches);
    count.fetch_add(1, Ordering::SeqCst);
    let w = WatchTask {
        filter,
        bookmarks,
        every,
        deadline: Instant::now() + timeout,
        partial_meta,
        tx,
        close,
        kill,
        hung,
        silence,
        count,
    };
    tokio::spawn(w.run(start));
    Ok(streaming(rx))
}

#[derive(Debug)]
struct WatchTask {
    filter: Filter,
    bookmarks: bool,
    every: Duration,
    deadline: Instant,
    partial_meta: bool,
    tx: mpsc::Sender<Bytes>,
    close: watch::Receiver<u64>,
    kill: watch::Receiver<u64>,
    hung: watch::Receiver<bool>,
    silence: watch::Receiver<u64>,
    count: Arc<AtomicUsize>,
}

impl WatchTask {
    /// A silenced watch sends nothing more and never closes by itself; it ends only when the
    /// client drops the connection or the server is dropped or taken down.
    async fn go_silent(mut self) {
        tokio::select! {
            _ = self.tx.closed() => {}
            _ = self.kill.changed() => {}
        }
    }

    fn next_bookmark(&self) -> Option<Instant> {
        if !self.bookmarks {
            return None;
        }
        let now = Instant::now();
        let mut at = now + self.every;
        if let Some(pre) = self.deadline.checked_sub(Duration::from_secs(2))
            && pre < at
        {
            at = pre;
        }
        (at > now).then_some(at)
    }

    fn line(&self, typ: &str, obj: &Value) -> Bytes {
        if self.partial_meta {
            event_line(typ, &partial(obj))
        } else {
            event_line(typ, obj)
        }
    }

    async fn run(mut self, mut start: store::WatchStart) {
        let _count = CountGuard(Arc::clone(&self.count));
        if *self.hung.borrow() {
            return self.go_silent().await;
        }
        for obj in std::mem::take(&mut start.initial) {
            if self.tx.send(self.line("ADDED", &obj)).await.is_err() {
                return;
            }
        }
        let (res, view) = (self.filter.res, self.filter.view);
        if start.initial_end {
            let b = bookmark(res, view, start.after, true, self.partial_meta);
            if self.tx.send(b).await.is_err() {
                return;
            }
        }
        for ch in std::mem::take(&mut start.replay) {
            if let Some((typ, obj)) = watch_event(&self.filter, &ch)
                && self.tx.send(self.line(typ, &obj)).await.is_err()
            {
                return;
            }
        }
        let mut seen = start.after;
        let mut next_bookmark = self.next_bookmark();
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut silent = false;
        loop {
            if silent {
                return self.go_silent().await;
            }
            let bookmark_at = next_bookmark.unwrap_or(far);
            // Biased: a hang or a silence that has begun wins over a change queued at the same moment,
            // as a server that stopped answering sends nothing more (a fair pick sometimes sent it).
            let line = tokio::select! {
                biased;
                _ = self.tx.closed() => return,
                _ = self.close.changed() => return,
                _ = self.kill.changed() => return,
                _ = async { let _ = self.hung.wait_for(|h| *h).await; } => {
                    silent = true;
                    None
                }
                _ = self.silence.changed() => {
                    silent = true;
                    None
                }
                _ = tokio::time::sleep_until(self.deadline) => return,
                _ = tokio::time::sleep_until(bookmark_at), if next_bookmark.is_some() => {
                    next_bookmark = self.next_bookmark();
                    Some(bookmark(res, view, seen, false, self.partial_meta))
                }
                r = start.rx.recv() => match r {
                    Ok(ch) => {
                        if ch.rv <= start.after {
                            None
                        } else {
                            seen = seen.max(ch.rv);
                            watch_event(&self.filter, &ch).map(|(typ, obj)| self.line(typ, &obj))
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!("fake apiserver: closing a watcher {n} changes behind");
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if let Some(line) = line
                && self.tx.send(line).await.is_err()
            {
                return;
            }
        }
    }
}

#[derive(Debug)]
struct CountGuard(Arc<AtomicUsize>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route("/api/v1/namespaces/default/pods/p1/binding"),
            Some(Route::Binding {
                ns: "default".into(),
                name: "p1".into()
            })
        );
        assert_eq!(
            route("/api/v1/pods"),
            Some(Route::Collection {
                res: Resource::Pods,
                view: View::Core,
                ns: None
            })
        );
        assert_eq!(
            route("/apis/events.k8s.io/v1/namespaces/x/events"),
            Some(Route::Collection {
                res: Resource::Events,
                view: View::EventsV1,
                ns: Some("x".into())
            })
        );
        assert_eq!(route("/apis/events.k8s.io/v1/namespaces/x/pods"), None);
        assert_eq!(route("/api/v1/pods/p1"), None);
        assert!(matches!(
            route("/api/v1/nodes/n1/status"),
            Some(Route::Status { .. })
        ));
        let r = RecordedRequest {
            method: "GET".into(),
            path: "/api/v1/pods".into(),
            query: "&watch=true&fieldSelector=spec.nodeName%3Dn1".into(),
            content_type: None,
            body: None,
        };
        assert_eq!(r.verb(), "watch");
        assert_eq!(
            r.param("fieldSelector").as_deref(),
            Some("spec.nodeName=n1")
        );
        assert_eq!(
            route("/api/v1/namespaces/default/pods/p/status").map(|_| ()),
            Some(())
        );
    }

    #[test]
    fn field_selected_list_of_10k_pods_is_fast() {
        let mut store = Store::new();
        for i in 0..10_000 {
            let pod = json!({
                "metadata": { "name": format!("pod-{i:05}"), "labels": { "app": "gpu" } },
                "spec": {
                    "nodeName": format!("node-{}", i % 10),
                    "containers": [{ "name": "main", "image": "cuda:12",
                        "resources": { "limits": { "volcano.sh/vgpu-number": "1" } } }]
                }
            });
            store
                .create(Resource::Pods, View::Core, Some("default"), pod, true)
                .expect("create");
        }
        let filter = Filter::new(Resource::Pods, View::Core, None, "", "spec.nodeName=node-3")
            .expect("filter");
        let q = ListQuery {
            filter,
            limit: None,
            cont: None,
            rv: None,
            rv_match: None,
        };
        let mut scan = Duration::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let l = store.list(&q).expect("list");
            scan = scan.min(t.elapsed());
            assert_eq!(l.items.len(), 1000);
        }
        let t = std::time::Instant::now();
        let l = store.list(&q).expect("list");
        let body = list_body(Resource::Pods, View::Core, &l, false);
        let total = t.elapsed();
        assert_eq!(l.items.len(), 1000);
        println!(
            "scan of 10,000 pods (best of 5): {scan:?}; scan and 1,000-item body ({} KiB): {total:?}",
            body.len() / 1024
        );
    }
}
