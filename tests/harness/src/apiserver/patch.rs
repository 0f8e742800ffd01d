//! The three patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and a strategic
//! merge patch that knows the merge keys of the pod and node fields an agent touches.

use serde_json::{Map, Value};

/// Why a patch could not be applied.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PatchError {
    /// The patch document itself is malformed (400).
    BadRequest(String),
    /// The patch is well-formed but does not apply to the object (422).
    Unprocessable(String),
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape_token(t: &str) -> String {
    t.replace("~1", "/").replace("~0", "~")
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PatchError::Unprocessable(format!(
            "invalid JSON pointer {path:?}: must start with '/'"
        )));
    };
    Ok(rest.split('/').map(unescape_token).collect())
}

fn missing(op: &str, path: &str) -> PatchError {
    PatchError::Unprocessable(format!(
        "{op} operation does not apply: doc is missing path: {path:?}: missing value"
    ))
}

fn array_index(tok: &str, len: usize, allow_end: bool) -> Option<usize> {
    if allow_end && tok == "-" {
        return Some(len);
    }
    if tok.is_empty()
        || (tok.len() > 1 && tok.starts_with('0'))
        || !tok.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let i: usize = tok.parse().ok()?;
    let limit = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    (i <= limit && (allow_end || len > 0)).then_some(i)
}

fn get_mut<'a>(doc: &'a mut Value, toks: &[String]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m.get_mut(t)?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                a.get_mut(i)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

fn get<'a>(doc: &'a Value, toks: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m.get(t)?,
            Value::Array(a) => a.get(array_index(t, a.len(), false)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    let toks = pointer_tokens(path)?;
    let Some((last, parent)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match get_mut(doc, parent) {
        Some(Value::Object(m)) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i = array_index(last, a.len(), true).ok_or_else(|| {
                PatchError::Unprocessable(format!(
                    "add operation does not apply: index out of bounds at {path:?}"
                ))
            })?;
            a.insert(i, value);
            Ok(())
        }
        _ => Err(missing("add", path)),
    }
}

fn remove(doc: &mut Value, path: &str, op: &str) -> Result<Value, PatchError> {
    let toks = pointer_tokens(path)?;
    let Some((last, parent)) = toks.split_last() else {
        return Err(PatchError::Unprocessable(format!(
            "{op} operation does not apply: cannot remove the whole document"
        )));
    };
    match get_mut(doc, parent) {
        Some(Value::Object(m)) => m.remove(last).ok_or_else(|| missing(op, path)),
        Some(Value::Array(a)) => {
            let i = array_index(last, a.len(), false).ok_or_else(|| missing(op, path))?;
            Ok(a.remove(i))
        }
        _ => Err(missing(op, path)),
    }
}

