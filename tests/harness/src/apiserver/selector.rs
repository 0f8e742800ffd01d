//! Label and field selectors, parsed the way `k8s.io/apimachinery/pkg/{labels,fields}` parse them.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::status::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A label selector: `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector {
    reqs: Vec<(String, LabelOp)>,
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                cur.push(c);
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { reqs });
        }
        let bad = |term: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: found '{term}', expected: '=', '!=', '==', 'in', notin'"
            ))
        };
        for term in split_top_level(s) {
            let t = term.trim();
            if t.is_empty() {
                return Err(bad(t));
            }
            let req = if let Some(k) = t.strip_prefix('!') {
                (k.trim().to_string(), LabelOp::NotExists)
            } else if let Some((k, v)) = t.split_once("!=") {
                (k.trim().to_string(), LabelOp::Ne(v.trim().to_string()))
            } else if let Some((k, v)) = t.split_once("==") {
                (k.trim().to_string(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = t.split_once('=') {
                (k.trim().to_string(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((k, rest)) = t.split_once(" notin ") {
                (
                    k.trim().to_string(),
                    LabelOp::NotIn(parse_set(rest).ok_or_else(|| bad(t))?),
                )
            } else if let Some((k, rest)) = t.split_once(" in ") {
                (
                    k.trim().to_string(),
                    LabelOp::In(parse_set(rest).ok_or_else(|| bad(t))?),
                )
            } else if t.contains(' ') || t.contains('(') {
                return Err(bad(t));
            } else {
                (t.to_string(), LabelOp::Exists)
            };
            if req.0.is_empty() {
                return Err(bad(t));
            }
            reqs.push(req);
        }
        Ok(Self { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.reqs.iter().all(|(k, op)| {
            let v = labels.and_then(|l| l.get(k)).and_then(Value::as_str);
            match op {
                LabelOp::Eq(want) => v == Some(want.as_str()),
                LabelOp::Ne(want) => v != Some(want.as_str()),
                LabelOp::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => v.is_none_or(|v| !set.iter().any(|s| s == v)),
                LabelOp::Exists => v.is_some(),
                LabelOp::NotExists => v.is_none(),
            }
        })
    }
}

/// A field selector: `a=b,c==d,e!=f`; `\,` `\=` `\\` escape in values.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSelector {
    /// (field, equal?, value)
    terms: Vec<(String, bool, String)>,
}

fn split_unescaped(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { terms });
        }
        for term in split_unescaped(s) {
            let t = term.as_str();
            let parsed = if let Some((k, v)) = t.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = t.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = t.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{t}'"
                )));
            };
            terms.push((parsed.0.trim().to_string(), parsed.1, unescape(parsed.2)));
        }
        Ok(Self { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The fields the selector names.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|(f, _, _)| f.as_str())
    }

    /// `(field, equal?, value)` terms.
    pub fn terms(&self) -> impl Iterator<Item = (&str, bool, &str)> {
        self.terms
            .iter()
            .map(|(f, eq, v)| (f.as_str(), *eq, v.as_str()))
    }

    /// Whether the object's field set satisfies every term; `get` returns a field's value.
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Cow<'a, str>) -> bool {
        self.terms
            .iter()
            .all(|(f, eq, v)| (get(f) == v.as_str()) == *eq)
    }

    /// Adds a `field=value` term.
    pub fn push_eq(&mut self, field: &str, value: &str) {
        self.terms.push((field.into(), true, value.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let labels = json!({"app": "gpu", "tier": "a"});
        let l = labels.as_object();
        let m = |s: &str| LabelSelector::parse(s).expect("parse").matches(l);
        assert!(m("app=gpu"));
        assert!(m("app==gpu,tier=a"));
        assert!(!m("app=gpu,tier=b"));
        assert!(m("app!=cpu"));
        assert!(m("missing!=x"));
        assert!(m("tier in (a, b)"));
        assert!(!m("tier notin (a,b)"));
        assert!(m("app,!missing"));
        assert!(!m("!app"));
        assert!(m(""));
        assert!(LabelSelector::parse("a in b").is_err());
    }

    #[test]
    fn field_selectors() {
        let f = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed").expect("parse");
        let get = |phase: &'static str| {
            move |k: &str| match k {
                "spec.nodeName" => Cow::Borrowed("n1"),
                "status.phase" => Cow::Borrowed(phase),
                _ => Cow::Borrowed(""),
            }
        };
        assert!(f.matches(get("Running")));
        assert!(!f.matches(get("Failed")));
        let e = FieldSelector::parse(r"metadata.name=a\,b").expect("parse");
        assert!(e.matches(|_| Cow::Borrowed("a,b")));
        assert!(FieldSelector::parse("spec.nodeName").is_err());
        assert!(
            FieldSelector::parse("spec.nodeName=")
                .expect("parse")
                .matches(|_| Cow::Borrowed(""))
        );
    }
}
