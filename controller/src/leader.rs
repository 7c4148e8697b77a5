//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several controller
//! replicas (all serving sidecars) exactly one writes status.
//!
//! The holder renews every `renew_every`; a replica takes the lease over when its
//! `renewTime + leaseDurationSeconds` has passed. Every write carries the Lease's
//! resourceVersion, so two replicas racing for it cannot both win (the loser gets 409). A
//! leader that cannot renew within the lease duration steps down before anyone may take over;
//! on shutdown it releases the lease so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use weir_api::rt::Drain;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity`.
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// What one attempt concluded.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Leading,
    Following(String),
}

/// Runs the election until drained; the receiver says whether this replica leads.
pub fn spawn(
    client: Client,
    cfg: LeaseConfig,
    gauge: prometheus::IntGauge,
    drain: Drain,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let mut last_renewed: Option<tokio::time::Instant> = None;
        let mut last_error: Option<String> = None;
        let mut following: Option<String> = None;
        let mut observed: Observed = None;
        let mut drained = std::pin::pin!(drain.signaled());
        loop {
            // A leader's renewal must land within 80 % of the lease after the previous one, or
            // it steps down before any standby may take over; no attempt may outlast that.
            let deadline = |renewed: Option<tokio::time::Instant>| renewed.map(|t| t + cfg.duration.mul_f32(0.8));
            let now = tokio::time::Instant::now();
            if deadline(last_renewed).is_some_and(|d| now >= d) {
                tracing::warn!("could not renew the lease in time; stepping down");
                last_renewed = None;
                tx.send_if_modified(|l| std::mem::replace(l, false));
            }
            let budget = match deadline(last_renewed) {
                Some(d) => d.saturating_duration_since(now),
                None => cfg.duration / 2,
            };
            let attempt = match tokio::time::timeout(budget, try_acquire_or_renew(&api, &cfg, &mut observed)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer from the API server within {budget:?}")),
            };
            match attempt {
                Ok(Outcome::Leading) => {
                    last_error = None;
                    following = None;
                    last_renewed = Some(tokio::time::Instant::now());
                    if !*tx.borrow() {
                        tracing::info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), identity = %cfg.identity, "became leader");
                    }
                    tx.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Ok(Outcome::Following(holder)) => {
                    last_error = None;
                    if *tx.borrow() {
                        tracing::warn!(holder = %holder, "lost the lease; stepping down");
                    }
                    if following.as_deref() != Some(holder.as_str()) {
                        tracing::info!(holder = %holder, "following the leader");
                        following = Some(holder);
                    }
                    last_renewed = None;
                    tx.send_if_modified(|l| std::mem::replace(l, false));
                }
                Err(msg) => {
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(error = %msg, "leader election: cannot read or write the lease");
                        last_error = Some(msg);
                    }
                }
            }
            gauge.set(i64::from(*tx.borrow()));
            let mut wake = tokio::time::Instant::now() + cfg.renew_every;
            if let Some(d) = deadline(last_renewed) {
                wake = wake.min(d);
            }
            tokio::select! {
                _ = &mut drained => break,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            gauge.set(0);
            match release(&api, &cfg).await {
                Ok(()) => tracing::info!("released the lease"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the lease; a standby takes over when it expires")
                }
            }
        }
    });
    (rx, task)
}

/// The lease record last seen (holder and renew time) and when this replica first saw it.
type Observed = Option<(String, tokio::time::Instant)>;

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Observed,
) -> Result<Outcome, kube::Error> {
    let now = Timestamp::now();
    // Rounded up: standbys must never wait less than the leader keeps the lease.
    let secs = i32::try_from(cfg.duration.as_secs_f64().ceil().max(1.0) as u64).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.name.clone()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Outcome::Leading),
            // Another replica created it first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Following("(another replica)".into())),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    // Expiry is judged on this replica's clock, from when it last saw the record change (as
    // client-go does), so clock skew between replicas cannot cut a lease short.
    let record = format!("{holder}@{:?}", spec.renew_time);
    let seen = match observed {
        Some((r, at)) if *r == record => *at,
        _ => {
            let at = tokio::time::Instant::now();
            *observed = Some((record, at));
            at
        }
    };
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(1));
    let expired = spec.renew_time.is_none() || seen.elapsed() >= duration;
    if holder != cfg.identity && !holder.is_empty() && !expired {
        return Ok(Outcome::Following(holder));
    }
    if holder != cfg.identity {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.holder_identity = Some(cfg.identity.clone());
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(secs);
    // `replace` carries metadata.resourceVersion: a concurrent writer makes this a 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Outcome::Leading),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Ok(Outcome::Following(if holder.is_empty() { "(another replica)".into() } else { holder }))
        }
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else { return Ok(()) };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(&cfg.name, &PostParams::default(), &lease).await.map(|_| ())
}
