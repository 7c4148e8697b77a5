//! How the `weir` command reaches the controllers' and sidecars' admin endpoints: directly at
//! an address (local mode, or a port-forward), or through the Kubernetes API server's `proxy`
//! subresource of each controller pod (every replica: each knows the sidecars connected to it)
//! and of the sidecar's own pod.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;

/// The controller's admin port in its pod (the chart's `--admin-addr`).
pub const CONTROLLER_ADMIN_PORT: u16 = 9990;
/// Labels of the chart's controller pods.
pub const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/name=weir,app.kubernetes.io/component=controller";
/// The leader-election Lease (the controller's `--lease-name` default).
pub const LEASE: &str = "weir-controller";

/// The plain-HTTP client every admin call goes through.
pub(crate) type Http = Client<HttpConnector, Empty<Bytes>>;

/// Where the controllers are: flags shared by every command that asks them.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The controller's admin address (local mode, or a port-forward). Default 127.0.0.1:9990
    /// unless --kubeconfig or --kube is given.
    #[arg(long, global = true, env = "WEIR_CONTROLLER_ADMIN")]
    pub controller_admin: Option<SocketAddr>,
    /// Reach every controller replica through this cluster's API server (the pods' proxy
    /// subresource: needs get on pods/proxy in the Weir namespace); sidecars' configuration
    /// through a port-forward (create on pods/portforward in their namespace).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Like --kubeconfig, with kube's usual lookup (KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, global = true)]
    pub kube: bool,
    /// The namespace Weir is installed in (Kubernetes).
    #[arg(long, global = true, default_value = "weir-system")]
    pub weir_namespace: String,
}

impl Target {
    /// Whether the command talks to a cluster.
    pub fn is_kube(&self) -> bool {
        self.controller_admin.is_none() && (self.kubeconfig.is_some() || self.kube)
    }

    pub async fn connect(&self) -> anyhow::Result<Admin> {
        let http: Http = Client::builder(TokioExecutor::new()).build_http();
        if !self.is_kube() {
            let addr = self.controller_admin.unwrap_or_else(|| ([127, 0, 0, 1], CONTROLLER_ADMIN_PORT).into());
            return Ok(Admin::Direct { http: Box::new(http), addr });
        }
        let client = kube_client(self.kubeconfig.as_ref()).await?;
        Ok(Admin::Kube { client, namespace: self.weir_namespace.clone() })
    }
}

/// A Kubernetes client from `kubeconfig`, or kube's usual inference when `None`.
pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await.context("finding a kubeconfig (KUBECONFIG, ~/.kube/config)")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// An HTTP answer: status and body.
pub struct Answer {
    pub status: http::StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self, what: &str) -> anyhow::Result<serde_json::Value> {
        if !self.status.is_success() {
            bail!("{what}: {} {}", self.status, String::from_utf8_lossy(&self.body).trim());
        }
        serde_json::from_slice(&self.body).with_context(|| format!("{what}: not JSON"))
    }
}

pub enum Admin {
    Direct { http: Box<Http>, addr: SocketAddr },
    Kube { client: kube::Client, namespace: String },
}

impl Admin {
    /// Every controller replica: its address, or its pod's name (ready pods only).
    pub async fn replicas(&self) -> anyhow::Result<Vec<String>> {
        match self {
            Admin::Direct { addr, .. } => Ok(vec![addr.to_string()]),
            Admin::Kube { client, namespace } => {
                let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
                let list = pods
                    .list(&kube::api::ListParams::default().labels(CONTROLLER_SELECTOR))
                    .await
                    .with_context(|| format!("listing the controller pods in {namespace}"))?;
                let mut ready: Vec<String> =
                    list.items.iter().filter(|p| pod_ready(p)).filter_map(|p| p.metadata.name.clone()).collect();
                ready.sort();
                if ready.is_empty() {
                    bail!(
                        "no ready controller pod in {namespace} ({} found; is Weir installed? helm install weir charts/weir -n {namespace} --create-namespace)",
                        list.items.len()
                    );
                }
                Ok(ready)
            }
        }
    }

