//! The object store: one global resourceVersion counter, a table per resource, a bounded
//! change history per resource (the watch cache window), and the write paths with the
//! apiserver's strategies (defaulting, validation, status/spec split, graceful deletion,
//! finalizers, no-op suppression).

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, watch};

use super::patch::{PatchError, json_patch, merge_patch, strategic_merge_patch};
use super::resource::{
    Resource, View, api_version, check_types, default_pod, field_labels, field_value, group, key,
    meta, meta_mut, meta_str, present, qos_class, validate_create, validate_meta, validate_update,
};
use super::selector::{FieldSelector, LabelSelector};
use super::status::{ApiError, Cause};
use super::util::{hex_decode, hex_encode, name_suffix, new_uid, rfc3339, unix_now};

/// How many changes per resource the watch window keeps by default.
pub(crate) const DEFAULT_HISTORY: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One committed write, as watchers see it.
#[derive(Debug)]
pub(crate) struct Change {
    pub res: Resource,
    pub typ: ChangeType,
    pub key: String,
    /// The new state; for a deletion, the last state carrying the deletion's resourceVersion.
    pub obj: Arc<Value>,
    /// The state before the write.
    pub prev: Option<Arc<Value>>,
    pub rv: u64,
}

/// A stored object with its field-label values precomputed, as the watch cache keeps them
/// (so a selected list scans small strings, not JSON trees).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub obj: Arc<Value>,
    /// Values of `field_labels(res, View::Core)`, in that order (empty for events, which are
    /// matched on their presented form).
    fields: Arc<[Box<str>]>,
}

impl Stored {
    fn new(res: Resource, obj: Arc<Value>) -> Self {
        let fields = if res == Resource::Events {
            Arc::from(Vec::new())
        } else {
            field_labels(res, View::Core)
                .iter()
                .map(|l| Box::from(field_value(res, &obj, l).as_ref()))
                .collect()
        };
        Self { obj, fields }
    }
}

#[derive(Debug, Default)]
struct Table {
    objects: BTreeMap<String, Stored>,
    history: VecDeque<Arc<Change>>,
    /// Every change with a resourceVersion above this is in `history`.
    floor: u64,
}

/// Main resource or a subresource write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sub {
    Main,
    Status,
}

/// The patch formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    Merge,
    Strategic,
    Json,
}

/// What a DELETE did.
#[derive(Debug)]
pub(crate) enum Deleted {
    /// Gone from the store.
    Now(Arc<Value>),
    /// Still there: graceful deletion or finalizers pending.
    Pending(Arc<Value>),
}

/// `DeleteOptions` the fake honours.
#[derive(Debug, Default, Clone)]
pub(crate) struct DeleteOpts {
    pub grace: Option<i64>,
    pub uid: Option<String>,
    pub rv: Option<String>,
}

/// Which objects a list or watch selects.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub res: Resource,
    pub view: View,
    pub ns: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// `fields` as indices into [`Stored`]'s precomputed values.
    field_index: Vec<(usize, bool, String)>,
}

impl Filter {
    pub fn new(
        res: Resource,
        view: View,
        ns: Option<String>,
        labels: &str,
        fields: &str,
    ) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(labels)?;
        let fields_sel = FieldSelector::parse(fields)?;
        let supported = field_labels(res, view);
        if let Some(bad) = fields_sel.fields().find(|f| !supported.contains(f)) {
            return Err(ApiError::bad_request(format!(
                "Unable to find {:?} that match label selector {labels_text:?}, field selector {fields:?}: field label not supported: {bad}",
                format!("{}, Resource={}", gv(view), res.plural()),
                labels_text = labels_text(&labels),
            )));
        }
        let mut f = Self {
            res,
            view,
            ns,
            labels,
            fields: fields_sel,
            field_index: Vec::new(),
        };
        f.index_fields();
        Ok(f)
    }

    fn index_fields(&mut self) {
        let labels = field_labels(self.res, View::Core);
        self.field_index = self
            .fields
            .terms()
            .filter_map(|(f, eq, v)| {
                labels
                    .iter()
                    .position(|l| *l == f)
                    .map(|i| (i, eq, v.to_string()))
            })
            .collect();
    }

    /// Adds a `field=value` term.
    pub fn require_field(&mut self, field: &str, value: &str) {
        self.fields.push_eq(field, value);
        self.index_fields();
    }

    /// Whether a stored object is selected; the namespace is the caller's to check (by key).
    fn matches_stored(&self, s: &Stored) -> bool {
        if self.res == Resource::Events {
            return self.matches(&present(self.res, self.view, &s.obj));
        }
        if !self.labels.is_empty() {
            let labels = meta(&s.obj)
                .and_then(|m| m.get("labels"))
                .and_then(Value::as_object);
            if !self.labels.matches(labels) {
                return false;
            }
        }
        self.field_index
            .iter()
            .all(|(i, eq, v)| (s.fields.get(*i).map(AsRef::as_ref) == Some(v.as_str())) == *eq)
    }

    /// Whether a (presented) object is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.ns
            && meta_str(obj, "namespace") != Some(ns.as_str())
        {
            return false;
        }
        let labels = meta(obj)
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.labels.matches(labels) && self.fields.matches(|f| field_value(self.res, obj, f))
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

