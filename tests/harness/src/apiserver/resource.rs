//! What the fake knows about each resource: names, scope, field labels, defaulting, validation,
//! and the conversion between core `v1` and `events.k8s.io/v1` Events.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::status::{ApiError, Cause};
use super::util::{
    is_config_map_key, is_dns_label, is_dns_subdomain, is_label_value, is_qualified_name,
};

/// A stored resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Resource {
    Pods,
    Nodes,
    ConfigMaps,
    Events,
}

/// The API a request came through: events exist in both, as one stored collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    Core,
    EventsV1,
}

pub(crate) const ALL: [Resource; 4] = [
    Resource::Pods,
    Resource::Nodes,
    Resource::ConfigMaps,
    Resource::Events,
];

impl Resource {
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Nodes => "nodes",
            Self::ConfigMaps => "configmaps",
            Self::Events => "events",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Nodes => "Node",
            Self::ConfigMaps => "ConfigMap",
            Self::Events => "Event",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Self::Nodes
    }

    pub fn from_plural(s: &str) -> Option<Self> {
        ALL.into_iter().find(|r| r.plural() == s)
    }

    /// `pods`, `pod` or `Pod` (any case).
    pub fn from_any(s: &str) -> Option<Self> {
        let l = s.to_ascii_lowercase();
        ALL.into_iter()
            .find(|r| r.plural() == l || r.kind().to_ascii_lowercase() == l)
    }

    /// `pods` or `events.events.k8s.io`, as resource names appear in status messages.
    pub fn qualified(self, view: View) -> &'static str {
        match (self, view) {
            (Self::Events, View::EventsV1) => "events.events.k8s.io",
            _ => self.plural(),
        }
    }
}

pub(crate) fn api_version(view: View) -> &'static str {
    match view {
        View::Core => "v1",
        View::EventsV1 => "events.k8s.io/v1",
    }
}

pub(crate) fn group(view: View) -> &'static str {
    match view {
        View::Core => "",
        View::EventsV1 => "events.k8s.io",
    }
}

/// `ns/name` or `name`: the etcd key order lists come out in.
pub(crate) fn key(ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

pub(crate) fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str)
}

pub(crate) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

fn str_at<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = obj;
    for p in path {
        cur = cur.get(*p)?;
    }
    Some(cur)
}

fn dotted<'a>(obj: &'a Value, label: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for p in label.split('.') {
        cur = cur.get(p)?;
    }
    Some(cur)
}

fn field_text(v: Option<&Value>) -> String {
    field_cow(v).into_owned()
}

fn field_cow(v: Option<&Value>) -> Cow<'_, str> {
    match v {
        Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Some(Value::Bool(b)) => Cow::Owned(b.to_string()),
        Some(Value::Number(n)) => Cow::Owned(n.to_string()),
        _ => Cow::Borrowed(""),
    }
}

/// The field labels the real apiserver supports for each resource (`GetAttrs`/field label
/// conversion funcs); anything else is a 400.
pub(crate) fn field_labels(res: Resource, view: View) -> &'static [&'static str] {
    match (res, view) {
        (Resource::Pods, _) => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        (Resource::Nodes, _) => &["metadata.name", "spec.unschedulable"],
        (Resource::ConfigMaps, _) => &["metadata.name", "metadata.namespace"],
        (Resource::Events, View::Core) => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        (Resource::Events, View::EventsV1) => &[
            "metadata.name",
            "metadata.namespace",
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
    }
}

/// The value of a supported field label on an object (already in the request's view).
pub(crate) fn field_value<'a>(res: Resource, obj: &'a Value, label: &str) -> Cow<'a, str> {
    let flag = |path: &[&str]| {
        let b = str_at(obj, path).and_then(Value::as_bool).unwrap_or(false);
        Cow::Borrowed(if b { "true" } else { "false" })
    };
    match (res, label) {
        (Resource::Nodes, "spec.unschedulable") => flag(&["spec", "unschedulable"]),
        (Resource::Pods, "spec.hostNetwork") => flag(&["spec", "hostNetwork"]),
        (Resource::Events, "source") => field_cow(str_at(obj, &["source", "component"])),
        _ => field_cow(dotted(obj, label)),
    }
}

const EVENT_FIELDS: [(&str, &str); 8] = [
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("kind", "kind"),
];