    /// The replica that leads (drives canaries): the Lease holder in Kubernetes.
    pub async fn leader(&self) -> anyhow::Result<String> {
        match self {
            Admin::Direct { addr, .. } => Ok(addr.to_string()),
            Admin::Kube { client, namespace } => {
                let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), namespace);
                let lease = leases
                    .get_opt(LEASE)
                    .await
                    .with_context(|| format!("reading the Lease {namespace}/{LEASE}"))?
                    .with_context(|| format!("no Lease {namespace}/{LEASE}: no controller has led yet"))?;
                lease
                    .spec
                    .and_then(|s| s.holder_identity)
                    .filter(|h| !h.is_empty())
                    .with_context(|| format!("the Lease {namespace}/{LEASE} has no holder: no controller leads now"))
            }
        }
    }

    /// `method path` on one controller replica's admin port.
    pub async fn call(&self, replica: &str, method: http::Method, path: &str) -> anyhow::Result<Answer> {
        match self {
            Admin::Direct { http, addr } => direct(http, *addr, method, path, "the controller's admin port").await,
            Admin::Kube { client, namespace } => {
                pod_proxy(client, namespace, replica, CONTROLLER_ADMIN_PORT, method, path).await
            }
        }
    }

    /// GET `path` (JSON) from every replica.
    pub async fn get_all(&self, path: &str) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        for r in self.replicas().await? {
            let v = self.call(&r, http::Method::GET, path).await?.json(&format!("{r}{path}"))?;
            out.push((r, v));
        }
        Ok(out)
    }

    /// GET `path` (JSON) from the admin port of a connected sidecar, as the controller's
    /// `/resources` lists it (`workload`, `admin`).
    pub async fn sidecar_get(&self, proxy: &serde_json::Value, path: &str) -> anyhow::Result<serde_json::Value> {
        let (workload, admin) = sidecar_admin(proxy)?;
        match self {
            Admin::Direct { http, .. } => {
                direct(http, admin, http::Method::GET, path, "the sidecar's admin port").await?.json(path)
            }
            Admin::Kube { client, .. } => {
                // A sidecar's workload is its pod: NAMESPACE/POD. Its admin port shows the
                // configuration only to loopback clients, so this goes the way `kubectl
                // port-forward` does (the connection starts inside the pod), not through the
                // API server's proxy (which a sidecar refuses, as any other pod).
                let (ns, pod) = workload.split_once('/').with_context(|| format!("workload {workload:?}"))?;
                port_forward_get(client, ns, pod, admin.port(), path)
                    .await?
                    .json(&format!("{workload}:{}{path}", admin.port()))
            }
        }
    }
}

impl Admin {
    /// `GET path` on a sidecar's admin port as a stream of lines: `on_line` gets each line as
    /// it arrives until it returns `false` or the sidecar ends the stream (reached as
    /// [`Self::sidecar_get`] reaches it).
    pub async fn sidecar_stream(
        &self,
        proxy: &serde_json::Value,
        path: &str,
        on_line: impl FnMut(&[u8]) -> bool,
    ) -> anyhow::Result<()> {
        let (workload, admin) = sidecar_admin(proxy)?;
        match self {
            Admin::Direct { http, .. } => {
                let req = http::Request::get(format!("http://{admin}{path}")).body(Empty::new())?;
                let rsp =
                    http.request(req).await.with_context(|| format!("reaching the sidecar's admin port at {admin}"))?;
                read_lines(rsp, &format!("{admin}{path}"), on_line).await
            }
            Admin::Kube { client, .. } => {
                let (ns, pod) = workload.split_once('/').with_context(|| format!("workload {workload:?}"))?;
                let (mut send, conn, forward) = port_forward_connect(client, ns, pod, admin.port()).await?;
                let req = http::Request::get(path)
                    .header(http::header::HOST, format!("127.0.0.1:{}", admin.port()))
                    .body(Empty::<Bytes>::new())?;
                let what = format!("{workload}:{}{path}", admin.port());
                let result = match send.send_request(req).await {
                    Ok(rsp) => read_lines(rsp, &what, on_line).await,
                    Err(e) => Err(anyhow::anyhow!("{what}: {e}")),
                };
                conn.abort();
                forward.abort();
                result
            }
        }
    }
}

