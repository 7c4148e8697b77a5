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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as the event history keeps it.
struct Change {
    rv: u64,
    collection: String,
    namespace: String,
    /// The object before the write (None for a create).
    old: Option<Arc<Value>>,
    /// The object after the write; for a delete, the last state stamped with the delete's rv.
    new: Arc<Value>,
    deleted: bool,
}

struct Watcher {
    collection: String,
    namespace: Option<String>,
    filter: Filter,
    /// Only events with a greater resourceVersion are sent (a watch "from the future" waits).
    after: u64,
    tx: mpsc::Sender<(u64, Bytes)>,
}

/// A paged list in progress: its id, resourceVersion and the items of that moment.
type ListSnapshot = (u64, u64, Arc<Vec<Arc<Value>>>);

struct State {
    /// The global resourceVersion counter: the last version handed out.
    rv: u64,
    /// The version of the last real write (the counter also moves on [`FakeKube::compact`]).
    last_write_rv: u64,
    /// A watch resuming from a version below this gets `410 Expired`.
    min_resume_rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    watchers: Vec<Watcher>,
    forbidden: HashSet<String>,
    /// (user, collection, verb) refused to that user only.
    denied: HashSet<(String, String, String)>,
    /// Collections the server does not serve at all (a CRD not installed): 404 on every request.
    unserved: HashSet<String>,
    /// Paged lists in progress: (id, resourceVersion, the items of that moment), newest last.
    list_snapshots: VecDeque<ListSnapshot>,
    next_snapshot: u64,
    /// `kind` last seen per collection, for list kinds and bookmarks.
    kinds: HashMap<String, String>,
    next_uid: u64,
}

/// A Kubernetes `Status` failure.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }

    /// The `Status` object the API server would send.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn not_found(collection: &str, name: &str) -> ApiError {
    ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", plural_of(collection)))
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

fn key(collection: &str, ns: &str, name: &str) -> Key {
    (collection.to_string(), ns.to_string(), name.to_string())
}