/// An Event as the given API shows it. Events are stored as written; reading one through the
/// other API converts field names as the apiserver's conversion functions do.
pub(crate) fn present(res: Resource, view: View, obj: &Arc<Value>) -> Arc<Value> {
    if res != Resource::Events {
        return Arc::clone(obj);
    }
    let stored_v1 = obj.get("apiVersion").and_then(Value::as_str) == Some("events.k8s.io/v1");
    match (view, stored_v1) {
        (View::EventsV1, true) => Arc::clone(obj),
        (View::Core, false) => Arc::new(core_event_defaults(obj.as_ref().clone())),
        (View::EventsV1, false) => {
            let mut out = Map::new();
            for (k, v) in obj.as_object().into_iter().flatten() {
                let k2 = EVENT_FIELDS
                    .iter()
                    .find(|(c, _)| c == k)
                    .map_or(k.as_str(), |(_, e)| e);
                out.insert(k2.to_string(), v.clone());
            }
            out.insert("apiVersion".into(), json!("events.k8s.io/v1"));
            out.entry("eventTime").or_insert(Value::Null);
            Arc::new(Value::Object(out))
        }
        (View::Core, true) => {
            let mut out = Map::new();
            for (k, v) in obj.as_object().into_iter().flatten() {
                let k2 = EVENT_FIELDS
                    .iter()
                    .find(|(_, e)| e == k)
                    .map_or(k.as_str(), |(c, _)| c);
                out.insert(k2.to_string(), v.clone());
            }
            out.insert("apiVersion".into(), json!("v1"));
            Arc::new(core_event_defaults(Value::Object(out)))
        }
    }
}

/// Fields a core Event always has on the wire (Go structs and non-omitempty strings).
fn core_event_defaults(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.entry("involvedObject").or_insert(json!({}));
        m.entry("source").or_insert(json!({}));
        m.entry("reportingComponent").or_insert(json!(""));
        m.entry("reportingInstance").or_insert(json!(""));
    }
    v
}

fn str_map<'a>(
    obj: &'a Value,
    field: &str,
    causes: &mut Vec<Cause>,
) -> Option<&'a Map<String, Value>> {
    match meta(obj).and_then(|m| m.get(field)) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            causes.push(Cause::invalid(
                &format!("metadata.{field}"),
                "",
                "must be a map of strings",
            ));
            None
        }
    }
}

/// Checks the JSON types the Go decoder would reject (400 before validation).
pub(crate) fn check_types(obj: &Value) -> Result<(), ApiError> {
    let Some(m) = obj.as_object() else {
        return Err(ApiError::bad_request(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf",
        ));
    };
    if let Some(md) = m.get("metadata")
        && !md.is_object()
        && !md.is_null()
    {
        return Err(ApiError::bad_request(
            "json: cannot unmarshal into Go struct field .metadata of type v1.ObjectMeta",
        ));
    }
    for field in ["labels", "annotations"] {
        if let Some(map) = meta(obj).and_then(|md| md.get(field)) {
            let ok = map.is_null()
                || map
                    .as_object()
                    .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "json: cannot unmarshal into Go struct field ObjectMeta.metadata.{field} of type string"
                )));
            }
        }
    }
    for field in [
        "name",
        "namespace",
        "generateName",
        "resourceVersion",
        "uid",
    ] {
        if let Some(v) = meta(obj).and_then(|md| md.get(field))
            && !v.is_string()
            && !v.is_null()
        {
            return Err(ApiError::bad_request(format!(
                "json: cannot unmarshal into Go struct field ObjectMeta.metadata.{field} of type string"
            )));
        }
    }
    Ok(())
}