/// Feeds `rsp`'s body to `on_line` line by line; a non-200 answer is an error with its text.
async fn read_lines<B>(rsp: http::Response<B>, what: &str, mut on_line: impl FnMut(&[u8]) -> bool) -> anyhow::Result<()>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let status = rsp.status();
    let mut body = rsp.into_body();
    if status != http::StatusCode::OK {
        let text = body.collect().await?.to_bytes();
        bail!("{what}: {status}: {}", String::from_utf8_lossy(&text).trim());
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if !on_line(&line[..line.len() - 1]) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A connected sidecar's workload and admin address, as a controller lists it.
fn sidecar_admin(proxy: &serde_json::Value) -> anyhow::Result<(&str, SocketAddr)> {
    let workload = proxy["workload"].as_str().unwrap_or("?");
    let admin = proxy["admin"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("the sidecar of {workload} did not say where its admin port is; use --proxy-admin"))?;
    Ok((workload, admin))
}

/// An HTTP/1.1 connection to `port` of a pod through a port-forward (`pods/portforward`, as
/// `kubectl port-forward`: it reaches the pod from its own loopback). The caller aborts the
/// returned task and forwarder when done.
async fn port_forward_connect(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    port: u16,
) -> anyhow::Result<(
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
    kube::api::Portforwarder,
)> {
    let what = || format!("port-forwarding to {namespace}/{pod}:{port} (needs create on pods/portforward)");
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let mut forward = pods.portforward(pod, &[port]).await.with_context(what)?;
    let stream = forward.take_stream(port).with_context(what)?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.with_context(what)?;
    Ok((send, tokio::spawn(conn), forward))
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn direct(http: &Http, addr: SocketAddr, method: http::Method, path: &str, what: &str) -> anyhow::Result<Answer> {
    let req = http::Request::builder().method(method).uri(format!("http://{addr}{path}")).body(Empty::new())?;
    let rsp = http.request(req).await.with_context(|| format!("reaching {what} at {addr}"))?;
    let status = rsp.status();
    Ok(Answer { status, body: rsp.into_body().collect().await?.to_bytes() })
}

/// Longest a request through a port-forward may take.
const PORT_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// `GET path` on `port` of a pod through a port-forward (`pods/portforward`, as `kubectl
/// port-forward`: the request reaches the pod from its own loopback).
async fn port_forward_get(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<Answer> {
    let what = || format!("port-forwarding to {namespace}/{pod}:{port} (needs create on pods/portforward)");
    let attempt = async {
        let (mut send, conn, forward) = port_forward_connect(client, namespace, pod, port).await?;
        let req = http::Request::get(path)
            .header(http::header::HOST, format!("127.0.0.1:{port}"))
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())?;
        let rsp = send.send_request(req).await.with_context(what)?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await.with_context(what)?.to_bytes();
        drop(send);
        conn.abort();
        forward.abort();
        Ok(Answer { status, body })
    };
    tokio::time::timeout(PORT_FORWARD_TIMEOUT, attempt)
        .await
        .with_context(|| format!("{}: no answer within {PORT_FORWARD_TIMEOUT:?}", what()))?
}

/// `method path` on `port` of a pod, through the API server's proxy subresource.
async fn pod_proxy(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    port: u16,
    method: http::Method,
    path: &str,
) -> anyhow::Result<Answer> {
    let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}");
    let req = http::Request::builder().method(method).uri(&uri).body(kube::client::Body::empty())?;
    let rsp =
        client.send(req).await.with_context(|| format!("reaching {namespace}/{pod}:{port} through the API server"))?;
    let status = rsp.status();
    let body = rsp.into_body().collect_bytes().await?;
    Ok(Answer { status, body })
}
