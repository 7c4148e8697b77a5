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
        return Err(FieldError::new(join(first), "unknown field"));
    }
    Ok(parsed)
}
