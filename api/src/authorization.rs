//! The `MeshAuthorization` resource: who may call a workload, over which transport.
//!
//! ```yaml
//! apiVersion: weir.io/v1alpha1
//! kind: MeshAuthorization
//! metadata: { name: reviews, namespace: shop }
//! spec:
//!   targetRef:
//!     selector: { matchLabels: { app: reviews } }   # or `workload: reviews`; absent: the whole namespace
//!     port: 9080                                     # optional: only this port of the workload
//!   mode: strict                                     # strict: mesh mTLS only; permissive (default)
//!   allow:
//!   - name: frontend-reads
//!     from:
//!       serviceAccounts: [frontend, web/gateway]     # [namespace/]name; namespace defaults to the policy's
//!       namespaces: [ops]                            # any identity in these namespaces ("*": any mesh identity)
//!     to:
//!       paths: [/api/]                               # path prefixes, matched segment by segment
//!       methods: [GET, HEAD]
//! ```
//!
//! When at least one policy selects a workload's port, a request is served only if some rule
//! of those policies allows it; anything else is denied (HTTP 403 with a `weir-error` header).
//! Without any policy, every client is allowed, mesh or plaintext.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, dns_label, dns_subdomain};

/// Who may call the selected workloads, and whether plaintext callers are admitted at all.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.io",
    version = "v1alpha1",
    kind = "MeshAuthorization",
    namespaced,
    status = "MeshAuthorizationStatus",
    shortname = "wauthz",
    category = "weir",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Workload","type":"string","jsonPath":".spec.targetRef.workload"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.targetRef.port"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshAuthorizationSpec {
    /// The workloads (and port) this policy protects; absent: every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<WorkloadTarget>,
    /// `strict` admits only mesh mTLS clients; `permissive` also admits plaintext clients that a
    /// rule allows (`from.unauthenticated`).
    #[serde(default)]
    pub mode: AuthorizationMode,
    /// Rules; a request allowed by any rule is served. Empty denies everything.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub allow: Vec<AllowRule>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthorizationMode {
    Strict,
    #[default]
    Permissive,
}

/// The workloads a policy selects: one by name, or all matching a label selector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadTarget {
    /// A workload's name (its sidecar's `--workload`; in Kubernetes the pod's owner name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Workloads whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Only this port of the workload (the port the application listens on); absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
}

/// One allow rule: clients (`from`) and, optionally, the requests they may make (`to`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowRule {
    /// Name used in metrics; defaults to the rule's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Who; absent: every client the mode admits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Clients>,
    /// What; absent: every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Requests>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Clients {
    /// Mesh identities by service account: `name` (in the policy's namespace) or `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Every mesh identity in these namespaces (`*.ns`); `*` is every mesh identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Plaintext clients (no mesh identity); only in permissive mode.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requests {
    /// Path prefixes, matched segment by segment (`/api` matches `/api` and `/api/x`, not
    /// `/apix`) against the normalised path; empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// HTTP methods; empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// Status written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshAuthorizationStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Label selector operators Kubernetes defines.
const OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

