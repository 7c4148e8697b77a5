//! What a set of resources would do once applied, said before they are: every rejection the
//! controller would make (the same [`Index`] checks: schema and field errors, references to
//! missing Services or rules, duplicates, conflicts), and warnings about resources that would
//! be accepted but not do what they look like they do:
//!
//! - a Route rule that can never match, because an earlier rule for the same Service (in the
//!   order the sidecars try them: Routes by name, rules in order) matches every request it does;
//! - a ResiliencePolicy for a port its Service does not expose;
//! - a MeshAuthorization for a port none of the pods it selects serves, or that selects none
//!   of the pods serving a Service (judged where endpoints are pods: read from Kubernetes);
//! - a Canary whose Service other Routes also steer (its rules come first).
//!
//! `weir analyze` prints them for files, directories or a cluster; the controller logs the
//! warnings whenever the configuration changes.

use std::collections::BTreeMap;

use serde::Serialize;
use weir_api::route::{HttpRouteMatch, PathMatchType, RouteSpec};

use crate::index::{Index, Kind, Resource, ResourceKey};

/// How bad a finding is: an error means the resource is not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One thing wrong with a resource, located as precisely as it can be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// The file (local mode) or object the resource came from.
    pub origin: String,
    pub resource: Option<ResourceKey>,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(r) = &self.resource {
            write!(f, ": {r}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {severity}: {}", self.message)
    }
}

/// Every finding for what `index` holds: its rejections, then the warnings.
pub fn findings(index: &Index) -> Vec<Finding> {
    let mut out: Vec<Finding> = index
        .rejections()
        .iter()
        .map(|r| Finding {
            severity: Severity::Error,
            origin: r.origin.clone(),
            resource: r.resource.clone(),
            field: r.field.clone(),
            message: r.message.clone(),
        })
        .collect();
    out.extend(warnings(index));
    out
}

/// Warnings about the resources in force (see the module documentation).
pub fn warnings(index: &Index) -> Vec<Finding> {
    let mut out = Vec::new();
    shadowed_rules(index, &mut out);
    policy_ports(index, &mut out);
    authorization_ports(index, &mut out);
    canaries_beside_routes(index, &mut out);
    out
}

fn warning(origin: &str, key: &ResourceKey, field: impl Into<String>, message: String) -> Finding {
    Finding {
        severity: Severity::Warning,
        origin: origin.to_string(),
        resource: Some(key.clone()),
        field: Some(field.into()),
        message,
    }
}

/// Rules no request can reach: an earlier rule for the same Service matches all it matches.
fn shadowed_rules(index: &Index, out: &mut Vec<Finding>) {
    // Each Service's rules in the order the sidecars try them: Routes by name (the index is
    // sorted by kind, namespace and name), each Route's rules in order.
    // (Route, its origin, the rule's index, the Route's spec) by (namespace, Service).
    type Rules<'a> = Vec<(&'a ResourceKey, &'a str, usize, &'a RouteSpec)>;
    let mut by_service: BTreeMap<(&str, &str), Rules> = BTreeMap::new();
    for (key, entry) in index.entries() {
        if let Resource::Route(spec) = &entry.resource {
            for i in 0..spec.rules.len() {
                by_service.entry((&key.namespace, &spec.service)).or_default().push((key, &entry.origin, i, spec));
            }
        }
    }
    for rules in by_service.values() {
        for (j, (key, origin, rule, spec)) in rules.iter().enumerate() {
            let later = &spec.rules[*rule].matches;
            let earlier = rules[..j].iter().find(|(_, _, i, s)| covers(&s.rules[*i].matches, later));
            if let Some((by_key, _, by_rule, _)) = earlier {
                let by = if by_key == key {
                    format!("spec.rules[{by_rule}]")
                } else {
                    format!("{by_key} spec.rules[{by_rule}]")
                };
                out.push(warning(
                    origin,
                    key,
                    format!("spec.rules[{rule}]"),
                    format!("never matches: {by} comes first and matches every request this rule does"),
                ));
            }
        }
    }
}

/// Whether a rule with `earlier` matches every request a rule with `later` matches. Sound,
/// not complete: it says yes only when that is certain (regular expressions are compared as
/// text).
pub fn covers(earlier: &[HttpRouteMatch], later: &[HttpRouteMatch]) -> bool {
    // No conditions match every request.
    if earlier.is_empty() {
        return true;
    }
    if later.is_empty() {
        return earlier.iter().any(|m| *m == HttpRouteMatch::default());
    }
    later.iter().all(|l| earlier.iter().any(|e| match_covers(e, l)))
}

