//! The Kubernetes source: kube-rs watchers and reflectors over Weir's custom resources,
//! `Service`s, `EndpointSlice`s and `Pod`s. Every change (coalesced) rebuilds the same
//! [`Definition`]s local mode reads from files, so both sources share the index, the
//! translator and every check.
//!
//! - A core `Service` becomes a Weir Service: its TCP ports, its ClusterIPs, and one endpoint
//!   per ready address and port of its EndpointSlices (target port resolved by port name). The
//!   endpoint's pod gives its identity (service account), labels, workload name and whether a
//!   Weir sidecar serves it. Headless Services (no ClusterIP) route to the pod addresses alike.
//! - Weir's custom resources are read as dynamic objects, so one malformed object is rejected
//!   on its own (with a status condition saying why) instead of failing the whole list.
//!
//! Watch failures (410 Gone, disconnects, RBAC denials) are retried with kube's default
//! back-off; the stores keep the last good view meanwhile. What the stores' objects become is
//! [`translate`]'s part.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use weir_api::rt::Drain;
use weir_api::service::{LocalEndpoint, LocalServiceSpec, ServicePort};

use crate::index::{Definition, Kind, Problem, Resource as IndexResource, ResourceKey};

mod translate;

pub use translate::is_meshed;
pub(crate) use translate::{PodIndex, service_spec};
use translate::{ns_name, weir_definition};

/// Name of the sidecar container the injector adds; a pod with it is meshed.
pub const PROXY_CONTAINER: &str = "weir-proxy";
/// Origin of every definition this source produces.
pub const ORIGIN: &str = "kubernetes";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A client from `kubeconfig`, or else kube's inference (`KUBECONFIG`, `~/.kube/config`, then
/// the in-cluster ServiceAccount).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    use anyhow::Context;
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no Kubernetes configuration (in-cluster or kubeconfig)")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Weir's custom resource kinds, with their API resource.
pub fn weir_kinds() -> [(Kind, ApiResource); 4] {
    [
        (Kind::Route, ApiResource::erase::<weir_api::route::Route>(&())),
        (Kind::ResiliencePolicy, ApiResource::erase::<weir_api::resilience::ResiliencePolicy>(&())),
        (Kind::MeshAuthorization, ApiResource::erase::<weir_api::authorization::MeshAuthorization>(&())),
        (Kind::Canary, ApiResource::erase::<weir_api::canary::Canary>(&())),
    ]
}

/// The reflector stores of one kind, one per watched namespace (or one for all).
pub struct Stores<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    stores: Vec<Store<K>>,
    /// Custom resources: set when the API server does not serve the kind (CRD not installed).
    absent: Option<watch::Receiver<bool>>,
}

impl<K: Resource + Clone + 'static> Stores<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub fn objects(&self) -> impl Iterator<Item = Arc<K>> + '_ {
        self.stores.iter().flat_map(|s| s.state())
    }

    /// Waits for the first list of every scope; a custom resource the API server does not
    /// serve counts as listed (empty) so a missing CRD does not hold the whole mesh back.
    async fn wait_until_ready(&self, what: &str) {
        let listed = async {
            for s in &self.stores {
                // Only fails when the writer is gone, i.e. at shutdown.
                let _ = s.wait_until_ready().await;
            }
        };
        match &self.absent {
            None => listed.await,
            Some(absent) => {
                let mut absent = absent.clone();
                tokio::select! {
                    _ = listed => {}
                    _ = absent.wait_for(|a| *a) => {
                        tracing::warn!(kind = %what, "the API server does not serve this kind; serving without it until its CRD is installed");
                    }
                }
            }
        }
    }
}

/// Coalesces store changes: the time of the first change of a burst, handed out once the
/// burst has settled.
#[derive(Default)]
struct Changes {
    first: Mutex<Option<Instant>>,
    notify: Notify,
}