/// Object-meta validation common to every kind (name, labels, annotations).
pub(crate) fn validate_meta(res: Resource, obj: &Value, causes: &mut Vec<Cause>) {
    let name = meta_str(obj, "name").unwrap_or("");
    if name.is_empty() {
        causes.push(Cause::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else if !is_dns_subdomain(name) {
        causes.push(Cause::invalid(
            "metadata.name",
            name,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    }
    if res.namespaced() {
        let ns = meta_str(obj, "namespace").unwrap_or("");
        if !is_dns_label(ns) {
            causes.push(Cause::invalid(
                "metadata.namespace",
                ns,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            ));
        }
    }
    if let Some(labels) = str_map(obj, "labels", causes) {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                causes.push(Cause::invalid(
                    "metadata.labels",
                    k,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
            let v = v.as_str().unwrap_or("");
            if !is_label_value(v) {
                causes.push(Cause::invalid(
                    "metadata.labels",
                    v,
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
        }
    }
    if let Some(ann) = str_map(obj, "annotations", causes) {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            if !is_qualified_name(&k.to_ascii_lowercase()) {
                causes.push(Cause::invalid(
                    "metadata.annotations",
                    k,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
        }
        if total > 256 * 1024 {
            causes.push(Cause::too_long("metadata.annotations", 256 * 1024));
        }
    }
    if let Some(f) = meta(obj).and_then(|m| m.get("finalizers")) {
        let ok = f.is_null() || f.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            causes.push(Cause::invalid(
                "metadata.finalizers",
                "",
                "must be a list of strings",
            ));
        }
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    let without_digest = last.split('@').next().unwrap_or(last);
    match without_digest.split_once(':') {
        Some((_, "latest")) | None if !last.contains('@') => "Always",
        _ => "IfNotPresent",
    }
}

fn default_containers(list: Option<&mut Value>) {
    let Some(Value::Array(cs)) = list else { return };
    for c in cs.iter_mut().filter_map(Value::as_object_mut) {
        c.entry("terminationMessagePath")
            .or_insert(json!("/dev/termination-log"));
        c.entry("terminationMessagePolicy").or_insert(json!("File"));
        if !c.contains_key("imagePullPolicy") {
            let p = image_pull_policy(c.get("image").and_then(Value::as_str).unwrap_or(""));
            c.insert("imagePullPolicy".into(), json!(p));
        }
        let res = c.entry("resources").or_insert(json!({}));
        if let Some(limits) = res.get("limits").and_then(Value::as_object).cloned() {
            let req = res
                .as_object_mut()
                .map(|r| r.entry("requests").or_insert(json!({})));
            if let Some(Value::Object(req)) = req {
                for (k, v) in limits {
                    req.entry(k).or_insert(v);
                }
            }
        }
        if let Some(Value::Array(ports)) = c.get_mut("ports") {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                p.entry("protocol").or_insert(json!("TCP"));
            }
        }
    }
}

/// API defaulting (`SetDefaults_Pod` and friends), run on every write of a pod. `admission`
/// adds what admission plugins add on create (service account name, priority, default
/// not-ready/unreachable tolerations).
pub(crate) fn default_pod(obj: &mut Value, admission: bool) {
    if !obj.get("spec").is_some_and(Value::is_object) {
        return;
    }
    let spec = &mut obj["spec"];
    if let Some(s) = spec.as_object_mut() {
        s.entry("restartPolicy").or_insert(json!("Always"));
        s.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
        s.entry("schedulerName")
            .or_insert(json!("default-scheduler"));
        s.entry("terminationGracePeriodSeconds")
            .or_insert(json!(30));
        s.entry("securityContext").or_insert(json!({}));
        s.entry("enableServiceLinks").or_insert(json!(true));
        if admission {
            s.entry("serviceAccountName").or_insert(json!("default"));
            let sa = s["serviceAccountName"].clone();
            s.entry("serviceAccount").or_insert(sa);
            s.entry("priority").or_insert(json!(0));
            let tol = s.entry("tolerations").or_insert(json!([]));
            if let Value::Array(t) = tol {
                for key in [
                    "node.kubernetes.io/not-ready",
                    "node.kubernetes.io/unreachable",
                ] {
                    let present = t.iter().any(|x| {
                        x.get("key").and_then(Value::as_str) == Some(key)
                            || (x.get("key").is_none()
                                && x.get("operator").and_then(Value::as_str) == Some("Exists"))
                    });
                    if !present {
                        t.push(json!({
                            "key": key,
                            "operator": "Exists",
                            "effect": "NoExecute",
                            "tolerationSeconds": 300
                        }));
                    }
                }
            }
        }
    }
    default_containers(spec.get_mut("containers"));
    default_containers(spec.get_mut("initContainers"));
}

fn resources_of(c: &Value, which: &str) -> Map<String, Value> {
    c.get("resources")
        .and_then(|r| r.get(which))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// `status.qosClass` as `GetPodQOS` computes it.
pub(crate) fn qos_class(obj: &Value) -> &'static str {
    let mut containers: Vec<&Value> = Vec::new();
    for f in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = obj.get("spec").and_then(|s| s.get(f)) {
            containers.extend(cs.iter());
        }
    }
    let compute = |k: &str| k == "cpu" || k == "memory";
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let req = resources_of(c, "requests");
        let lim = resources_of(c, "limits");
        if req.keys().chain(lim.keys()).any(|k| compute(k)) {
            any = true;
        }
        for r in ["cpu", "memory"] {
            match (lim.get(r), req.get(r)) {
                (Some(l), Some(q)) if l == q => {}
                (Some(_), None) => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn is_extended_resource(name: &str) -> bool {
    match name.split_once('/') {
        Some((domain, _)) => !(domain == "kubernetes.io" || domain.ends_with(".kubernetes.io")),
        None => false,
    }
}

fn validate_containers(obj: &Value, field: &str, required: bool, causes: &mut Vec<Cause>) {
    let list = obj.get("spec").and_then(|s| s.get(field));
    let path = format!("spec.{field}");
    let cs = match list {
        Some(Value::Array(cs)) => cs.as_slice(),
        None | Some(Value::Null) => &[],
        Some(_) => {
            causes.push(Cause::invalid(&path, "", "must be a list"));
            return;
        }
    };
    if required && cs.is_empty() {
        causes.push(Cause::required(&path, ""));
    }
    let mut names = Vec::new();
    for (i, c) in cs.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            causes.push(Cause::required(&format!("{p}.name"), ""));
        } else if !is_dns_label(name) {
            causes.push(Cause::invalid(&format!("{p}.name"), name, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"));
        } else if names.contains(&name) {
            causes.push(Cause {
                field: format!("{p}.name"),
                reason: "FieldValueDuplicate",
                message: format!("{p}.name: Duplicate value: {name:?}"),
            });
        }
        names.push(name);
        if c.get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            causes.push(Cause::required(&format!("{p}.image"), ""));
        }
        let req = resources_of(c, "requests");
        let lim = resources_of(c, "limits");
        for (k, q) in &req {
            if !is_extended_resource(k) {
                continue;
            }
            match lim.get(k) {
                None => causes.push(Cause::required(
                    &format!("{p}.resources.limits"),
                    "Limit must be set for non overcommitable resources",
                )),
                Some(l) if l != q => causes.push(Cause::invalid(
                    &format!("{p}.resources.requests[{k}]"),
                    &field_text(Some(q)),
                    &format!("must be equal to {k} limit of {}", field_text(Some(l))),
                )),
                _ => {}
            }
        }
        for (k, q) in req.iter().chain(lim.iter()) {
            let text = field_text(Some(q));
            if is_extended_resource(k) && !text.bytes().all(|b| b.is_ascii_digit()) {
                causes.push(Cause::invalid(
                    &format!("{p}.resources.requests[{k}]"),
                    &text,
                    "must be an integer",
                ));
            }
        }
    }
}

/// Kind-specific create validation.
pub(crate) fn validate_create(res: Resource, view: View, obj: &Value, causes: &mut Vec<Cause>) {
    match res {
        Resource::Pods => {
            validate_containers(obj, "containers", true, causes);
            validate_containers(obj, "initContainers", false, causes);
        }
        Resource::ConfigMaps => validate_config_map(obj, causes),
        Resource::Events => validate_event(view, obj, causes),
        Resource::Nodes => {}
    }
}

fn validate_config_map(obj: &Value, causes: &mut Vec<Cause>) {
    for field in ["data", "binaryData"] {
        if let Some(Value::Object(d)) = obj.get(field) {
            for (k, v) in d {
                if !is_config_map_key(k) {
                    causes.push(Cause::invalid(
                        &format!("{field}[{k}]"),
                        k,
                        "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                    ));
                }
                if !v.is_string() {
                    causes.push(Cause::invalid(
                        &format!("{field}[{k}]"),
                        "",
                        "must be a string",
                    ));
                }
            }
        }
    }
}

fn validate_event(view: View, obj: &Value, causes: &mut Vec<Cause>) {
    let (regarding, rfield) = match view {
        View::Core => ("involvedObject", "involvedObject.namespace"),
        View::EventsV1 => ("regarding", "regarding.namespace"),
    };
    let ns = meta_str(obj, "namespace").unwrap_or("");
    let rns = obj
        .get(regarding)
        .and_then(|r| r.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let ok = if rns.is_empty() {
        ns.is_empty() || ns == "default"
    } else {
        ns == rns
    };
    if !ok {
        causes.push(Cause::invalid(
            rfield,
            rns,
            "does not match event.namespace",
        ));
    }
    let text = |f: &str| obj.get(f).and_then(Value::as_str).unwrap_or("");
    if view == View::EventsV1 {
        if obj.get("eventTime").is_none_or(Value::is_null) {
            causes.push(Cause::required("eventTime", ""));
        }
        let t = text("type");
        if t != "Normal" && t != "Warning" {
            causes.push(Cause::unsupported("type", t, &["Normal", "Warning"]));
        }
        let rc = text("reportingController");
        if rc.is_empty() {
            causes.push(Cause::required("reportingController", ""));
        } else if !is_qualified_name(rc) {
            causes.push(Cause::invalid(
                "reportingController",
                rc,
                "must be a qualified name",
            ));
        }
        for f in ["reportingInstance", "action", "reason"] {
            let v = text(f);
            if v.is_empty() {
                causes.push(Cause::required(f, ""));
            } else if v.len() > 128 {
                causes.push(Cause::too_long(f, 128));
            }
        }
        if text("note").len() > 1024 {
            causes.push(Cause::too_long("note", 1024));
        }
    } else {
        let t = text("type");
        if !t.is_empty() && t != "Normal" && t != "Warning" {
            causes.push(Cause::unsupported("type", t, &["Normal", "Warning"]));
        }
    }
}

fn strip_mutable_pod_spec(spec: &Value) -> Value {
    let mut s = spec.clone();
    if let Some(m) = s.as_object_mut() {
        m.remove("activeDeadlineSeconds");
        m.remove("tolerations");
        m.remove("schedulingGates");
        m.remove("terminationGracePeriodSeconds");
        for f in ["containers", "initContainers"] {
            if let Some(Value::Array(cs)) = m.get_mut(f) {
                for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                    c.remove("image");
                }
            }
        }
    }
    s
}

/// Kind-specific update validation, comparing with the stored object.
pub(crate) fn validate_update(
    res: Resource,
    view: View,
    old: &Value,
    new: &Value,
    causes: &mut Vec<Cause>,
) {
    match res {
        Resource::Pods => {
            let os = old.get("spec").cloned().unwrap_or(Value::Null);
            let ns = new.get("spec").cloned().unwrap_or(Value::Null);
            if strip_mutable_pod_spec(&os) != strip_mutable_pod_spec(&ns) {
                causes.push(Cause::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                ));
            }
            validate_containers(new, "containers", true, causes);
        }
        Resource::ConfigMaps => {
            validate_config_map(new, causes);
            if old.get("immutable").and_then(Value::as_bool) == Some(true) {
                let same = ["data", "binaryData", "immutable"]
                    .iter()
                    .all(|f| old.get(*f) == new.get(*f));
                if !same {
                    causes.push(Cause::forbidden(
                        "data",
                        "field is immutable when `immutable` is set",
                    ));
                }
            }
        }
        Resource::Events => {
            let t = new.get("type").and_then(Value::as_str).unwrap_or("");
            if (view == View::EventsV1 || !t.is_empty()) && t != "Normal" && t != "Warning" {
                causes.push(Cause::unsupported("type", t, &["Normal", "Warning"]));
            }
        }
        Resource::Nodes => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_defaults_and_qos() {
        let mut p = json!({"spec": {"containers": [{"name": "c", "image": "cuda:12",
            "resources": {"limits": {"volcano.sh/vgpu-number": "1", "cpu": "1", "memory": "1Gi"}}}]}});
        default_pod(&mut p, true);
        assert_eq!(
            p["spec"]["containers"][0]["resources"]["requests"]["volcano.sh/vgpu-number"],
            "1"
        );
        assert_eq!(
            p["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(p["spec"]["tolerations"].as_array().map(Vec::len), Some(2));
        assert_eq!(qos_class(&p), "Guaranteed");
        let mut causes = Vec::new();
        validate_create(Resource::Pods, View::Core, &p, &mut causes);
        assert!(causes.is_empty(), "{causes:?}");
        assert_eq!(image_pull_policy("busybox"), "Always");
        assert_eq!(image_pull_policy("reg:5000/busybox:latest"), "Always");
        assert_eq!(image_pull_policy("reg:5000/busybox:1"), "IfNotPresent");
    }

    #[test]
    fn extended_resources_must_match_limits() {
        let p = json!({"spec": {"containers": [{"name": "c", "image": "x",
            "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "2"}}}]}});
        let mut causes = Vec::new();
        validate_create(Resource::Pods, View::Core, &p, &mut causes);
        assert_eq!(causes.len(), 1, "{causes:?}");
    }

    #[test]
    fn events_convert_between_apis() {
        let v1 = Arc::new(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "regarding": {"kind": "Node", "name": "n1"}, "note": "hello", "reportingController": "x.io/agent"}));
        let core = present(Resource::Events, View::Core, &v1);
        assert_eq!(core["involvedObject"]["name"], "n1");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["reportingComponent"], "x.io/agent");
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(
            field_value(Resource::Events, &core, "involvedObject.kind"),
            "Node"
        );
    }
}