fn match_covers(e: &HttpRouteMatch, l: &HttpRouteMatch) -> bool {
    let path = match (&e.path, &l.path) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => match (e.kind, l.kind) {
            (PathMatchType::PathPrefix, PathMatchType::PathPrefix | PathMatchType::Exact) => {
                weir_api::route::path_prefix_matches(&e.value, &l.value)
            }
            (a, b) => a == b && e.value == l.value,
        },
    };
    let method = e.method.is_none() || e.method == l.method;
    let same = |a: &weir_api::route::NamedValueMatch, b: &weir_api::route::NamedValueMatch, ci: bool| {
        a.kind == b.kind
            && a.value == b.value
            && if ci { a.name.eq_ignore_ascii_case(&b.name) } else { a.name == b.name }
    };
    let headers = e.headers.iter().all(|h| l.headers.iter().any(|x| same(h, x, true)));
    let query = e.query_params.iter().all(|q| l.query_params.iter().any(|x| same(q, x, false)));
    path && method && headers && query
}

/// A policy for a port the Service does not expose applies to nothing.
fn policy_ports(index: &Index, out: &mut Vec<Finding>) {
    for (key, entry) in index.entries() {
        let Resource::ResiliencePolicy(spec) = &entry.resource else { continue };
        let Some(port) = spec.target_ref.port else { continue };
        let service = ResourceKey::new(Kind::Service, key.namespace.clone(), spec.target_ref.service.clone());
        let Some(Resource::Service(svc)) = index.entries().get(&service).map(|e| &e.resource) else { continue };
        if !svc.ports.is_empty() && !svc.ports.iter().any(|p| u32::from(p.port) == port) {
            let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
            out.push(warning(
                &entry.origin,
                key,
                "spec.targetRef.port",
                format!(
                    "Service {}/{} has no port {port} (its ports: {})",
                    key.namespace,
                    spec.target_ref.service,
                    ports.join(", ")
                ),
            ));
        }
    }
}

/// A MeshAuthorization for a port none of its workloads listens on guards nothing; one that
/// selects no workload serving a Service guards nothing yet. Judged only on endpoints read from
/// Kubernetes, where an endpoint is a pod (its labels, its workload, the port its application
/// listens on); a local-mode endpoint is a sidecar's listener and says neither.
fn authorization_ports(index: &Index, out: &mut Vec<Finding>) {
    for (key, entry) in index.entries() {
        let Resource::MeshAuthorization(spec) = &entry.resource else { continue };
        let Some(target) = &spec.target_ref else { continue };
        let narrowed = target.workload.is_some() || target.selector.is_some();
        // Pods of the namespace serving a Service, and those the policy selects.
        let mut pods = 0;
        let mut selected = Vec::new();
        for (k, e) in index.entries() {
            let Resource::Service(svc) = &e.resource else { continue };
            if k.namespace != key.namespace || e.origin != crate::source::kubernetes::ORIGIN {
                continue;
            }
            for ep in &svc.endpoints {
                pods += 1;
                if !narrowed || target.selects(ep.workload.as_deref().unwrap_or(""), &ep.labels) {
                    selected.push(ep);
                }
            }
        }
        if pods == 0 {
            continue;
        }
        if selected.is_empty() {
            out.push(warning(
                &entry.origin,
                key,
                "spec.targetRef",
                format!("selects none of the {pods} pods that serve a Service in {}", key.namespace),
            ));
            continue;
        }
        let Some(port) = target.port else { continue };
        let app_port = |ep: &&weir_api::service::LocalEndpoint| {
            ep.address.parse::<std::net::SocketAddr>().ok().map(|a| u32::from(a.port()))
        };
        if !selected.iter().filter_map(app_port).any(|p| p == port) {
            let ports: std::collections::BTreeSet<u32> = selected.iter().filter_map(app_port).collect();
            let ports: Vec<String> = ports.iter().map(u32::to_string).collect();
            out.push(warning(
                &entry.origin,
                key,
                "spec.targetRef.port",
                format!("none of the pods it selects serves port {port} (they serve {})", ports.join(", ")),
            ));
        }
    }
}

/// Routes that also steer a Canary's Service: the canary's rules come before theirs.
fn canaries_beside_routes(index: &Index, out: &mut Vec<Finding>) {
    for def in crate::translator::definitions(index) {
        if def.conflicting_routes.is_empty() {
            continue;
        }
        let key = ResourceKey::new(Kind::Canary, def.namespace.clone(), def.name.clone());
        let origin = index.entries().get(&key).map(|e| e.origin.clone()).unwrap_or_default();
        out.push(warning(
            &origin,
            &key,
            "spec.service",
            format!(
                "Route {} also steers Service {}/{}: the canary's rules come first, so theirs see only what the canary does not take",
                def.conflicting_routes.join(", "),
                def.namespace,
                def.spec.service
            ),
        ));
    }
}

