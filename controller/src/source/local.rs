//! Local mode: every `*.yaml`/`*.yml` file in a directory (multi-document, `kind`-tagged),
//! re-read as a whole whenever the directory changes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::Watcher;
use serde::Deserialize;
use tokio::sync::mpsc;
use weir_api::authorization::MeshAuthorizationSpec;
use weir_api::canary::CanarySpec;
use weir_api::resilience::ResiliencePolicySpec;
use weir_api::route::RouteSpec;
use weir_api::service::LocalServiceSpec;
use weir_api::validate::{FieldError, from_yaml};

use crate::index::{Definition, Kind, Problem, Resource, ResourceKey, UnreadableOrigin};

/// Reads every YAML file of `dir` (sorted by name).
pub fn read_dir(dir: &Path) -> std::io::Result<(Vec<Definition>, Vec<UnreadableOrigin>)> {
    read_dir_cached(dir, &mut ParseCache::default())
}

/// What each file parsed to, by name, with the text it was parsed from: a change to one file
/// re-parses only that file (the YAML of a large mesh costs far more than reading it).
#[derive(Default)]
pub struct ParseCache(HashMap<String, (String, Result<Vec<Definition>, UnreadableOrigin>)>);

/// [`read_dir`], re-parsing only files whose text changed since `cache` saw them.
pub fn read_dir_cached(
    dir: &Path,
    cache: &mut ParseCache,
) -> std::io::Result<(Vec<Definition>, Vec<UnreadableOrigin>)> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_config_file(p)).collect();
    files.sort();
    let mut defs = Vec::new();
    let mut unreadable = Vec::new();
    let mut seen = HashSet::new();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let parsed = match cache.0.get(&name) {
                    Some((cached, parsed)) if *cached == text => parsed.clone(),
                    _ => {
                        let parsed = parse_file(&name, &text);
                        cache.0.insert(name.clone(), (text, parsed.clone()));
                        parsed
                    }
                };
                seen.insert(name);
                match parsed {
                    Ok(d) => defs.extend(d),
                    Err(u) => unreadable.push(u),
                }
            }
            // Removed between listing and reading: the next event re-reads the directory.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => unreadable.push(UnreadableOrigin { origin: name, message: format!("cannot read: {e}") }),
        }
    }
    cache.0.retain(|name, _| seen.contains(name));
    Ok((defs, unreadable))
}

pub(crate) fn is_config_file(p: &Path) -> bool {
    let name = p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) && p.is_file()
}

/// Parses one file. A YAML syntax error makes the whole file unreadable (its resources keep
/// their previous versions); a bad document only rejects that document.
pub fn parse_file(origin: &str, text: &str) -> Result<Vec<Definition>, UnreadableOrigin> {
    let mut values = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| UnreadableOrigin { origin: origin.to_string(), message: format!("invalid YAML: {e}") })?;
        values.push(value);
    }
    Ok(values
        .into_iter()
        .enumerate()
        .filter(|(_, v)| !v.is_null())
        .map(|(i, v)| parse_document(origin, i + 1, v))
        .collect())
}

pub(crate) fn parse_document(origin: &str, number: usize, value: serde_yaml::Value) -> Definition {
    let fail = |key: Option<ResourceKey>, field: Option<&str>, message: String| Definition {
        origin: origin.to_string(),
        key,
        parsed: Err(Problem::new(field.map(String::from), message)),
    };
    let serde_yaml::Value::Mapping(map) = value else {
        return fail(None, None, format!("document {number} is not a mapping"));
    };
    let get = |k: &str| map.get(serde_yaml::Value::from(k));
    let Some(kind) = get("kind").and_then(|k| k.as_str()) else {
        return fail(None, Some("kind"), format!("document {number} has no kind"));
    };
    let kind = match kind {
        "Service" => Kind::Service,
        "Route" => Kind::Route,
        "ResiliencePolicy" => Kind::ResiliencePolicy,
        "MeshAuthorization" => Kind::MeshAuthorization,
        "Canary" => Kind::Canary,
        other => {
            return fail(
                None,
                Some("kind"),
                format!(
                    "document {number}: unknown kind {other:?} (expected Service, Route, ResiliencePolicy, MeshAuthorization or Canary)"
                ),
            );
        }
    };
    let meta = get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str());
    let Some(name) = name else {
        return fail(None, Some("metadata.name"), format!("document {number} ({kind}) has no metadata.name"));
    };
    let namespace = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default");
    let key = ResourceKey::new(kind, namespace, name);
    match parse_resource(kind, &map) {
        Ok(resource) => Definition { origin: origin.to_string(), key: Some(key), parsed: Ok(resource) },
        Err(e) => fail(Some(key), Some(&e.field), e.message),
    }
}