fn gv(view: View) -> &'static str {
    match view {
        View::Core => "/v1",
        View::EventsV1 => "events.k8s.io/v1",
    }
}

fn labels_text(l: &LabelSelector) -> String {
    if l.is_empty() {
        String::new()
    } else {
        format!("{l:?}")
    }
}

/// How a list's `resourceVersion` is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RvMatch {
    NotOlderThan,
    Exact,
}

/// A LIST request.
#[derive(Debug, Clone)]
pub(crate) struct ListQuery {
    pub filter: Filter,
    pub limit: Option<usize>,
    pub cont: Option<String>,
    pub rv: Option<u64>,
    pub rv_match: Option<RvMatch>,
}

/// A LIST answer.
#[derive(Debug)]
pub(crate) struct ListResult {
    pub items: Vec<Arc<Value>>,
    pub rv: u64,
    pub cont: Option<String>,
    pub remaining: Option<usize>,
}

/// What a new watch starts from.
#[derive(Debug)]
pub(crate) struct WatchStart {
    /// Synthetic ADDED events (already presented and filtered).
    pub initial: Vec<Arc<Value>>,
    /// Send the `k8s.io/initial-events-end` bookmark after `initial`.
    pub initial_end: bool,
    /// Changes from the history window to replay (unfiltered).
    pub replay: Vec<Arc<Change>>,
    pub rx: broadcast::Receiver<Arc<Change>>,
    /// Changes at or below this were already covered.
    pub after: u64,
}

/// The store.
#[derive(Debug)]
pub(crate) struct Store {
    pub rv: u64,
    tables: [Table; 4],
    pub history_cap: usize,
    pub tx: broadcast::Sender<Arc<Change>>,
    pub rv_tx: watch::Sender<u64>,
    pub clock: Option<i64>,
}

fn type_meta_error(res: Resource, view: View, obj: &Value) -> Option<ApiError> {
    let want_kind = res.kind();
    let want_av = api_version(view);
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && !av.is_empty()
        && av != want_av
    {
        return Some(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({want_av})"
        )));
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && !k.is_empty()
        && k != want_kind
    {
        return Some(ApiError::bad_request(format!(
            "{k} in version {:?} cannot be handled as a {want_kind}: no kind {k:?} is registered for version {want_av:?}",
            want_av.rsplit('/').next().unwrap_or(want_av)
        )));
    }
    None
}