/// RFC 6902 with the six operations; any failed operation leaves `doc` unchanged.
pub(crate) fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Array(ops) = patch else {
        return Err(PatchError::BadRequest(
            "json: cannot unmarshal object into Go value of type jsonpatch.Patch".into(),
        ));
    };
    let mut work = doc.clone();
    for op in ops {
        let Value::Object(o) = op else {
            return Err(PatchError::BadRequest(
                "json: cannot unmarshal into Go value of type jsonpatch.Operation".into(),
            ));
        };
        let kind = o.get("op").and_then(Value::as_str).unwrap_or("");
        let path = o.get("path").and_then(Value::as_str);
        let Some(path) = path else {
            return Err(PatchError::Unprocessable(format!(
                "{kind} operation missing path"
            )));
        };
        let value = || {
            o.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Unprocessable(format!("{kind} operation missing value")))
        };
        let from = || {
            o.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Unprocessable(format!("{kind} operation missing from")))
        };
        match kind {
            "add" => add(&mut work, path, value()?)?,
            "remove" => {
                remove(&mut work, path, "remove")?;
            }
            "replace" => {
                let v = value()?;
                let toks = pointer_tokens(path)?;
                let slot = get_mut(&mut work, &toks).ok_or_else(|| {
                    PatchError::Unprocessable(format!(
                        "replace operation does not apply: doc is missing key: {path}: missing value"
                    ))
                })?;
                *slot = v;
            }
            "move" => {
                let f = from()?;
                if path != f && path.starts_with(&format!("{f}/")) {
                    return Err(PatchError::Unprocessable(format!(
                        "move operation does not apply: cannot move {f:?} into its child {path:?}"
                    )));
                }
                let v = remove(&mut work, f, "move")?;
                add(&mut work, path, v)?;
            }
            "copy" => {
                let f = from()?;
                let v = get(&work, &pointer_tokens(f)?)
                    .cloned()
                    .ok_or_else(|| missing("copy", f))?;
                add(&mut work, path, v)?;
            }
            "test" => {
                let want = o.get("value").cloned().unwrap_or(Value::Null);
                let have = get(&work, &pointer_tokens(path)?);
                if have != Some(&want) {
                    return Err(PatchError::Unprocessable(format!(
                        "testing value {path} failed: test failed"
                    )));
                }
            }
            other => {
                return Err(PatchError::Unprocessable(format!(
                    "Unexpected kind: {other}"
                )));
            }
        }
    }
    *doc = work;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ListStrategy {
    MergeKey(&'static str),
    MergePrimitives,
    Replace,
}

/// `patchStrategy:"merge"` fields of the built-in types this fake serves, by dotted path
/// (array indices dropped).
fn list_strategy(path: &str) -> ListStrategy {
    use ListStrategy::*;
    let tail = |suffix: &str| {
        path == format!("spec.containers.{suffix}")
            || path == format!("spec.initContainers.{suffix}")
            || path == format!("spec.ephemeralContainers.{suffix}")
    };
    match path {
        "metadata.finalizers" => MergePrimitives,
        "metadata.ownerReferences" => MergeKey("uid"),
        "spec.containers" | "spec.initContainers" | "spec.ephemeralContainers" => MergeKey("name"),
        "spec.volumes" | "spec.imagePullSecrets" | "spec.resourceClaims" => MergeKey("name"),
        "spec.hostAliases" => MergeKey("ip"),
        "status.conditions" | "status.addresses" => MergeKey("type"),
        "status.podIPs" | "status.hostIPs" => MergeKey("ip"),
        _ if tail("env") => MergeKey("name"),
        _ if tail("resizePolicy") => MergeKey("resourceName"),
        _ if tail("ports") => MergeKey("containerPort"),
        _ if tail("volumeMounts") => MergeKey("mountPath"),
        _ if tail("volumeDevices") => MergeKey("devicePath"),
        _ => Replace,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Drops `$patch`/`$setElementOrder`/`$retainKeys`/`$deleteFromPrimitiveList` directives from a
/// value that is being inserted wholesale.
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

/// A strategic merge patch. Maps merge as in a merge patch (`null` deletes a key); lists whose
/// field is `patchStrategy:"merge"` in the Kubernetes API (containers, env, volumes, conditions,
/// addresses, ownerReferences, finalizers, ...) merge by their merge key or as a set; every
/// other list is replaced wholesale. Understands `$patch: replace|delete`, `$retainKeys` and
/// `$deleteFromPrimitiveList/<field>`; ignores `$setElementOrder/<field>` (order of merged lists
/// is: existing elements in place, new ones appended).
pub(crate) fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    if !patch.is_object() {
        return Err(PatchError::BadRequest(
            "unable to find api field in struct for the patch: the patch is not a JSON object"
                .into(),
        ));
    }
    smp_map(target, patch, "")
}

fn smp_map(target: &mut Value, patch: &Value, path: &str) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        *target = strip_directives(patch);
        return Ok(());
    };
    match directive(patch) {
        Some("replace") => {
            *target = strip_directives(patch);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::BadRequest(format!(
                "Unknown patch type: {other} in map: {patch}"
            )));
        }
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (t.get_mut(field), v) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let child = join(path, k);
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => {
                if directive(v) == Some("delete") {
                    t.remove(k);
                    continue;
                }
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                smp_map(slot, v, &child)?;
            }
            Value::Array(items) => {
                let strategy = list_strategy(&child);
                let replace_all = items.iter().any(|i| {
                    directive(i) == Some("replace") && i.as_object().is_some_and(|m| m.len() == 1)
                });
                if strategy == ListStrategy::Replace || replace_all {
                    let kept: Vec<Value> = items
                        .iter()
                        .filter(|i| directive(i) != Some("replace"))
                        .map(strip_directives)
                        .collect();
                    t.insert(k.clone(), Value::Array(kept));
                    continue;
                }
                let slot = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !slot.is_array() {
                    *slot = Value::Array(Vec::new());
                }
                let Value::Array(list) = slot else { continue };
                match strategy {
                    ListStrategy::MergePrimitives => {
                        for i in items {
                            if !list.contains(i) {
                                list.push(i.clone());
                            }
                        }
                    }
                    ListStrategy::MergeKey(key) => {
                        for item in items {
                            let Some(id) = item.get(key) else {
                                return Err(PatchError::BadRequest(format!(
                                    "map: {item} does not contain declared merge key: {key}"
                                )));
                            };
                            let pos = list.iter().position(|e| e.get(key) == Some(id));
                            match (directive(item), pos) {
                                (Some("delete"), Some(i)) => {
                                    list.remove(i);
                                }
                                (Some("delete"), None) => {}
                                (_, Some(i)) => smp_map(&mut list[i], item, &child)?,
                                (_, None) => list.push(strip_directives(item)),
                            }
                        }
                    }
                    ListStrategy::Replace => {}
                }
            }
            scalar => {
                t.insert(k.clone(), scalar.clone());
            }
        }
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_deletes_with_null() {
        let mut t =
            json!({"metadata": {"annotations": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
        merge_patch(
            &mut t,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}, "spec": {"x": [3]}}),
        );
        assert_eq!(
            t,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}, "spec": {"x": [3]}})
        );
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"metadata": {"annotations": {"volcano.sh/bind-phase": "allocating"}}, "l": [1, 2]});
        json_patch(
            &mut d,
            &json!([
                {"op": "test", "path": "/metadata/annotations/volcano.sh~1bind-phase", "value": "allocating"},
                {"op": "replace", "path": "/metadata/annotations/volcano.sh~1bind-phase", "value": "success"},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "remove", "path": "/l/0"},
                {"op": "copy", "from": "/l", "path": "/m"},
                {"op": "move", "from": "/m", "path": "/n"}
            ]),
        )
        .expect("applies");
        assert_eq!(
            d["metadata"]["annotations"]["volcano.sh/bind-phase"],
            "success"
        );
        assert_eq!(d["l"], json!([2, 3]));
        assert_eq!(d["n"], json!([2, 3]));
        assert!(d.get("m").is_none());
        let before = d.clone();
        let e = json_patch(
            &mut d,
            &json!([
                {"op": "remove", "path": "/l/0"},
                {"op": "test", "path": "/metadata/annotations/volcano.sh~1bind-phase", "value": "x"}
            ]),
        );
        assert!(matches!(e, Err(PatchError::Unprocessable(_))));
        assert_eq!(d, before, "a failed patch changes nothing");
        let e = json_patch(
            &mut d,
            &json!([{"op": "add", "path": "/nope/x", "value": 1}]),
        );
        assert!(matches!(e, Err(PatchError::Unprocessable(_))));
        assert!(matches!(
            json_patch(&mut d, &json!({})),
            Err(PatchError::BadRequest(_))
        ));
    }

    #[test]
    fn strategic_merges_by_key() {
        let mut t = json!({
            "metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
            "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "PIDPressure", "status": "False"}],
                       "images": [{"names": ["a"]}]}
        });
        strategic_merge_patch(
            &mut t,
            &json!({
                "metadata": {"finalizers": ["b"], "labels": {"x": null, "y": "2"}},
                "status": {
                    "$setElementOrder/conditions": [{"type": "Ready"}],
                    "conditions": [{"type": "Ready", "status": "True"}, {"type": "PIDPressure", "$patch": "delete"}],
                    "images": [{"names": ["b"]}]
                }
            }),
        )
        .expect("applies");
        assert_eq!(t["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(t["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(
            t["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
        assert_eq!(t["status"]["images"], json!([{"names": ["b"]}]));
    }
}
