//! Harness for the end-to-end tests: real `weir-controller` and `weir-proxy` processes on
//! loopback with OS-chosen ports, in-process backends that fail on command, and helpers to
//! wait for conditions (never fixed sleeps).

pub mod chart;
pub mod fake_kube;
pub mod grpc_app;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
pub use weir::backend::Behaviour;
pub use weir::procs::{ChildProc, loopback_controller_args, loopback_sidecar_args, memory_kib, write_atomic};

/// Path of a workspace binary, built (once per test process) with the same profile as the
/// tests so a stale binary is never tested.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/..").to_path_buf();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "weir-controller", "-p", "weir-proxy", "-p", "weir", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("running cargo build");
        assert!(status.success(), "building the weir binaries failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// A scratch directory holding the config files and the processes' logs.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        // WEIR_KEEP_SCRATCH=1 keeps the directory (configs and every process's log) for a look.
        let keep = std::env::var_os("WEIR_KEEP_SCRATCH").is_some();
        let dir = tempfile::Builder::new().prefix("weir-e2e-").disable_cleanup(keep).tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config")).unwrap();
        Self { dir }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn write(&self, file: &str, yaml: &str) {
        write_atomic(&self.config_dir().join(file), yaml).unwrap();
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts a controller over the config directory (on `grpc` when given, to restart one).
    pub async fn controller(&self, grpc: Option<SocketAddr>) -> ChildProc {
        self.controller_with(grpc, &[]).await
    }

    /// Starts a controller with extra flags.
    pub async fn controller_with(&self, grpc: Option<SocketAddr>, extra: &[String]) -> ChildProc {
        let mut a = loopback_controller_args(&self.config_dir(), grpc, "debug");
        a.extend_from_slice(extra);
        ChildProc::spawn("controller", &bin("weir-controller"), &a, self.log("controller")).await.unwrap()
    }

    /// Controller flags for a CA kept in this directory and a token table of
    /// `(token, "namespace/serviceaccount")` entries, plus `extra` flags.
    pub fn identity_flags(&self, entries: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
        let tokens = self.dir.path().join("tokens");
        let table: String = entries.iter().map(|(t, who)| format!("{t} {who}\n")).collect();
        std::fs::write(&tokens, format!("# token table\n{table}")).unwrap();
        let mut flags = vec![
            "--identity-dir".to_string(),
            self.dir.path().join("identity").display().to_string(),
            "--tokens".into(),
            tokens.display().to_string(),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    }

    /// Sidecar flags pointing `--token-file` at a file holding `token`, and `--trust-anchors`
    /// at the anchors of the controller's identity directory (the sidecar verifies the
    /// controller before it sends the token).
    pub fn token_flags(&self, token: &str) -> Vec<String> {
        let path = self.dir.path().join(format!("{token}.token"));
        std::fs::write(&path, token).unwrap();
        vec![
            "--token-file".to_string(),
            path.display().to_string(),
            "--trust-anchors".to_string(),
            self.anchors().display().to_string(),
        ]
    }

    /// The trust-anchor bundle in the controller's identity directory (`root.crt`, or `ca.crt`
    /// when it holds a TLS Secret's keys).
    pub fn anchors(&self) -> PathBuf {
        let dir = self.dir.path().join("identity");
        let ours = dir.join("root.crt");
        if ours.exists() || !dir.join("ca.crt").exists() { ours } else { dir.join("ca.crt") }
    }

    /// The controller at `grpc` as a sidecar reaches it: TLS, verified against
    /// [`anchors`](Self::anchors), expecting the default controller identity in `trust_domain`.
    pub fn control(&self, grpc: SocketAddr, trust_domain: &str) -> weir_proxy::channel::ControlEndpoint {
        weir_proxy::channel::ControlEndpoint {
            addr: grpc.to_string(),
            tls: Some(weir_proxy::channel::ControlTls {
                anchors: weir_proxy::channel::AnchorSource::File(self.anchors()),
                controller_identity: weir_api::spiffe::id(trust_domain, "weir-system", "weir-controller"),
            }),
        }
    }

    /// Starts a sidecar for `workload` (NS/NAME) forwarding inbound traffic to `app`.
    pub async fn proxy(&self, controller: SocketAddr, workload: &str, app: Option<SocketAddr>) -> ChildProc {
        self.proxy_with(controller, workload, app, &[]).await
    }

    /// Starts a sidecar with extra flags.
    pub async fn proxy_with(
        &self,
        controller: SocketAddr,
        workload: &str,
        app: Option<SocketAddr>,
        extra: &[String],
    ) -> ChildProc {
        let mut a = loopback_sidecar_args(controller, workload, app, "debug");
        a.extend_from_slice(extra);
        let name = workload.replace('/', "-");
        ChildProc::spawn(&name, &bin("weir-proxy"), &a, self.log(&name)).await.unwrap()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until the controller at `admin` has reports of `requests` outbound requests to
/// `backend`, then runs `weir stat SERVICE -n NS -o json` against it and returns the row of
/// that backend's outbound traffic.
pub async fn stat_row(admin: SocketAddr, service: &str, ns: &str, backend: &str, requests: u64) -> serde_json::Value {
    wait_until("the reports", Duration::from_secs(10), || async move {
        let s = admin_json(admin, "/stats").await;
        s["series"].as_array().is_some_and(|l| {
            l.iter().any(|s| s["direction"] == "outbound" && s["backend"] == backend && s["requests"] == requests)
        })
    })
    .await;
    let a = admin.to_string();
    let (code, json, err) =
        run_weir(&["stat", service, "-n", ns, "--controller-admin", &a, "--window", "100ms", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    rows.as_array()
        .and_then(|r| r.iter().find(|r| r["backend"] == backend && r["direction"] != "inbound"))
        .cloned()
        .unwrap_or_else(|| panic!("no outbound row for {backend}: {json}"))
}

/// Service `test/{name}` served by `app` behind its own sidecar, and a client sidecar whose
/// configuration has the meshed endpoint: the smallest mesh (no identities). The scratch
/// directory's `services.yaml` is written here.
pub struct SidecarPair {
    pub controller: ChildProc,
    pub server: ChildProc,
    pub client: ChildProc,
}

impl SidecarPair {
    pub async fn start(scratch: &Scratch, name: &str, app: SocketAddr) -> Self {
        scratch.write("services.yaml", &service("test", name, &[]));
        let controller = scratch.controller(None).await;
        let grpc = controller.addr("grpc");
        let server = scratch.proxy(grpc, &format!("test/{name}"), Some(app)).await;
        let client = scratch.proxy(grpc, "test/client", None).await;
        scratch.write("services.yaml", &service("test", name, &[meshed(server.addr("inbound"))]));
        wait_config(client.addr("admin"), "the endpoint", |c| endpoint_count(c, "test", name) == 1).await;
        Self { controller, server, client }
    }
}

/// A MeshAuthorization `name` in namespace `test` selecting the pods labelled `app: {name}`,
/// in `mode`, with `rules` (YAML list items, indented two spaces).
pub fn mesh_authorization(name: &str, mode: &str, rules: &str) -> String {
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: MeshAuthorization\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  \
         targetRef: {{ selector: {{ matchLabels: {{ app: {name} }} }} }}\n  mode: {mode}\n  allow:\n{rules}"
    )
}

/// Service `test/{name}` behind a sidecar with workload identity `test/{name}` (labelled
/// `app={name}`), and client sidecars with identities of their own, all issued by one
/// controller: the server ready, its meshed endpoint (service account `name`) in every client's
/// configuration. The config directory already holds what the test wrote before.
pub struct IdentityMesh {
    pub controller: ChildProc,
    pub server: ChildProc,
    /// In the order of `clients` given to [`IdentityMesh::start`].
    pub clients: Vec<ChildProc>,
}

impl IdentityMesh {
    pub async fn start(
        scratch: &Scratch,
        name: &str,
        app: SocketAddr,
        clients: &[&str],
        server_flags: &[String],
    ) -> Self {
        Self::start_with(scratch, name, app, clients, server_flags, &[]).await
    }

    /// [`IdentityMesh::start`] with extra flags for every client sidecar too.
    pub async fn start_with(
        scratch: &Scratch,
        name: &str,
        app: SocketAddr,
        clients: &[&str],
        server_flags: &[String],
        client_flags: &[String],
    ) -> Self {
        let accounts: Vec<(String, String)> = std::iter::once(name)
            .chain(clients.iter().copied())
            .map(|sa| (format!("t-{sa}"), format!("test/{sa}")))
            .collect();
        let pairs: Vec<(&str, &str)> = accounts.iter().map(|(t, a)| (t.as_str(), a.as_str())).collect();
        let flags = scratch.identity_flags(&pairs, &[]);
        let controller = scratch.controller_with(None, &flags).await;
        let grpc = controller.addr("grpc");
        let mut flags = scratch.token_flags(&format!("t-{name}"));
        flags.extend(["--label".to_string(), format!("app={name}")]);
        flags.extend_from_slice(server_flags);
        let server = scratch.proxy_with(grpc, &format!("test/{name}"), Some(app), &flags).await;
        let mut started = Vec::new();
        for sa in clients {
            let mut flags = scratch.token_flags(&format!("t-{sa}"));
            flags.extend_from_slice(client_flags);
            started.push(scratch.proxy_with(grpc, &format!("test/{sa}"), None, &flags).await);
        }
        wait_ready(server.addr("admin")).await;
        for c in &started {
            wait_ready(c.addr("admin")).await;
        }
        let endpoint = format!("{{ address: \"{}\", meshed: true, serviceAccount: {name} }}", server.addr("inbound"));
        scratch.write("services.yaml", &service("test", name, &[endpoint]));
        for c in &started {
            wait_config(c.addr("admin"), "the endpoint", |cfg| endpoint_count(cfg, "test", name) == 1).await;
        }
        Self { controller, server, clients: started }
    }
}

/// Arguments for a controller in Kubernetes mode (`--kubeconfig`) on loopback with OS-chosen
/// ports, its leader-election Lease in `weir-system`.
pub fn kube_controller_args(kubeconfig: &Path, log_level: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--print-listen-addrs",
        "--log-level",
        log_level,
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--lease-namespace",
        "weir-system",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A hand-driven sidecar: says Hello as `test/NAME`, then Nacks the first snapshot with
/// `nack` (or never answers when `None`). Aborting the task hangs up.
pub async fn fake_sidecar(
    grpc: std::net::SocketAddr,
    name: &str,
    nack: Option<&'static str>,
) -> tokio::task::JoinHandle<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
    let mut client = weir_api::proto::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = weir_api::proto::Hello {
        namespace: "test".into(),
        name: name.into(),
        service_account: name.into(),
        proxy_version: "fake".into(),
        ..Default::default()
    };
    tx.send(weir_api::proto::ProxyMessage { msg: Some(weir_api::proto::proxy_message::Msg::Hello(hello)) })
        .await
        .unwrap();
    let mut stream = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tokio::spawn(async move {
        let _keep = tx.clone();
        while let Ok(Some(m)) = stream.message().await {
            if let (Some(weir_api::proto::controller_message::Msg::Snapshot(s)), Some(reason)) = (m.msg, nack) {
                let msg = weir_api::proto::proxy_message::Msg::Nack(weir_api::proto::Nack {
                    version: s.version,
                    reason: reason.into(),
                    ..Default::default()
                });
                let _ = tx.send(weir_api::proto::ProxyMessage { msg: Some(msg) }).await;
            }
        }
    })
}

/// Runs the `weir` command: (exit code, stdout, stderr).
pub async fn run_weir(args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(bin("weir")).args(args).kill_on_drop(true).output().await.unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// An in-process backend; stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub behaviour: Arc<Behaviour>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let behaviour = Behaviour::new(name, 0.0, Duration::ZERO);
        let task = tokio::spawn(weir::backend::serve(listener, behaviour.clone(), std::future::pending()));
        Self { addr, behaviour, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A meshed endpoint (a sidecar's inbound address) in local-mode YAML.
pub fn meshed(addr: SocketAddr) -> String {
    format!("{{ address: \"{addr}\", meshed: true }}")
}

/// A local-mode Service document with the given endpoint entries.
pub fn service(ns: &str, name: &str, endpoints: &[String]) -> String {
    format!(
        "kind: Service\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n  endpoints: [{}]\n---\n",
        endpoints.join(", ")
    )
}

/// An HTTP/1.1 client.
pub fn http1() -> Client<HttpConnector, BoxBody<Bytes, hyper::Error>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn backend(&self) -> &str {
        self.headers.get("x-weir-backend").and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

pub fn empty() -> BoxBody<Bytes, hyper::Error> {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Sends a request through a sidecar's outbound listener to `authority`.
pub async fn send(
    client: &Client<HttpConnector, BoxBody<Bytes, hyper::Error>>,
    via: SocketAddr,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut b = http::Request::builder().method(method).uri(format!("http://{via}{path}")).header("host", authority);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let rsp = tokio::time::timeout(Duration::from_secs(10), client.request(b.body(empty())?)).await??;
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok(Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// GETs `path` from an admin port, whatever the status; panics when the port does not answer
/// (a dead process is never mistaken for an empty answer).
pub async fn admin_reply(addr: SocketAddr, path: &str) -> Reply {
    send(&http1(), addr, "GET", &addr.to_string(), path, &[])
        .await
        .unwrap_or_else(|e| panic!("admin GET {path} on {addr} got no answer: {e:#}"))
}

/// GETs `path` from an admin port as text; panics unless it answers `200`.
pub async fn admin_text(addr: SocketAddr, path: &str) -> String {
    let rsp = admin_reply(addr, path).await;
    assert_eq!(rsp.status, 200, "admin GET {path} on {addr}: {}", rsp.body);
    rsp.body
}

/// GETs `path` from an admin port as JSON; panics unless it answers `200` with JSON.
pub async fn admin_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let body = admin_text(addr, path).await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin GET {path} on {addr} is not JSON ({e}): {body}"))
}

/// Polls `check` every few milliseconds until it returns true; panics after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the sidecar at `admin` is ready: a workload certificate (when it has an
/// identity) and a configuration from the controller.
pub async fn wait_ready(admin: SocketAddr) -> Duration {
    wait_until("a ready sidecar (certificate and configuration)", Duration::from_secs(20), || async move {
        admin_reply(admin, "/ready").await.body.starts_with("ready")
    })
    .await
}

/// Waits until the sidecar's admin `/config` satisfies `ok`.
pub async fn wait_config(admin: SocketAddr, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> Duration {
    wait_until(what, Duration::from_secs(20), || {
        let ok = &ok;
        async move { ok(&admin_json(admin, "/config").await) }
    })
    .await
}

/// Number of endpoints of `ns/name` in a sidecar's `/config`.
pub fn endpoint_count(config: &serde_json::Value, ns: &str, name: &str) -> usize {
    config["snapshot"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["namespace"] == ns && s["name"] == name))
        .and_then(|s| s["endpoints"].as_array())
        .map(|e| e.len())
        .unwrap_or(0)
}

/// A standard little mesh: a controller, backends `v1` and `v2` of service `web` in namespace
/// `test` (each behind its own sidecar), and a client sidecar. The route file is the caller's.
pub struct TwoVersions {
    pub scratch: Scratch,
    pub controller: ChildProc,
    pub v1: Backend,
    pub v2: Backend,
    pub sidecars: Vec<ChildProc>,
    pub client: ChildProc,
}

impl TwoVersions {
    pub async fn start(route_yaml: &str) -> Self {
        let scratch = Scratch::new();
        scratch.write("services.yaml", &services_doc(&[]));
        scratch.write("route.yaml", route_yaml);
        let controller = scratch.controller(None).await;
        let grpc = controller.addr("grpc");
        let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
        let s1 = scratch.proxy(grpc, "test/web-v1", Some(v1.addr)).await;
        let s2 = scratch.proxy(grpc, "test/web-v2", Some(v2.addr)).await;
        let client = scratch.proxy(grpc, "test/client", None).await;
        scratch.write("services.yaml", &services_doc(&[s1.addr("inbound"), s2.addr("inbound")]));
        let admin = client.addr("admin");
        wait_config(admin, "endpoints of web-v1 and web-v2", |c| {
            endpoint_count(c, "test", "web-v1") == 1 && endpoint_count(c, "test", "web-v2") == 1
        })
        .await;
        Self { scratch, controller, v1, v2, sidecars: vec![s1, s2], client }
    }

    pub fn outbound(&self) -> SocketAddr {
        self.client.addr("outbound")
    }
}

/// Services `web` (no endpoints of its own), `web-v1` and `web-v2` in namespace `test`.
pub fn services_doc(inbound: &[SocketAddr]) -> String {
    let ep = |i: usize| inbound.get(i).map(|a| vec![meshed(*a)]).unwrap_or_default();
    format!("{}{}{}", service("test", "web", &[]), service("test", "web-v1", &ep(0)), service("test", "web-v2", &ep(1)))
}

/// A Route for `web` in namespace `test` with one weighted rule.
pub fn split_route(w1: u32, w2: u32) -> String {
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: Route\nmetadata: {{ name: web, namespace: test }}\nspec:\n  service: web\n  rules:\n  - name: split\n    backendRefs: [{{ name: web-v1, weight: {w1} }}, {{ name: web-v2, weight: {w2} }}]\n"
    )
}

/// Backend weights of the first rule of `ns/name` in a sidecar's `/config`.
pub fn weights(config: &serde_json::Value, ns: &str, name: &str) -> Vec<u64> {
    config["snapshot"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["namespace"] == ns && s["name"] == name))
        .and_then(|s| s["rules"][0]["backends"].as_array())
        .map(|b| b.iter().filter_map(|b| b["weight"].as_u64()).collect())
        .unwrap_or_default()
}

/// Sends one HTTP/2 (prior knowledge) request to `via` with `:authority` set to `authority`,
/// the way an h2c client that addresses the service by name does.
pub async fn send_h2(via: SocketAddr, authority: &str, path: &str) -> anyhow::Result<Reply> {
    let stream = tokio::net::TcpStream::connect(via).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{authority}{path}")).body(empty())?;
    let rsp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = rsp.into_body().collect().await?.to_bytes();
    conn.abort();
    Ok(Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// `weir_identity_renewals_total{result}` from a sidecar's metrics.
pub async fn renewals(admin: SocketAddr, result: &str) -> u64 {
    let m = admin_text(admin, "/metrics").await;
    let prefix = format!("weir_identity_renewals_total{{result=\"{result}\"}} ");
    m.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok()).unwrap_or(0)
}

/// A fresh P-256 key and a CSR (DER) whose only SAN is the URI `uri`.
pub fn keyed_csr(uri: &str) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let der = p.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

/// A CSR (DER) for the URI `uri`, its key thrown away.
pub fn csr(uri: &str) -> Vec<u8> {
    keyed_csr(uri).1
}

/// Calls `weir.v1.Identity/Certify` on the controller at `control`, as a sidecar does.
pub async fn certify(
    control: &weir_proxy::channel::ControlEndpoint,
    token: &str,
    csr_der: Vec<u8>,
) -> Result<weir_api::proto::CertifyResponse, tonic::Status> {
    let channel = control.channel(None, None).await.unwrap();
    let mut client = weir_api::proto::identity_client::IdentityClient::new(channel);
    client.certify(weir_api::proto::CertifyRequest { token: token.into(), csr_der }).await.map(|r| r.into_inner())
}

/// What a fake server's handler sees of a request.
pub struct FakeRequest {
    pub method: http::Method,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A JSON HTTP server on loopback (a fake Kubernetes API, say): `handler` answers every request
/// with a status and a JSON body. Connections live in the returned task: aborting it closes them.
pub async fn fake_json_server<F, Fut>(handler: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(FakeRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u16, serde_json::Value)> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (method, path) = (req.method().clone(), req.uri().path().to_string());
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let (status, json) = handler(FakeRequest { method, path, headers, body }).await;
                        let mut r = http::Response::new(http_body_util::Full::new(Bytes::from(json.to_string())));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A client of the injection webhook over HTTPS, trusting `roots` for `server_name`.
pub struct WebhookClient {
    pub server_name: String,
    pub addr: SocketAddr,
    pub roots: Arc<rustls::RootCertStore>,
}

impl WebhookClient {
    /// POSTs `body` to `path`: (status, body).
    pub async fn post(&self, path: &str, body: String) -> (u16, String) {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header("host", &self.server_name)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let rsp = send.send_request(req).await.unwrap();
        let status = rsp.status().as_u16();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The response of an AdmissionReview for `pod`, and the pod with its patch applied.
    pub async fn admit(&self, path: &str, pod: Value) -> (Value, Value) {
        let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "3f2c", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "operation": "CREATE", "namespace": "shop", "object": pod.clone()}});
        let (status, body) = self.post(path, review.to_string()).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], "3f2c");
        let mut patched = pod;
        if let Some(p) = answer["response"]["patch"].as_str() {
            assert_eq!(answer["response"]["patchType"], "JSONPatch");
            let ops: Value =
                serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p).unwrap()).unwrap();
            for op in ops.as_array().unwrap() {
                // add/replace of whole members, all the webhook emits.
                let path = op["path"].as_str().unwrap();
                let (parent, key) = path.rsplit_once('/').unwrap();
                let target = if parent.is_empty() { &mut patched } else { patched.pointer_mut(parent).unwrap() };
                match op["op"].as_str().unwrap() {
                    "add" => assert!(target.get(key).is_none(), "add over an existing {path}"),
                    "replace" => assert!(target.get(key).is_some(), "replace of a missing {path}"),
                    other => panic!("unexpected op {other}"),
                }
                target[key] = op["value"].clone();
            }
        }
        (answer["response"].clone(), patched)
    }
}