impl State {
    fn create(&mut self, collection: &str, ns: &str, mut obj: Value, keep_status: bool) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::new(400, "BadRequest", "the object must be a JSON object"));
        }
        let name = match obj["metadata"]["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => format!("{prefix}{:05x}", self.next_uid * 7919 % 0xfffff),
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if let Some(body_ns) = obj["metadata"]["namespace"].as_str()
            && body_ns != ns
        {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let key = key(collection, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", plural_of(collection)),
            ));
        }
        if !keep_status && let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
        Ok(self.commit(&key, Some(obj)))
    }

    /// Applies a merge patch (RFC 7386). `status_only`: only `.status` of the result is kept (the
    /// `/status` subresource); otherwise `.status` is kept from the stored object unless
    /// `keep_status`. `create`: an absent object is created from the patch (server-side apply).
    fn patch(
        &mut self,
        collection: &str,
        ns: &str,
        name: &str,
        patch: &Value,
        status_only: bool,
        create: bool,
    ) -> Result<Value, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::new(400, "BadRequest", "the patch must be a JSON object"));
        }
        let key = key(collection, ns, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            if create && !status_only {
                let mut obj = patch.clone();
                obj["metadata"]["name"] = json!(name);
                obj["metadata"]["namespace"] = json!(ns);
                strip_nulls(&mut obj);
                return self.create(collection, ns, obj, false);
            }
            return Err(not_found(collection, name));
        };
        check_rv(collection, patch, &old)?;
        let mut new = (*old).clone();
        json_merge(&mut new, patch);
        let new = if status_only { with_status_of(&old, &new) } else { with_status_of(&new, &old) };
        Ok(self.commit(&key, Some(merge_server_fields(new, &old))))
    }

    /// PUT: replaces the object (or only its status), after the optimistic-concurrency check.
    fn replace(
        &mut self,
        collection: &str,
        ns: &str,
        name: &str,
        body: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::new(400, "BadRequest", "the object must be a JSON object"));
        }
        if let Some(n) = body["metadata"]["name"].as_str()
            && n != name
        {
            return Err(ApiError::new(400, "BadRequest", "the name of the object does not match the name on the URL"));
        }
        let key = key(collection, ns, name);
        let Some(old) = self.objects.get(&key).cloned() else { return Err(not_found(collection, name)) };
        check_rv(collection, &body, &old)?;
        let new = if status_only { with_status_of(&old, &body) } else { with_status_of(&body, &old) };
        Ok(self.commit(&key, Some(merge_server_fields(new, &old))))
    }

    /// Deletes, after checking `preconditions` (`{"uid": .., "resourceVersion": ..}`, from a
    /// DeleteOptions body) if given.
    fn delete(&mut self, collection: &str, ns: &str, name: &str, preconditions: &Value) -> Result<Value, ApiError> {
        let key = key(collection, ns, name);
        let Some(old) = self.objects.get(&key) else { return Err(not_found(collection, name)) };
        for field in ["uid", "resourceVersion"] {
            if let Some(want) = preconditions[field].as_str()
                && Some(want) != old["metadata"][field].as_str()
            {
                return Err(conflict(collection, name));
            }
        }
        Ok(self.commit(&key, None))
    }

    /// The one write path: stamps server-owned metadata, bumps the resourceVersion, records the
    /// event and hands it to the watches. `new` None deletes. A write that changes nothing is a
    /// no-op (no new version, no event), as on a real API server.
    fn commit(&mut self, key: &Key, new: Option<Value>) -> Value {
        let (collection, ns, name) = key;
        let old = self.objects.get(key).cloned();
        let (object, deleted) = match new {
            Some(mut obj) => {
                let meta = ensure_object(&mut obj, "metadata");
                meta.insert("name".into(), json!(name));
                if ns.is_empty() {
                    // Cluster-scoped.
                    meta.remove("namespace");
                } else {
                    meta.insert("namespace".into(), json!(ns));
                }
                self.fill_type(collection, &mut obj);
                match &old {
                    Some(old) => {
                        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                        let generation = if spec_of(old) != spec_of(&obj) { generation + 1 } else { generation };
                        let meta = ensure_object(&mut obj, "metadata");
                        for field in ["uid", "creationTimestamp"] {
                            meta.insert(field.into(), old["metadata"][field].clone());
                        }
                        meta.insert("generation".into(), json!(generation));
                        meta.insert("resourceVersion".into(), old["metadata"]["resourceVersion"].clone());
                        if obj == **old {
                            return obj;
                        }
                    }
                    None => {
                        let uid = self.next_uid;
                        self.next_uid += 1;
                        let meta = ensure_object(&mut obj, "metadata");
                        meta.insert("uid".into(), json!(format!("fa6e0000-0000-4000-8000-{uid:012x}")));
                        meta.insert("creationTimestamp".into(), json!(rfc3339_now()));
                        meta.insert("generation".into(), json!(1));
                    }
                }
                (obj, false)
            }
            None => ((*old.clone().expect("deleting an absent object")).clone(), true),
        };
        let mut object = object;
        self.rv += 1;
        self.last_write_rv = self.rv;
        ensure_object(&mut object, "metadata").insert("resourceVersion".into(), json!(self.rv.to_string()));
        let object = Arc::new(object);
        if deleted {
            self.objects.remove(key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        let change = Arc::new(Change {
            rv: self.rv,
            collection: collection.clone(),
            namespace: ns.clone(),
            old,
            new: object.clone(),
            deleted,
        });
        // Hand the event to each watch without blocking: a watch whose queue is full is closed
        // (its task drains what is queued, then ends the stream) and the client re-watches.
        self.watchers.retain(|w| match w.event_for(&change) {
            None => true,
            Some(line) => w.tx.try_send((change.rv, line)).is_ok(),
        });
        self.history.push_back(change);
        self.trim_history();
        (*object).clone()
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            let dropped = self.history.pop_front().unwrap();
            self.min_resume_rv = self.min_resume_rv.max(dropped.rv);
        }
    }

    fn fill_type(&mut self, collection: &str, obj: &mut Value) {
        let (api_version, _) = api_version_and_plural(collection);
        let map = obj.as_object_mut().unwrap();
        if !map.get("apiVersion").is_some_and(Value::is_string) {
            map.insert("apiVersion".into(), json!(api_version));
        }
        match map.get("kind").and_then(Value::as_str) {
            Some(kind) => {
                self.kinds.insert(collection.to_string(), kind.to_string());
            }
            None => {
                map.insert("kind".into(), json!(self.kind_of(collection)));
            }
        }
    }

    fn kind_of(&self, collection: &str) -> String {
        self.kinds.get(collection).cloned().unwrap_or_else(|| guess_kind(plural_of(collection)))
    }

    fn check_forbidden(&self, collection: &str, verb: &str, ns: Option<&str>, user: &str) -> Result<(), ApiError> {
        if self.unserved.contains(collection) {
            return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
        }
        let denied = self.denied.contains(&(user.to_string(), collection.to_string(), verb.to_string()));
        if !self.forbidden.contains(collection) && !denied {
            return Ok(());
        }
        let who = if denied { user.to_string() } else { "system:serviceaccount:default:fake".to_string() };
        let (api_version, plural) = api_version_and_plural(collection);
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let scope = match ns {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "{plural} is forbidden: User \"{who}\" cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}"
            ),
        ))
    }
}

