//! The index: every resource the sources produced, which version of each is in force, and
//! which definitions were rejected and why.
//!
//! A rejected definition never removes a working one: the previously accepted version of the
//! same resource stays in force until a valid definition replaces it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use weir_api::authorization::MeshAuthorizationSpec;
use weir_api::canary::CanarySpec;
use weir_api::resilience::ResiliencePolicySpec;
use weir_api::route::RouteSpec;
use weir_api::service::LocalServiceSpec;

/// Resource kinds the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Service,
    Route,
    ResiliencePolicy,
    MeshAuthorization,
    Canary,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Route => "Route",
            Kind::ResiliencePolicy => "ResiliencePolicy",
            Kind::MeshAuthorization => "MeshAuthorization",
            Kind::Canary => "Canary",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind, namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Service(LocalServiceSpec),
    Route(RouteSpec),
    ResiliencePolicy(Box<ResiliencePolicySpec>),
    MeshAuthorization(MeshAuthorizationSpec),
    Canary(Box<CanarySpec>),
}

/// One definition a source produced: where it came from and what it parsed to.
#[derive(Clone, Debug)]
pub struct Definition {
    /// Where the definition lives (a file name in local mode).
    pub origin: String,
    /// The resource it defines, when that much could be read.
    pub key: Option<ResourceKey>,
    pub parsed: Result<Resource, Problem>,
}

/// Why a definition was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The field at fault, when one is.
    pub field: Option<String>,
    pub message: String,
    pub reason: Reason,
}

impl Problem {
    pub fn new(field: Option<String>, message: impl Into<String>) -> Self {
        Self { field, message: message.into(), reason: Reason::Invalid }
    }

    fn because(mut self, reason: Reason) -> Self {
        self.reason = reason;
        self
    }
}

/// The class of a rejection (a status condition's `reason` in Kubernetes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// The definition itself is malformed.
    #[default]
    Invalid,
    /// It refers to a Service (or rule) that does not exist.
    BackendNotFound,
    /// Another resource already holds what it claims.
    Conflict,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Invalid => "Invalid",
            Reason::BackendNotFound => "BackendNotFound",
            Reason::Conflict => "Conflict",
        }
    }
}

/// A source that could not be read at all (e.g. a file that is not YAML): everything it
/// defined before stays in force.
#[derive(Clone, Debug)]
pub struct UnreadableOrigin {
    pub origin: String,
    pub message: String,
}

/// A resource in force.
#[derive(Clone, Debug)]
pub struct Entry {
    pub origin: String,
    pub resource: Resource,
    /// Bumped every time the accepted content changes.
    pub version: u64,
}