impl Changes {
    fn mark(&self) {
        let mut first = self.first.lock().expect("changes lock");
        first.get_or_insert_with(Instant::now);
        self.notify.notify_one();
    }

    async fn settled(&self, settle: Duration, max_delay: Duration) -> Instant {
        // Cancel-safe: a burst stays pending in `first` until this returns, so a caller that
        // drops the future mid-way (a `select!` taking another branch) finds it again next time.
        let first = loop {
            if let Some(first) = *self.first.lock().expect("changes lock") {
                break first;
            }
            self.notify.notified().await;
        };
        let deadline = tokio::time::Instant::from_std(first + max_delay);
        loop {
            let settle_at = (tokio::time::Instant::now() + settle).min(deadline);
            match tokio::time::timeout_at(settle_at, self.notify.notified()).await {
                Ok(()) if tokio::time::Instant::now() < deadline => continue,
                _ => break,
            }
        }
        self.first.lock().expect("changes lock").take().unwrap_or(first)
    }
}

/// The watched cluster.
pub struct KubeSource {
    pub weir: Vec<(Kind, Stores<DynamicObject>)>,
    pub services: Stores<KubeService>,
    pub slices: Stores<EndpointSlice>,
    pub pods: Stores<Pod>,
    changes: Arc<Changes>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Counts watch failures by kind (for `weir_controller_watch_restarts_total`).
pub type RestartCounter = prometheus::IntCounterVec;

impl KubeSource {
    /// Starts a watcher per kind and namespace (`namespaces` empty: all namespaces).
    pub fn start(client: Client, namespaces: &[String], restarts: RestartCounter, drain: Drain) -> Self {
        let changes = Arc::new(Changes::default());
        let mut tasks = Vec::new();
        let mut namespaces = namespaces.to_vec();
        namespaces.sort();
        namespaces.dedup();
        let scopes: Vec<Option<&str>> =
            if namespaces.is_empty() { vec![None] } else { namespaces.iter().map(|n| Some(n.as_str())).collect() };
        let label = |plural: &str, scope: Option<&str>| format!("{plural} {}", scope.unwrap_or("(all namespaces)"));

        let mut weir = Vec::new();
        for (kind, ar) in weir_kinds() {
            let mut stores = Vec::new();
            let (absent_tx, absent_rx) = watch::channel(false);
            for scope in &scopes {
                let api: Api<DynamicObject> = match scope {
                    Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                    None => Api::all_with(client.clone(), &ar),
                };
                let writer = Writer::new(ar.clone());
                stores.push(writer.as_reader());
                let spec = WatchSpec {
                    trim: |_| {},
                    // A Canary's status carries the rollout the leader drives; others follow it.
                    // Its `weir.io/request` annotation asks the leader for a manual control.
                    fingerprint: if kind == Kind::Canary { fingerprint_with_status } else { fingerprint_custom },
                    label: label(&format!("{}.{}", ar.plural, ar.group), *scope),
                    kind: kind.as_str(),
                    absent: Some(absent_tx.clone()),
                };
                tasks.push(watch(api, writer, spec, &changes, &restarts, &drain));
            }
            weir.push((kind, Stores { stores, absent: Some(absent_rx) }));
        }
        fn typed<K>(
            client: &Client,
            scopes: &[Option<&str>],
            spec: impl Fn(Option<&str>) -> WatchSpec<K>,
            changes: &Arc<Changes>,
            restarts: &RestartCounter,
            drain: &Drain,
            tasks: &mut Vec<tokio::task::JoinHandle<()>>,
        ) -> Stores<K>
        where
            K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
                + Clone
                + DeserializeOwned
                + Debug
                + Send
                + Sync
                + 'static,
            K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
        {
            let mut stores = Vec::new();
            for scope in scopes {
                let writer = Writer::default();
                stores.push(writer.as_reader());
                tasks.push(watch(scoped_api(client, *scope), writer, spec(*scope), changes, restarts, drain));
            }
            Stores { stores, absent: None }
        }
        let services = typed(
            &client,
            &scopes,
            |scope| WatchSpec {
                trim: trim_meta,
                fingerprint: fingerprint_object::<KubeService>,
                label: label("services", scope),
                kind: "Service",
                absent: None,
            },
            &changes,
            &restarts,
            &drain,
            &mut tasks,
        );
        let slices = typed(
            &client,
            &scopes,
            |scope| WatchSpec {
                trim: trim_meta,
                fingerprint: fingerprint_object::<EndpointSlice>,
                label: label("endpointslices.discovery.k8s.io", scope),
                kind: "EndpointSlice",
                absent: None,
            },
            &changes,
            &restarts,
            &drain,
            &mut tasks,
        );
        let pods = typed(
            &client,
            &scopes,
            |scope| WatchSpec {
                trim: trim_pod,
                fingerprint: fingerprint_object::<Pod>,
                label: label("pods", scope),
                kind: "Pod",
                absent: None,
            },
            &changes,
            &restarts,
            &drain,
            &mut tasks,
        );
        KubeSource { weir, services, slices, pods, changes, tasks }
    }

