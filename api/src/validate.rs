//! Field-level validation shared by every resource.

use std::fmt;

/// One thing wrong with a resource, located by its field path (`spec.rules[0].backendRefs[1].weight`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Checks a Kubernetes object name (RFC 1123 label, as Services require).
pub fn dns_label(field: &str, value: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{value:?} is not a valid name (lowercase letters, digits and '-', at most 63)"),
        ))
    }
}

/// Checks a Kubernetes DNS subdomain name (what ServiceAccount names are): dot-separated
/// RFC 1123 labels, at most 253 characters.
pub fn dns_subdomain(field: &str, value: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty() && value.len() <= 253 && value.split('.').all(|l| dns_label(field, l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{value:?} is not a valid name (dot-separated lowercase labels of letters, digits and '-')"),
        ))
    }
}

/// Deserializes `value` into `T`, rejecting unknown fields and naming the field at fault
/// (prefixed with `prefix`, e.g. `spec`).
pub fn from_yaml<T: serde::de::DeserializeOwned>(value: serde_yaml::Value, prefix: &str) -> Result<T, FieldError> {
    let join = |path: String| {
        if path == "." || path.is_empty() { prefix.to_string() } else { format!("{prefix}.{path}") }
    };
    let mut unknown = Vec::new();
    let mut track = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut track);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(de);
    let parsed = parsed.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        FieldError::new(join(path), inner)
    })?;
    if let Some(first) = unknown.into_iter().next() {
        // serde_ignored writes list indices as segments (`rules.0.name`); every other field
        // path says `rules[0].name`.
        let mut path = String::new();
        for segment in first.split('.') {
            if !path.is_empty() && !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
                path.push_str(&format!("[{segment}]"));
            } else {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(segment);
            }
        }
        return Err(FieldError::new(join(path), "unknown field"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Rule {
        name: String,
        #[serde(default)]
        weight: u32,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Spec {
        rules: Vec<Rule>,
    }

    #[test]
    fn field_errors_name_list_items_by_index() {
        let yaml = |s: &str| serde_yaml::from_str::<serde_yaml::Value>(s).unwrap();
        let unknown = from_yaml::<Spec>(yaml("rules: [{ name: a }, { name: b, wieght: 1 }]"), "spec").unwrap_err();
        assert_eq!((unknown.field.as_str(), unknown.message.as_str()), ("spec.rules[1].wieght", "unknown field"));
        let wrong = from_yaml::<Spec>(yaml("rules: [{ name: a, weight: heavy }]"), "spec").unwrap_err();
        assert_eq!(wrong.field, "spec.rules[0].weight");
    }
}
