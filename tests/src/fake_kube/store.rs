//! The fake's store: objects under one global resourceVersion, the event history watches
//! resume from, and the semantics of each write (create, replace with optimistic concurrency,
//! merge patch, `/status`, delete), with Kubernetes `Status` errors.

use super::select::Filter;
use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as the event history keeps it.
pub(super) struct Change {
    pub(super) rv: u64,
    pub(super) collection: String,
    pub(super) namespace: String,
    /// The object before the write (None for a create).
    pub(super) old: Option<Arc<Value>>,
    /// The object after the write; for a delete, the last state stamped with the delete's rv.
    pub(super) new: Arc<Value>,
    pub(super) deleted: bool,
}

pub(super) struct Watcher {
    pub(super) collection: String,
    pub(super) namespace: Option<String>,
    pub(super) filter: Filter,
    /// Only events with a greater resourceVersion are sent (a watch "from the future" waits).
    pub(super) after: u64,
    pub(super) tx: mpsc::Sender<(u64, Bytes)>,
}

/// A paged list in progress: its id, resourceVersion and the items of that moment.
pub(super) type ListSnapshot = (u64, u64, Arc<Vec<Arc<Value>>>);

pub(super) struct State {
    /// The global resourceVersion counter: the last version handed out.
    pub(super) rv: u64,
    /// The version of the last real write (the counter also moves on [`FakeKube::compact`]).
    pub(super) last_write_rv: u64,
    /// A watch resuming from a version below this gets `410 Expired`.
    pub(super) min_resume_rv: u64,
    pub(super) objects: BTreeMap<Key, Arc<Value>>,
    pub(super) history: VecDeque<Arc<Change>>,
    pub(super) history_limit: usize,
    pub(super) watchers: Vec<Watcher>,
    pub(super) forbidden: HashSet<String>,
    /// (user, collection, verb) refused to that user only.
    pub(super) denied: HashSet<(String, String, String)>,
    /// Collections the server does not serve at all (a CRD not installed): 404 on every request.
    pub(super) unserved: HashSet<String>,
    /// Paged lists in progress: (id, resourceVersion, the items of that moment), newest last.
    pub(super) list_snapshots: VecDeque<ListSnapshot>,
    pub(super) next_snapshot: u64,
    /// `kind` last seen per collection, for list kinds and bookmarks.
    pub(super) kinds: HashMap<String, String>,
    pub(super) next_uid: u64,
}

/// A Kubernetes `Status` failure.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub(super) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
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

pub(super) fn not_found(collection: &str, name: &str) -> ApiError {
    ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", plural_of(collection)))
}

pub(super) fn key(collection: &str, ns: &str, name: &str) -> Key {
    (collection.to_string(), ns.to_string(), name.to_string())
}

impl State {
    pub(super) fn create(
        &mut self,
        collection: &str,
        ns: &str,
        mut obj: Value,
        keep_status: bool,
    ) -> Result<Value, ApiError> {
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
    pub(super) fn patch(
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
    pub(super) fn replace(
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
    pub(super) fn delete(
        &mut self,
        collection: &str,
        ns: &str,
        name: &str,
        preconditions: &Value,
    ) -> Result<Value, ApiError> {
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
    pub(super) fn commit(&mut self, key: &Key, new: Option<Value>) -> Value {
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

    pub(super) fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            let dropped = self.history.pop_front().unwrap();
            self.min_resume_rv = self.min_resume_rv.max(dropped.rv);
        }
    }

    pub(super) fn fill_type(&mut self, collection: &str, obj: &mut Value) {
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

    pub(super) fn kind_of(&self, collection: &str) -> String {
        self.kinds.get(collection).cloned().unwrap_or_else(|| guess_kind(plural_of(collection)))
    }

    pub(super) fn check_forbidden(
        &self,
        collection: &str,
        verb: &str,
        ns: Option<&str>,
        user: &str,
    ) -> Result<(), ApiError> {
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
pub(super) fn merge_server_fields(mut obj: Value, old: &Value) -> Value {
    let meta = ensure_object(&mut obj, "metadata");
    for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
        meta.insert(field.into(), old["metadata"][field].clone());
    }
    obj
}

/// `base` with the `.status` of `status_from` (or none, if it has none).
pub(super) fn with_status_of(base: &Value, status_from: &Value) -> Value {
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
pub(super) fn check_rv(collection: &str, body: &Value, old: &Value) -> Result<(), ApiError> {
    match body["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && Some(rv) != old["metadata"]["resourceVersion"].as_str() => {
            Err(conflict(collection, old["metadata"]["name"].as_str().unwrap_or("")))
        }
        _ => Ok(()),
    }
}

pub(super) fn conflict(collection: &str, name: &str) -> ApiError {
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
pub(super) fn spec_of(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    v
}

pub(super) fn ensure_object<'a>(obj: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
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

pub(super) fn strip_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, v| !v.is_null());
        m.values_mut().for_each(strip_nulls);
    }
}

/// `("v1", "services")` for `api/v1/services`, `("weir.io/v1alpha1", "routes")` for
/// `apis/weir.io/v1alpha1/routes`.
pub(super) fn api_version_and_plural(collection: &str) -> (String, &str) {
    let parts: Vec<&str> = collection.split('/').collect();
    match parts.as_slice() {
        ["api", v, plural] => (v.to_string(), plural),
        ["apis", g, v, plural] => (format!("{g}/{v}"), plural),
        _ => (String::new(), parts.last().copied().unwrap_or("")),
    }
}

pub(super) fn plural_of(collection: &str) -> &str {
    collection.rsplit('/').next().unwrap_or(collection)
}

/// A Kind for a collection never written to (only used in list kinds and bookmarks).
pub(super) fn guess_kind(plural: &str) -> String {
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
pub(super) fn rfc3339_now() -> String {
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

impl Watcher {
    /// The line this watch gets for `change`, if any. With a selector, an object that starts
    /// matching is ADDED and one that stops matching is DELETED, as on a real API server.
    pub(super) fn event_for(&self, change: &Change) -> Option<Bytes> {
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

pub(super) fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": ty, "object": object })).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}