    /// Waits until every watch has listed once (so no sidecar sees a half-loaded cluster).
    pub async fn wait_until_ready(&self) {
        for (kind, s) in &self.weir {
            s.wait_until_ready(kind.as_str()).await;
        }
        self.services.wait_until_ready("Service").await;
        self.slices.wait_until_ready("EndpointSlice").await;
        self.pods.wait_until_ready("Pod").await;
    }

    /// Waits for the next burst of changes and returns when its first change happened: the
    /// burst ends after `settle` without changes, or `max_delay` after it began.
    pub async fn changed(&self, settle: Duration, max_delay: Duration) -> Instant {
        self.changes.settled(settle, max_delay).await
    }

    /// The rollout status written to each Canary (by the leading replica), keyed `ns/name`.
    pub fn canary_statuses(&self) -> BTreeMap<String, weir_api::canary::CanaryStatus> {
        let Some((_, stores)) = self.weir.iter().find(|(k, _)| *k == Kind::Canary) else { return BTreeMap::new() };
        stores
            .objects()
            .filter_map(|o| {
                let status = serde_json::from_value(o.data.get("status")?.clone()).ok()?;
                Some((format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()), status))
            })
            .collect()
    }

    /// The manual controls asked on each Canary (its `weir.io/request` annotation), keyed
    /// `ns/name`.
    pub fn canary_requests(&self) -> BTreeMap<String, String> {
        let Some((_, stores)) = self.weir.iter().find(|(k, _)| *k == Kind::Canary) else { return BTreeMap::new() };
        stores
            .objects()
            .filter_map(|o| {
                let request = o.annotations().get(weir_api::canary::REQUEST_ANNOTATION)?.clone();
                Some((format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()), request))
            })
            .collect()
    }

    /// Everything in the stores, as definitions for the index, and the generation of each
    /// custom resource read (what its status conditions will refer to).
    pub fn definitions(&self) -> (Vec<Definition>, HashMap<ResourceKey, Option<i64>>) {
        let mut defs = Vec::new();
        let mut generations = HashMap::new();
        for (kind, stores) in &self.weir {
            for obj in stores.objects() {
                let def = weir_definition(*kind, &obj);
                if let Some(key) = &def.key {
                    generations.insert(key.clone(), obj.metadata.generation);
                }
                defs.push(def);
            }
        }
        // Indexed by borrowed keys: this runs on every change, over every pod.
        let pod_list: Vec<Arc<Pod>> = self.pods.objects().collect();
        let pods: PodIndex = pod_list.iter().map(|p| (ns_name(&p.metadata), p.as_ref())).collect();
        let slice_list: Vec<Arc<EndpointSlice>> = self.slices.objects().collect();
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for s in &slice_list {
            if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
                slices.entry((s.metadata.namespace.as_deref().unwrap_or(""), svc.as_str())).or_default().push(s);
            }
        }
        for svc in self.services.objects() {
            let own = slices.get(&ns_name(&svc.metadata)).map(Vec::as_slice).unwrap_or_default();
            let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
            if let Some(spec) = service_spec(&svc, own, &pods) {
                defs.push(Definition {
                    origin: ORIGIN.into(),
                    key: Some(ResourceKey::new(Kind::Service, ns, name)),
                    parsed: spec
                        .validate()
                        .map(|()| IndexResource::Service(spec))
                        .map_err(|e| Problem::new(Some(e.field), e.message)),
                });
            }
        }
        (defs, generations)
    }
}