fn parse_resource(kind: Kind, map: &serde_yaml::Mapping) -> Result<Resource, FieldError> {
    for (k, _) in map {
        let k = k.as_str().unwrap_or("");
        if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k) {
            return Err(FieldError::new(k, "unknown field"));
        }
    }
    let api_version = map.get("apiVersion").map(|v| v.as_str().unwrap_or("<not a string>"));
    let meta = map.get("metadata").cloned().unwrap_or_default();
    let meta: k8s_meta::ObjectMeta = from_yaml(meta, "metadata")?;
    weir_api::validate::dns_label("metadata.name", meta.name.as_deref().unwrap_or(""))?;
    if let Some(ns) = &meta.namespace {
        weir_api::validate::dns_label("metadata.namespace", ns)?;
    }
    let spec = map.get("spec").cloned().unwrap_or(serde_yaml::Value::Mapping(Default::default()));
    parse_spec(kind, api_version, spec)
}

/// Reads and validates a resource's `spec` (shared with the Kubernetes source, so both judge
/// a definition the same way).
pub fn parse_spec(kind: Kind, api_version: Option<&str>, spec: serde_yaml::Value) -> Result<Resource, FieldError> {
    match kind {
        Kind::Route | Kind::ResiliencePolicy | Kind::MeshAuthorization
            if api_version != Some(weir_api::API_VERSION) =>
        {
            Err(FieldError::new("apiVersion", format!("must be {}", weir_api::API_VERSION)))
        }
        Kind::Route => {
            let spec: RouteSpec = from_yaml(spec, "spec")?;
            spec.validate()?;
            Ok(Resource::Route(spec))
        }
        Kind::ResiliencePolicy => {
            let spec: ResiliencePolicySpec = from_yaml(spec, "spec")?;
            spec.validate()?;
            Ok(Resource::ResiliencePolicy(Box::new(spec)))
        }
        Kind::MeshAuthorization => {
            let spec: MeshAuthorizationSpec = from_yaml(spec, "spec")?;
            spec.validate()?;
            Ok(Resource::MeshAuthorization(spec))
        }
        Kind::Canary => {
            let spec: CanarySpec = from_yaml(spec, "spec")?;
            spec.validate()?;
            Ok(Resource::Canary(Box::new(spec)))
        }
        Kind::Service => {
            if let Some(v) = api_version
                && v != "v1"
                && v != weir_api::API_VERSION
            {
                return Err(FieldError::new("apiVersion", format!("must be v1 or {}", weir_api::API_VERSION)));
            }
            let spec: LocalServiceSpec = from_yaml(spec, "spec")?;
            spec.validate()?;
            Ok(Resource::Service(spec))
        }
    }
}

/// The subset of `ObjectMeta` local mode reads; other fields are rejected so typos surface.
mod k8s_meta {
    use std::collections::BTreeMap;

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    pub struct ObjectMeta {
        pub name: Option<String>,
        pub namespace: Option<String>,
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
        #[serde(default)]
        pub annotations: BTreeMap<String, String>,
    }
}

/// Watches `dir` and sends the time of the first change of every burst, after the burst has
/// been quiet for `settle` (or after `max_delay`). Ends when `tx` closes.
pub fn watch(
    dir: &Path,
    tx: mpsc::Sender<Instant>,
    settle: Duration,
    max_delay: Duration,
) -> notify::Result<WatchGuard> {
    let (raw_tx, mut raw_rx) = mpsc::channel::<Instant>(64);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(ev) if !matches!(ev.kind, notify::EventKind::Access(_)) => {
            // Full means a re-read is already pending; dropping the event loses nothing.
            let _ = raw_tx.try_send(Instant::now());
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "file watch error"),
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    let task = tokio::spawn(async move {
        while let Some(first) = raw_rx.recv().await {
            let deadline = tokio::time::Instant::from_std(first + max_delay);
            loop {
                let settle_at = (tokio::time::Instant::now() + settle).min(deadline);
                match tokio::time::timeout_at(settle_at, raw_rx.recv()).await {
                    Ok(Some(_)) if tokio::time::Instant::now() < deadline => continue,
                    Ok(None) => return,
                    _ => break,
                }
            }
            if tx.send(first).await.is_err() {
                return;
            }
        }
    });
    Ok(WatchGuard { _watcher: watcher, task })
}

