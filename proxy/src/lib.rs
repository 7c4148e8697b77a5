//! `weir-proxy`: the sidecar data plane.
//!
//! # Layout
//! - [`control`]: the Discovery client feeding a `watch` of [`config::Config`].
//! - [`channel`]: the channel to the controller (TLS verified against out-of-band anchors).
//! - [`config`]: snapshots as validated domain types (the Nack boundary).
//! - [`outbound`]: the application's calls: route, split, balance, forward.
//! - [`identity`]: the workload certificate (in-memory key, Certify, renewal).
//! - [`inbound`]: calls to the application from peers and plain clients.
//! - [`client`]: upstream connections (multiplexed HTTP/2 per peer, pooled HTTP/1.1).
//! - [`tls`]: mutual TLS with SPIFFE identities between sidecars.
//! - [`server`]: the accept loop with protocol detection and draining.
//! - [`tunnel`]: opaque byte streams (CONNECT, and redirected TCP in both directions).
//! - [`upgrade`]: HTTP Upgrade (WebSocket) across the pair as extended CONNECT.
//! - [`errors`]: proxy-made responses, mapped to HTTP in one place.
//! - [`grpc`]: a gRPC call's outcome from its trailers (metrics, breakers, retries).
//! - [`body`]: body types and hop-by-hop header handling.
//! - [`replay`]: request bodies kept (bounded) so an attempt can be sent again.
//! - [`metrics`]: Prometheus series and the Reports sent to the controller.
//! - [`trace`]: request ids, W3C trace context, and spans exported over OTLP.
//! - [`tap`]: `weir tap`'s live view of requests.
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/config`.
//! - [`init`]: `weir-proxy init`, the iptables rules for transparent interception.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod channel;
pub mod client;
pub mod config;
pub mod control;
pub mod errors;
pub mod grpc;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod outbound;
pub mod replay;
pub mod server;
pub mod tap;
pub mod tls;
pub mod trace;
pub mod tunnel;
pub mod upgrade;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;
use weir_api::{proto, rt};

use crate::metrics::{Direction, Metrics};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "weir-proxy",
    version,
    about = "Weir's sidecar proxy",
    after_help = "`weir-proxy init` writes the iptables rules that send a pod's traffic through the sidecar (see `weir-proxy init --help`)."
)]
pub struct Args {
    /// Controller Discovery address (host:port).
    #[arg(long, env = "WEIR_CONTROLLER")]
    pub controller: String,
    /// The workload this sidecar serves, as NAMESPACE/NAME.
    #[arg(long, env = "WEIR_WORKLOAD", value_parser = parse_workload)]
    pub workload: (String, String),
    /// The workload's service account (its mesh identity).
    #[arg(long, env = "WEIR_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// Workload labels, `key=value`, repeated or comma-separated.
    #[arg(long = "label", env = "WEIR_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Where the application's outbound calls arrive.
    #[arg(long, env = "WEIR_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    pub outbound_addr: SocketAddr,
    /// Where peers and clients reach the application through the sidecar.
    #[arg(long, env = "WEIR_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,
    /// The application's own address (inbound traffic goes there).
    #[arg(long, env = "WEIR_APP_ADDR")]
    pub app_addr: Option<SocketAddr>,
    /// Admin endpoints: /live /ready /metrics /config.
    #[arg(long, env = "WEIR_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
    /// Kubernetes cluster domain used in full service names.
    #[arg(long, env = "WEIR_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// How often traffic reports go to the controller.
    #[arg(long, env = "WEIR_REPORT_INTERVAL", default_value = "5s", value_parser = weir_api::duration::flag)]
    pub report_interval: Duration,
    /// Upstream connect timeout.
    #[arg(long, env = "WEIR_CONNECT_TIMEOUT", default_value = "1s", value_parser = weir_api::duration::flag)]
    pub connect_timeout: Duration,
    /// How long draining may take on SIGTERM.
    #[arg(long, env = "WEIR_SHUTDOWN_GRACE", default_value = "10s", value_parser = weir_api::duration::flag)]
    pub shutdown_grace: Duration,
    /// Log level (an EnvFilter directive; RUST_LOG overrides).
    #[arg(long, env = "WEIR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `plain` or `json`.
    #[arg(long, env = "WEIR_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
    /// Print the bound addresses as one JSON line on stdout once listening (for scripts and tests).
    #[arg(long)]
    pub print_listen_addrs: bool,
    /// Log one line per request (target `weir::access`): method, authority, path, status,
    /// duration, upstream, attempts, request id, trace and span ids.
    #[arg(long, env = "WEIR_ACCESS_LOG")]
    pub access_log: bool,
    /// A token proving this workload's identity (a projected ServiceAccount token, or in
    /// local mode one from the controller's table). With it, the sidecar gets a certificate.
    #[arg(long, env = "WEIR_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Trust domain of the mesh's SPIFFE IDs.
    #[arg(long, env = "WEIR_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The mesh's trust anchors (a PEM bundle, several roots during a rotation): the
    /// controller and every peer are verified against them. Given out of band, never taken
    /// from the network; with them the control plane is TLS. Read anew at each use.
    #[arg(long, env = "WEIR_TRUST_ANCHORS", conflicts_with = "trust_anchors_pem")]
    pub trust_anchors: Option<std::path::PathBuf>,
    /// The trust anchors inline, as PEM (what the injector sets).
    #[arg(long, env = "WEIR_TRUST_ANCHORS_PEM", hide_env_values = true)]
    pub trust_anchors_pem: Option<String>,
    /// The controller's identity, NAMESPACE/SERVICEACCOUNT: its certificate must name this.
    #[arg(long, env = "WEIR_CONTROLLER_IDENTITY", default_value = "weir-system/weir-controller", value_parser = weir_api::spiffe::parse_account)]
    pub controller_identity: (String, String),
    /// Threads that carry traffic; 0 means one per CPU this process may run on (its CPU
    /// affinity, cgroup quota permitting). With one, the whole sidecar runs on a single-threaded
    /// runtime: no work-stealing and no wake-ups across threads.
    #[arg(long, env = "WEIR_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Inbound ports that carry opaque TCP, e.g. `5432,6379-6380` (the injector copies the
    /// pod's `weir.io/opaque-ports` annotation): no HTTP detection on them; a meshed client's
    /// mTLS is still recognised. Outbound, Services declare theirs (appProtocol `tcp`).
    #[arg(long, env = "WEIR_OPAQUE_PORTS", default_value = "", value_parser = parse_ports)]
    pub opaque_ports: Ports,
    /// The kubelet's HTTP probes of the application, as a JSON list of `{"port", "path"}` (the
    /// injector copies the pod's probes here): plaintext GETs of exactly these are admitted
    /// whatever the MeshAuthorizations say, so a strict policy does not fail the pod's probes.
    #[arg(long, env = "WEIR_PROBE_PATHS", default_value = "", value_parser = parse_probe_paths)]
    pub probe_paths: ProbePaths,
    /// Export spans to this OpenTelemetry collector, `http://HOST:PORT` (its OTLP receiver;
    /// without it no span is recorded, and trace context is only passed on).
    #[arg(long, env = "WEIR_TRACE_COLLECTOR", value_parser = weir_api::telemetry::parse_collector)]
    pub trace_collector: Option<http::Uri>,
    /// How spans reach the collector: `grpc` (OTLP/gRPC, port 4317) or `http` (OTLP/HTTP
    /// protobuf, port 4318, `POST /v1/traces` unless the address has a path).
    #[arg(long, env = "WEIR_TRACE_PROTOCOL", default_value = "grpc")]
    pub trace_protocol: trace::export::Protocol,
    /// The share of new traces recorded, from 0 to 1. A request that arrives with trace
    /// context follows its sampled flag whatever this says.
    #[arg(long, env = "WEIR_TRACE_SAMPLING", default_value = "0.01", value_parser = weir_api::telemetry::parse_sampling)]
    pub trace_sampling: f64,
    /// Resource attributes of exported spans, `key=value`, repeated or comma-separated
    /// (`service.name` defaults to the workload's `app.kubernetes.io/name` or `app` label, else
    /// its name; `service.namespace` and `k8s.namespace.name` to its namespace).
    #[arg(long = "trace-attribute", env = "WEIR_TRACE_ATTRIBUTES", value_delimiter = ',', value_parser = weir_api::telemetry::parse_attribute)]
    pub trace_attributes: Vec<(String, String)>,
}

