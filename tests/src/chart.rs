//! The Helm chart from the tests' side: rendering `charts/weir` with a real `helm`, finding
//! objects in what it rendered, and judging API requests against the RBAC it grants.
//!
//! `helm` and `kubernetes-validate` come from `scripts/tools.sh` (run by `scripts/test.sh`),
//! installed under `target/tools` (or `WEIR_TOOLS_DIR`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The release the tests render: `helm template weir charts/weir -n weir-system`.
pub const NAMESPACE: &str = "weir-system";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn chart_dir() -> PathBuf {
    workspace().join("charts/weir")
}

fn tool(relative: &str) -> PathBuf {
    let dir = std::env::var_os("WEIR_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target/tools"));
    let path = dir.join(relative);
    assert!(path.exists(), "{} is missing: run ./scripts/tools.sh (./scripts/test.sh does)", path.display());
    path
}

pub fn helm() -> PathBuf {
    tool("helm")
}

pub fn kubernetes_validate() -> PathBuf {
    tool("kv/bin/kubernetes-validate")
}

/// Runs `helm template` on the chart with `values` (a values file's YAML, or none) and
/// `extra` flags: the rendered documents, or helm's error output.
pub fn render(values: Option<&str>, extra: &[&str]) -> Result<Vec<Value>, String> {
    render_text(values, extra).map(|yaml| parse_documents(&yaml))
}

/// [`render`]'s YAML stream as helm wrote it.
pub fn render_text(values: Option<&str>, extra: &[&str]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(helm());
    cmd.args(["template", "weir"]).arg(chart_dir()).args(["--namespace", NAMESPACE]).args(extra);
    if let Some(v) = values {
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, v).unwrap();
        cmd.arg("--values").arg(&file);
    }
    let out = cmd.output().expect("running helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The non-empty documents of a multi-document YAML stream.
pub fn parse_documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml).map(|d| Value::deserialize(d).unwrap()).filter(|v| !v.is_null()).collect()
}

/// The rendered object of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the chart rendered no {kind} {name}"))
}

/// What an API request asks for, in RBAC's terms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    /// Empty for cluster-wide requests.
    pub namespace: String,
}

/// The RBAC attributes of `method path?query`; `None` for discovery and other non-resource
/// paths (which every authenticated user may read).
pub fn request(method: &str, path_and_query: &str) -> Option<Request> {
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        rest => ("", rest),
    };
    let (resource, named) = match rest {
        [] => return None,
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", false) => "deletecollection",
        ("DELETE", true) => "delete",
        _ => return None,
    };
    Some(Request { verb: verb.into(), group: group.into(), resource, namespace: namespace.into() })
}

/// Whether the rendered RBAC lets `service_account` (NAMESPACE/NAME) make `req`: a
/// ClusterRole bound cluster-wide, or a Role bound in the request's namespace.
pub fn allows(docs: &[Value], service_account: &str, req: &Request) -> bool {
    let (sa_ns, sa_name) = service_account.split_once('/').unwrap();
    let binds_us = |b: &Value| {
        b["subjects"].as_array().is_some_and(|s| {
            s.iter().any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa_name && s["namespace"] == sa_ns)
        })
    };
    let rule_allows = |rule: &Value| {
        let has = |field: &str, want: &str| {
            rule[field].as_array().is_some_and(|v| v.iter().any(|x| x == "*" || x.as_str() == Some(want)))
        };
        has("apiGroups", &req.group) && has("resources", &req.resource) && has("verbs", &req.verb)
    };
    let role_allows = |kind: &str, name: &str, ns: Option<&str>| {
        docs.iter().any(|r| {
            r["kind"] == kind
                && r["metadata"]["name"] == name
                && ns.is_none_or(|ns| r["metadata"]["namespace"] == ns)
                && r["rules"].as_array().is_some_and(|rules| rules.iter().any(rule_allows))
        })
    };
    docs.iter().filter(|b| binds_us(b)).any(|b| {
        let role = b["roleRef"]["name"].as_str().unwrap_or_default();
        match (b["kind"].as_str(), b["roleRef"]["kind"].as_str()) {
            (Some("ClusterRoleBinding"), Some("ClusterRole")) => role_allows("ClusterRole", role, None),
            (Some("RoleBinding"), roleref) if b["metadata"]["namespace"] == req.namespace.as_str() => match roleref {
                Some("ClusterRole") => role_allows("ClusterRole", role, None),
                _ => role_allows("Role", role, Some(&req.namespace)),
            },
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_in_rbac_terms() {
        let r = |m, p| request(m, p).map(|r| (r.verb, r.group, r.resource, r.namespace));
        let s = |v: &str, g: &str, r: &str, n: &str| Some((v.into(), g.into(), r.into(), n.into()));
        assert_eq!(r("GET", "/api/v1/pods?limit=500"), s("list", "", "pods", ""));
        assert_eq!(r("GET", "/api/v1/pods?watch=true&resourceVersion=3"), s("watch", "", "pods", ""));
        assert_eq!(
            r("PATCH", "/apis/weir.io/v1alpha1/namespaces/shop/routes/web/status"),
            s("patch", "weir.io", "routes/status", "shop")
        );
        assert_eq!(
            r("PUT", "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases/weir-controller"),
            s("update", "coordination.k8s.io", "leases", "weir-system")
        );
        assert_eq!(r("GET", "/apis/weir.io/v1alpha1"), None);
        assert_eq!(r("GET", "/version"), None);
    }
}