fn scoped_api<K>(client: &Client, scope: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// How one kind is watched.
struct WatchSpec<K> {
    /// Drops what the mesh never reads before the object is stored.
    trim: fn(&mut K),
    /// A hash of what the mesh reads: an event that leaves it unchanged (a pod's status, a
    /// resource's status written by a controller) triggers no rebuild.
    fingerprint: fn(&K) -> u64,
    /// For logs: the resource and scope.
    label: String,
    /// For metrics: the kind.
    kind: &'static str,
    /// Set when the initial list finds no such resource (a CRD not installed).
    absent: Option<watch::Sender<bool>>,
}

fn hash_json(v: &serde_json::Value) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(v.to_string().as_bytes());
    h.finish()
}

/// Everything but `metadata.resourceVersion` and `status`.
fn fingerprint_object<K: serde::Serialize>(o: &K) -> u64 {
    let mut v = serde_json::to_value(o).unwrap_or_default();
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        m.remove("resourceVersion");
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    hash_json(&v)
}

/// A custom resource's spec and generation.
fn fingerprint_custom(o: &DynamicObject) -> u64 {
    hash_json(&serde_json::json!([o.data.get("spec"), o.metadata.generation]))
}

/// A custom resource's spec, generation, status and manual-control request (Canaries).
fn fingerprint_with_status(o: &DynamicObject) -> u64 {
    let request = o.annotations().get(weir_api::canary::REQUEST_ANNOTATION);
    hash_json(&serde_json::json!([o.data.get("spec"), o.metadata.generation, o.data.get("status"), request]))
}

/// Runs one watcher into its store until drained, marking every change that matters.
fn watch<K>(
    api: Api<K>,
    writer: Writer<K>,
    spec: WatchSpec<K>,
    changes: &Arc<Changes>,
    restarts: &RestartCounter,
    drain: &Drain,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let changes = changes.clone();
    let restarts = restarts.with_label_values(&[spec.kind]);
    let drain = drain.clone();
    let WatchSpec { trim, fingerprint, label, absent, .. } = spec;
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(move |o: &mut K| {
                o.managed_fields_mut().clear();
                trim(o);
            })
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        let mut drained = std::pin::pin!(drain.signaled());
        // Log a failing watch once per outage, not once per retry.
        let mut failing = false;
        let key = |o: &K| (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default());
        let mut seen: HashMap<(String, String), u64> = HashMap::new();
        let mut relisted: HashMap<(String, String), u64> = HashMap::new();
        loop {
            let item = tokio::select! {
                _ = &mut drained => break,
                item = stream.next() => item,
            };
            match item {
                None => break,
                Some(Ok(event)) => {
                    if failing {
                        tracing::info!(watch = %label, "watch recovered");
                        failing = false;
                    }
                    match event {
                        watcher::Event::Apply(o) => {
                            let fp = fingerprint(&o);
                            if seen.insert(key(&o), fp) != Some(fp) {
                                changes.mark();
                            }
                        }
                        watcher::Event::Delete(o) => {
                            seen.remove(&key(&o));
                            changes.mark();
                        }
                        watcher::Event::Init => relisted.clear(),
                        watcher::Event::InitApply(o) => {
                            relisted.insert(key(&o), fingerprint(&o));
                        }
                        watcher::Event::InitDone => {
                            // A relist that found what the watch had already delivered is no change.
                            if relisted != seen {
                                changes.mark();
                            }
                            seen = std::mem::take(&mut relisted);
                        }
                    }
                }
                Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                    // The history to resume from was compacted away (routine after a broken
                    // watch): the watcher relists at once. Not a failure of the watch.
                    restarts.inc();
                    tracing::info!(watch = %label, reason = %status.message, "watch history expired; relisting");
                }
                Some(Err(e)) => {
                    restarts.inc();
                    let missing = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                    if let (true, Some(absent)) = (missing, &absent) {
                        absent.send_replace(true);
                    }
                    if !failing {
                        if missing {
                            tracing::warn!(watch = %label, error = %e, "resource not served by the API server (are Weir's CRDs installed? kubectl apply -f charts/weir/crds/); retrying with back-off");
                        } else {
                            tracing::warn!(watch = %label, error = %e, "watch failed; retrying with back-off and serving the last good view");
                        }
                        failing = true;
                    } else {
                        tracing::debug!(watch = %label, error = %e, "watch still failing");
                    }
                }
            }
        }
    })
}