/// `obj` with the server-owned metadata of `old` (uid, creationTimestamp, generation and
/// resourceVersion are then set by `commit`).
fn merge_server_fields(mut obj: Value, old: &Value) -> Value {
    let meta = ensure_object(&mut obj, "metadata");
    for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
        meta.insert(field.into(), old["metadata"][field].clone());
    }
    obj
}

/// `base` with the `.status` of `status_from` (or none, if it has none).
fn with_status_of(base: &Value, status_from: &Value) -> Value {
    let mut out = base.clone();
    let map = out.as_object_mut().unwrap();
    match status_from.get("status") {
        Some(s) if !s.is_null() => {
            map.insert("status".into(), s.clone());
        }
        _ => {
            map.remove("status");
        }
    }
    out
}

/// 409 Conflict when `body` carries a resourceVersion other than the stored one.
fn check_rv(collection: &str, body: &Value, old: &Value) -> Result<(), ApiError> {
    match body["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && Some(rv) != old["metadata"]["resourceVersion"].as_str() => {
            Err(conflict(collection, old["metadata"]["name"].as_str().unwrap_or("")))
        }
        _ => Ok(()),
    }
}

fn conflict(collection: &str, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            plural_of(collection)
        ),
    )
}

/// Everything but `metadata` and `status`: a change here bumps `metadata.generation`.
fn spec_of(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    v
}

fn ensure_object<'a>(obj: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    let map = obj.as_object_mut().expect("a JSON object");
    let entry = map.entry(field.to_string()).or_insert_with(|| json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    entry.as_object_mut().unwrap()
}

/// RFC 7386 JSON merge patch.
pub fn json_merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().unwrap();
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            json_merge(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn strip_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, v| !v.is_null());
        m.values_mut().for_each(strip_nulls);
    }
}

/// `("v1", "services")` for `api/v1/services`, `("weir.io/v1alpha1", "routes")` for
/// `apis/weir.io/v1alpha1/routes`.
fn api_version_and_plural(collection: &str) -> (String, &str) {
    let parts: Vec<&str> = collection.split('/').collect();
    match parts.as_slice() {
        ["api", v, plural] => (v.to_string(), plural),
        ["apis", g, v, plural] => (format!("{g}/{v}"), plural),
        _ => (String::new(), parts.last().copied().unwrap_or("")),
    }
}

fn plural_of(collection: &str) -> &str {
    collection.rsplit('/').next().unwrap_or(collection)
}

