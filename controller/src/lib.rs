//! `weir-controller`: reads resources, translates them into per-sidecar views and streams
//! those to the sidecars.
//!
//! # Layout
//! - [`source`]: where resources come from (local mode: a directory of YAML files).
//! - [`index`]: the resources in force and the rejected definitions.
//! - [`translator`]: index → the protocol's view of the mesh.
//! - [`state`]: the published view, shared through a `watch` channel.
//! - [`grpc`]: the Discovery server (one session per sidecar).
//! - [`identity`]: the certificate authority and `weir.v1.Identity/Certify`.
//! - [`proxies`]: the registry of connected sidecars and what each acked.
//! - [`reports`]: traffic reports aggregated from the sidecars.
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/resources`, `/stats`.
//! - [`metrics`]: the controller's Prometheus metrics.
#![forbid(unsafe_code)]

pub mod admin;
pub mod canary;
pub mod grpc;
pub mod identity;
pub mod index;
pub mod metrics;
pub mod proxies;
pub mod reports;
pub mod source;
pub mod state;
pub mod translator;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
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
    #[arg(long, env = "WEIR_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
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
    /// Where canary progress is kept across restarts; default `<config-dir>/.weir/canaries.json`.
    #[arg(long, env = "WEIR_CANARY_STATE")]
    pub canary_state: Option<PathBuf>,
    /// Lifetime of issued workload certificates.
    #[arg(long, env = "WEIR_CERT_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print every CRD as YAML (or write one file per CRD into --out-dir).
    Crds {
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    weir_api::duration::parse(s).map_err(|e| e.to_string())
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

pub async fn run(args: Args) -> anyhow::Result<()> {
    let Some(dir) = args.config_dir.clone() else {
        anyhow::bail!(
            "no --config-dir given: the Kubernetes source is not available in this build yet; run in local mode with --config-dir DIR"
        );
    };
    let metrics = metrics::Metrics::new();
    let mut index = Index::default();
    // Read everything before serving, so no sidecar ever sees a half-loaded mesh.
    let (defs, unreadable) =
        source::local::read_dir(&dir).with_context(|| format!("reading config directory {}", dir.display()))?;
    index.replace_all(defs, unreadable);
    log_rejections(&index);
    metrics.rejected_resources.set(index.rejections().len() as i64);
    let reports = Arc::new(Mutex::new(reports::Reports::default()));
    let state_file = args.canary_state.clone().unwrap_or_else(|| dir.join(".weir").join("canaries.json"));
    let (canaries, mut routing_rx) = canary::Canaries::new(Some(state_file), reports.clone(), metrics.clone())?;
    // Saved canary weights apply from the first snapshot on.
    canaries.adopt(&canary::definitions(&index));
    let routing = routing_rx.borrow_and_update().clone();
    let (state_tx, state_rx) = watch::channel(Arc::new(MeshState::build(&index, &routing, 1, Instant::now(), None)));

    let grpc_listener =
        TcpListener::bind(args.grpc_addr).await.with_context(|| format!("binding {}", args.grpc_addr))?;
    let admin_listener =
        TcpListener::bind(args.admin_addr).await.with_context(|| format!("binding {}", args.admin_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let (trigger, drain) = rt::drain();
    let proxies = proxies::Proxies::default();
    let ready = Arc::new(AtomicBool::new(false));

    // Watch the directory and republish on every change burst.
    let (change_tx, mut change_rx) = mpsc::channel(8);
    let _watch = source::local::watch(&dir, change_tx, Duration::from_millis(10), Duration::from_millis(100))
        .with_context(|| format!("watching {}", dir.display()))?;
    let reload_metrics = metrics.clone();
    let reload_dir = dir.clone();
    let reload = tokio::spawn(async move {
        let mut generation = 1;
        loop {
            // A config change re-reads the directory; a canary step only re-translates.
            let changed_at = tokio::select! {
                changed = change_rx.recv() => {
                    let Some(changed_at) = changed else { break };
                    reload_metrics.config_reloads.inc();
                    let (defs, unreadable) = match source::local::read_dir(&reload_dir) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, dir = %reload_dir.display(), "cannot read config directory; keeping current config");
                            continue;
                        }
                    };
                    if index.replace_all(defs, unreadable) {
                        tracing::info!(generation = generation + 1, resources = index.entries().len(), "configuration changed");
                    }
                    log_rejections(&index);
                    reload_metrics.rejected_resources.set(index.rejections().len() as i64);
                    changed_at
                }
                routed = routing_rx.changed() => {
                    if routed.is_err() { break }
                    Instant::now()
                }
            };
            let routing = routing_rx.borrow_and_update().clone();
            generation += 1;
            let prev = state_tx.borrow().clone();
            let next = MeshState::build(&index, &routing, generation, changed_at, Some(&prev));
            state_tx.send_replace(Arc::new(next));
        }
    });

    let identity = match &args.identity_dir {
        None => None,
        Some(dir) => {
            if args.cert_lifetime < Duration::from_secs(1) {
                anyhow::bail!("--cert-lifetime must be at least 1s");
            }
            let authenticator = match &args.tokens {
                Some(tokens) => identity::grpc::Authenticator::Tokens(tokens.clone()),
                None => identity::grpc::Authenticator::Kubernetes(
                    identity::review::TokenReviewer::connect(args.kubeconfig.as_deref(), &args.token_audience)
                        .await
                        .context("--identity-dir without --tokens checks tokens with a Kubernetes TokenReview")?,
                ),
            };
            let ca = identity::Ca::load_or_create(dir, &args.trust_domain, args.cert_lifetime)
                .with_context(|| format!("loading the CA from {}", dir.display()))?;
            let (root, issuer) = ca.expiries();
            metrics.ca_expiration.with_label_values(&["trust-anchor"]).set(root);
            metrics.ca_expiration.with_label_values(&["issuer"]).set(issuer);
            Some(identity::grpc::IdentityService {
                ca: Arc::new(ca),
                authenticator,
                results: metrics.certify_results.clone(),
            })
        }
    };
    let discovery = grpc::discovery::DiscoveryService {
        state: state_rx.clone(),
        proxies: proxies.clone(),
        metrics: metrics.clone(),
        reports: reports.clone(),
        drain: drain.clone(),
    };
    let grpc_drain = drain.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(weir_api::proto::discovery_server::DiscoveryServer::new(discovery))
            .add_optional_service(identity.map(weir_api::proto::identity_server::IdentityServer::new))
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), grpc_drain.signaled()),
    );
    let reconciler = tokio::spawn(canary::run(canaries.clone(), state_rx.clone(), drain.clone()));
    let admin = admin::Admin { state: state_rx, proxies, metrics, reports, ready: ready.clone(), canaries };
    let admin_task = tokio::spawn(rt::serve_admin(
        admin_listener,
        move |req| admin.clone().handle(req),
        drain.clone(),
        args.shutdown_grace,
    ));
    ready.store(true, Ordering::Release);
    tracing::info!(%grpc_addr, %admin_addr, config_dir = %dir.display(), "controller serving (local mode)");
    if args.print_listen_addrs {
        println!("{}", serde_json::json!({ "grpc": grpc_addr, "admin": admin_addr }));
    }

    rt::shutdown_signal().await;
    ready.store(false, Ordering::Release);
    trigger.trigger();
    reload.abort();
    let _ = tokio::time::timeout(args.shutdown_grace, async {
        let _ = grpc.await;
        let _ = admin_task.await;
        let _ = reconciler.await;
    })
    .await;
    tracing::info!("controller stopped");
    Ok(())
}

fn log_rejections(index: &Index) {
    for r in index.rejections() {
        tracing::warn!(rejected = %r, "resource rejected");
    }
}