/// Reads `paths` (files, and directories read as the controller reads its config directory)
/// and analyzes what they define together. Documents of Kubernetes kinds Weir does not read
/// are skipped; core `v1` Services become the Services routes may refer to, as the Kubernetes
/// source makes them (without endpoints: those come from the cluster). Returns the findings,
/// sorted by origin, and how many resources were read.
pub fn analyze_paths(paths: &[std::path::PathBuf]) -> anyhow::Result<(Vec<Finding>, usize)> {
    use anyhow::Context;
    let mut defs = Vec::new();
    let mut unreadable = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        let files = if meta.is_dir() {
            let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("{}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| crate::source::local::is_config_file(p))
                .collect();
            files.sort();
            files
        } else {
            vec![path.clone()]
        };
        for file in files {
            let origin = file.display().to_string();
            let text = std::fs::read_to_string(&file).with_context(|| origin.clone())?;
            match read_documents(&origin, &text) {
                Ok(d) => defs.extend(d),
                Err(u) => unreadable.push(u),
            }
        }
    }
    Ok(analyze(defs, unreadable))
}

/// Analyzes what the cluster holds, read as the controller reads it (every watched kind listed
/// once; `namespaces` empty: all of them).
pub async fn analyze_cluster(
    kubeconfig: Option<&std::path::Path>,
    namespaces: &[String],
) -> anyhow::Result<(Vec<Finding>, usize)> {
    use anyhow::Context;
    let client = crate::source::kubernetes::client(kubeconfig).await?;
    let (stop, drain) = weir_api::rt::drain();
    let restarts = prometheus::IntCounterVec::new(prometheus::Opts::new("watch_restarts", "unused"), &["watch"])?;
    let source = crate::source::kubernetes::KubeSource::start(client, namespaces, restarts, drain);
    tokio::time::timeout(std::time::Duration::from_secs(60), source.wait_until_ready())
        .await
        .context("the cluster did not list every kind Weir reads within 60 s (is the API server reachable, and are the CRDs installed?)")?;
    let (defs, _) = source.definitions();
    stop.trigger();
    Ok(analyze(defs, Vec::new()))
}

fn analyze(
    defs: Vec<crate::index::Definition>,
    unreadable: Vec<crate::index::UnreadableOrigin>,
) -> (Vec<Finding>, usize) {
    let read = defs.len();
    let mut index = Index::default();
    index.replace_all(defs, unreadable);
    let mut all = findings(&index);
    all.sort_by(|a, b| (&a.origin, &a.resource, a.severity).cmp(&(&b.origin, &b.resource, b.severity)));
    (all, read)
}

/// The documents of one file: Weir's kinds parsed as local mode parses them, core Services
/// translated as the Kubernetes source translates them, everything else skipped.
fn read_documents(origin: &str, text: &str) -> Result<Vec<crate::index::Definition>, crate::index::UnreadableOrigin> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| crate::index::UnreadableOrigin {
            origin: origin.to_string(),
            message: format!("invalid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        let kind = value.get("kind").and_then(|v| v.as_str());
        match (api_version, kind) {
            // Local mode's own Services (no apiVersion) and Weir's resources.
            (None, _) => out.push(crate::source::local::parse_document(origin, i + 1, value)),
            (Some(v), _) if v.starts_with(weir_api::GROUP) => {
                out.push(crate::source::local::parse_document(origin, i + 1, value))
            }
            (Some("v1"), Some("Service")) => out.extend(core_service(origin, value)),
            _ => {}
        }
    }
    Ok(out)
}

