//! `weir-controller`: reads resources, translates them into per-sidecar views and streams
//! those to the sidecars.
//!
//! # Layout
//! - [`source`]: where resources come from (a directory of YAML files, or Kubernetes).
//! - [`index`]: the resources in force and the rejected definitions.
//! - [`translator`]: index → the protocol's view of the mesh.
//! - [`state`]: the published view, shared through a `watch` channel.
//! - [`grpc`]: the Discovery server (one session per sidecar).
//! - [`identity`]: the certificate authority and `weir.v1.Identity/Certify`.
//! - [`inject`]: what a pod gets to join the mesh (webhook and `weir inject`).
//! - [`proxies`]: the registry of connected sidecars and what each acked.
//! - [`reports`]: traffic reports aggregated from the sidecars.
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/resources`, `/stats`.
//! - [`leader`]: Lease-based leader election among replicas (Kubernetes mode).
//! - [`status`]: status conditions of Weir's custom resources (written by the leader).
//! - [`webhook`]: the sidecar injection admission webhook (HTTPS).
//! - [`metrics`]: the controller's Prometheus metrics.
#![forbid(unsafe_code)]

pub mod admin;
pub mod analyze;
pub mod canary;
pub mod grpc;
pub mod identity;
pub mod index;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod proxies;
pub mod reports;
pub mod source;
pub mod state;
pub mod status;
pub mod translator;
pub mod webhook;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use weir_api::rt;

use crate::index::Index;
use crate::state::MeshState;

#[derive(Parser, Debug, Clone)]
#[command(name = "weir-controller", version, about = "Weir's control plane")]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Local mode: read resources from the YAML files in this directory (and watch it).
    #[arg(long, env = "WEIR_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Where sidecars connect (Discovery gRPC).
    #[arg(long, env = "WEIR_GRPC_ADDR", default_value = "127.0.0.1:8090")]
    pub grpc_addr: SocketAddr,
    /// Admin endpoints: /live /ready /metrics /resources /stats.
    #[arg(long, env = "WEIR_ADMIN_ADDR", default_value = "127.0.0.1:9990")]
    pub admin_addr: SocketAddr,
    /// Log level (an EnvFilter directive; RUST_LOG overrides).
    #[arg(long, env = "WEIR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `plain` or `json`.
    #[arg(long, env = "WEIR_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
    /// How long draining may take on SIGTERM.
    #[arg(long, env = "WEIR_SHUTDOWN_GRACE", default_value = "5s", value_parser = weir_api::duration::flag)]
    pub shutdown_grace: Duration,
    /// On SIGTERM, how long to keep serving while reporting not ready, before draining (so
    /// the webhook and gRPC endpoints leave the Services' endpoints before their listeners
    /// close: no refused admission calls during rollouts).
    #[arg(long, env = "WEIR_SHUTDOWN_DELAY", default_value = "0s", value_parser = weir_api::duration::flag)]
    pub shutdown_delay: Duration,
    /// Print the bound addresses as one JSON line on stdout once listening (for scripts and tests).
    #[arg(long)]
    pub print_listen_addrs: bool,
    /// Serve workload identities: the trust anchor and issuer live here (generated once when
    /// the directory is empty).
    #[arg(long, env = "WEIR_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// Local mode's token table (`TOKEN NAMESPACE/SERVICEACCOUNT` lines). Without it, tokens
    /// are projected ServiceAccount tokens checked with a Kubernetes TokenReview.
    #[arg(long, env = "WEIR_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API; default: kube's inference (`KUBECONFIG`, which may
    /// list several files, then `~/.kube/config`, then the in-cluster ServiceAccount).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Audience the sidecars' ServiceAccount tokens must be issued for.
    #[arg(long, env = "WEIR_TOKEN_AUDIENCE", default_value = "weir")]
    pub token_audience: String,
    /// Trust domain of the SPIFFE IDs issued.
    #[arg(long, env = "WEIR_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The controller's own identity, NAMESPACE/SERVICEACCOUNT: with --identity-dir, the gRPC
    /// port serves TLS with a certificate for this SPIFFE ID, which sidecars expect (the
    /// injector tells them).
    #[arg(long, env = "WEIR_CONTROLLER_IDENTITY", default_value = "weir-system/weir-controller", value_parser = weir_api::spiffe::parse_account)]
    pub controller_identity: (String, String),
    /// Where canary progress is kept across restarts; default `<config-dir>/.weir/canaries.json`.
    #[arg(long, env = "WEIR_CANARY_STATE")]
    pub canary_state: Option<PathBuf>,
    /// Lifetime of issued workload certificates.
    #[arg(long, env = "WEIR_CERT_LIFETIME", default_value = "24h", value_parser = weir_api::duration::flag)]
    pub cert_lifetime: Duration,
    /// Kubernetes mode: watch only this namespace (repeat the flag, or separate with commas);
    /// default: all namespaces.
    #[arg(long = "namespace", env = "WEIR_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Namespace of the leader-election Lease; default: `POD_NAMESPACE`, else `weir-system`.
    #[arg(long, env = "WEIR_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "WEIR_LEASE_NAME", default_value = "weir-controller")]
    pub lease_name: String,
    /// How long a leader's lease lasts without renewal (a standby takes over after it).
    #[arg(long, env = "WEIR_LEASE_DURATION", default_value = "15s", value_parser = weir_api::duration::flag)]
    pub lease_duration: Duration,
    /// How often the leader renews (and standbys retry); at most half of --lease-duration.
    #[arg(long, env = "WEIR_LEASE_RENEW", default_value = "2s", value_parser = weir_api::duration::flag)]
    pub lease_renew: Duration,
    /// Serve the sidecar injection webhook (HTTPS) here.
    #[arg(long, env = "WEIR_WEBHOOK_ADDR", requires = "webhook_tls_dir")]
    pub webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate and key: `tls.crt` and `tls.key` (a mounted TLS Secret).
    #[arg(long, env = "WEIR_WEBHOOK_TLS_DIR")]
    pub webhook_tls_dir: Option<PathBuf>,
    /// The proxy image injected pods run.
    #[arg(long, env = "WEIR_PROXY_IMAGE", default_value_t = inject::Settings::default().proxy_image)]
    pub proxy_image: String,
    /// Secrets for pulling the proxy image, added to injected pods (repeat, or separate with
    /// commas).
    #[arg(long = "proxy-image-pull-secret", env = "WEIR_PROXY_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    pub proxy_image_pull_secrets: Vec<String>,
    /// Where injected sidecars reach this controller.
    #[arg(long, env = "WEIR_INJECT_CONTROLLER_ADDR", default_value_t = inject::Settings::default().controller_addr)]
    pub inject_controller_addr: String,
    /// The OpenTelemetry collector injected sidecars export spans to (`http://HOST:PORT`, its
    /// OTLP receiver); without it they export none unless a pod's `weir.io/trace-collector`
    /// annotation names one.
    #[arg(long, env = "WEIR_INJECT_TRACE_COLLECTOR", value_parser = weir_api::telemetry::parse_collector)]
    pub inject_trace_collector: Option<http::Uri>,
    /// The injected sidecars' OTLP protocol: `grpc` or `http` (`weir.io/trace-protocol`).
    #[arg(long, env = "WEIR_INJECT_TRACE_PROTOCOL", default_value = "grpc")]
    pub inject_trace_protocol: weir_api::telemetry::Protocol,
    /// The share of new traces injected sidecars record, 0 to 1 (`weir.io/trace-sampling`).
    #[arg(long, env = "WEIR_INJECT_TRACE_SAMPLING", default_value = "0.01", value_parser = weir_api::telemetry::parse_sampling)]
    pub inject_trace_sampling: f64,
    /// Resource attributes of injected sidecars' spans, `key=value` (repeat, or separate with
    /// commas).
    #[arg(long = "inject-trace-attribute", env = "WEIR_INJECT_TRACE_ATTRIBUTES", value_delimiter = ',', value_parser = weir_api::telemetry::parse_attribute)]
    pub inject_trace_attributes: Vec<(String, String)>,
    /// This replica's name in the Lease; default: `POD_NAME`, else `<hostname>-<pid>`.
    #[arg(long, env = "WEIR_REPLICA_NAME")]
    pub replica_name: Option<String>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print every CRD as YAML (or write one file per CRD into --out-dir).
    Crds {
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

/// Entry point shared by `weir-controller` and `weir controller`.
pub fn main_with(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Crds { out_dir }) = &args.command {
        return print_crds(out_dir.as_deref());
    }
    rt::init_logging(&args.log_level, args.log_format == "json");
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

fn print_crds(out_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    for (file, yaml) in weir_api::crds_yaml()? {
        match out_dir {
            Some(dir) => std::fs::write(dir.join(&file), &yaml).with_context(|| format!("writing {file}"))?,
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

/// Where resources come from.
enum Source {
    Local {
        dir: PathBuf,
        changes: mpsc::Receiver<Instant>,
        _watch: source::local::WatchGuard,
        cache: source::local::ParseCache,
    },
    Kubernetes(Arc<source::kubernetes::KubeSource>),
}

/// One full read of a source.
struct Read {
    defs: Vec<index::Definition>,
    unreadable: Vec<index::UnreadableOrigin>,
    /// Kubernetes: the generation of each custom resource read.
    generations: Option<std::collections::HashMap<index::ResourceKey, Option<i64>>>,
    /// Kubernetes: the rollout status the leading replica wrote to each Canary.
    canary_statuses: Option<std::collections::BTreeMap<String, weir_api::canary::CanaryStatus>>,
    /// Kubernetes: the manual controls asked on each Canary (`weir.io/request`).
    canary_requests: std::collections::BTreeMap<String, String>,
}

impl Source {
    fn read(&mut self) -> Result<Read, String> {
        match self {
            Source::Local { dir, cache, .. } => source::local::read_dir_cached(dir, cache)
                .map(|(defs, unreadable)| Read {
                    defs,
                    unreadable,
                    generations: None,
                    canary_statuses: None,
                    canary_requests: Default::default(),
                })
                .map_err(|e| format!("cannot read config directory {}: {e}", dir.display())),
            Source::Kubernetes(k) => {
                let (defs, generations) = k.definitions();
                let canary_statuses = Some(k.canary_statuses());
                Ok(Read {
                    defs,
                    unreadable: Vec::new(),
                    generations: Some(generations),
                    canary_statuses,
                    canary_requests: k.canary_requests(),
                })
            }
        }
    }

    /// When the next burst of changes began; `None` when the source has ended.
    async fn changed(&mut self) -> Option<Instant> {
        match self {
            Source::Local { changes, .. } => changes.recv().await,
            Source::Kubernetes(k) => Some(k.changed(Duration::from_millis(10), Duration::from_millis(100)).await),
        }
    }
}

/// The controller: reads resources, publishes the mesh state to every sidecar, and serves
/// identities, the webhook and the admin endpoints until SIGTERM, then drains. Each part has its
/// own named step below.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM right after the listen addresses are announced must drain.
    let mut stop = Box::pin(rt::shutdown_signal());
    let metrics = metrics::Metrics::new();
    let (trigger, drain) = rt::drain();
    let Some((mut source, kube)) = open_source(&args, &metrics, &drain, &mut stop).await? else {
        trigger.trigger();
        return Ok(());
    };

    // The first state, from the first full read, before anything is served.
    let mut index = Index::default();
    let first = source.read().map_err(anyhow::Error::msg)?;
    index.replace_all(first.defs, first.unreadable);
    log_rejections(&index);
    metrics.rejected_resources.set(index.rejections().len() as i64);
    let (verdict_tx, verdict_rx) =
        watch::channel(Arc::new(first.generations.as_ref().map(|g| status::verdicts(&index, g)).unwrap_or_default()));
    let reports = Arc::new(Mutex::new(reports::Reports::default()));
    // Local mode keeps canary progress beside the configuration; Kubernetes mode only where told.
    let state_file =
        args.canary_state.clone().or_else(|| args.config_dir.as_ref().map(|d| d.join(".weir").join("canaries.json")));
    let (canaries, mut routing_rx) = canary::Canaries::new(state_file, reports.clone(), metrics.clone())?;
    // Saved canary weights apply from the first snapshot on (local mode: the state file;
    // Kubernetes: the statuses in the Canary objects).
    canaries.adopt(&translator::definitions(&index), Instant::now());
    if let Some(written) = &first.canary_statuses {
        canaries.follow(&translator::definitions(&index), written, Instant::now());
    }
    canaries.set_requests(first.canary_requests);
    let routing = routing_rx.borrow_and_update().clone();
    let first_state = MeshState::build(&index, &routing, 1, Instant::now(), None);
    log_warnings(&first_state, None);
    let (state_tx, state_rx) = watch::channel(Arc::new(first_state));

    let grpc_listener =
        TcpListener::bind(args.grpc_addr).await.with_context(|| format!("binding {}", args.grpc_addr))?;
    let admin_listener =
        TcpListener::bind(args.admin_addr).await.with_context(|| format!("binding {}", args.admin_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let mut background = Vec::new();
    let leading = match &kube {
        Some(kube) => lead_and_write_status(&args, kube, verdict_rx, &canaries, &metrics, &drain, &mut background)?,
        // Local mode has one controller, which leads.
        None => {
            metrics.leader.set(1);
            watch::channel(true).1
        }
    };
    let reload = tokio::spawn(
        Reload {
            source,
            index,
            metrics: metrics.clone(),
            leading: leading.clone(),
            canaries: canaries.clone(),
            routing: routing_rx,
            state: state_tx,
            verdicts: verdict_tx,
        }
        .run(),
    );

    let identity = identity_service(&args, &metrics, &drain, &mut background).await?;
    let control_tls = control_plane_tls(&args, identity.as_ref(), &drain, &mut background)?;
    let identity_ca = identity.as_ref().map(|i| i.ca.clone());
    let proxies = proxies::Proxies::default();
    let discovery = grpc::discovery::DiscoveryService {
        state: state_rx.clone(),
        proxies: proxies.clone(),
        metrics: metrics.clone(),
        reports: reports.clone(),
        drain: drain.clone(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(grpc::discovery::MAX_IN_FLIGHT)),
        authenticate: control_tls.as_ref().map(|_| Arc::from(args.trust_domain.as_str())),
    };
    let grpc_drain = drain.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(grpc::stream::DiscoveryServer::new(discovery))
            .add_optional_service(identity.map(weir_api::proto::identity_server::IdentityServer::new))
            .serve_with_incoming_shutdown(
                grpc::tls::incoming(grpc_listener, control_tls, metrics.control_refused.clone(), drain.clone()),
                grpc_drain.signaled(),
            ),
    );
    let webhook_addr = match args.webhook_addr {
        Some(addr) => Some(start_webhook(&args, addr, identity_ca.as_ref(), &drain, &mut background).await?),
        None => None,
    };
    let reconciler = tokio::spawn(canary::run(canaries.clone(), state_rx.clone(), leading.clone(), drain.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let admin = admin::Admin {
        state: state_rx,
        proxies,
        metrics,
        reports,
        ready: ready.clone(),
        canaries,
        leading,
        controls_via_api: args.config_dir.is_none(),
    };
    let admin_task = tokio::spawn(weir_api::server::serve_admin(
        admin_listener,
        move |req, peer| admin.clone().handle(req, peer),
        drain.clone(),
        args.shutdown_grace,
    ));
    ready.store(true, Ordering::Release);
    match &args.config_dir {
        Some(dir) => {
            tracing::info!(%grpc_addr, %admin_addr, config_dir = %dir.display(), "controller serving (local mode)")
        }
        None => tracing::info!(%grpc_addr, %admin_addr, "controller serving (Kubernetes)"),
    }
    if args.print_listen_addrs {
        println!("{}", serde_json::json!({ "grpc": grpc_addr, "admin": admin_addr, "webhook": webhook_addr }));
    }

    stop.await;
    ready.store(false, Ordering::Release);
    if !args.shutdown_delay.is_zero() {
        // Not ready, still serving: the API server and sidecars stop picking this replica
        // (endpoints removal takes a moment to spread) before its listeners close.
        tracing::info!(delay = ?args.shutdown_delay, "stopping: not ready, serving on for the shutdown delay");
        tokio::time::sleep(args.shutdown_delay).await;
    }
    trigger.trigger();
    reload.abort();
    let _ = tokio::time::timeout(args.shutdown_grace, async {
        let _ = grpc.await;
        let _ = admin_task.await;
        let _ = reconciler.await;
        // The election releases the lease so a standby takes over at once.
        for task in background {
            let _ = task.await;
        }
    })
    .await;
    tracing::info!("controller stopped");
    Ok(())
}

/// The resource source: the watched config directory (read once first, so one that cannot be
/// read stops start-up), or the Kubernetes API once every watched kind has been listed (no
/// sidecar may see a half-loaded cluster). `None` when `stop` fired while waiting.
async fn open_source(
    args: &Args,
    metrics: &metrics::Metrics,
    drain: &rt::Drain,
    stop: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
) -> anyhow::Result<Option<(Source, Option<KubeHandles>)>> {
    if let Some(dir) = &args.config_dir {
        let (tx, rx) = mpsc::channel(8);
        let guard = source::local::watch(dir, tx, Duration::from_millis(10), Duration::from_millis(100))
            .with_context(|| format!("watching {}", dir.display()))?;
        source::local::read_dir(dir).with_context(|| format!("reading config directory {}", dir.display()))?;
        let source = Source::Local { dir: dir.clone(), changes: rx, _watch: guard, cache: Default::default() };
        return Ok(Some((source, None)));
    }
    let client = source::kubernetes::client(args.kubeconfig.as_deref())
        .await
        .context("no --config-dir: running against Kubernetes")?;
    let k = Arc::new(source::kubernetes::KubeSource::start(
        client.clone(),
        &args.namespaces,
        metrics.watch_restarts.clone(),
        drain.clone(),
    ));
    tracing::info!(namespaces = ?args.namespaces, "waiting for the first list of every watched kind");
    tokio::select! {
        _ = k.wait_until_ready() => {}
        _ = stop.as_mut() => return Ok(None),
    }
    Ok(Some((Source::Kubernetes(k.clone()), Some((client, k)))))
}

/// The Kubernetes client and source, for what only Kubernetes mode runs.
type KubeHandles = (kube::Client, Arc<source::kubernetes::KubeSource>);

/// Kubernetes mode: joins the leader election and starts the status writer (which writes only
/// while this replica leads). Returns whether this replica leads, as it changes.
fn lead_and_write_status(
    args: &Args,
    (client, k): &KubeHandles,
    verdicts: watch::Receiver<Arc<status::Verdicts>>,
    canaries: &Arc<canary::Canaries>,
    metrics: &metrics::Metrics,
    drain: &rt::Drain,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<watch::Receiver<bool>> {
    if args.lease_renew * 2 > args.lease_duration || args.lease_renew.is_zero() {
        anyhow::bail!("--lease-renew must be positive and at most half of --lease-duration");
    }
    let lease = leader::LeaseConfig {
        namespace: args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "weir-system".into()),
        name: args.lease_name.clone(),
        identity: args.replica_name.clone().unwrap_or_else(replica_name),
        duration: args.lease_duration,
        renew_every: args.lease_renew,
    };
    tracing::info!(lease = %format!("{}/{}", lease.namespace, lease.name), identity = %lease.identity, "joining leader election");
    let (leading, election) = leader::spawn(client.clone(), lease, metrics.leader.clone(), drain.clone());
    background.push(election);
    background.push(status::spawn(
        client.clone(),
        k.clone(),
        verdicts,
        leading.clone(),
        canaries.clone(),
        metrics.status_writes.clone(),
        drain.clone(),
    ));
    Ok(leading)
}

/// Republishes the mesh state on every change: a config change re-reads the source, a canary
/// step only re-translates.
struct Reload {
    source: Source,
    index: Index,
    metrics: metrics::Metrics,
    leading: watch::Receiver<bool>,
    canaries: Arc<canary::Canaries>,
    routing: canary::RoutingRx,
    state: watch::Sender<Arc<MeshState>>,
    verdicts: watch::Sender<Arc<status::Verdicts>>,
}

impl Reload {
    async fn run(mut self) {
        let mut generation = 1;
        loop {
            let changed_at = tokio::select! {
                changed = self.source.changed() => {
                    let Some(changed_at) = changed else { break };
                    if !self.reread(generation) {
                        continue;
                    }
                    changed_at
                }
                routed = self.routing.changed() => {
                    if routed.is_err() { break }
                    Instant::now()
                }
            };
            let routing = self.routing.borrow_and_update().clone();
            generation += 1;
            let prev = self.state.borrow().clone();
            let built = Instant::now();
            let next = MeshState::build(&self.index, &routing, generation, changed_at, Some(&prev));
            log_warnings(&next, Some(&prev));
            tracing::debug!(
                generation,
                build_ms = built.elapsed().as_secs_f64() * 1e3,
                since_change_ms = changed_at.elapsed().as_secs_f64() * 1e3,
                "state published"
            );
            self.state.send_replace(Arc::new(next));
        }
    }

    /// Reads the source into the index and passes on what else it carries (the leader's canary
    /// statuses, manual controls, status verdicts). `false`: unreadable, the current config stays.
    fn reread(&mut self, generation: u64) -> bool {
        self.metrics.config_reloads.inc();
        let started = Instant::now();
        let read = match self.source.read() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "keeping current config");
                return false;
            }
        };
        let read_ms = started.elapsed().as_secs_f64() * 1e3;
        let index = &mut self.index;
        if index.replace_all(read.defs, read.unreadable) {
            tracing::info!(
                generation = generation + 1,
                resources = index.entries().len(),
                read_ms,
                index_ms = started.elapsed().as_secs_f64() * 1e3 - read_ms,
                "configuration changed"
            );
        }
        log_rejections(index);
        self.metrics.rejected_resources.set(index.rejections().len() as i64);
        // Replicas that do not lead route canaries as the leader's statuses say.
        if let Some(written) = &read.canary_statuses
            && !*self.leading.borrow()
        {
            self.canaries.follow(&translator::definitions(index), written, Instant::now());
        }
        // The leader applies new ones at its next tick.
        self.canaries.set_requests(read.canary_requests);
        if let Some(g) = &read.generations {
            let verdicts = status::verdicts(index, g);
            self.verdicts.send_if_modified(|v| {
                let changed = **v != verdicts;
                if changed {
                    *v = Arc::new(verdicts);
                }
                changed
            });
        }
        true
    }
}

/// With `--identity-dir`: the mesh CA (reloaded when its files change) and the Certify service
/// that issues workload certificates, checking tokens against `--tokens` or a TokenReview.
async fn identity_service(
    args: &Args,
    metrics: &metrics::Metrics,
    drain: &rt::Drain,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Option<grpc::certify::IdentityService>> {
    let Some(dir) = &args.identity_dir else { return Ok(None) };
    if args.cert_lifetime < Duration::from_secs(1) {
        anyhow::bail!("--cert-lifetime must be at least 1s");
    }
    let authenticator = match &args.tokens {
        Some(tokens) => grpc::certify::Authenticator::Tokens(tokens.clone()),
        None => grpc::certify::Authenticator::Kubernetes(
            identity::review::TokenReviewer::connect(args.kubeconfig.as_deref(), &args.token_audience)
                .await
                .context("--identity-dir without --tokens checks tokens with a Kubernetes TokenReview")?,
        ),
    };
    let ca = identity::Ca::load_or_create(dir, &args.trust_domain, args.cert_lifetime)
        .with_context(|| format!("loading the CA from {}", dir.display()))?;
    metrics.ca.record(&ca);
    // A rotated bundle or issuer (Secret or directory rewritten) applies without restart.
    let (ca_tx, ca_rx) = tokio::sync::watch::channel(Arc::new(ca));
    background.push(tokio::spawn(identity::reload(
        dir.clone(),
        args.trust_domain.clone(),
        args.cert_lifetime,
        ca_tx,
        metrics.ca.clone(),
        drain.clone(),
    )));
    Ok(Some(grpc::certify::IdentityService {
        ca: ca_rx,
        authenticator,
        results: metrics.certify_results.clone(),
        limiter: Arc::default(),
    }))
}

/// With identities, the control plane is TLS only: the controller's certificate comes from the
/// mesh CA for its own SPIFFE ID (renewed in the background), and Discovery requires a workload
/// certificate. Without, it is plaintext (and says so).
fn control_plane_tls(
    args: &Args,
    identity: Option<&grpc::certify::IdentityService>,
    drain: &rt::Drain,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Option<Arc<grpc::tls::ServerTls>>> {
    let Some(id) = identity else {
        tracing::warn!("no --identity-dir: the control plane is plaintext and the mesh has no identities");
        return Ok(None);
    };
    let (ns, sa) = &args.controller_identity;
    let own = id.ca.borrow().spiffe_id(ns, sa);
    let tls = grpc::tls::ServerTls::new(id.ca.clone(), own).context("issuing the controller's own certificate")?;
    tracing::info!(identity = %tls.identity(), "control plane served over TLS");
    background.push(tokio::spawn(tls.clone().renew(drain.clone())));
    Ok(Some(tls))
}

/// The sidecar-injection webhook on `addr`, with the TLS files of `--webhook-tls-dir`; it
/// needs the mesh CA (injected sidecars get workload identities). Returns the bound address.
async fn start_webhook(
    args: &Args,
    addr: SocketAddr,
    ca: Option<&watch::Receiver<Arc<identity::Ca>>>,
    drain: &rt::Drain,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let Some(ca) = ca else {
        anyhow::bail!("--webhook-addr needs --identity-dir: injected sidecars get workload identities");
    };
    let dir = args.webhook_tls_dir.as_deref().expect("clap requires it");
    let tls = webhook::load_tls(dir).context("--webhook-tls-dir")?;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the webhook on {addr}"))?;
    let bound = listener.local_addr()?;
    let settings = inject::Settings {
        proxy_image: args.proxy_image.clone(),
        controller_addr: args.inject_controller_addr.clone(),
        token_audience: args.token_audience.clone(),
        image_pull_secrets: args.proxy_image_pull_secrets.clone(),
        // Filled from the CA in force at each admission.
        trust_anchors_pem: String::new(),
        controller_identity: format!("{}/{}", args.controller_identity.0, args.controller_identity.1),
        tracing: inject::TraceSettings {
            collector: args.inject_trace_collector.clone(),
            protocol: args.inject_trace_protocol,
            sampling: args.inject_trace_sampling,
            attributes: args.inject_trace_attributes.clone(),
        },
    };
    background.push(tokio::spawn(webhook::serve(
        listener,
        tls,
        settings,
        ca.clone(),
        drain.clone(),
        args.shutdown_grace,
    )));
    Ok(bound)
}

/// `POD_NAME`, else `<hostname>-<pid>`.
fn replica_name() -> String {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.is_empty()
    {
        return name;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weir-controller".into());
    format!("{host}-{}", std::process::id())
}

fn log_rejections(index: &Index) {
    for r in index.rejections() {
        tracing::warn!(rejected = %r, "resource rejected");
    }
}

/// The warnings `weir analyze` would give about what is in force, when they are new.
fn log_warnings(state: &MeshState, previous: Option<&MeshState>) {
    if previous.is_some_and(|p| Arc::ptr_eq(&p.warnings, &state.warnings)) {
        return;
    }
    for w in state.warnings.iter() {
        tracing::warn!(warning = %w, "resource accepted, with a warning");
    }
}