impl MeshAuthorizationSpec {
    /// Checks what the schema cannot: names, selector shape, paths, methods, contradictions.
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(t) = &self.target_ref {
            if t.workload.is_some() && t.selector.is_some() {
                return Err(FieldError::new("spec.targetRef", "give either workload or selector, not both"));
            }
            if let Some(w) = &t.workload {
                dns_label("spec.targetRef.workload", w)?;
            }
            if let Some(p) = t.port
                && !(1..=65535).contains(&p)
            {
                return Err(FieldError::new("spec.targetRef.port", format!("{p} is not a port")));
            }
            if let Some(s) = &t.selector {
                for (i, e) in s.match_expressions.iter().flatten().enumerate() {
                    let at = format!("spec.targetRef.selector.matchExpressions[{i}]");
                    if !OPERATORS.contains(&e.operator.as_str()) {
                        return Err(FieldError::new(
                            format!("{at}.operator"),
                            format!("{:?} is not one of {}", e.operator, OPERATORS.join(", ")),
                        ));
                    }
                    let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
                    let wants_values = matches!(e.operator.as_str(), "In" | "NotIn");
                    if has_values != wants_values {
                        let msg = if wants_values {
                            "In and NotIn need values"
                        } else {
                            "Exists and DoesNotExist take no values"
                        };
                        return Err(FieldError::new(format!("{at}.values"), msg));
                    }
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, rule) in self.allow.iter().enumerate() {
            let at = format!("spec.allow[{i}]");
            let name = rule.name.clone().unwrap_or_else(|| i.to_string());
            if !names.insert(name.clone()) {
                return Err(FieldError::new(format!("{at}.name"), format!("rule name {name:?} used twice")));
            }
            if let Some(from) = &rule.from {
                if from.service_accounts.is_empty() && from.namespaces.is_empty() && !from.unauthenticated {
                    return Err(FieldError::new(
                        format!("{at}.from"),
                        "names no client: give serviceAccounts, namespaces or unauthenticated (omit `from` to allow every client)",
                    ));
                }
                if from.unauthenticated && self.mode == AuthorizationMode::Strict {
                    return Err(FieldError::new(
                        format!("{at}.from.unauthenticated"),
                        "strict mode refuses every client without a mesh identity; use mode: permissive",
                    ));
                }
                for (j, sa) in from.service_accounts.iter().enumerate() {
                    let field = format!("{at}.from.serviceAccounts[{j}]");
                    match sa.split_once('/') {
                        Some((ns, name)) => {
                            dns_label(&field, ns)?;
                            if name != "*" {
                                dns_subdomain(&field, name)?;
                            }
                        }
                        None => dns_subdomain(&field, sa)?,
                    }
                }
                for (j, ns) in from.namespaces.iter().enumerate() {
                    if ns != "*" {
                        dns_label(&format!("{at}.from.namespaces[{j}]"), ns)?;
                    }
                }
            }
            if let Some(to) = &rule.to {
                for (j, p) in to.paths.iter().enumerate() {
                    if !p.starts_with('/') || p.contains(['?', '#']) || p.split('/').any(|s| s == "." || s == "..") {
                        return Err(FieldError::new(
                            format!("{at}.to.paths[{j}]"),
                            format!(
                                "{p:?} is not a normalised path prefix (starts with '/', no '.', '..', '?' or '#')"
                            ),
                        ));
                    }
                }
                for (j, m) in to.methods.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        return Err(FieldError::new(
                            format!("{at}.to.methods[{j}]"),
                            format!("{m:?} is not an HTTP method (uppercase letters, e.g. GET)"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl WorkloadTarget {
    /// Whether a workload named `name` with `labels` is selected (the namespace is the caller's
    /// to check).
    pub fn selects(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        if let Some(w) = &self.workload {
            return w == name;
        }
        let Some(sel) = &self.selector else { return true };
        let labels_match = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
        let exprs_match = sel.match_expressions.iter().flatten().all(|e| {
            let have = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => have.is_some_and(|h| values.contains(h)),
                "NotIn" => have.is_none_or(|h| !values.contains(h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        });
        labels_match && exprs_match
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<MeshAuthorizationSpec, FieldError> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let s: MeshAuthorizationSpec = crate::validate::from_yaml(v, "spec")?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn contradictions_and_bad_values_name_the_field() {
        let e = spec("mode: strict\nallow: [{from: {unauthenticated: true}}]").unwrap_err();
        assert_eq!(e.field, "spec.allow[0].from.unauthenticated");
        let e = spec("targetRef: {workload: a, selector: {matchLabels: {a: b}}}").unwrap_err();
        assert_eq!(e.field, "spec.targetRef");
        let e = spec("allow: [{to: {paths: [/api/../admin]}}]").unwrap_err();
        assert_eq!(e.field, "spec.allow[0].to.paths[0]");
        let e = spec("allow: [{to: {methods: [get]}}]").unwrap_err();
        assert_eq!(e.field, "spec.allow[0].to.methods[0]");
        let e = spec("allow: [{from: {serviceAccounts: [Bad_Name]}}]").unwrap_err();
        assert_eq!(e.field, "spec.allow[0].from.serviceAccounts[0]");
        let e = spec("allow: [{from: {}}]").unwrap_err();
        assert_eq!(e.field, "spec.allow[0].from");
        let e = spec("targetRef: {selector: {matchExpressions: [{key: a, operator: In}]}}").unwrap_err();
        assert_eq!(e.field, "spec.targetRef.selector.matchExpressions[0].values");
        let e = spec("mode: lax").unwrap_err();
        assert_eq!(e.field, "spec.mode");
        assert_eq!(spec("{}").unwrap().mode, AuthorizationMode::Permissive);
    }

    #[test]
    fn selectors_select() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "reviews".to_string())].into();
        let t = |yaml: &str| spec(&format!("targetRef: {yaml}")).unwrap().target_ref.unwrap();
        assert!(t("{workload: reviews}").selects("reviews", &labels));
        assert!(!t("{workload: reviews}").selects("ratings", &labels));
        assert!(t("{selector: {matchLabels: {app: reviews}}}").selects("x", &labels));
        assert!(!t("{selector: {matchLabels: {app: ratings}}}").selects("x", &labels));
        assert!(
            t("{selector: {matchExpressions: [{key: app, operator: In, values: [a, reviews]}]}}").selects("x", &labels)
        );
        assert!(t("{selector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}}").selects("x", &labels));
        assert!(
            !t("{selector: {matchExpressions: [{key: app, operator: NotIn, values: [reviews]}]}}")
                .selects("x", &labels)
        );
        assert!(t("{port: 80}").selects("anything", &labels));
    }
}
