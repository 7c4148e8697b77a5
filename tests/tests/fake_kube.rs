//! The fake Kubernetes API server, exercised through kube-rs itself (client, watcher, reflector)
//! so we know the real client accepts what it serves.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::Method;
use k8s_openapi::api::core::v1::Service;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
    WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::time::timeout;
use weir_tests::fake_kube::FakeKube;

const SERVICES: &str = "api/v1/services";
const ROUTES: &str = "apis/weir.io/v1alpha1/routes";
const LIMIT: Duration = Duration::from_secs(30);

async fn client(kube: &FakeKube, dir: &Path) -> kube::Client {
    let path = kube.kubeconfig(dir);
    let kc = Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    assert_eq!(cfg.default_namespace, "default");
    kube::Client::try_from(cfg).unwrap()
}

/// Polls `check` until it holds; panics after 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A watcher backoff short enough for tests.
struct Quick;

impl Iterator for Quick {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }
}

impl Backoff for Quick {
    fn reset(&mut self) {}
}

/// Runs a reflector over `api` in the background; returns its store and the watcher's errors.
fn reflect<K>(api: Api<K>, cfg: watcher::Config) -> (Store<K>, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + std::fmt::Debug + k8s_openapi::serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    reflect_with(api, cfg, Default::default())
}

fn reflect_with<K>(
    api: Api<K>,
    cfg: watcher::Config,
    dt: K::DynamicType,
) -> (Store<K>, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + std::fmt::Debug + k8s_openapi::serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dt);
    let reader = writer.as_reader();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let errs = errors.clone();
    let task = tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, cfg)).backoff(Quick);
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                errs.lock().unwrap().push(format!("{e:?}"));
            }
        }
    });
    (reader, errors, task)
}

fn names<K: Resource + Clone>(store: &Store<K>) -> Vec<String>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut v: Vec<String> =
        store.state().iter().map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())).collect();
    v.sort();
    v
}

fn service(ns: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": ns, "labels": { "app": app } },
        "spec": { "ports": [{ "port": 80 }] },
    })
}

fn route(ns: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "weir.io/v1alpha1",
        "kind": "Route",
        "metadata": { "name": name, "namespace": ns, "labels": { "app": app } },
        "spec": { "service": name, "rules": [] },
    })
}

