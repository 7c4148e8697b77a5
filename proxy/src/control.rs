//! The Discovery client: one background task that keeps a stream to the controller open and
//! turns snapshots into a `watch` of [`Config`]. Bad snapshots are Nacked and the last good one
//! keeps serving; while the controller is away the proxy serves what it has and reconnects
//! with capped, jittered back-off. Snapshots may be incremental (the Hello says this sidecar
//! applies them): the changed Services on top of the version it runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use weir_api::proto::{self, controller_message, proxy_message};
use weir_api::rt::Drain;

use crate::config::Config;
use crate::metrics::Metrics;

/// What the control task needs to know.
#[derive(Clone)]
pub struct ControlConfig {
    /// The controller; over TLS when the mesh has identities.
    pub endpoint: crate::channel::ControlEndpoint,
    /// This sidecar's workload certificate, which a TLS control plane requires for Discovery:
    /// the stream opens once there is one.
    pub credentials: Option<crate::tls::CredsRx>,
    pub hello: proto::Hello,
    pub cluster_domain: String,
    pub report_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// Runs until `drain` fires.
pub async fn run(cfg: ControlConfig, tx: watch::Sender<Option<Arc<Config>>>, metrics: Metrics, drain: Drain) {
    let mut attempt: u32 = 0;
    let stop = drain.signaled();
    tokio::pin!(stop);
    loop {
        let result = tokio::select! {
            r = session(&cfg, &tx, &metrics, &mut attempt) => r,
            _ = &mut stop => return,
        };
        metrics.control_connected.set(0);
        let (delay, how) = match &result {
            Err(status)
                if matches!(status.code(), Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated) =>
            {
                // The controller refused us; retrying quickly will not help.
                (cfg.backoff_max, "refused")
            }
            _ => (weir_api::rt::backoff(attempt, cfg.backoff_base, cfg.backoff_max, RETRY_FLOOR), "lost"),
        };
        match result {
            Ok(()) => {
                tracing::warn!(controller = %cfg.endpoint.addr, "control stream ended; reconnecting")
            }
            Err(status) => {
                tracing::warn!(controller = %cfg.endpoint.addr, code = ?status.code(), message = status.message(), how, ?delay, "control stream failed; serving last config")
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut stop => return,
        }
    }
}

/// The shortest wait before reconnecting to the controller.
const RETRY_FLOOR: Duration = Duration::from_millis(5);

async fn session(
    cfg: &ControlConfig,
    tx: &watch::Sender<Option<Arc<Config>>>,
    metrics: &Metrics,
    attempt: &mut u32,
) -> Result<(), tonic::Status> {
    let client = match (&cfg.endpoint.tls, &cfg.credentials) {
        (Some(_), Some(creds)) => {
            let mut creds = creds.clone();
            creds
                .wait_for(Option::is_some)
                .await
                .map_err(|_| tonic::Status::unavailable("the identity task ended"))?
                .clone()
        }
        (Some(_), None) => {
            return Err(tonic::Status::failed_precondition(
                "a TLS control plane needs a workload certificate (--token-file)",
            ));
        }
        (None, _) => None,
    };
    let channel = cfg.endpoint.channel(client, None).await.map_err(|e| match e {
        crate::channel::ChannelError::Address { .. } => tonic::Status::invalid_argument(e.to_string()),
        _ => tonic::Status::unavailable(e.to_string()),
    })?;
    let mut client = proto::discovery_client::DiscoveryClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel(16);
    let hello = proto::ProxyMessage { msg: Some(proxy_message::Msg::Hello(cfg.hello.clone())) };
    out_tx.send(hello).await.map_err(|_| tonic::Status::internal("stream closed"))?;
    let mut inbound = client.stream(ReceiverStream::new(out_rx)).await?.into_inner();
    metrics.control_connected.set(1);
    tracing::info!(controller = %cfg.endpoint.addr, "control stream established");

    let mut applied_on_this_stream = false;
    let mut reports = tokio::time::interval(cfg.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reports.tick().await;
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                let Some(controller_message::Msg::Snapshot(snapshot)) = msg.msg else { continue };
                *attempt = 0;
                let version = snapshot.version.clone();
                let started = std::time::Instant::now();
                let incremental = !snapshot.base_version.is_empty();
                // An incremental snapshot becomes the whole one it stands for, then both are
                // checked and applied alike. Its base must be a snapshot applied on this
                // stream: versions are a controller's own counter, and the one running may
                // have come from another controller (or an earlier run) with the same number.
                let running = tx.borrow().clone().filter(|_| applied_on_this_stream);
                let whole = crate::config::resolve(snapshot, running.as_deref());
                let applied = whole.and_then(|s| Config::from_snapshot(s, &cfg.hello.namespace, &cfg.cluster_domain));
                let reply = match applied {
                    Ok(config) => {
                        let build_ms = started.elapsed().as_secs_f64() * 1e3;
                        tracing::info!(%version, incremental, services = config.services.len(), build_ms, "applied snapshot");
                        tx.send_replace(Some(Arc::new(config)));
                        applied_on_this_stream = true;
                        metrics.snapshots_applied.inc();
                        proxy_message::Msg::Ack(proto::Ack { version })
                    }
                    Err(e) => {
                        tracing::warn!(%version, error = %e, "rejected snapshot; keeping the previous one");
                        metrics.snapshots_rejected.inc();
                        proxy_message::Msg::Nack(proto::Nack {
                            version,
                            reason: e.to_string(),
                            reason_class: e.class().to_string(),
                        })
                    }
                };
                if out_tx.send(proto::ProxyMessage { msg: Some(reply) }).await.is_err() {
                    return Ok(());
                }
            }
            _ = reports.tick() => {
                let report = metrics.take_report();
                if report.stats.is_empty() {
                    continue;
                }
                match out_tx.try_send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Report(report)) }) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m)) => {
                        if let Some(proxy_message::Msg::Report(r)) = m.msg {
                            metrics.restore_report(r);
                        }
                    }
                }
            }
        }
    }
}