/// A Kind for a collection never written to (only used in list kinds and bookmarks).
fn guess_kind(plural: &str) -> String {
    let singular = if let Some(s) = plural.strip_suffix("ies") {
        format!("{s}y")
    } else if plural.ends_with("sses") || plural.ends_with("ches") || plural.ends_with("shes") {
        plural[..plural.len() - 2].to_string()
    } else {
        plural.strip_suffix('s').unwrap_or(plural).to_string()
    };
    let mut c = singular.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// Now as RFC 3339 UTC with second precision, e.g. `2024-05-01T12:00:00Z`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone, Default)]
struct Filter {
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Filter {
    fn parse(label_selector: Option<&str>, field_selector: Option<&str>) -> Result<Self, ApiError> {
        let bad = |what: &str, s: &str| ApiError::new(400, "BadRequest", format!("unable to parse {what} {s:?}"));
        let mut f = Filter::default();
        for term in split_top_level(label_selector.unwrap_or("")) {
            let req = if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, set)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), parse_set(set).ok_or_else(|| bad("labelSelector", term))?)
            } else if let Some((k, set)) = term.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), parse_set(set).ok_or_else(|| bad("labelSelector", term))?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
                return Err(bad("labelSelector", term));
            } else {
                LabelReq::Exists(term.to_string())
            };
            f.labels.push(req);
        }
        for term in split_top_level(field_selector.unwrap_or("")) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(bad("fieldSelector", term));
            };
            f.fields.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(f)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"]["labels"].as_object();
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v),
            LabelReq::NotEq(k, v) => label(k) != Some(v),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, set) => label(k).is_some_and(|l| set.iter().any(|s| s == l)),
            LabelReq::NotIn(k, set) => label(k).is_none_or(|l| set.iter().all(|s| s != l)),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, want)| {
                let v = path.split('.').fold(obj, |v, seg| &v[seg]);
                let got = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (got == *want) == *eq
            })
    }
}

/// Splits on commas outside parentheses, dropping empty terms.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|t| !t.is_empty());
    out
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

impl Watcher {
    /// The line this watch gets for `change`, if any. With a selector, an object that starts
    /// matching is ADDED and one that stops matching is DELETED, as on a real API server.
    fn event_for(&self, change: &Change) -> Option<Bytes> {
        if change.rv <= self.after || change.collection != self.collection {
            return None;
        }
        if self.namespace.as_ref().is_some_and(|ns| *ns != change.namespace) {
            return None;
        }
        let now = self.filter.matches(&change.new);
        let before = change.old.as_ref().is_some_and(|o| self.filter.matches(o));
        let ty = match (change.deleted, before, now) {
            (true, _, true) => EventType::Deleted,
            (true, _, false) => return None,
            (false, false, true) => EventType::Added,
            (false, true, true) => EventType::Modified,
            (false, true, false) => EventType::Deleted,
            (false, false, false) => return None,
        };
        Some(event_line(ty.as_str(), &change.new))
    }
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": ty, "object": object })).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

// ---------------------------------------------------------------------------------------------
// HTTP

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        while conns.try_join_next().is_some() {}
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json_response(status: u16, body: &Value) -> http::Response<Body> {
    let mut r = http::Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: ApiError) -> http::Response<Body> {
    json_response(e.code, &e.status())
}

/// `/api/v1/namespaces/NS/pods/NAME/portforward?ports=PORT`: (NS, NAME, PORT); one port only.
fn port_forward_path(path: &str, query: Option<&str>) -> Option<(String, String, u16)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/pods/")?;
    let pod = rest.strip_suffix("/portforward")?;
    let port = parse_query(query).get("ports")?.parse().ok()?;
    Some((ns.to_string(), pod.to_string(), port))
}

