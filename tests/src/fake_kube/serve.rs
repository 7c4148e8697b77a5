//! The fake's HTTP side: requests routed to the store by verb, paged lists, watches (with
//! bookmarks, timeouts and `410 Expired`), pod port-forwarding and the pods' proxy
//! subresource.

use super::select::Filter;
use super::store::*;
use super::*;

pub(super) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
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

pub(super) fn json_response(status: u16, body: &Value) -> http::Response<Body> {
    let mut r = http::Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

pub(super) fn error_response(e: ApiError) -> http::Response<Body> {
    json_response(e.code, &e.status())
}

/// `/api/v1/namespaces/NS/pods/NAME/portforward?ports=PORT`: (NS, NAME, PORT); one port only.
pub(super) fn port_forward_path(path: &str, query: Option<&str>) -> Option<(String, String, u16)> {
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
pub(super) fn port_forward(
    req: http::Request<hyper::body::Incoming>,
    to: SocketAddr,
    port: u16,
) -> http::Response<Body> {
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
pub(super) fn pod_proxy_path(path: &str) -> Option<(String, String, u16, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/pods/")?;
    let (pod_port, rest) = rest.split_once("/proxy")?;
    let (pod, port) = pod_port.rsplit_once(':')?;
    let rest = if rest.is_empty() { "/".to_string() } else { rest.to_string() };
    Some((ns.to_string(), pod.to_string(), port.parse().ok()?, rest))
}

/// Forwards a proxied request to `to` and relays the answer, as the API server's proxy does.
pub(super) async fn forward(
    req: http::Request<hyper::body::Incoming>,
    to: SocketAddr,
    path: &str,
) -> http::Response<Body> {
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
pub(super) struct Target {
    pub(super) collection: String,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) status: bool,
}

pub(super) fn parse_path(path: &str) -> Option<Target> {
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

pub(super) fn percent_decode(s: &str) -> String {
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

pub(super) fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(super) async fn handle(shared: Arc<Shared>, req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
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

pub(super) enum Reply {
    Json(u16, Value),
    Watch(WatchStart),
}

pub(super) struct WatchStart {
    pub(super) replay: Vec<(u64, Bytes)>,
    pub(super) events: mpsc::Receiver<(u64, Bytes)>,
    pub(super) bookmarks: bool,
    /// The initial-events-end bookmark's version, for `sendInitialEvents=true`.
    pub(super) initial_end: Option<u64>,
    pub(super) start_rv: u64,
    pub(super) timeout: Duration,
    pub(super) kind: String,
    pub(super) api_version: String,
}

pub(super) fn verb(method: &Method, target: &Target, watch: bool) -> &'static str {
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

pub(super) fn respond(
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
pub(super) fn watch_request(
    st: &mut State,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<WatchStart, ApiError> {
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

pub(super) fn start_watch(shared: &Arc<Shared>, w: WatchStart) -> http::Response<Body> {
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

pub(super) async fn run_watch(
    shared: Arc<Shared>,
    w: WatchStart,
    body: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
) {
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