impl Args {
    /// The spans' resource: the workload's defaults, overridden by `--trace-attribute`.
    fn trace_resource(&self) -> Vec<(String, String)> {
        let (ns, name) = &self.workload;
        let label = |k: &str| self.labels.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let service = label("app.kubernetes.io/name").or_else(|| label("app")).unwrap_or_else(|| name.clone());
        let mut attrs: BTreeMap<String, String> = [
            ("service.name", service),
            ("service.namespace", ns.clone()),
            ("k8s.namespace.name", ns.clone()),
            ("weir.workload", format!("{ns}/{name}")),
            ("telemetry.sdk.name", "weir-proxy".to_string()),
            ("telemetry.sdk.version", env!("CARGO_PKG_VERSION").to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        attrs.extend(self.trace_attributes.iter().cloned());
        attrs.into_iter().collect()
    }
}

/// The kubelet's probes the inbound side admits (see [`Args::probe_paths`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbePaths(pub Vec<weir_api::service::ProbePath>);

fn parse_probe_paths(s: &str) -> Result<ProbePaths, String> {
    weir_api::service::parse_probe_paths(s).map(ProbePaths)
}

/// A list of ports, given as `5432,6379-6380`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

fn parse_ports(s: &str) -> Result<Ports, String> {
    weir_api::service::parse_port_list(s).map(Ports)
}

fn parse_workload(s: &str) -> Result<(String, String), String> {
    let (ns, name) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME"))?;
    for part in [ns, name] {
        weir_api::validate::dns_label("workload", part).map_err(|e| e.message)?;
    }
    Ok((ns.to_string(), name.to_string()))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: empty label key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Entry point shared by `weir-proxy` and `weir proxy`.
pub fn main_with(args: Args) -> anyhow::Result<()> {
    rt::init_logging(&args.log_level, args.log_format == "json");
    let threads = match args.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    runtime.block_on(run(args))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM right after the listen addresses are announced must drain.
    let stop = rt::shutdown_signal();
    let (ns, name) = args.workload.clone();
    let workload = format!("{ns}/{name}");
    let metrics = Metrics::new();
    let (config_tx, config_rx) = watch::channel(None);
    let clients = client::Clients::new(args.connect_timeout);
    let balancer = outbound::balance::Balancer::default();
    let draining = Arc::new(AtomicBool::new(false));

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding the {what} listener on {addr}"))
    };
    let outbound_l = bind(args.outbound_addr, "outbound").await?;
    let inbound_l = bind(args.inbound_addr, "inbound").await?;
    let admin_l = bind(args.admin_addr, "admin").await?;
    let addrs = serde_json::json!({
        "outbound": outbound_l.local_addr()?, "inbound": inbound_l.local_addr()?, "admin": admin_l.local_addr()?,
    });

    let anchors = match (&args.trust_anchors, &args.trust_anchors_pem) {
        (Some(path), _) => Some(channel::AnchorSource::File(path.clone())),
        (None, Some(pem)) => Some(channel::AnchorSource::Pem(pem.as_str().into())),
        (None, None) => None,
    };
    match (&anchors, &args.token_file) {
        (Some(a), Some(_)) => {
            a.load().map_err(anyhow::Error::msg)?;
        }
        (None, Some(_)) => anyhow::bail!(
            "--token-file needs --trust-anchors (or WEIR_TRUST_ANCHORS_PEM): the sidecar verifies the controller before sending its token, and never takes trust anchors from the network"
        ),
        (Some(_), None) => {
            anyhow::bail!("--trust-anchors needs --token-file: Discovery over TLS requires a workload certificate")
        }
        (None, None) => {}
    }
    let endpoint = channel::ControlEndpoint {
        addr: args.controller.clone(),
        tls: anchors.map(|anchors| channel::ControlTls {
            anchors,
            controller_identity: weir_api::spiffe::id(
                &args.trust_domain,
                &args.controller_identity.0,
                &args.controller_identity.1,
            ),
        }),
    };
    let (trigger, drain) = rt::drain();
    let (control_trigger, control_drain) = rt::drain();
    let control_drain_identity = control_drain.clone();
    let (creds_tx, creds_rx) = watch::channel(None);
    let control_cfg = control::ControlConfig {
        endpoint: endpoint.clone(),
        credentials: args.token_file.is_some().then(|| creds_rx.clone()),
        hello: proto::Hello {
            namespace: ns,
            name,
            service_account: args.service_account.clone(),
            labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>().into_iter().collect(),
            proxy_version: env!("CARGO_PKG_VERSION").to_string(),
            admin_port: u32::from(admin_l.local_addr()?.port()),
            incremental: true,
        },
        cluster_domain: args.cluster_domain.clone(),
        report_interval: args.report_interval,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
    };
    let control = tokio::spawn(control::run(control_cfg, config_tx, metrics.clone(), control_drain));
    let identity_task = args.token_file.clone().map(|token_file| {
        let cfg = identity::IdentityConfig {
            endpoint: endpoint.clone(),
            token_file,
            identity: weir_api::spiffe::id(&args.trust_domain, &args.workload.0, &args.service_account),
        };
        tokio::spawn(identity::run(cfg, creds_tx, metrics.identity.clone(), control_drain_identity.clone()))
    });

    // Forget connections and statistics of endpoints that left the configuration.
    let mut prune_rx = config_rx.clone();
    let resilience = outbound::resilience::Resilience::new(metrics.resilience.clone());
    let health = outbound::health::Health::default();
    let (health_trigger, health_drain) = rt::drain();
    let mesh = outbound::health::Mesh {
        credentials: args.token_file.is_some().then(|| creds_rx.clone()),
        trust_domain: args.trust_domain.clone().into(),
    };
    let health_task = tokio::spawn(outbound::health::run(
        config_rx.clone(),
        clients.clone(),
        mesh,
        health.clone(),
        metrics.resilience.clone(),
        health_drain,
    ));
    let (prune_balancer, prune_clients, prune_resilience, app) =
        (balancer.clone(), clients.clone(), resilience.clone(), args.app_addr);
    tokio::spawn(async move {
        while prune_rx.changed().await.is_ok() {
            let Some(cfg) = prune_rx.borrow_and_update().clone() else {
                continue;
            };
            let live: HashSet<SocketAddr> =
                cfg.services.values().flat_map(|s| s.endpoints.iter().map(|e| e.addr)).chain(app).collect();
            prune_balancer.retain(|a| live.contains(a));
            prune_clients.h2.retain(|a| live.contains(a));
            let policies: HashSet<Arc<str>> =
                cfg.services.values().flat_map(|s| s.policies.iter().map(|p| p.name.clone())).collect();
            prune_resilience.retain(&policies);
            prune_balancer.retain_policies(&policies);
        }
    });

    let taps = tap::Taps::counted(metrics.taps_open.clone(), metrics.tap_events.clone());
    let (trace_trigger, trace_drain) = rt::drain();
    let (tracer, trace_task) = match &args.trace_collector {
        Some(collector) => {
            let cfg = trace::export::ExportConfig::new(
                collector.clone(),
                args.trace_protocol,
                args.trace_sampling,
                args.trace_resource(),
            );
            let (tracer, task) = trace::export::start(cfg, metrics.trace.clone(), trace_drain);
            (tracer, Some(task))
        }
        None => (trace::Tracer::default(), None),
    };
    // Shared by every request (one reference count each), not cloned per request.
    let out = Arc::new(outbound::Outbound {
        config: config_rx.clone(),
        clients: clients.clone(),
        balancer,
        resilience: resilience.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        credentials: args.token_file.is_some().then(|| creds_rx.clone()),
        trust_domain: args.trust_domain.clone().into(),
        tunnels: tunnel::Tunnels::new(drain.clone(), args.shutdown_grace),
        access_log: args.access_log,
        taps: taps.clone(),
        tracer: tracer.clone(),
    });
    let mut inb = inbound::Inbound::new(
        args.app_addr,
        &workload,
        config_rx.clone(),
        args.trust_domain.clone().into(),
        inbound::Shared {
            clients,
            metrics: metrics.clone(),
            resilience,
            tunnels: tunnel::Tunnels::new(drain.clone(), args.shutdown_grace),
        },
    );
    inb.access_log = args.access_log;
    inb.taps = taps.clone();
    inb.tracer = tracer;
    inb.probe_paths = args.probe_paths.0.clone().into();
    let inb = Arc::new(inb);
    let grace = args.shutdown_grace;
    // A redirected connection bound for one of these (another pod calling `podIP:4140`) is
    // refused: the sidecar's listeners are never reachable through interception.
    let own_ports: Vec<u16> =
        [&outbound_l, &inbound_l, &admin_l].iter().filter_map(|l| l.local_addr().ok().map(|a| a.port())).collect();
    let (out_tcp, inb_tcp) = (out.clone(), inb.clone());
    let opaque_config = config_rx.clone();
    let inbound_opaque: Arc<[u16]> = args.opaque_ports.0.clone().into();
    let outbound_task = tokio::spawn(server::serve(
        outbound_l,
        server::Listener {
            direction: Direction::Outbound,
            metrics: metrics.clone(),
            handler: move |req, peer| out.clone().handle(req, peer),
            drain: drain.clone(),
            grace,
            tls: None,
            opaque: Some(Arc::new(move |conn| Box::pin(out_tcp.clone().carry_tcp(conn)))),
            // Ports the Services called declare opaque, as the configuration in force says.
            declared_opaque: Some(Arc::new(move |orig| {
                opaque_config.borrow().as_ref().is_some_and(|c: &Arc<config::Config>| c.opaque_at(orig))
            })),
            own_ports: own_ports.clone(),
        },
    ));
    let inbound_task = tokio::spawn(server::serve(
        inbound_l,
        server::Listener {
            direction: Direction::Inbound,
            metrics: metrics.clone(),
            handler: move |req, peer| inb.clone().handle(req, peer),
            drain: drain.clone(),
            grace,
            tls: args.token_file.is_some().then(|| creds_rx.clone()),
            opaque: Some(Arc::new(move |conn| Box::pin(inb_tcp.clone().carry_tcp(conn)))),
            declared_opaque: (!inbound_opaque.is_empty())
                .then(|| -> server::DeclaredOpaque { Arc::new(move |orig| inbound_opaque.contains(&orig.port())) }),
            own_ports,
        },
    ));
    let admin = admin::Admin {
        config: config_rx,
        credentials: args.token_file.is_some().then_some(creds_rx),
        metrics,
        draining: draining.clone(),
        taps,
    };
    let (admin_trigger, admin_drain) = rt::drain();
    let admin_task = tokio::spawn(weir_api::server::serve_admin(
        admin_l,
        move |req, peer| admin.clone().handle(req, peer),
        admin_drain,
        grace,
    ));
    tracing::info!(%workload, listening = %addrs, controller = %args.controller, "proxy started");
    if args.print_listen_addrs {
        println!("{addrs}");
    }

    stop.await;
    draining.store(true, Ordering::Release);
    trigger.trigger();
    let _ = tokio::join!(outbound_task, inbound_task);
    // The last requests' spans go out before the sidecar does.
    trace_trigger.trigger();
    if let Some(task) = trace_task {
        let _ = task.await;
    }
    // Traffic has drained; now the control stream and the admin port can go.
    control_trigger.trigger();
    admin_trigger.trigger();
    health_trigger.trigger();
    let _ = tokio::join!(control, admin_task, health_task);
    if let Some(t) = identity_task {
        let _ = t.await;
    }
    tracing::info!("proxy stopped");
    Ok(())
}

#[cfg(test)]
mod args_tests {
    use super::*;

    #[test]
    fn opaque_ports_parse_as_a_list_and_bad_ones_are_named() {
        let base = ["weir-proxy", "--controller", "127.0.0.1:1", "--workload", "ns/a"];
        let a = Args::try_parse_from(base.iter().copied().chain(["--opaque-ports", "5432,6379-6380"])).unwrap();
        assert_eq!(a.opaque_ports, Ports(vec![5432, 6379, 6380]));
        assert_eq!(Args::try_parse_from(base).unwrap().opaque_ports, Ports::default());
        let err = Args::try_parse_from(base.iter().copied().chain(["--opaque-ports", "pg"])).unwrap_err().to_string();
        assert!(err.contains("\"pg\" is not a port"), "{err}");
    }
}