fn set_type_meta(res: Resource, view: View, obj: &mut Value) {
    if let Value::Object(m) = obj {
        m.insert("kind".into(), json!(res.kind()));
        m.insert("apiVersion".into(), json!(api_version(view)));
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn rv_of(obj: &Value) -> &str {
    meta_str(obj, "resourceVersion").unwrap_or("")
}

fn invalid(res: Resource, view: View, name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(res.kind(), group(view), name, causes)
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        let (rv_tx, _) = watch::channel(1);
        Self {
            rv: 1,
            tables: Default::default(),
            history_cap: DEFAULT_HISTORY,
            tx,
            rv_tx,
            clock: None,
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.unwrap_or_else(unix_now)
    }

    fn table(&self, res: Resource) -> &Table {
        &self.tables[res.index()]
    }

    pub fn get(&self, res: Resource, ns: Option<&str>, name: &str) -> Option<&Arc<Value>> {
        self.table(res).objects.get(&key(ns, name)).map(|s| &s.obj)
    }

    pub fn all(&self, res: Resource) -> impl Iterator<Item = &Arc<Value>> {
        self.table(res).objects.values().map(|s| &s.obj)
    }

    pub fn len(&self, res: Resource) -> usize {
        self.table(res).objects.len()
    }

    /// Drops the change history: every older resourceVersion is now expired.
    pub fn compact(&mut self) {
        let rv = self.rv;
        for t in &mut self.tables {
            t.history.clear();
            t.floor = rv;
        }
    }

    pub fn set_history_cap(&mut self, cap: usize) {
        self.history_cap = cap;
        for t in &mut self.tables {
            while t.history.len() > cap {
                if let Some(old) = t.history.pop_front() {
                    t.floor = old.rv;
                }
            }
        }
    }

    /// Writes unconditionally: bumps the counter, records and broadcasts the change.
    fn commit(&mut self, res: Resource, key: &str, new: Option<Value>) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        let cap = self.history_cap;
        let table = &mut self.tables[res.index()];
        let prev = table.objects.get(key).map(|s| Arc::clone(&s.obj));
        let (typ, obj) = match new {
            Some(mut v) => {
                meta_mut(&mut v).insert("resourceVersion".into(), json!(rv.to_string()));
                let v = Arc::new(v);
                table
                    .objects
                    .insert(key.to_string(), Stored::new(res, Arc::clone(&v)));
                let typ = if prev.is_some() {
                    ChangeType::Modified
                } else {
                    ChangeType::Added
                };
                (typ, v)
            }
            None => {
                let mut v = prev
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| json!({"metadata": {}}));
                meta_mut(&mut v).insert("resourceVersion".into(), json!(rv.to_string()));
                table.objects.remove(key);
                (ChangeType::Deleted, Arc::new(v))
            }
        };
        let change = Arc::new(Change {
            res,
            typ,
            key: key.to_string(),
            obj: Arc::clone(&obj),
            prev,
            rv,
        });
        table.history.push_back(Arc::clone(&change));
        while table.history.len() > cap {
            if let Some(old) = table.history.pop_front() {
                table.floor = old.rv;
            }
        }
        if cap == 0 {
            table.floor = rv;
        }
        let _ = self.tx.send(change);
        self.rv_tx.send_replace(rv);
        obj
    }

    /// Writes `new` over `old` unless nothing changed (the apiserver skips no-op writes: no new
    /// resourceVersion, no watch event).
    fn write(
        &mut self,
        res: Resource,
        key: &str,
        old: Option<&Arc<Value>>,
        mut new: Value,
    ) -> Arc<Value> {
        let old_rv = old.map(|o| rv_of(o).to_string());
        match &old_rv {
            Some(rv) => {
                meta_mut(&mut new).insert("resourceVersion".into(), json!(rv));
            }
            None => {
                meta_mut(&mut new).remove("resourceVersion");
            }
        }
        if let Some(old) = old
            && **old == new
        {
            return Arc::clone(old);
        }
        self.commit(res, key, Some(new))
    }

    /// POST. `keep_status` keeps a pod's `status` (in-process seeding) instead of resetting it.
    pub fn create(
        &mut self,
        res: Resource,
        view: View,
        ns: Option<&str>,
        mut obj: Value,
        keep_status: bool,
    ) -> Result<Arc<Value>, ApiError> {
        check_types(&obj)?;
        if let Some(e) = type_meta_error(res, view, &obj) {
            return Err(e);
        }
        set_type_meta(res, view, &mut obj);
        let now = rfc3339(self.now());
        {
            let m = meta_mut(&mut obj);
            if res.namespaced() {
                let body_ns = m.get("namespace").and_then(Value::as_str).unwrap_or("");
                let url_ns = ns.unwrap_or("");
                if body_ns.is_empty() {
                    m.insert("namespace".into(), json!(url_ns));
                } else if body_ns != url_ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(new_uid()));
            m.insert("creationTimestamp".into(), json!(now));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("selfLink");
        }
        let generate = meta_str(&obj, "generateName").unwrap_or("").to_string();
        let mut generated = false;
        if meta_str(&obj, "name").unwrap_or("").is_empty() && !generate.is_empty() {
            meta_mut(&mut obj).insert("name".into(), json!(format!("{generate}{}", name_suffix())));
            generated = true;
        }
        if res == Resource::Pods {
            default_pod(&mut obj, true);
            let qos = qos_class(&obj);
            if keep_status {
                let st = obj
                    .as_object_mut()
                    .map(|m| m.entry("status").or_insert(json!({})));
                if let Some(Value::Object(st)) = st {
                    st.entry("phase").or_insert(json!("Pending"));
                    st.entry("qosClass").or_insert(json!(qos));
                }
            } else {
                obj["status"] = json!({ "phase": "Pending", "qosClass": qos });
            }
        }
        let mut causes = Vec::new();
        validate_meta(res, &obj, &mut causes);
        validate_create(res, view, &obj, &mut causes);
        let name = meta_str(&obj, "name").unwrap_or("").to_string();
        if !causes.is_empty() {
            return Err(invalid(res, view, &name, causes));
        }
        let ns_s = meta_str(&obj, "namespace").map(str::to_string);
        let ns_ref = if res.namespaced() {
            ns_s.as_deref()
        } else {
            None
        };
        if !rv_of(&obj).is_empty() {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let mut k = key(ns_ref, &name);
        if generated {
            // The apiserver retries a generated name that collides (RetryGenerateName).
            let mut tries = 0;
            while self.table(res).objects.contains_key(&k) && tries < 8 {
                let n = format!("{generate}{}", name_suffix());
                meta_mut(&mut obj).insert("name".into(), json!(n));
                k = key(ns_ref, &n);
                tries += 1;
            }
        }
        if self.table(res).objects.contains_key(&k) {
            let name = meta_str(&obj, "name").unwrap_or("").to_string();
            return Err(ApiError::already_exists(res.qualified(view), &name));
        }
        Ok(self.write(res, &k, None, obj))
    }

    fn check_name(
        res: Resource,
        ns: Option<&str>,
        name: &str,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        let m = meta_mut(obj);
        let body_name = m.get("name").and_then(Value::as_str).unwrap_or("");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if res.namespaced() {
            let body_ns = m.get("namespace").and_then(Value::as_str).unwrap_or("");
            if body_ns.is_empty() {
                m.insert("namespace".into(), json!(ns.unwrap_or("")));
            } else if Some(body_ns) != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        } else {
            m.remove("namespace");
        }
        Ok(())
    }

    /// PUT. Returns the object and whether it was created (events allow create-on-update).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        res: Resource,
        view: View,
        ns: Option<&str>,
        name: &str,
        sub: Sub,
        mut obj: Value,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        check_types(&obj)?;
        if let Some(e) = type_meta_error(res, view, &obj) {
            return Err(e);
        }
        Self::check_name(res, ns, name, &mut obj)?;
        let Some(old) = self.get(res, ns, name).cloned() else {
            if res == Resource::Events && sub == Sub::Main {
                if !rv_of(&obj).is_empty() {
                    return Err(ApiError::modified(res.qualified(view), name));
                }
                let created = self.create(res, view, ns, obj, false)?;
                return Ok((created, true));
            }
            return Err(ApiError::not_found(res.qualified(view), name));
        };
        let out = self.apply_update(res, view, &old, obj, sub)?;
        Ok((out, false))
    }

    /// The shared tail of PUT and PATCH.
    fn apply_update(
        &mut self,
        res: Resource,
        view: View,
        old: &Arc<Value>,
        mut new: Value,
        sub: Sub,
    ) -> Result<Arc<Value>, ApiError> {
        let name = meta_str(old, "name").unwrap_or("").to_string();
        let ns = meta_str(old, "namespace").map(str::to_string);
        let k = key(
            if res.namespaced() {
                ns.as_deref()
            } else {
                None
            },
            &name,
        );
        let qualified = res.qualified(view);
        let new_rv = rv_of(&new).to_string();
        if !new_rv.is_empty() && new_rv != rv_of(old) {
            return Err(ApiError::modified(qualified, &name));
        }
        set_type_meta(res, view, &mut new);
        let old_view = present(res, view, old);
        {
            let old_meta = meta(old).cloned().unwrap_or_default();
            let m = meta_mut(&mut new);
            let old_uid = old_meta.get("uid").cloned().unwrap_or(Value::Null);
            match m.get("uid").and_then(Value::as_str) {
                None | Some("") => {
                    m.insert("uid".into(), old_uid);
                }
                Some(u) if Some(u) != old_uid.as_str() => {
                    let u = u.to_string();
                    return Err(invalid(
                        res,
                        view,
                        &name,
                        vec![Cause::invalid("metadata.uid", &u, "field is immutable")],
                    ));
                }
                Some(_) => {}
            }
            for f in [
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match old_meta.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            m.remove("selfLink");
        }
        if let Value::Object(n) = &mut new {
            let keep = match (res, sub) {
                (Resource::Pods | Resource::Nodes, Sub::Main) => Some("status"),
                (_, Sub::Status) => Some("spec"),
                _ => None,
            };
            if let Some(f) = keep {
                match old_view.get(f) {
                    Some(v) => n.insert(f.into(), v.clone()),
                    None => n.remove(f),
                };
            }
        }
        if res == Resource::Pods {
            default_pod(&mut new, false);
        }
        let mut causes = Vec::new();
        validate_meta(res, &new, &mut causes);
        validate_update(res, view, &old_view, &new, &mut causes);
        let old_fin = finalizers(old);
        let new_fin = finalizers(&new);
        let deleting = meta(old).is_some_and(|m| m.contains_key("deletionTimestamp"));
        if deleting {
            let added: Vec<&String> = new_fin.iter().filter(|f| !old_fin.contains(f)).collect();
            if !added.is_empty() {
                causes.push(Cause::forbidden(
                    "metadata.finalizers",
                    &format!("no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"),
                ));
            }
        }
        if !causes.is_empty() {
            return Err(invalid(res, view, &name, causes));
        }
        let grace = meta(old)
            .and_then(|m| m.get("deletionGracePeriodSeconds"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if deleting && new_fin.is_empty() && grace == 0 {
            return Ok(self.commit(res, &k, None));
        }
        Ok(self.write(res, &k, Some(old), new))
    }

    /// PATCH.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        res: Resource,
        view: View,
        ns: Option<&str>,
        name: &str,
        sub: Sub,
        ptype: PatchType,
        patch: &Value,
    ) -> Result<Arc<Value>, ApiError> {
        let Some(old) = self.get(res, ns, name).cloned() else {
            return Err(ApiError::not_found(res.qualified(view), name));
        };
        let mut doc = present(res, view, &old).as_ref().clone();
        let applied = match ptype {
            PatchType::Merge => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request(
                        "json: cannot unmarshal into Go value of type map[string]interface {}",
                    ));
                }
                merge_patch(&mut doc, patch);
                Ok(())
            }
            PatchType::Strategic => strategic_merge_patch(&mut doc, patch),
            PatchType::Json => json_patch(&mut doc, patch),
        };
        match applied {
            Ok(()) => {}
            Err(PatchError::BadRequest(m)) => return Err(ApiError::bad_request(m)),
            Err(PatchError::Unprocessable(m)) => return Err(ApiError::unprocessable(&m)),
        }
        check_types(&doc)?;
        if let Some(e) = type_meta_error(res, view, &doc) {
            return Err(e);
        }
        {
            let m = meta_mut(&mut doc);
            if m.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                m.insert("name".into(), json!(name));
            }
        }
        Self::check_name(res, ns, name, &mut doc)?;
        self.apply_update(res, view, &old, doc, sub)
    }

    /// DELETE of one object.
    pub fn delete(
        &mut self,
        res: Resource,
        view: View,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Deleted, ApiError> {
        let qualified = res.qualified(view);
        let Some(old) = self.get(res, ns, name).cloned() else {
            return Err(ApiError::not_found(qualified, name));
        };
        let k = key(ns, name);
        let uid = meta_str(&old, "uid").unwrap_or("");
        if let Some(want) = &opts.uid
            && want != uid
        {
            return Err(ApiError::conflict(
                qualified,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                ),
            ));
        }
        if let Some(want) = &opts.rv
            && want != rv_of(&old)
        {
            return Err(ApiError::conflict(
                qualified,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                    rv_of(&old)
                ),
            ));
        }
        let now = self.now();
        let old_meta = meta(&old).cloned().unwrap_or_default();
        let pending = old_meta.contains_key("deletionTimestamp");
        let current_grace = old_meta
            .get("deletionGracePeriodSeconds")
            .and_then(Value::as_i64);
        let mut grace = 0;
        if res == Resource::Pods {
            let spec = old.get("spec");
            let default = spec
                .and_then(|s| s.get("terminationGracePeriodSeconds"))
                .and_then(Value::as_i64)
                .unwrap_or(30);
            grace = opts.grace.or(current_grace).unwrap_or(default).max(0);
            let unscheduled = spec
                .and_then(|s| s.get("nodeName"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty();
            let phase = old
                .get("status")
                .and_then(|s| s.get("phase"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if unscheduled || phase == "Succeeded" || phase == "Failed" {
                grace = 0;
            }
            if pending && current_grace.is_some_and(|g| grace >= g) {
                return Ok(Deleted::Pending(old));
            }
        }
        let fins = finalizers(&old);
        if grace > 0 || !fins.is_empty() {
            if grace == 0 && pending && current_grace == Some(0) {
                return Ok(Deleted::Pending(old));
            }
            let mut new = old.as_ref().clone();
            let m = meta_mut(&mut new);
            if !pending || grace > 0 || current_grace.is_some_and(|g| g > 0) {
                m.insert("deletionTimestamp".into(), json!(rfc3339(now + grace)));
            }
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            let out = self.write(res, &k, Some(&old), new);
            return Ok(Deleted::Pending(out));
        }
        Ok(Deleted::Now(self.commit(res, &k, None)))
    }

    /// POST `pods/{name}/binding`.
    pub fn bind(&mut self, ns: &str, url_name: &str, mut binding: Value) -> Result<(), ApiError> {
        check_types(&binding)?;
        if let Some(k) = binding.get("kind").and_then(Value::as_str)
            && !k.is_empty()
            && k != "Binding"
        {
            return Err(ApiError::bad_request(format!(
                "{k} in version \"v1\" cannot be handled as a Binding: no kind {k:?} is registered for version \"v1\""
            )));
        }
        let bname = meta_str(&binding, "name").unwrap_or("").to_string();
        if url_name != bname {
            return Err(ApiError::bad_request(
                "name in URL does not match name in Binding object",
            ));
        }
        {
            let m = meta_mut(&mut binding);
            let bns = m.get("namespace").and_then(Value::as_str).unwrap_or("");
            if bns.is_empty() {
                m.insert("namespace".into(), json!(ns));
            } else if bns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        let target = binding.get("target").cloned().unwrap_or(Value::Null);
        let tkind = target.get("kind").and_then(Value::as_str).unwrap_or("");
        let tname = target.get("name").and_then(Value::as_str).unwrap_or("");
        let mut causes = Vec::new();
        if !tkind.is_empty() && tkind != "Node" {
            causes.push(Cause::unsupported(
                "target.kind",
                tkind,
                &["Node", "<empty>"],
            ));
        }
        if tname.is_empty() {
            causes.push(Cause::required("target.name", ""));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid("Binding", "", &bname, causes));
        }
        let Some(old) = self.get(Resource::Pods, Some(ns), &bname).cloned() else {
            return Err(ApiError::not_found("pods", &bname));
        };
        let uid = meta_str(&old, "uid").unwrap_or("");
        if let Some(want) = meta_str(&binding, "uid").filter(|u| !u.is_empty())
            && want != uid
        {
            return Err(ApiError::conflict(
                "pods",
                &bname,
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                ),
            ));
        }
        if let Some(want) = meta_str(&binding, "resourceVersion").filter(|u| !u.is_empty())
            && want != rv_of(&old)
        {
            return Err(ApiError::conflict(
                "pods",
                &bname,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                    rv_of(&old)
                ),
            ));
        }
        if meta(&old).is_some_and(|m| m.contains_key("deletionTimestamp")) {
            return Err(ApiError::conflict(
                "pods/binding",
                &bname,
                &format!("pod {bname} is being deleted, cannot be assigned to a host"),
            ));
        }
        let spec = old.get("spec");
        let node = spec
            .and_then(|s| s.get("nodeName"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if !node.is_empty() {
            return Err(ApiError::conflict(
                "pods/binding",
                &bname,
                &format!("pod {bname} is already assigned to node {node:?}"),
            ));
        }
        if spec
            .and_then(|s| s.get("schedulingGates"))
            .and_then(Value::as_array)
            .is_some_and(|g| !g.is_empty())
        {
            return Err(ApiError::conflict(
                "pods/binding",
                &bname,
                &format!("pod {bname} has non-empty .spec.schedulingGates"),
            ));
        }
        let mut new = old.as_ref().clone();
        new["spec"]["nodeName"] = json!(tname);
        if let Some(Value::Object(ann)) = meta(&binding).and_then(|m| m.get("annotations")) {
            let m = meta_mut(&mut new);
            if !m.get("annotations").is_some_and(Value::is_object) {
                m.insert("annotations".into(), json!({}));
            }
            if let Some(Value::Object(dst)) = m.get_mut("annotations") {
                for (k, v) in ann {
                    dst.insert(k.clone(), v.clone());
                }
            }
        }
        let now = rfc3339(self.now());
        if !new.get("status").is_some_and(Value::is_object) {
            new["status"] = json!({});
        }
        let status = &mut new["status"];
        if !status.get("conditions").is_some_and(Value::is_array) {
            status["conditions"] = json!([]);
        }
        if let Some(conds) = status["conditions"].as_array_mut() {
            let cond = |t: &str| json!({ "type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": t });
            match conds
                .iter_mut()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("PodScheduled"))
            {
                Some(c) => {
                    let same = c.get("status").and_then(Value::as_str) == Some("True");
                    let t = if same {
                        c.get("lastTransitionTime")
                            .and_then(Value::as_str)
                            .unwrap_or(&now)
                            .to_string()
                    } else {
                        now.clone()
                    };
                    *c = cond(&t);
                }
                None => conds.push(cond(&now)),
            }
        }
        let mut causes = Vec::new();
        validate_meta(Resource::Pods, &new, &mut causes);
        if !causes.is_empty() {
            return Err(ApiError::invalid("Pod", "", &bname, causes));
        }
        self.write(Resource::Pods, &key(Some(ns), &bname), Some(&old), new);
        Ok(())
    }

    /// In-process write that skips strategies and validation: merge-patches the whole object
    /// (status and spec alike), keeping identity and system metadata.
    pub fn force_update(
        &mut self,
        res: Resource,
        ns: Option<&str>,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Arc<Value>> {
        let old = self.get(res, ns, name).cloned()?;
        let mut new = old.as_ref().clone();
        f(&mut new);
        if let (Value::Object(n), Value::Object(o)) = (&mut new, old.as_ref()) {
            for k in ["kind", "apiVersion"] {
                if let Some(v) = o.get(k) {
                    n.insert(k.into(), v.clone());
                }
            }
        }
        let old_meta = meta(&old).cloned().unwrap_or_default();
        let m = meta_mut(&mut new);
        for f in ["name", "namespace", "uid", "creationTimestamp"] {
            match old_meta.get(f) {
                Some(v) => m.insert(f.into(), v.clone()),
                None => m.remove(f),
            };
        }
        Some(self.write(res, &key(ns, name), Some(&old), new))
    }

    /// In-process immediate removal (like a final `gracePeriodSeconds=0` delete with no
    /// finalizers left).
    pub fn force_delete(
        &mut self,
        res: Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Arc<Value>> {
        let k = key(ns, name);
        self.table(res).objects.get(&k)?;
        Some(self.commit(res, &k, None))
    }

    fn snapshot_at(&self, res: Resource, rv: u64) -> BTreeMap<String, Stored> {
        let t = self.table(res);
        let mut m = t.objects.clone();
        for ch in t.history.iter().rev() {
            if ch.rv <= rv {
                break;
            }
            match (&ch.typ, &ch.prev) {
                (ChangeType::Added, _) => {
                    m.remove(&ch.key);
                }
                (_, Some(p)) => {
                    m.insert(ch.key.clone(), Stored::new(res, Arc::clone(p)));
                }
                (_, None) => {}
            }
        }
        m
    }

    /// LIST. `resourceVersion` larger than the current one is the caller's to wait for.
    pub fn list(&self, q: &ListQuery) -> Result<ListResult, ApiError> {
        let res = q.filter.res;
        let t = self.table(res);
        let (snap_rv, start) = match &q.cont {
            Some(tok) => {
                let bad = || {
                    ApiError::bad_request(
                        "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
                    )
                };
                let raw = hex_decode(tok).ok_or_else(bad)?;
                let raw = String::from_utf8(raw).map_err(|_| bad())?;
                let (rv, k) = raw.split_once('\0').ok_or_else(bad)?;
                let rv: u64 = rv.parse().map_err(|_| bad())?;
                if rv < t.floor && rv != self.rv {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                (rv, Some(k.to_string()))
            }
            None => match (q.rv_match, q.rv) {
                (Some(RvMatch::Exact), Some(rv)) if rv != self.rv => {
                    if rv > self.rv {
                        return Err(ApiError::too_large_resource_version(rv, self.rv));
                    }
                    if rv < t.floor {
                        return Err(ApiError::expired(
                            "The resourceVersion for the provided list is too old.",
                        ));
                    }
                    (rv, None)
                }
                _ => (self.rv, None),
            },
        };
        let objects: Cow<'_, BTreeMap<String, Stored>> = if snap_rv == self.rv {
            Cow::Borrowed(&t.objects)
        } else {
            Cow::Owned(self.snapshot_at(res, snap_rv))
        };
        let range = match &start {
            Some(k) => objects.range::<String, _>((Bound::Excluded(k), Bound::Unbounded)),
            None => objects.range::<String, _>(..),
        };
        let prefix = q.filter.ns.as_ref().map(|ns| format!("{ns}/"));
        let mut items = Vec::new();
        let mut last_key = None;
        let mut more = false;
        let mut remaining = 0usize;
        for (k, stored) in range {
            if let Some(p) = &prefix
                && !k.starts_with(p.as_str())
            {
                continue;
            }
            if !q.filter.matches_stored(stored) {
                continue;
            }
            if q.limit.is_some_and(|l| items.len() >= l) {
                more = true;
                if q.filter.has_selectors() {
                    break;
                }
                remaining += 1;
                continue;
            }
            last_key = Some(k.clone());
            items.push(present(res, q.filter.view, &stored.obj));
        }
        let cont = match (more, last_key) {
            (true, Some(k)) => Some(hex_encode(format!("{snap_rv}\0{k}").as_bytes())),
            _ => None,
        };
        let remaining = (more && !q.filter.has_selectors()).then_some(remaining);
        Ok(ListResult {
            items,
            rv: snap_rv,
            cont,
            remaining,
        })
    }

    /// Starts a watch: the synthetic initial events, the history replay and a subscription, all
    /// taken at one instant.
    pub fn watch(
        &self,
        filter: &Filter,
        rv: Option<u64>,
        send_initial: Option<bool>,
    ) -> Result<WatchStart, ApiError> {
        let t = self.table(filter.res);
        let from_now = matches!(rv, None | Some(0));
        let initial_wanted = send_initial.unwrap_or(from_now);
        let mut start = WatchStart {
            initial: Vec::new(),
            initial_end: send_initial == Some(true),
            replay: Vec::new(),
            rx: self.tx.subscribe(),
            after: self.rv,
        };
        if initial_wanted {
            let prefix = filter.ns.as_ref().map(|ns| format!("{ns}/"));
            for (k, stored) in &t.objects {
                if prefix.as_ref().is_some_and(|p| !k.starts_with(p.as_str())) {
                    continue;
                }
                if filter.matches_stored(stored) {
                    start
                        .initial
                        .push(present(filter.res, filter.view, &stored.obj));
                }
            }
            return Ok(start);
        }
        if let Some(n) = rv.filter(|n| *n > 0) {
            if n < t.floor {
                return Err(ApiError::expired(format!(
                    "too old resource version: {n} ({})",
                    t.floor
                )));
            }
            start.replay = t.history.iter().filter(|c| c.rv > n).cloned().collect();
            start.after = self.rv.max(n);
        }
        Ok(start)
    }
}

/// What one watcher is sent for a change: `(type, object)`, or nothing.
pub(crate) fn watch_event(filter: &Filter, ch: &Change) -> Option<(&'static str, Arc<Value>)> {
    if ch.res != filter.res {
        return None;
    }
    let cur = (ch.typ != ChangeType::Deleted).then(|| present(filter.res, filter.view, &ch.obj));
    let cur_pass = cur.as_ref().is_some_and(|o| filter.matches(o));
    let prev = ch
        .prev
        .as_ref()
        .map(|p| present(filter.res, filter.view, p));
    let old_pass = prev.as_ref().is_some_and(|o| filter.matches(o));
    match (cur_pass, old_pass, cur, prev) {
        (true, false, Some(c), _) => Some(("ADDED", c)),
        (true, true, Some(c), _) => Some(("MODIFIED", c)),
        (false, true, _, Some(p)) => {
            let mut p = p.as_ref().clone();
            meta_mut(&mut p).insert("resourceVersion".into(), json!(ch.rv.to_string()));
            Some(("DELETED", Arc::new(p)))
        }
        _ => None,
    }
}

/// `metadata` only, for `as=PartialObjectMetadata` requests.
pub(crate) fn partial(obj: &Value) -> Value {
    let md = obj
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    json!({ "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": md })
}