/// A rejected definition, as reported to users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub origin: String,
    pub resource: Option<ResourceKey>,
    pub field: Option<String>,
    pub message: String,
    pub reason: Reason,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(r) = &self.resource {
            write!(f, ": {r}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, Default)]
pub struct Index {
    entries: BTreeMap<ResourceKey, Entry>,
    rejections: Vec<Rejection>,
    last_version: u64,
}

impl Index {
    pub fn entries(&self) -> &BTreeMap<ResourceKey, Entry> {
        &self.entries
    }

    pub fn rejections(&self) -> &[Rejection] {
        &self.rejections
    }

    /// Replaces everything with what a full read of the sources produced (local mode reads
    /// the whole directory on every change). Returns whether the resources in force changed.
    pub fn replace_all(&mut self, definitions: Vec<Definition>, unreadable: Vec<UnreadableOrigin>) -> bool {
        let mut next: BTreeMap<ResourceKey, Entry> = BTreeMap::new();
        let mut rejections = Vec::new();
        // Keys whose new definition was rejected: their previous version stays in force.
        let mut keep_previous: BTreeSet<ResourceKey> = BTreeSet::new();

        for u in &unreadable {
            rejections.push(Rejection {
                origin: u.origin.clone(),
                resource: None,
                field: None,
                message: u.message.clone(),
                reason: Reason::Invalid,
            });
            for (k, e) in &self.entries {
                if e.origin == u.origin {
                    keep_previous.insert(k.clone());
                }
            }
        }

        let mut defined_at: BTreeMap<ResourceKey, String> = BTreeMap::new();
        for def in definitions {
            match def.parsed {
                Err(p) => {
                    if let Some(k) = &def.key {
                        keep_previous.insert(k.clone());
                    }
                    rejections.push(Rejection {
                        origin: def.origin,
                        resource: def.key,
                        field: p.field,
                        message: p.message,
                        reason: p.reason,
                    });
                }
                Ok(resource) => {
                    let key = def.key.expect("a parsed definition has a key");
                    if let Some(first) = defined_at.get(&key) {
                        // Prefer the origin that held the resource before, so adding a duplicate
                        // elsewhere never displaces a working definition.
                        let incumbent = self.entries.get(&key).map(|e| e.origin.as_str());
                        if incumbent == Some(def.origin.as_str()) && incumbent != Some(first.as_str()) {
                            rejections.push(duplicate(first, &key, &def.origin));
                            defined_at.insert(key.clone(), def.origin.clone());
                            next.insert(key, Entry { origin: def.origin, resource, version: 0 });
                        } else {
                            rejections.push(duplicate(&def.origin, &key, first));
                        }
                        continue;
                    }
                    defined_at.insert(key.clone(), def.origin.clone());
                    next.insert(key, Entry { origin: def.origin, resource, version: 0 });
                }
            }
        }

        // Carry over previous versions where the new definition failed (or its file did).
        for k in &keep_previous {
            if !next.contains_key(k)
                && let Some(prev) = self.entries.get(k)
            {
                next.insert(k.clone(), prev.clone());
            }
        }

        // Cross-object checks: a Route must point at Services that exist; a ResiliencePolicy
        // at a Service (and rule) that exist.
        let services: BTreeSet<(String, String)> =
            next.keys().filter(|k| k.kind == Kind::Service).map(|k| (k.namespace.clone(), k.name.clone())).collect();
        // A carried-over version is not re-judged.
        let to_check: Vec<ResourceKey> =
            next.keys().filter(|k| k.kind != Kind::Service && !keep_previous.contains(*k)).cloned().collect();
        for key in to_check {
            let entry = &next[&key];
            let problem = match &entry.resource {
                Resource::Route(spec) => missing_service(&key.namespace, spec, &services),
                Resource::ResiliencePolicy(spec) => missing_policy_target(&key.namespace, spec, &next),
                Resource::Canary(spec) => {
                    missing_canary_service(&key.namespace, spec, &services).or_else(|| second_canary(&key, spec, &next))
                }
                // Selects workloads, which come and go on their own: nothing to resolve.
                Resource::Service(_) | Resource::MeshAuthorization(_) => None,
            };
            let Some(problem) = problem else { continue };
            let origin = entry.origin.clone();
            next.remove(&key);
            if let Some(prev) = self.entries.get(&key) {
                next.insert(key.clone(), prev.clone());
            }
            rejections.push(Rejection {
                origin,
                resource: Some(key),
                field: problem.field,
                message: problem.message,
                reason: problem.reason,
            });
        }

        // Versions: unchanged content keeps its version.
        let mut changed = next.len() != self.entries.len();
        for (k, e) in next.iter_mut() {
            match self.entries.get(k) {
                Some(prev) if prev.resource == e.resource => {
                    e.version = prev.version;
                    if prev.origin != e.origin {
                        changed = true;
                    }
                }
                _ => {
                    self.last_version += 1;
                    e.version = self.last_version;
                    changed = true;
                }
            }
        }
        self.entries = next;
        self.rejections = rejections;
        changed
    }
}

fn duplicate(origin: &str, key: &ResourceKey, other: &str) -> Rejection {
    Rejection {
        origin: origin.to_string(),
        resource: Some(key.clone()),
        field: Some("metadata.name".into()),
        message: format!("duplicate: {key} is already defined in {other}"),
        reason: Reason::Conflict,
    }
}

fn missing_policy_target(
    ns: &str,
    spec: &ResiliencePolicySpec,
    entries: &BTreeMap<ResourceKey, Entry>,
) -> Option<Problem> {
    let target = &spec.target_ref.service;
    if !entries.contains_key(&ResourceKey::new(Kind::Service, ns, target.clone())) {
        return Some(
            Problem::new(Some("spec.targetRef.service".into()), format!("Service {ns}/{target} not found"))
                .because(Reason::BackendNotFound),
        );
    }
    if let Some(rule) = &spec.target_ref.rule {
        let found = entries.iter().any(|(k, e)| match &e.resource {
            Resource::Route(r) if k.namespace == ns && &r.service == target => r
                .rules
                .iter()
                .enumerate()
                .any(|(i, x)| x.name.as_deref().map(str::to_string).unwrap_or(i.to_string()) == *rule),
            _ => false,
        });
        if !found {
            return Some(
                Problem::new(
                    Some("spec.targetRef.rule".into()),
                    format!("no Route rule named {rule:?} for Service {ns}/{target}"),
                )
                .because(Reason::BackendNotFound),
            );
        }
    }
    None
}

fn missing_canary_service(ns: &str, spec: &CanarySpec, services: &BTreeSet<(String, String)>) -> Option<Problem> {
    for (field, name) in [("spec.service", &spec.service), ("spec.stable", &spec.stable), ("spec.canary", &spec.canary)]
    {
        if !services.contains(&(ns.to_string(), name.clone())) {
            return Some(
                Problem::new(Some(field.into()), format!("Service {ns}/{name} not found"))
                    .because(Reason::BackendNotFound),
            );
        }
    }
    None
}

/// Only one Canary may steer a Service: the one first by name keeps it.
fn second_canary(key: &ResourceKey, spec: &CanarySpec, entries: &BTreeMap<ResourceKey, Entry>) -> Option<Problem> {
    let first = entries.iter().find(|(k, e)| {
        k.kind == Kind::Canary
            && k.namespace == key.namespace
            && k.name < key.name
            && matches!(&e.resource, Resource::Canary(c) if c.service == spec.service)
    })?;
    Some(
        Problem::new(
            Some("spec.service".into()),
            format!("Canary {}/{} already rolls out Service {}", first.0.namespace, first.0.name, spec.service),
        )
        .because(Reason::Conflict),
    )
}

fn missing_service(ns: &str, spec: &RouteSpec, services: &BTreeSet<(String, String)>) -> Option<Problem> {
    if !services.contains(&(ns.to_string(), spec.service.clone())) {
        return Some(
            Problem::new(Some("spec.service".into()), format!("Service {ns}/{} not found", spec.service))
                .because(Reason::BackendNotFound),
        );
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let bns = b.namespace.as_deref().unwrap_or(ns);
            if !services.contains(&(bns.to_string(), b.name.clone())) {
                return Some(
                    Problem::new(
                        Some(format!("spec.rules[{i}].backendRefs[{j}].name")),
                        format!("backend Service {bns}/{} not found", b.name),
                    )
                    .because(Reason::BackendNotFound),
                );
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(origin: &str, name: &str) -> Definition {
        Definition {
            origin: origin.into(),
            key: Some(ResourceKey::new(Kind::Service, "ns", name)),
            parsed: Ok(Resource::Service(LocalServiceSpec::default())),
        }
    }

    fn route(origin: &str, name: &str, service: &str, backends: &[(&str, u32)]) -> Definition {
        let rules = serde_json::json!([{ "backendRefs": backends.iter().map(|(n, w)| serde_json::json!({"name": n, "weight": w})).collect::<Vec<_>>() }]);
        let spec: RouteSpec = serde_json::from_value(serde_json::json!({"service": service, "rules": rules})).unwrap();
        Definition {
            origin: origin.into(),
            key: Some(ResourceKey::new(Kind::Route, "ns", name)),
            parsed: Ok(Resource::Route(spec)),
        }
    }

    fn weights(index: &Index, name: &str) -> Vec<u32> {
        match &index.entries()[&ResourceKey::new(Kind::Route, "ns", name)].resource {
            Resource::Route(r) => r.rules[0].backend_refs.iter().map(|b| b.weight).collect(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn rejected_definition_keeps_previous_version() {
        let mut index = Index::default();
        assert!(index.replace_all(
            vec![svc("s.yaml", "a"), svc("s.yaml", "b"), route("r.yaml", "r", "a", &[("a", 1), ("b", 1)])],
            vec![]
        ));
        let v = index.entries()[&ResourceKey::new(Kind::Route, "ns", "r")].version;
        let bad = Definition {
            origin: "r.yaml".into(),
            key: Some(ResourceKey::new(Kind::Route, "ns", "r")),
            parsed: Err(Problem::new(Some("spec.rules[0].backendRefs[0].weight".into()), "negative")),
        };
        assert!(!index.replace_all(vec![svc("s.yaml", "a"), svc("s.yaml", "b"), bad], vec![]));
        assert_eq!(weights(&index, "r"), vec![1, 1]);
        assert_eq!(index.entries()[&ResourceKey::new(Kind::Route, "ns", "r")].version, v);
        let rej = &index.rejections()[0];
        assert_eq!(rej.to_string(), "r.yaml: Route ns/r: field spec.rules[0].backendRefs[0].weight: negative");
    }

    #[test]
    fn route_to_missing_service_is_rejected() {
        let mut index = Index::default();
        index.replace_all(vec![svc("s.yaml", "a"), route("r.yaml", "r", "a", &[("a", 1)])], vec![]);
        index.replace_all(vec![svc("s.yaml", "a"), route("r.yaml", "r", "a", &[("a", 1), ("ghost", 1)])], vec![]);
        assert_eq!(weights(&index, "r"), vec![1]);
        assert_eq!(index.rejections()[0].field.as_deref(), Some("spec.rules[0].backendRefs[1].name"));
        assert!(index.rejections()[0].message.contains("ns/ghost not found"));
    }

    #[test]
    fn duplicates_never_displace_the_incumbent() {
        let mut index = Index::default();
        index.replace_all(vec![svc("b.yaml", "a")], vec![]);
        index.replace_all(vec![svc("a.yaml", "a"), svc("b.yaml", "a")], vec![]);
        assert_eq!(index.entries()[&ResourceKey::new(Kind::Service, "ns", "a")].origin, "b.yaml");
        assert_eq!(index.rejections()[0].origin, "a.yaml");
        assert!(index.rejections()[0].message.contains("already defined in b.yaml"));
    }

    #[test]
    fn unreadable_file_keeps_its_resources() {
        let mut index = Index::default();
        index.replace_all(vec![svc("s.yaml", "a")], vec![]);
        let changed =
            index.replace_all(vec![], vec![UnreadableOrigin { origin: "s.yaml".into(), message: "bad yaml".into() }]);
        assert!(!changed);
        assert_eq!(index.entries().len(), 1);
        // Deleting the definition for real removes it.
        assert!(index.replace_all(vec![], vec![]));
        assert!(index.entries().is_empty());
    }
}
