//! Label and field selectors, as the API server parses and applies them.

use super::*;

#[derive(Debug, Clone, Default)]
pub(super) struct Filter {
    pub(super) labels: Vec<LabelReq>,
    pub(super) fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone)]
pub(super) enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Filter {
    pub(super) fn parse(label_selector: Option<&str>, field_selector: Option<&str>) -> Result<Self, ApiError> {
        let bad = |what: &str, s: &str| ApiError::new(400, "BadRequest", format!("unable to parse {what} {s:?}"));
        let mut f = Filter::default();
        for term in split_top_level(label_selector.unwrap_or("")) {
            let req = if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, set)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), parse_set(set).ok_or_else(|| bad("labelSelector", term))?)
            } else if let Some((k, set)) = term.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), parse_set(set).ok_or_else(|| bad("labelSelector", term))?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
                return Err(bad("labelSelector", term));
            } else {
                LabelReq::Exists(term.to_string())
            };
            f.labels.push(req);
        }
        for term in split_top_level(field_selector.unwrap_or("")) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(bad("fieldSelector", term));
            };
            f.fields.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(f)
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"]["labels"].as_object();
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v),
            LabelReq::NotEq(k, v) => label(k) != Some(v),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, set) => label(k).is_some_and(|l| set.iter().any(|s| s == l)),
            LabelReq::NotIn(k, set) => label(k).is_none_or(|l| set.iter().all(|s| s != l)),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, want)| {
                let v = path.split('.').fold(obj, |v, seg| &v[seg]);
                let got = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (got == *want) == *eq
            })
    }
}

/// Splits on commas outside parentheses, dropping empty terms.
pub(super) fn split_top_level(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|t| !t.is_empty());
    out
}

pub(super) fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}
