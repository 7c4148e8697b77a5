//! The `Route` resource: ordered rules for one Service, each with matches and weighted
//! backends. Close to Gateway API `HTTPRoute` (GAMMA): `matches`, `backendRefs` with `weight`,
//! `timeouts.request`.
//!
//! ```yaml
//! apiVersion: weir.io/v1alpha1
//! kind: Route
//! metadata: { name: reviews, namespace: shop }
//! spec:
//!   service: reviews
//!   rules:
//!   - name: testers
//!     matches:
//!     - headers: [{ name: x-tester, value: "true" }]
//!     backendRefs: [{ name: reviews-v2 }]
//!   - backendRefs:
//!     - { name: reviews-v1, weight: 90 }
//!     - { name: reviews-v2, weight: 10 }
//!     timeouts: { request: 2s }
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, dns_label};

/// Routing for one Service: the first rule whose matches accept a request decides where
/// it goes. Requests that match no rule go to the Service's own endpoints.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.io",
    version = "v1alpha1",
    kind = "Route",
    namespaced,
    status = "RouteStatus",
    shortname = "wrt",
    category = "weir",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.ruleCount"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Name of the Service (in the Route's namespace) whose traffic this Route steers.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// Ordered rules; the first that matches wins.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub rules: Vec<RouteRule>,
}

/// One rule: if any of `matches` accepts the request (or there are none), the request goes
/// to one of `backendRefs`, chosen by weight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "size(self.backendRefs) <= 1 || self.backendRefs.exists(b, !has(b.weight) || b.weight > 0)",
    "message": "all weights are 0"
}]))]
pub struct RouteRule {
    /// Optional name, used in metrics and status; defaults to the rule's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions; any one matching selects the rule. Empty matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub matches: Vec<HttpRouteMatch>,
    /// Where matching requests go, split by weight.
    #[schemars(length(min = 1, max = 16))]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts for requests matching this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
}

/// Request conditions; every present field must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<NamedValueMatch>,
    /// HTTP method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Z]+$"))]
    pub method: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    #[schemars(length(min = 1, max = 1024))]
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header or query parameter condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedValueMatch {
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A weighted reference to a backend Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// Service name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Namespace of the Service; defaults to the Route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Port on the backend; defaults to the port the client called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
    /// Relative weight (default 1); 0 sends this backend nothing.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTimeouts {
    /// Deadline for the whole request (e.g. `2s`); absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub request: Option<String>,
}

/// Status written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_count: Option<u32>,
}

impl RouteSpec {
    /// Checks what the schema cannot: names, regexes, durations, weights.
    pub fn validate(&self) -> Result<(), FieldError> {
        dns_label("spec.service", &self.service)?;
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            if rule.backend_refs.is_empty() {
                return Err(FieldError::new(format!("{at}.backendRefs"), "at least one backend is required"));
            }
            if rule.backend_refs.iter().all(|b| b.weight == 0) && rule.backend_refs.len() > 1 {
                // A single zero-weight backend is how a rule black-holes; several all-zero is a mistake.
                return Err(FieldError::new(format!("{at}.backendRefs"), "all weights are 0"));
            }
            for (j, b) in rule.backend_refs.iter().enumerate() {
                let bat = format!("{at}.backendRefs[{j}]");
                dns_label(&format!("{bat}.name"), &b.name)?;
                if let Some(ns) = &b.namespace {
                    dns_label(&format!("{bat}.namespace"), ns)?;
                }
                if let Some(p) = b.port
                    && !(1..=65535).contains(&p)
                {
                    return Err(FieldError::new(format!("{bat}.port"), format!("{p} is not a port")));
                }
                if b.weight > 1_000_000 {
                    return Err(FieldError::new(format!("{bat}.weight"), "must be at most 1000000"));
                }
            }
            for (j, m) in rule.matches.iter().enumerate() {
                let mat = format!("{at}.matches[{j}]");
                if let Some(p) = &m.path {
                    match p.kind {
                        PathMatchType::RegularExpression => check_regex(&format!("{mat}.path.value"), &p.value)?,
                        _ if !p.value.starts_with('/') => {
                            return Err(FieldError::new(format!("{mat}.path.value"), "must start with '/'"));
                        }
                        _ => {}
                    }
                }
                for (field, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
                    for (k, h) in list.iter().enumerate() {
                        let hat = format!("{mat}.{field}[{k}]");
                        if h.name.is_empty() {
                            return Err(FieldError::new(format!("{hat}.name"), "must not be empty"));
                        }
                        if field == "headers" && http_header_name_invalid(&h.name) {
                            return Err(FieldError::new(format!("{hat}.name"), "not a valid header name"));
                        }
                        if h.kind == ValueMatchType::RegularExpression {
                            check_regex(&format!("{hat}.value"), &h.value)?;
                        }
                    }
                }
                if let Some(method) = &m.method
                    && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
                {
                    return Err(FieldError::new(format!("{mat}.method"), format!("{method:?} is not an HTTP method")));
                }
            }
            if let Some(t) = &rule.timeouts
                && let Some(req) = &t.request
            {
                crate::duration::parse(req)
                    .map_err(|e| FieldError::new(format!("{at}.timeouts.request"), e.to_string()))?;
            }
        }
        Ok(())
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Regexes are compiled with a size limit both here and in the sidecar, so a rule the
/// controller accepts is one the sidecar can apply.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Gateway API prefix semantics: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`; `/`
/// matches every path. The sidecar matches requests with it; `weir analyze` compares rules.
pub fn path_prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

/// Compiles a route regex the way the sidecar does (anchored to the whole value).
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$")).size_limit(REGEX_SIZE_LIMIT).build()
}

pub(crate) fn check_regex(field: &str, pattern: &str) -> Result<(), FieldError> {
    compile_regex(pattern).map(|_| ()).map_err(|e| FieldError::new(field, format!("invalid regular expression: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> RouteSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn valid_route_passes() {
        let s = spec(
            "service: reviews\nrules:\n- matches:\n  - path: {type: RegularExpression, value: '/a/[0-9]+'}\n    method: GET\n  backendRefs: [{name: v1, weight: 80}, {name: v2, weight: 20}]\n  timeouts: {request: 2s}\n",
        );
        s.validate().unwrap();
        assert_eq!(s.rules[0].backend_refs[0].weight, 80);
    }

    #[test]
    fn errors_name_the_field() {
        let s = spec(
            "service: reviews\nrules:\n- backendRefs: [{name: v1}]\n  matches: [{path: {type: RegularExpression, value: '('}}]\n",
        );
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.rules[0].matches[0].path.value");
        let s = spec("service: reviews\nrules:\n- backendRefs: [{name: v1, weight: 0}, {name: v2, weight: 0}]\n");
        assert_eq!(s.validate().unwrap_err().field, "spec.rules[0].backendRefs");
        let s = spec("service: reviews\nrules:\n- backendRefs: [{name: v1}]\n  timeouts: {request: 2 s}\n");
        assert_eq!(s.validate().unwrap_err().field, "spec.rules[0].timeouts.request");
        let s = spec("service: Reviews\n");
        assert_eq!(s.validate().unwrap_err().field, "spec.service");
    }
}