/// A port-forward as the API server and the kubelet serve it: a WebSocket upgrade speaking
/// `v4.channel.k8s.io` (each message starts with its channel: 0 the port's data, 1 its errors;
/// the first message on each carries the port, little-endian), relayed to a TCP connection the
/// kubelet opens inside the pod, from the pod's own loopback (here, this process's).
fn port_forward(req: http::Request<hyper::body::Incoming>, to: SocketAddr, port: u16) -> http::Response<Body> {
    const PROTOCOL: &str = "v4.channel.k8s.io";
    let header = |name: http::header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let offered = header(http::header::SEC_WEBSOCKET_PROTOCOL).unwrap_or("");
    let (Some(key), true) = (header(http::header::SEC_WEBSOCKET_KEY), offered.split(',').any(|p| p.trim() == PROTOCOL))
    else {
        return error_response(ApiError::new(
            400,
            "BadRequest",
            format!("a port-forward is a WebSocket upgrade speaking {PROTOCOL}"),
        ));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        use futures_util::{SinkExt, StreamExt};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_tungstenite::tungstenite::Message;
        let Ok(upgraded) = hyper::upgrade::on(req).await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let [lo, hi] = port.to_le_bytes();
        for channel in [0u8, 1] {
            if ws.send(Message::binary(vec![channel, lo, hi])).await.is_err() {
                return;
            }
        }
        let mut tcp = match tokio::net::TcpStream::connect(to).await {
            Ok(t) => t,
            Err(e) => {
                let _ = ws.send(Message::binary([&[1u8][..], format!("dialing {to}: {e}").as_bytes()].concat())).await;
                let _ = ws.close(None).await;
                return;
            }
        };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(b))) if b.first() == Some(&0) => {
                        if tcp.write_all(&b[1..]).await.is_err() { break }
                    }
                    Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Text(_))) => {}
                    _ => break,
                },
                n = tcp.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if ws.send(Message::binary([&[0u8][..], &buf[..n]].concat())).await.is_err() { break }
                    }
                },
            }
        }
        let _ = ws.close(None).await;
    });
    http::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(http::header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL)
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

/// `/api/v1/namespaces/NS/pods/NAME:PORT/proxy/REST`: (NS, NAME, PORT, /REST).
fn pod_proxy_path(path: &str) -> Option<(String, String, u16, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/pods/")?;
    let (pod_port, rest) = rest.split_once("/proxy")?;
    let (pod, port) = pod_port.rsplit_once(':')?;
    let rest = if rest.is_empty() { "/".to_string() } else { rest.to_string() };
    Some((ns.to_string(), pod.to_string(), port.parse().ok()?, rest))
}

/// Forwards a proxied request to `to` and relays the answer, as the API server's proxy does.
async fn forward(req: http::Request<hyper::body::Incoming>, to: SocketAddr, path: &str) -> http::Response<Body> {
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let method = req.method().clone();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(to).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let out = http::Request::builder()
            .method(method)
            .uri(format!("{path}{query}"))
            .header("host", to.to_string())
            .body(Full::new(body))?;
        let rsp = send.send_request(out).await?;
        let status = rsp.status();
        let content_type = rsp.headers().get(http::header::CONTENT_TYPE).cloned();
        let bytes = rsp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, content_type, bytes))
    };
    match attempt.await {
        Ok((status, content_type, bytes)) => {
            let mut r = http::Response::new(Full::new(bytes).boxed());
            *r.status_mut() = status;
            if let Some(ct) = content_type {
                r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
            }
            r
        }
        Err(e) => {
            error_response(ApiError::new(503, "ServiceUnavailable", format!("error trying to reach service: {e}")))
        }
    }
}