/// Keeps the directory watch alive; dropping it stops watching.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(yaml: &str) -> (Option<ResourceKey>, Problem) {
        let defs = parse_file("x.yaml", yaml).unwrap();
        let d = defs.into_iter().next().unwrap();
        (d.key, d.parsed.unwrap_err())
    }

    #[test]
    fn errors_name_resource_and_field() {
        let (key, p) = problem(
            "apiVersion: weir.io/v1alpha1\nkind: Route\nmetadata: {name: r, namespace: shop}\nspec:\n  service: s\n  rules:\n  - backendRefs: [{name: a, weight: -5}]\n",
        );
        assert_eq!(key.unwrap().to_string(), "Route shop/r");
        assert_eq!(p.field.as_deref(), Some("spec.rules[0].backendRefs[0].weight"));
        let (_, p) = problem(
            "apiVersion: weir.io/v1alpha1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: s\n  rulez: []\n",
        );
        assert_eq!(p.field.as_deref(), Some("spec.rulez"));
        assert_eq!(p.message, "unknown field");
        let (_, p) = problem("kind: Service\nmetadata: {name: s}\nspec:\n  endpoints: [{address: nowhere}]\n");
        assert_eq!(p.field.as_deref(), Some("spec.endpoints[0].address"));
        let (key, p) = problem("kind: Gateway\nmetadata: {name: s}\n");
        assert!(key.is_none());
        assert!(p.message.contains("unknown kind"));
    }

    /// The cache re-parses what changed and forgets what is gone; the result is always what
    /// an uncached read gives.
    #[test]
    fn cached_reads_follow_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, t: &str| std::fs::write(dir.path().join(f), t).unwrap();
        let names = |defs: &[Definition]| {
            let mut n: Vec<String> = defs.iter().filter_map(|d| d.key.as_ref().map(|k| format!("{k:?}"))).collect();
            n.sort();
            n
        };
        write("a.yaml", "kind: Service\nmetadata: {name: a}\n");
        write("b.yaml", "kind: Service\nmetadata: {name: b}\n");
        let mut cache = ParseCache::default();
        let check = |cache: &mut ParseCache| {
            let (cached, bad) = read_dir_cached(dir.path(), cache).unwrap();
            let (plain, plain_bad) = read_dir(dir.path()).unwrap();
            assert_eq!((names(&cached), bad.len()), (names(&plain), plain_bad.len()));
            (names(&cached), bad.len())
        };
        assert_eq!(check(&mut cache).0.len(), 2);
        write("b.yaml", "kind: Service\nmetadata: {name: c}\n");
        assert!(check(&mut cache).0.iter().any(|n| n.contains("\"c\"")));
        write("b.yaml", "kind: Service\nmetadata: {name: c\n");
        assert_eq!(check(&mut cache), (names(&read_dir(dir.path()).unwrap().0), 1));
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert_eq!(check(&mut cache).0.len(), 1);
        assert_eq!(cache.0.len(), 1);
    }

    #[test]
    fn syntax_error_makes_file_unreadable() {
        let err = parse_file("x.yaml", "kind: Service\nmetadata: {name: s\n").unwrap_err();
        assert_eq!(err.origin, "x.yaml");
        assert!(err.message.contains("invalid YAML"), "{}", err.message);
    }

    #[test]
    fn multi_document_files_and_default_namespace() {
        let defs = parse_file(
            "x.yaml",
            "kind: Service\nmetadata: {name: a}\n---\n---\nkind: Service\nmetadata: {name: b, namespace: x}\n",
        )
        .unwrap();
        let keys: Vec<String> = defs.iter().map(|d| d.key.as_ref().unwrap().to_string()).collect();
        assert_eq!(keys, ["Service default/a", "Service x/b"]);
    }
}

#[cfg(test)]
mod examples {
    use crate::index::Index;

    /// Every directory under `examples/` is a valid local-mode configuration.
    #[test]
    fn every_example_loads_without_rejections() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut dirs = 0;
        for entry in std::fs::read_dir(&root).unwrap() {
            let dir = entry.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            dirs += 1;
            let (defs, unreadable) = super::read_dir(&dir).unwrap();
            assert!(unreadable.is_empty(), "{}: {unreadable:?}", dir.display());
            assert!(!defs.is_empty(), "{} holds no resources", dir.display());
            let mut index = Index::default();
            index.replace_all(defs, unreadable);
            assert!(index.rejections().is_empty(), "{}: {:?}", dir.display(), index.rejections());
        }
        assert!(dirs >= 2);
    }
}