fn query_param(path_and_query: &str, key: &str) -> Option<String> {
    let (_, q) = path_and_query.split_once('?')?;
    q.split('&').find_map(|p| p.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

fn is_watch(pq: &str) -> bool {
    query_param(pq, "watch").is_some_and(|w| w == "true" || w == "1")
}

/// Requests since `from` on a collection path: `(lists, watches' resourceVersions)`.
fn since(kube: &FakeKube, from: usize, path: &str) -> (usize, Vec<String>) {
    let log = kube.request_log();
    let mine: Vec<&String> = log[from..]
        .iter()
        .filter(|(m, pq)| *m == Method::GET && pq.split('?').next() == Some(path))
        .map(|(_, pq)| pq)
        .collect();
    let lists = mine.iter().filter(|pq| !is_watch(pq)).count();
    let watches = mine.iter().filter(|pq| is_watch(pq)).filter_map(|pq| query_param(pq, "resourceVersion")).collect();
    (lists, watches)
}

fn api_code(e: &kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("not an API error: {other:?}"),
    }
}

#[tokio::test]
async fn crud_through_the_kube_client() {
    timeout(LIMIT, async {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let api: Api<Service> = Api::default_namespaced(client(&kube, dir.path()).await);
        let pp = PostParams::default();

        let svc: Service = serde_json::from_value(service("default", "web", "web")).unwrap();
        let created = api.create(&pp, &svc).await.unwrap();
        let meta = &created.metadata;
        assert!(meta.uid.as_deref().is_some_and(|u| !u.is_empty()));
        assert!(meta.creation_timestamp.is_some());
        assert_eq!(meta.generation, Some(1));
        assert_eq!(meta.resource_version.as_deref(), Some(kube.resource_version().to_string().as_str()));
        assert_eq!(kube.get(SERVICES, "default", "web").unwrap()["metadata"]["uid"], json!(meta.uid));

        let e = api.create(&pp, &svc).await.unwrap_err();
        assert_eq!(api_code(&e), (409, "AlreadyExists".into()));
        let e = api.get("nope").await.unwrap_err();
        assert_eq!(api_code(&e), (404, "NotFound".into()));

        let got = api.get("web").await.unwrap();
        assert_eq!(got.metadata.resource_version, created.metadata.resource_version);

        kube.create(SERVICES, service("default", "api", "api"));
        kube.create(SERVICES, service("other", "web", "web"));
        let all = api.list(&ListParams::default()).await.unwrap();
        assert_eq!(all.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["api", "web"]);
        assert_eq!(all.metadata.resource_version, Some(kube.resource_version().to_string()));
        let web = api.list(&ListParams::default().labels("app=web")).await.unwrap();
        assert_eq!(web.items.len(), 1);
        let not_web = api.list(&ListParams::default().labels("app!=web,app")).await.unwrap();
        assert_eq!(not_web.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["api"]);
        let by_name = api.list(&ListParams::default().fields("metadata.name=api")).await.unwrap();
        assert_eq!(by_name.items.len(), 1);
        let everywhere: Api<Service> = Api::all(api.clone().into_client());
        assert_eq!(everywhere.list(&ListParams::default().labels("app=web")).await.unwrap().items.len(), 2);

        // Replace: a spec change bumps generation; a stale resourceVersion is a Conflict.
        let mut changed = got.clone();
        changed.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 8080;
        let replaced = api.replace("web", &pp, &changed).await.unwrap();
        assert_eq!(replaced.metadata.generation, Some(2));
        assert_ne!(replaced.metadata.resource_version, got.metadata.resource_version);
        let e = api.replace("web", &pp, &changed).await.unwrap_err();
        assert_eq!(api_code(&e), (409, "Conflict".into()));

        // Status: a merge patch on /status changes only status, not generation.
        let patch = json!({
            "spec": { "ports": [{ "port": 1 }] },
            "status": { "loadBalancer": { "ingress": [{ "ip": "10.0.0.1" }] } },
        });
        let st = api.patch_status("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        assert_eq!(st.metadata.generation, Some(2));
        assert_eq!(st.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 8080);
        let ingress = st.status.as_ref().unwrap().load_balancer.as_ref().unwrap().ingress.as_ref().unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("10.0.0.1"));

        // A merge patch on the main resource: labels don't bump generation, status is ignored.
        let labels = json!({ "metadata": { "labels": { "tier": "front" } }, "status": null });
        let p = api.patch("web", &PatchParams::default(), &Patch::Merge(&labels)).await.unwrap();
        assert_eq!(p.labels().get("tier").map(String::as_str), Some("front"));
        assert_eq!(p.metadata.generation, Some(2));
        assert!(p.status.unwrap().load_balancer.unwrap().ingress.is_some());
        // A patch carrying a stale resourceVersion is a Conflict too.
        let stale = json!({ "metadata": { "resourceVersion": got.metadata.resource_version } });
        let e = api.patch("web", &PatchParams::default(), &Patch::Merge(&stale)).await.unwrap_err();
        assert_eq!(api_code(&e), (409, "Conflict".into()));
        // Strategic merge is treated as a merge patch.
        let spec = json!({ "spec": { "ports": [{ "port": 9090 }] } });
        let p = api.patch("web", &PatchParams::default(), &Patch::Strategic(&spec)).await.unwrap();
        assert_eq!(p.metadata.generation, Some(3));
        // A no-op write makes no new version.
        let same = api.patch("web", &PatchParams::default(), &Patch::Merge(&spec)).await.unwrap();
        assert_eq!(same.metadata.resource_version, p.metadata.resource_version);

        // Server-side apply creates, then updates.
        let ssa = PatchParams::apply("fake-kube-test");
        let applied = api.patch("applied", &ssa, &Patch::Apply(service("default", "applied", "x"))).await.unwrap();
        assert_eq!(applied.metadata.generation, Some(1));
        let again = api.patch("applied", &ssa, &Patch::Apply(service("default", "applied", "y"))).await.unwrap();
        assert_eq!(again.labels()["app"], "y");
        assert_eq!(again.metadata.uid, applied.metadata.uid);

        // Delete preconditions are checked.
        let dp = DeleteParams {
            preconditions: Some(Preconditions { resource_version: Some("1".into()), uid: None }),
            ..Default::default()
        };
        assert_eq!(api_code(&api.delete("web", &dp).await.unwrap_err()), (409, "Conflict".into()));

        // Delete returns the last state; the object is gone.
        let deleted = api.delete("web", &DeleteParams::default()).await.unwrap();
        let deleted = deleted.left().expect("the deleted object");
        assert_eq!(deleted.labels()["tier"], "front");
        assert!(kube.get(SERVICES, "default", "web").is_none());
        assert_eq!(api_code(&api.get("web").await.unwrap_err()), (404, "NotFound".into()));
        assert_eq!(api_code(&api.delete("web", &DeleteParams::default()).await.unwrap_err()).0, 404);

        assert_eq!(kube.requests(&Method::POST, "/api/v1/namespaces/default/services"), 2);
        assert!(kube.requests(&Method::PATCH, "/api/v1/namespaces/default/services/web/status") == 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn reflector_resumes_after_a_break_and_relists_after_compaction() {
    timeout(LIMIT, async {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let api: Api<Service> = Api::all(client(&kube, dir.path()).await);
        kube.create(SERVICES, service("ns1", "a", "a"));
        let (store, errors, task) = reflect(api, watcher::Config::default());

        eventually("a listed", || names(&store) == ["ns1/a"]).await;
        kube.create(SERVICES, service("ns2", "b", "b"));
        eventually("b watched", || names(&store) == ["ns1/a", "ns2/b"]).await;
        kube.delete(SERVICES, "ns1", "a").unwrap();
        eventually("a deleted", || names(&store) == ["ns2/b"]).await;
        kube.patch(SERVICES, "ns2", "b", json!({ "metadata": { "labels": { "v": "2" } } }));
        let b = ObjectRef::new("b").within("ns2");
        eventually("b modified", || store.get(&b).is_some_and(|s| s.labels().get("v").is_some())).await;
        assert_eq!(kube.open_watches(), 1);

        // A broken watch resumes from the last version seen, with no relist.
        let from = kube.request_log().len();
        let last = kube.resource_version().to_string();
        kube.break_watches();
        kube.create(SERVICES, service("ns1", "c", "c"));
        eventually("c after the break", || names(&store) == ["ns1/c", "ns2/b"]).await;
        let (lists, watches) = since(&kube, from, "/api/v1/services");
        assert_eq!(lists, 0, "no relist after a clean break: {:?}", kube.request_log());
        assert_eq!(watches.first(), Some(&last), "resumed from the last version");
        assert!(errors.lock().unwrap().is_empty(), "{:?}", errors.lock().unwrap());

        // After compaction, resuming gets 410 Expired: the watcher relists and converges.
        let from = kube.request_log().len();
        kube.compact();
        kube.break_watches();
        kube.delete(SERVICES, "ns2", "b").unwrap();
        kube.create(SERVICES, service("ns2", "d", "d"));
        kube.patch(SERVICES, "ns1", "c", json!({ "spec": { "ports": [{ "port": 81 }] } }));
        let c = ObjectRef::new("c").within("ns1");
        eventually("converged after the relist", || {
            names(&store) == ["ns1/c", "ns2/d"] && store.get(&c).is_some_and(|s| s.metadata.generation == Some(2))
        })
        .await;
        let (lists, watches) = since(&kube, from, "/api/v1/services");
        assert_eq!(lists, 1, "one relist: {:?}", &kube.request_log()[from..]);
        assert!(watches.len() >= 2, "the expired watch and the one after the relist: {watches:?}");
        let errs = errors.lock().unwrap().clone();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("410") && errs[0].contains("Expired"), "{errs:?}");
        let want: Vec<String> = kube
            .list(SERVICES)
            .iter()
            .map(|o| {
                format!("{}/{}", o["metadata"]["namespace"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap())
            })
            .collect();
        assert_eq!(names(&store), want);
        assert_eq!(store.state().len(), 2, "no duplicates");
        task.abort();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn dynamic_route_watcher() {
    timeout(LIMIT, async {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let client = client(&kube, dir.path()).await;
        let ar = ApiResource {
            group: "weir.io".into(),
            version: "v1alpha1".into(),
            api_version: "weir.io/v1alpha1".into(),
            kind: "Route".into(),
            plural: "routes".into(),
        };
        kube.create(ROUTES, route("test", "web", "web"));
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let (store, errors, task) = reflect_with(all, watcher::Config::default(), ar.clone());
        // A second watcher with a label selector.
        let (selected, _, task2) = reflect_with(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            watcher::Config::default().labels("app=web"),
            ar.clone(),
        );
        eventually("the route listed", || names(&store) == ["test/web"] && names(&selected) == ["test/web"]).await;

        // Create through the client too.
        let test: Api<DynamicObject> = Api::namespaced_with(client.clone(), "test", &ar);
        let obj: DynamicObject = serde_json::from_value(route("test", "api", "api")).unwrap();
        let created = test.create(&PostParams::default(), &obj).await.unwrap();
        assert_eq!(created.types.as_ref().unwrap().kind, "Route");
        eventually("api watched", || names(&store) == ["test/api", "test/web"]).await;
        assert_eq!(names(&selected), ["test/web"]);

        // Relabelling moves objects in and out of the selected watch (ADDED / DELETED).
        kube.patch(ROUTES, "test", "api", json!({ "metadata": { "labels": { "app": "web" } } }));
        kube.patch(ROUTES, "test", "web", json!({ "metadata": { "labels": { "app": "old" } } }));
        eventually("selection follows labels", || names(&selected) == ["test/api"]).await;

        // Break and compaction, as for core types.
        let from = kube.request_log().len();
        kube.break_watches();
        kube.create(ROUTES, route("test", "third", "web"));
        eventually("third after the break", || names(&store).len() == 3 && names(&selected).len() == 2).await;
        let (lists, _) = since(&kube, from, "/apis/weir.io/v1alpha1/routes");
        assert_eq!(lists, 0);
        let from = kube.request_log().len();
        kube.compact();
        kube.break_watches();
        kube.delete(ROUTES, "test", "web").unwrap();
        test.delete("third", &DeleteParams::default()).await.unwrap();
        eventually("converged", || names(&store) == ["test/api"] && names(&selected) == ["test/api"]).await;
        let (lists, _) = since(&kube, from, "/apis/weir.io/v1alpha1/routes");
        assert_eq!(lists, 2, "both watchers relisted");
        assert!(errors.lock().unwrap().iter().all(|e| e.contains("410")));
        let route = store.get(&ObjectRef::new_with("api", ar.clone()).within("test")).unwrap();
        assert_eq!(route.data["spec"]["service"], "api");
        task.abort();
        task2.abort();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn forbidden_then_allowed() {
    timeout(LIMIT, async {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let client = client(&kube, dir.path()).await;
        let api: Api<Service> = Api::default_namespaced(client.clone());
        kube.create(SERVICES, service("default", "x", "x"));
        let (store, errors, task) = reflect(api.clone(), watcher::Config::default());
        eventually("x listed", || names(&store) == ["default/x"]).await;

        kube.set_forbidden(SERVICES, true);
        let e = api.list(&ListParams::default()).await.unwrap_err();
        assert_eq!(api_code(&e), (403, "Forbidden".into()));
        kube.break_watches();
        kube.create(SERVICES, service("default", "y", "y"));
        eventually("a watch error", || errors.lock().unwrap().iter().any(|e| e.contains("403"))).await;
        assert_eq!(names(&store), ["default/x"]);

        kube.set_forbidden(SERVICES, false);
        eventually("recovered", || names(&store) == ["default/x", "default/y"]).await;
        let errs = errors.lock().unwrap().clone();
        assert!(errs.iter().all(|e| e.contains("WatchStartFailed") && e.contains("Forbidden")), "{errs:?}");

        // A watcher that starts while forbidden fails its list, then recovers.
        kube.set_forbidden(SERVICES, true);
        let (late, late_errors, task2) = reflect(api.clone(), watcher::Config::default());
        eventually("a list error", || late_errors.lock().unwrap().iter().any(|e| e.contains("InitialListFailed")))
            .await;
        kube.set_forbidden(SERVICES, false);
        eventually("late watcher listed", || names(&late) == ["default/x", "default/y"]).await;
        task.abort();
        task2.abort();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn raw_watch_expiry_bookmarks_and_streaming_lists() {
    timeout(LIMIT, async {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let api: Api<Service> = Api::default_namespaced(client(&kube, dir.path()).await);
        kube.create(SERVICES, service("default", "a", "a"));
        let old = kube.resource_version().to_string();
        kube.create(SERVICES, service("default", "b", "b"));

        // From a version in history: exactly the later events, then bookmarks while idle.
        let mut s = api.watch(&WatchParams::default(), &old).await.unwrap().boxed();
        match s.next().await.unwrap().unwrap() {
            WatchEvent::Added(svc) => assert_eq!(svc.name_any(), "b"),
            other => panic!("{other:?}"),
        }
        let t = Instant::now();
        match s.next().await.unwrap().unwrap() {
            WatchEvent::Bookmark(bm) => assert_eq!(bm.metadata.resource_version, kube.resource_version().to_string()),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(s);

        // From a compacted version: one ERROR 410 Expired, then the stream ends.
        kube.compact();
        let mut s = api.watch(&WatchParams::default(), &old).await.unwrap().boxed();
        match s.next().await.unwrap().unwrap() {
            WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
            other => panic!("{other:?}"),
        }
        assert!(s.next().await.is_none());

        // timeoutSeconds ends the stream.
        let rv = kube.resource_version().to_string();
        let mut s = api.watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv).await.unwrap().boxed();
        assert!(s.next().await.is_none());

        // Streaming lists (sendInitialEvents): ADDED for each object, then the end-marker bookmark.
        let (store, errors, task) = reflect(api.clone(), watcher::Config::default().streaming_lists());
        eventually("streamed", || names(&store) == ["default/a", "default/b"]).await;
        assert!(errors.lock().unwrap().is_empty());
        assert!(kube.request_log().iter().any(|(_, pq)| pq.contains("sendInitialEvents=true")));
        task.abort();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stuck_watcher_does_not_block_writers() {
    timeout(LIMIT, async {
        use tokio::io::AsyncWriteExt;
        let kube = FakeKube::start().await;
        // A client that starts a watch and never reads.
        let mut conn = tokio::net::TcpStream::connect(kube.addr()).await.unwrap();
        let req = "GET /api/v1/services?watch=true&resourceVersion=0 HTTP/1.1\r\nhost: x\r\n\r\n";
        conn.write_all(req.as_bytes()).await.unwrap();
        eventually("the watch registered", || kube.open_watches() == 1).await;
        let big = "x".repeat(4096);
        for i in 0..3000 {
            let mut s = service("default", &format!("s{i}"), "a");
            s["metadata"]["annotations"] = json!({ "pad": big });
            kube.create(SERVICES, s);
        }
        eventually("the stuck watch closed", || kube.open_watches() == 0).await;
        drop(conn);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn dropping_the_server_ends_watches() {
    timeout(LIMIT, async {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let api: Api<Service> = Api::default_namespaced(client(&kube, dir.path()).await);
        let mut s = api.watch(&WatchParams::default().disable_bookmarks(), "0").await.unwrap().boxed();
        kube.create(SERVICES, service("default", "a", "a"));
        assert!(matches!(s.next().await, Some(Ok(WatchEvent::Added(_)))));
        drop(kube);
        // The stream ends (or errors) instead of hanging.
        while let Some(Ok(_)) = s.next().await {}
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn paged_lists_are_consistent_snapshots() {
    timeout(LIMIT, async {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let api: Api<Service> = Api::default_namespaced(client(&kube, dir.path()).await);
        for i in 0..5 {
            kube.create("api/v1/services", json!({"metadata": {"name": format!("s{i}"), "namespace": "default"}}));
        }
        let first = api.list(&kube::api::ListParams::default().limit(2)).await.unwrap();
        assert_eq!(first.items.len(), 2);
        let token = first.metadata.continue_.clone().expect("a continue token");
        let rv = first.metadata.resource_version.clone();
        // The store moves on; the rest of the list still shows the moment it began.
        kube.delete("api/v1/services", "default", "s4");
        kube.create("api/v1/services", json!({"metadata": {"name": "s5", "namespace": "default"}}));
        let mut names: Vec<String> = first.items.iter().map(|s| s.name_any()).collect();
        let mut token = Some(token);
        while let Some(t) = token {
            let page = api.list(&kube::api::ListParams::default().limit(2).continue_token(&t)).await.unwrap();
            assert_eq!(page.metadata.resource_version, rv);
            names.extend(page.items.iter().map(|s| s.name_any()));
            token = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        }
        assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);
        // A fresh list sees the new state; an unknown token is 410 Expired.
        let now: Vec<String> =
            api.list(&Default::default()).await.unwrap().items.iter().map(|s| s.name_any()).collect();
        assert_eq!(now, ["s0", "s1", "s2", "s3", "s5"]);
        let err = api.list(&kube::api::ListParams::default().limit(2).continue_token("999:2")).await.unwrap_err();
        assert!(matches!(err, kube::Error::Api(s) if s.code == 410), "expired continue token");
    })
    .await
    .unwrap();
}