/// A core Service from a manifest, as the Kubernetes source would see it with no endpoints yet
/// (`None` for an ExternalName Service, which the mesh does not route).
fn core_service(origin: &str, value: serde_yaml::Value) -> Option<crate::index::Definition> {
    let fail = |message: String| crate::index::Definition {
        origin: origin.to_string(),
        key: None,
        parsed: Err(crate::index::Problem::new(None, message)),
    };
    let svc: k8s_openapi::api::core::v1::Service = match serde_yaml::from_value(value) {
        Ok(svc) => svc,
        Err(e) => return Some(fail(format!("a v1 Service that does not parse: {e}"))),
    };
    let Some(name) = svc.metadata.name.clone() else {
        return Some(fail("a v1 Service without metadata.name".into()));
    };
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = crate::source::kubernetes::service_spec(&svc, &[], &Default::default())?;
    Some(crate::index::Definition {
        origin: origin.to_string(),
        key: Some(ResourceKey::new(Kind::Service, namespace, name)),
        parsed: Ok(Resource::Service(spec)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_api::route::{NamedValueMatch, PathMatch, ValueMatchType};

    fn m(path: Option<(PathMatchType, &str)>, method: Option<&str>, headers: &[(&str, &str)]) -> HttpRouteMatch {
        HttpRouteMatch {
            path: path.map(|(kind, value)| PathMatch { kind, value: value.into() }),
            headers: headers
                .iter()
                .map(|(n, v)| NamedValueMatch {
                    kind: ValueMatchType::Exact,
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            query_params: vec![],
            method: method.map(String::from),
        }
    }

    #[test]
    fn a_rule_covers_another_only_when_it_matches_all_it_matches() {
        use PathMatchType::*;
        let any: Vec<HttpRouteMatch> = vec![];
        let api = vec![m(Some((PathPrefix, "/api")), None, &[])];
        let api_v1 = vec![m(Some((PathPrefix, "/api/v1")), None, &[])];
        let apix = vec![m(Some((PathPrefix, "/apix")), None, &[])];
        let api_get = vec![m(Some((PathPrefix, "/api")), Some("GET"), &[])];
        let api_exact = vec![m(Some((Exact, "/api")), None, &[])];
        let api_regex = vec![m(Some((RegularExpression, "/api/.*")), None, &[])];
        let canary = vec![m(None, None, &[("X-Canary", "1")])];
        let canary_lower_get = vec![m(Some((Exact, "/")), Some("GET"), &[("x-canary", "1")])];
        // No condition covers everything; nothing but "no condition" covers it.
        assert!(covers(&any, &api) && covers(&any, &any));
        assert!(!covers(&api, &any));
        // Prefixes by path segment.
        assert!(covers(&api, &api_v1) && covers(&api, &api_exact) && covers(&api, &api_get));
        assert!(!covers(&api, &apix) && !covers(&api_v1, &api) && !covers(&api_get, &api));
        // A regex is compared as text: never assumed to cover a prefix.
        assert!(!covers(&api_regex, &api_v1) && covers(&api_regex, &api_regex));
        assert!(!covers(&api, &api_regex), "a prefix does not cover what a regex may match");
        // Header names are case-insensitive; extra conditions on the later rule narrow it.
        assert!(covers(&canary, &canary_lower_get) && !covers(&canary_lower_get, &canary));
        // Every one of the later rule's matches must be covered.
        let both = [api_v1.clone(), apix.clone()].concat();
        assert!(!covers(&api, &both) && covers(&[api.clone(), apix.clone()].concat(), &both));
    }

    fn read(origin: &str, yaml: &str) -> Vec<crate::index::Definition> {
        crate::source::local::parse_file(origin, yaml).unwrap()
    }

    #[test]
    fn authorizations_are_judged_on_pods_read_from_kubernetes() {
        let pods = "kind: Service\nmetadata: { name: web, namespace: shop }\nspec:\n  ports: [{ port: 80 }]\n  endpoints:\n  \
                    - { address: \"10.0.0.1:8080\", workload: web-1, labels: { app: web } }\n";
        let authz = |target: &str| {
            format!(
                "apiVersion: weir.io/v1alpha1\nkind: MeshAuthorization\nmetadata: {{ name: a, namespace: shop }}\nspec:\n  targetRef: {target}\n  allow: [{{ from: {{ namespaces: [shop] }} }}]\n"
            )
        };
        let judge = |service_origin: &str, target: &str| {
            let mut defs = read(service_origin, pods);
            defs.extend(read("authz.yaml", &authz(target)));
            let mut index = Index::default();
            index.replace_all(defs, vec![]);
            warnings(&index)
                .into_iter()
                .map(|w| format!("{}: {}", w.field.unwrap_or_default(), w.message))
                .collect::<Vec<_>>()
        };
        let k8s = crate::source::kubernetes::ORIGIN;
        assert_eq!(judge(k8s, "{ selector: { matchLabels: { app: web } }, port: 8080 }"), Vec::<String>::new());
        assert_eq!(
            judge(k8s, "{ selector: { matchLabels: { app: web } }, port: 9090 }"),
            ["spec.targetRef.port: none of the pods it selects serves port 9090 (they serve 8080)"]
        );
        assert_eq!(
            judge(k8s, "{ selector: { matchLabels: { app: api } } }"),
            ["spec.targetRef: selects none of the 1 pods that serve a Service in shop"]
        );
        // A local-mode endpoint is a sidecar's listener: nothing to judge by.
        assert_eq!(
            judge("services.yaml", "{ selector: { matchLabels: { app: api } }, port: 9090 }"),
            Vec::<String>::new()
        );
    }
}