/// The annotation declaring a Service's (or, on a pod, the sidecar's inbound) opaque ports.
pub const OPAQUE_PORTS: &str = "weir.io/opaque-ports";

/// Keeps only Weir's annotations (a Service's `weir.io/opaque-ports`) and drops owner
/// references: what the mesh reads of Services and EndpointSlices.
fn trim_meta<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.annotations = meta
        .annotations
        .take()
        .map(|a| a.into_iter().filter(|(k, _)| k.starts_with("weir.io/")).collect::<BTreeMap<_, _>>())
        .filter(|a| !a.is_empty());
    meta.owner_references = None;
}

/// Pods are the bulk of a cluster: keep only what endpoints need.
fn trim_pod(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    let annotations = meta.annotations.map(|a| a.into_iter().filter(|(k, _)| k.starts_with("weir.io/")).collect());
    let names = |cs: &[Container]| -> Vec<Container> {
        cs.iter().map(|c| Container { name: c.name.clone(), ..Default::default() }).collect()
    };
    let spec = pod.spec.take().map(|s| PodSpec {
        service_account_name: s.service_account_name,
        containers: names(&s.containers),
        init_containers: s.init_containers.as_deref().map(names),
        ..Default::default()
    });
    *pod = Pod {
        metadata: ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            labels: meta.labels,
            annotations,
            resource_version: meta.resource_version,
            uid: meta.uid,
            ..Default::default()
        },
        spec,
        status: None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, sa: &str, meshed: bool) -> Arc<Pod> {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"},
                          "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "weir.io/inject": "enabled"}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "web:1"}],
                     "initContainers": if meshed { serde_json::json!([{"name": PROXY_CONTAINER, "image": "weir-proxy", "restartPolicy": "Always"}]) } else { serde_json::json!([]) }},
            "status": {"podIP": "10.0.0.1"}
        }))
        .unwrap();
        trim_pod(&mut p);
        Arc::new(p)
    }

    fn by_ref(pods: &HashMap<(String, String), Arc<Pod>>) -> PodIndex<'_> {
        pods.iter().map(|((n, p), pod)| ((n.as_str(), p.as_str()), pod.as_ref())).collect()
    }

    fn refs(slices: &[Arc<EndpointSlice>]) -> Vec<&EndpointSlice> {
        slices.iter().map(|s| s.as_ref()).collect()
    }

    fn service(json: serde_json::Value) -> KubeService {
        serde_json::from_value(json).unwrap()
    }

    fn slice(json: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    #[test]
    fn trimmed_pod_keeps_what_endpoints_need() {
        let p = pod("web-1", "web", true);
        assert!(is_meshed(&p));
        assert_eq!(p.annotations().len(), 1);
        assert_eq!(p.spec.as_ref().unwrap().service_account_name.as_deref(), Some("web"));
        assert!(p.spec.as_ref().unwrap().containers[0].image.is_none());
        assert!(p.status.is_none());
        assert!(!is_meshed(&pod("web-2", "web", false)));
    }

    #[test]
    fn opaque_ports_from_app_protocol_and_the_annotation() {
        let svc = |annotations: serde_json::Value| {
            let mut svc = service(serde_json::json!({
                "metadata": {"name": "db", "namespace": "shop", "annotations": annotations},
                "spec": {"clusterIP": "10.96.0.20",
                         "ports": [{"name": "pg", "port": 5432, "appProtocol": "tcp"},
                                   {"name": "redis", "port": 6379},
                                   {"name": "http", "port": 80, "appProtocol": "http"}]}
            }));
            trim_meta(&mut svc);
            svc
        };
        let opaque = |svc: &KubeService| -> Vec<u16> {
            let spec = service_spec(svc, &[], &HashMap::new()).unwrap();
            spec.ports.iter().filter(|p| p.is_opaque()).map(|p| p.port).collect()
        };
        let plain = svc(serde_json::json!({"kubectl.kubernetes.io/last-applied-configuration": "{}"}));
        assert_eq!(opaque(&plain), [5432]);
        assert!(plain.metadata.annotations.is_none(), "only weir.io annotations are kept");
        assert_eq!(opaque(&svc(serde_json::json!({OPAQUE_PORTS: "6379"}))), [5432, 6379]);
        // A malformed list is ignored (logged), appProtocol still applies.
        assert_eq!(opaque(&svc(serde_json::json!({OPAQUE_PORTS: "redis"}))), [5432]);
    }

    #[test]
    fn endpoints_from_slices_by_port_name_and_readiness() {
        let svc = service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "web"},
                               {"name": "admin", "port": 9000},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }));
        let slices = vec![
            slice(serde_json::json!({
                "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "admin", "port": 9001}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "z1",
                     "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true},
                     "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "shop"}},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false}},
                    {"addresses": ["10.0.0.4"]}
                ]
            })),
            // The same endpoint in a second slice (as during slice migration) counts once.
            slice(serde_json::json!({
                "metadata": {"name": "web-def", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}}]
            })),
        ];
        let pods: HashMap<_, _> = [("web-1", true), ("web-2", true)]
            .into_iter()
            .map(|(n, m)| (("shop".to_string(), n.to_string()), pod(n, "web", m)))
            .collect();
        let spec = service_spec(&svc, &refs(&slices), &by_ref(&pods)).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.cluster_ips, ["10.96.0.10", "fd00::10"]);
        assert_eq!(spec.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80, 9000]);
        let eps: Vec<(String, Option<u16>)> = spec.endpoints.iter().map(|e| (e.address.clone(), e.port)).collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1:8080".to_string(), Some(80)),
                ("10.0.0.1:9001".to_string(), Some(9000)),
                ("10.0.0.4:8080".to_string(), Some(80)),
                ("10.0.0.4:9001".to_string(), Some(9000)),
            ]
        );
        let first = &spec.endpoints[0];
        assert!(first.meshed);
        assert_eq!(first.service_account.as_deref(), Some("web"));
        assert_eq!(first.workload.as_deref(), Some("web-1"));
        assert_eq!(first.labels.get(ZONE_LABEL).map(String::as_str), Some("z1"));
        assert_eq!(first.labels.get("app").map(String::as_str), Some("web"));
        // No pod behind it: not meshed, no identity.
        assert!(!spec.endpoints[2].meshed && spec.endpoints[2].service_account.is_none());
    }

    #[tokio::test]
    async fn a_burst_survives_a_cancelled_wait() {
        let changes = Changes::default();
        changes.mark();
        let settle = Duration::from_millis(50);
        // Dropped mid-settle, as a select! taking another branch would.
        assert!(
            tokio::time::timeout(Duration::from_millis(5), changes.settled(settle, Duration::from_secs(1)))
                .await
                .is_err()
        );
        let first = tokio::time::timeout(Duration::from_secs(5), changes.settled(settle, Duration::from_secs(1)))
            .await
            .expect("the pending burst is still delivered");
        assert!(first.elapsed() >= settle);
        assert!(changes.first.lock().unwrap().is_none());
    }

    #[test]
    fn unknown_pods_duplicates_and_dual_stack() {
        let svc = service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIPs": ["10.96.0.10", "fd00::10"], "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80}]}
        }));
        let pods: HashMap<_, _> = [(("shop".to_string(), "web-1".to_string()), pod("web-1", "web", true))].into();
        let slices = vec![
            // A terminating copy first, then the ready one: the ready one wins.
            slice(serde_json::json!({
                "metadata": {"name": "a", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4", "ports": [{"port": 8080}],
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true},
                               "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}}]
            })),
            slice(serde_json::json!({
                "metadata": {"name": "b", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4", "ports": [{"port": 8080}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true},
                     "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
                    // Its pod is not known yet: left out rather than routed without identity.
                    {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "name": "web-9", "namespace": "shop"}}
                ]
            })),
            // The secondary family's slice is ignored.
            slice(serde_json::json!({
                "metadata": {"name": "c", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv6", "ports": [{"port": 8080}],
                "endpoints": [{"addresses": ["fd00::1"], "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}}]
            })),
        ];
        let spec = service_spec(&svc, &refs(&slices), &by_ref(&pods)).unwrap();
        let eps: Vec<&str> = spec.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(eps, ["10.0.0.1:8080"]);
        assert!(spec.endpoints[0].meshed);
        // Slice order does not matter.
        let reversed: Vec<_> = slices.iter().rev().cloned().collect();
        assert_eq!(service_spec(&svc, &refs(&reversed), &by_ref(&pods)).unwrap(), spec);
        // A pod recreated under the same name (another UID) is not the endpoint's.
        let mut moved = slices[1].as_ref().clone();
        moved.endpoints.as_mut().unwrap()[0].target_ref.as_mut().unwrap().uid = Some("other".into());
        let mut with_uid = pods.clone();
        let mut p = with_uid[&("shop".to_string(), "web-1".to_string())].as_ref().clone();
        p.metadata.uid = Some("current".into());
        with_uid.insert(("shop".into(), "web-1".into()), Arc::new(p));
        let spec = service_spec(&svc, &[&moved], &by_ref(&with_uid)).unwrap();
        assert!(spec.endpoints.is_empty(), "{:?}", spec.endpoints);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let svc = service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }));
        let slices = vec![slice(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}]
        }))];
        let spec = service_spec(&svc, &refs(&slices), &HashMap::new()).unwrap();
        assert!(spec.cluster_ips.is_empty(), "headless");
        assert_eq!(spec.endpoints.len(), 1);
        assert_eq!(spec.endpoints[0].address, "10.0.0.2:8080");
        let external = service(serde_json::json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }));
        assert!(service_spec(&external, &[], &HashMap::new()).is_none());
    }

    #[test]
    fn malformed_custom_resource_is_rejected_alone() {
        let ar = ApiResource::erase::<weir_api::route::Route>(&());
        let mut obj = DynamicObject::new("r", &ar).within("shop");
        obj.data = serde_json::json!({"spec": {"service": "web", "rules": [{"backendRefs": [{"name": "web", "weight": -1}]}]}});
        let def = weir_definition(Kind::Route, &obj);
        let p = def.parsed.unwrap_err();
        assert_eq!(def.key.unwrap().to_string(), "Route shop/r");
        assert_eq!(p.field.as_deref(), Some("spec.rules[0].backendRefs[0].weight"));
        obj.data = serde_json::json!({"spec": {"service": "web", "rules": [{"backendRefs": [{"name": "web"}]}]}});
        assert!(weir_definition(Kind::Route, &obj).parsed.is_ok());
    }
}