/// A parsed API path.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<String> = path.trim_matches('/').split('/').map(percent_decode).collect();
    let (prefix, rest) = match segs.first().map(String::as_str) {
        Some("api") if segs.len() >= 3 => segs.split_at(2),
        Some("apis") if segs.len() >= 4 => segs.split_at(3),
        _ => return None,
    };
    let (namespace, plural, name, sub) = match rest {
        [plural] => (None, plural, None, None),
        // Cluster-scoped objects (stored under the namespace "").
        [plural, name] if plural != "namespaces" => (None, plural, Some(name.clone()), None),
        [ns_kw, ns, plural, tail @ ..] if ns_kw == "namespaces" && tail.len() <= 2 => {
            (Some(ns.clone()), plural, tail.first().cloned(), tail.get(1).cloned())
        }
        _ => return None,
    };
    let status = match sub.as_deref() {
        None => false,
        Some("status") => true,
        Some(_) => return None,
    };
    Some(Target { collection: format!("{}/{plural}", prefix.join("/")), namespace, name, status })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn handle(shared: Arc<Shared>, req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
    let method = req.method().clone();
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    shared.log.lock().unwrap().push((method.clone(), path_and_query));
    if let Some((ns, pod, port)) = port_forward_path(req.uri().path(), req.uri().query()) {
        let to = shared.pod_proxies.lock().unwrap().get(&(ns.clone(), pod.clone(), port)).copied();
        return match to {
            Some(to) => port_forward(req, to, port),
            None => error_response(ApiError::new(404, "NotFound", format!("pods \"{pod}\" not found"))),
        };
    }
    if let Some((ns, pod, port, rest)) = pod_proxy_path(req.uri().path()) {
        let to = shared.pod_proxies.lock().unwrap().get(&(ns.clone(), pod.clone(), port)).copied();
        return match to {
            Some(to) => forward(req, to, &rest).await,
            None => error_response(ApiError::new(
                503,
                "ServiceUnavailable",
                format!("error trying to reach service: no pod {ns}/{pod} serving port {port}"),
            )),
        };
    }
    let query = parse_query(req.uri().query());
    let user = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let Some(target) = parse_path(req.uri().path()) else {
        return error_response(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    };
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(ApiError::new(400, "BadRequest", format!("reading the body: {e}"))),
    };
    match respond(&shared, &method, &target, &query, &content_type, &body, &user) {
        Ok(Reply::Json(code, v)) => json_response(code, &v),
        Ok(Reply::Watch(w)) => start_watch(&shared, w),
        Err(e) => error_response(e),
    }
}

enum Reply {
    Json(u16, Value),
    Watch(WatchStart),
}

struct WatchStart {
    replay: Vec<(u64, Bytes)>,
    events: mpsc::Receiver<(u64, Bytes)>,
    bookmarks: bool,
    /// The initial-events-end bookmark's version, for `sendInitialEvents=true`.
    initial_end: Option<u64>,
    start_rv: u64,
    timeout: Duration,
    kind: String,
    api_version: String,
}

