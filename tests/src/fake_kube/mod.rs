//! An in-process fake of the Kubernetes API server's HTTP protocol (list, watch, get, create,
//! replace, patch, delete) for end-to-end tests, with the semantics clients depend on: one global
//! resourceVersion, `410 Expired` for watches resuming from compacted history, bookmarks, label
//! and field selectors, optimistic concurrency on replace, `/status` subresources, and `Status`
//! errors. It is generic: any `api/V/PLURAL` or `apis/G/V/PLURAL` collection works, and every
//! collection is namespaced.
//!
//! ```ignore
//! let kube = FakeKube::start().await;
//! let cfg = kube.kubeconfig(dir.path());
//! kube.create("api/v1/services", json!({"metadata": {"name": "web", "namespace": "test"}}));
//! ```
//!
//! Test controls (`create`, `update`, `patch_status`, `delete`, `compact`, `break_watches`,
//! `set_forbidden`, ...) are synchronous and act on the same store the HTTP side serves.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A watch with no event to send sends a BOOKMARK (when asked for) after this long.
pub const BOOKMARK_IDLE: Duration = Duration::from_millis(500);
/// Events a watch may have queued before the fake closes it as too slow.
const WATCH_QUEUE: usize = 1024;
/// Frames buffered between a watch task and the connection.
const BODY_QUEUE: usize = 32;
/// How long a watch lasts when the request has no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Events kept for resuming watches, unless changed with [`FakeKube::set_history_limit`].
const DEFAULT_HISTORY: usize = 10_000;

type Body = BoxBody<Bytes, Infallible>;

/// `(collection, namespace, name)`, e.g. `("api/v1/services", "default", "web")`.
type Key = (String, String, String);

mod select;
mod serve;
mod store;

use serve::serve;
use store::*;

/// The fake API server. Dropping it (or [`FakeKube::shutdown`]) stops the server, closes its
/// connections and ends every watch.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