fn verb(method: &Method, target: &Target, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if target.name.is_some() => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

fn respond(
    shared: &Shared,
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
    user: &str,
) -> Result<Reply, ApiError> {
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body).map_err(|e| ApiError::new(400, "BadRequest", format!("decoding the body: {e}")))
    };
    // Decode outside the lock.
    let body_json = match *method {
        Method::POST | Method::PUT | Method::PATCH => Some(parse_body()?),
        _ => None,
    };
    let mut st = shared.state();
    st.check_forbidden(&target.collection, verb(method, target, watch), target.namespace.as_deref(), user)?;
    let coll = target.collection.as_str();
    let ns = target.namespace.as_deref();
    match (method.clone(), &target.name) {
        (Method::GET, None) if watch => watch_request(&mut st, target, query).map(Reply::Watch),
        (Method::GET, None) => {
            let filter = Filter::parse(
                query.get("labelSelector").map(String::as_str),
                query.get("fieldSelector").map(String::as_str),
            )?;
            // Paging as the real API server does it: `limit` cuts the list, and `continue`
            // resumes the same snapshot (same resourceVersion) however the store moved since.
            let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
            let (snapshot_id, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
                Some(token) => {
                    let parsed = token
                        .split_once(':')
                        .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
                    match parsed.filter(|(id, _)| st.list_snapshots.iter().any(|(i, _, _)| i == id)) {
                        Some(p) => (Some(p.0), p.1),
                        None => {
                            return Err(ApiError::new(
                                410,
                                "Expired",
                                "the provided continue parameter is too old to display a consistent list result",
                            ));
                        }
                    }
                }
                None => (None, 0),
            };
            let (snapshot_id, rv, all) = match snapshot_id {
                Some(id) => {
                    let (_, rv, items) = st.list_snapshots.iter().find(|(i, _, _)| *i == id).expect("checked");
                    (id, *rv, items.clone())
                }
                None => {
                    let items: Arc<Vec<Arc<Value>>> = Arc::new(
                        st.objects
                            .iter()
                            .filter(|((c, n, _), o)| c == coll && ns.is_none_or(|ns| ns == n) && filter.matches(o))
                            .map(|(_, o)| o.clone())
                            .collect(),
                    );
                    st.next_snapshot += 1;
                    let id = st.next_snapshot;
                    let rv = st.rv;
                    if limit.is_some_and(|l| l < items.len()) {
                        st.list_snapshots.push_back((id, rv, items.clone()));
                        while st.list_snapshots.len() > 16 {
                            st.list_snapshots.pop_front();
                        }
                    }
                    (id, rv, items)
                }
            };
            let end = limit.map(|l| (offset + l).min(all.len())).unwrap_or(all.len());
            let items: Vec<Value> = all[offset.min(end)..end].iter().map(|o| (**o).clone()).collect();
            let mut metadata = json!({ "resourceVersion": rv.to_string() });
            if end < all.len() {
                metadata["continue"] = json!(format!("{snapshot_id}:{end}"));
            }
            let (api_version, _) = api_version_and_plural(coll);
            Ok(Reply::Json(
                200,
                json!({
                    "apiVersion": api_version,
                    "kind": format!("{}List", st.kind_of(coll)),
                    "metadata": metadata,
                    "items": items,
                }),
            ))
        }
        (Method::GET, Some(name)) => {
            let ns = ns.unwrap_or("");
            st.objects
                .get(&key(coll, ns, name))
                .map(|o| Reply::Json(200, (**o).clone()))
                .ok_or_else(|| not_found(coll, name))
        }
        (Method::POST, None) => {
            let ns = ns.ok_or_else(|| ApiError::new(405, "MethodNotAllowed", "create needs a namespaced path"))?;
            if target.status {
                return Err(ApiError::new(405, "MethodNotAllowed", "the server does not allow this method"));
            }
            st.create(coll, ns, body_json.unwrap(), false).map(|v| Reply::Json(201, v))
        }
        (Method::PUT, Some(name)) => {
            let ns = ns.ok_or_else(|| not_found(coll, name))?;
            st.replace(coll, ns, name, body_json.unwrap(), target.status).map(|v| Reply::Json(200, v))
        }
        (Method::PATCH, Some(name)) => {
            let ns = ns.ok_or_else(|| not_found(coll, name))?;
            let apply = match content_type {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
                "application/apply-patch+yaml" => true,
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {other:?})"
                        ),
                    ));
                }
            };
            if apply && query.get("fieldManager").is_none_or(|m| m.is_empty()) {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            let existed = st.objects.contains_key(&key(coll, ns, name));
            let v = st.patch(coll, ns, name, &body_json.unwrap(), target.status, apply)?;
            Ok(Reply::Json(if existed { 200 } else { 201 }, v))
        }
        (Method::DELETE, Some(name)) => {
            let ns = ns.ok_or_else(|| not_found(coll, name))?;
            let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            st.delete(coll, ns, name, &options["preconditions"]).map(|v| Reply::Json(200, v))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// Registers a watch under the store lock, so the replay and the live events meet exactly.
fn watch_request(st: &mut State, target: &Target, query: &HashMap<String, String>) -> Result<WatchStart, ApiError> {
    let filter =
        Filter::parse(query.get("labelSelector").map(String::as_str), query.get("fieldSelector").map(String::as_str))?;
    let rv = query.get("resourceVersion").map(String::as_str).unwrap_or("");
    let coll = target.collection.clone();
    let namespace = target.namespace.clone();
    let bookmarks = matches!(query.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let send_initial = matches!(query.get("sendInitialEvents").map(String::as_str), Some("true" | "1"));
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse().map_err(|_| ApiError::new(400, "BadRequest", format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let mut replay = Vec::new();
    let (after, initial_end) = if rv.is_empty() || rv == "0" {
        // "Any" version: the current state as ADDED events, then changes.
        for ((c, n, _), o) in &st.objects {
            if *c == coll && namespace.as_ref().is_none_or(|ns| ns == n) && filter.matches(o) {
                replay.push((st.rv, event_line("ADDED", o)));
            }
        }
        (st.rv, (send_initial && bookmarks).then_some(st.rv))
    } else {
        let r: u64 =
            rv.parse().map_err(|_| ApiError::new(400, "BadRequest", format!("invalid resourceVersion {rv:?}")))?;
        if r < st.min_resume_rv {
            // Too old: the stream starts and carries a single ERROR event, as the API server does.
            let status =
                ApiError::new(410, "Expired", format!("too old resource version: {r} ({})", st.min_resume_rv)).status();
            replay.push((r, event_line("ERROR", &status)));
            let (_tx, events) = mpsc::channel(1);
            return Ok(WatchStart {
                replay,
                events,
                bookmarks: false,
                initial_end: None,
                start_rv: r,
                timeout,
                kind: String::new(),
                api_version: String::new(),
            });
        }
        (r, None)
    };
    let (tx, events) = mpsc::channel(WATCH_QUEUE);
    let watcher = Watcher { collection: coll.clone(), namespace, filter, after, tx };
    for change in &st.history {
        if let Some(line) = watcher.event_for(change) {
            replay.push((change.rv, line));
        }
    }
    st.watchers.push(watcher);
    let (api_version, _) = api_version_and_plural(&coll);
    Ok(WatchStart {
        replay,
        events,
        bookmarks,
        initial_end,
        start_rv: after,
        timeout,
        kind: st.kind_of(&coll),
        api_version,
    })
}

fn start_watch(shared: &Arc<Shared>, w: WatchStart) -> http::Response<Body> {
    let (body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(BODY_QUEUE);
    let task = run_watch(shared.clone(), w, body_tx);
    {
        let mut tasks = shared.watch_tasks.lock().unwrap();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }
    let mut r = http::Response::new(StreamBody::new(ReceiverStream::new(body_rx)).boxed());
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

async fn run_watch(shared: Arc<Shared>, w: WatchStart, body: mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
    let WatchStart { replay, mut events, bookmarks, initial_end, start_rv, timeout, kind, api_version } = w;
    let mut shutdown = shared.shutdown.subscribe();
    let bookmark = |rv: u64, initial_end: bool| {
        let mut meta = json!({ "resourceVersion": rv.to_string() });
        if initial_end {
            meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        event_line("BOOKMARK", &json!({ "kind": kind, "apiVersion": api_version, "metadata": meta }))
    };
    let send = |line: Bytes| body.send(Ok(Frame::data(line)));
    let run = async {
        let mut last = start_rv;
        for (rv, line) in replay {
            if send(line).await.is_err() {
                return;
            }
            last = last.max(rv);
        }
        if let Some(rv) = initial_end
            && send(bookmark(rv, true)).await.is_err()
        {
            return;
        }
        loop {
            match tokio::time::timeout(BOOKMARK_IDLE, events.recv()).await {
                Ok(Some((rv, line))) => {
                    if send(line).await.is_err() {
                        return;
                    }
                    last = last.max(rv);
                }
                Ok(None) => return,
                Err(_idle) if bookmarks => {
                    // Every event up to `now` was queued (under the lock) before we read it: send
                    // those first so the bookmark never claims an event the client has not had.
                    let now = shared.state().last_write_rv;
                    loop {
                        match events.try_recv() {
                            Ok((rv, line)) => {
                                if send(line).await.is_err() {
                                    return;
                                }
                                last = last.max(rv);
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => return,
                        }
                    }
                    last = last.max(now);
                    if send(bookmark(last, false)).await.is_err() {
                        return;
                    }
                }
                Err(_idle) => {}
            }
        }
    };
    tokio::select! {
        _ = run => {}
        _ = tokio::time::sleep(timeout) => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

#[cfg(test)]
mod tests {
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