struct Shared {
    state: Mutex<State>,
    /// Pod ports served through `pods/NAME:PORT/proxy/...`: where to forward.
    pod_proxies: Mutex<HashMap<(String, String, u16), SocketAddr>>,
    log: Mutex<Vec<(Method, String)>>,
    /// Running watch streams, aborted on shutdown.
    watch_tasks: Mutex<tokio::task::JoinSet<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl FakeKube {
    /// Binds 127.0.0.1 on an OS-chosen port and serves plain HTTP (HTTP/1.1 and h2c).
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the fake API server");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                last_write_rv: 1,
                min_resume_rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: DEFAULT_HISTORY,
                watchers: Vec::new(),
                forbidden: HashSet::new(),
                denied: HashSet::new(),
                unserved: HashSet::new(),
                list_snapshots: VecDeque::new(),
                next_snapshot: 0,
                kinds: HashMap::new(),
                next_uid: 1,
            }),
            log: Mutex::new(Vec::new()),
            pod_proxies: Mutex::new(HashMap::new()),
            watch_tasks: Mutex::new(tokio::task::JoinSet::new()),
            shutdown: tokio::sync::watch::channel(false).0,
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        Self { addr, shared, server }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig` pointing at this server (a bearer-token user, namespace
    /// `default`) and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        self.write_kubeconfig(dir.join("kubeconfig"), "fake-token")
    }

    /// Writes `dir/kubeconfig-USER` for the user `user` (its bearer token is its name), whom
    /// [`FakeKube::deny`] can refuse verbs the other users may use.
    pub fn kubeconfig_as(&self, dir: &Path, user: &str) -> PathBuf {
        self.write_kubeconfig(dir.join(format!("kubeconfig-{user}")), user)
    }

    /// RBAC for one user: `verb` on `collection` is forbidden to `user` (the default user and
    /// every other keep it).
    pub fn deny(&self, user: &str, collection: &str, verb: &str) {
        self.shared.state().denied.insert((user.to_string(), collection.to_string(), verb.to_string()));
    }

    fn write_kubeconfig(&self, path: PathBuf, token: &str) -> PathBuf {
        let yaml = format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user:
    token: {token}
preferences: {{}}
"#,
            url = self.url()
        );
        std::fs::write(&path, yaml).expect("writing the kubeconfig");
        path
    }

    /// Stops the server and every watch now (dropping does the same).
    pub fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
        self.server.abort();
        self.shared.watch_tasks.lock().unwrap().abort_all();
        self.shared.state().watchers.clear();
    }

    /// Creates an object (namespace from `metadata.namespace`, default `default`); panics if it
    /// exists. `status` is kept as given. Returns the stored object.
    pub fn create(&self, collection: &str, obj: Value) -> Value {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let mut st = self.shared.state();
        st.create(collection, &ns, obj, true).unwrap_or_else(|e| panic!("create in {collection}: {e}"))
    }

    /// Creates a cluster-scoped object (a CRD, a webhook configuration); panics if it exists.
    pub fn create_cluster_scoped(&self, collection: &str, obj: Value) -> Value {
        let mut st = self.shared.state();
        st.create(collection, "", obj, true).unwrap_or_else(|e| panic!("create in {collection}: {e}"))
    }

    /// Serves `port` of pod `ns/name` through the pods' `proxy` subresource by forwarding to
    /// `to` (what the API server does with the pod's IP).
    pub fn set_pod_proxy(&self, ns: &str, name: &str, port: u16, to: SocketAddr) {
        self.shared.pod_proxies.lock().unwrap().insert((ns.to_string(), name.to_string(), port), to);
    }

    /// Replaces an object wholesale (status included; `resourceVersion` in `obj` is ignored);
    /// panics if it does not exist. Returns the stored object.
    pub fn update(&self, collection: &str, obj: Value) -> Value {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let name = obj["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let mut st = self.shared.state();
        let key = (collection.to_string(), ns, name);
        let Some(old) = st.objects.get(&key).cloned() else { panic!("update: {key:?} not found") };
        st.commit(&key, Some(merge_server_fields(obj, &old)))
    }

    /// Applies a JSON merge patch (RFC 7386) to the whole object; panics if it does not exist.
    pub fn patch(&self, collection: &str, ns: &str, name: &str, merge_patch: Value) -> Value {
        let mut st = self.shared.state();
        let key = key(collection, ns, name);
        let Some(old) = st.objects.get(&key).cloned() else { panic!("patch: {key:?} not found") };
        let mut new = (*old).clone();
        json_merge(&mut new, &merge_patch);
        st.commit(&key, Some(merge_server_fields(new, &old)))
    }

    /// Merge-patches `.status` (as `PATCH .../status` with `{"status": status}` would); panics if
    /// the object does not exist.
    pub fn patch_status(&self, collection: &str, ns: &str, name: &str, status: Value) -> Value {
        let mut st = self.shared.state();
        st.patch(collection, ns, name, &json!({ "status": status }), true, false)
            .unwrap_or_else(|e| panic!("patch_status {collection} {ns}/{name}: {e}"))
    }

    /// Deletes an object, emitting DELETED with its last state; None if it did not exist.
    pub fn delete(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.shared.state().delete(collection, ns, name, &Value::Null).ok()
    }

    pub fn get(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.shared.state().objects.get(&key(collection, ns, name)).map(|o| (**o).clone())
    }

    /// Every object of a collection, in all namespaces, ordered by namespace and name.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        let st = self.shared.state();
        st.objects.iter().filter(|((c, _, _), _)| c == collection).map(|(_, o)| (**o).clone()).collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }

    /// Forgets all event history: a watch resuming from any version handed out so far gets an
    /// `ERROR` event with a `410 Expired` Status (so the client relists). The global counter moves
    /// on by one (a write nobody sees), so a fresh list returns a version watches can resume from.
    /// Open watches keep running; combine with [`FakeKube::break_watches`].
    pub fn compact(&self) {
        let mut st = self.shared.state();
        st.history.clear();
        st.rv += 1;
        st.min_resume_rv = st.rv;
    }

    /// Keeps at most `n` events for resuming watches; older ones are compacted away.
    pub fn set_history_limit(&self, n: usize) {
        let mut st = self.shared.state();
        st.history_limit = n;
        st.trim_history();
    }

    /// Ends every open watch stream (after the events already queued for it), cleanly, as an API
    /// server restart or a load balancer would; clients re-watch from their last version.
    pub fn break_watches(&self) {
        self.shared.state().watchers.clear();
    }

    /// Number of open watches (streams registered for events).
    pub fn open_watches(&self) -> usize {
        self.shared.state().watchers.len()
    }

    /// While set, every request on `collection` gets `403 Forbidden` (open watches are not
    /// closed, as with a real RBAC change).
    pub fn set_forbidden(&self, collection: &str, forbidden: bool) {
        let mut st = self.shared.state();
        if forbidden {
            st.forbidden.insert(collection.to_string());
        } else {
            st.forbidden.remove(collection);
        }
    }

    /// While set, the server does not serve `collection` at all (as when its CRD is not
    /// installed): every request gets `404 NotFound`, as the real API server answers.
    pub fn set_unserved(&self, collection: &str, unserved: bool) {
        let mut st = self.shared.state();
        if unserved {
            st.unserved.insert(collection.to_string());
        } else {
            st.unserved.remove(collection);
        }
    }

    /// Every request so far: method and path with query (as sent, still percent-encoded).
    pub fn request_log(&self) -> Vec<(Method, String)> {
        self.shared.log.lock().unwrap().clone()
    }

    /// How many requests with `method` had a path+query starting with `prefix`.
    pub fn requests(&self, method: &Method, prefix: &str) -> usize {
        self.shared.log.lock().unwrap().iter().filter(|(m, p)| m == method && p.starts_with(prefix)).count()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::select::*;
    use super::serve::*;
    use super::*;

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/namespaces/default/services/web/status").unwrap();
        assert_eq!(
            (t.collection.as_str(), t.namespace.as_deref(), t.name.as_deref(), t.status),
            ("api/v1/services", Some("default"), Some("web"), true)
        );
        let t = parse_path("/apis/weir.io/v1alpha1/routes").unwrap();
        assert_eq!((t.collection.as_str(), t.namespace, t.name), ("apis/weir.io/v1alpha1/routes", None, None));
        assert!(parse_path("/apis/weir.io/v1alpha1/namespaces/x/routes/a/scale").is_none());
        assert!(parse_path("/version").is_none());
    }

    #[test]
    fn selectors() {
        let obj = json!({"metadata": {"name": "a", "labels": {"app": "web", "tier": "front"}}});
        let m = |l: &str, f: &str| Filter::parse(Some(l), Some(f)).unwrap().matches(&obj);
        assert!(m("app=web", ""));
        assert!(m("app==web,tier", ""));
        assert!(!m("app!=web", ""));
        assert!(m("!missing,app in (web,api)", "metadata.name=a"));
        assert!(!m("tier notin (front)", ""));
        assert!(!m("", "metadata.name=b"));
        assert!(m("", "metadata.name!=b"));
    }

    #[test]
    fn merge_patch() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        json_merge(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn kinds_and_time() {
        assert_eq!(guess_kind("services"), "Service");
        assert_eq!(guess_kind("policies"), "Policy");
        assert_eq!(guess_kind("ingressclasses"), "Ingressclass");
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert_eq!(percent_decode("a%3Db%2Cc"), "a=b,c");
    }
}
