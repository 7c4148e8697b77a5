//! The canary reconciler: every interval, judge each Canary's canary backend from the sidecars'
//! aggregated Reports, then advance a step, hold, count a failure, roll back or promote; the
//! weights it decides reach the sidecars as route rules through the translator.
//!
//! Aggregation: each sidecar reports, per interval, its outbound requests by service and
//! backend (requests, 5xx failures, a latency histogram). The controller sums them over every
//! sidecar and route into cumulative totals ([`Reports::outbound_totals`]); an analysis takes the
//! difference between the totals now and at the start of the interval. So the success rate is
//! weighted by requests across all callers, and p99 comes from the merged histogram.
//!
//! State lives in a file (local mode; `--canary-state`, by default `<config-dir>/.weir/canaries.json`)
//! and survives restarts: a restarted controller resumes at the same step, spending its first
//! interval measuring.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weir_api::canary::{AnalysisResult, BackendMetrics, CanarySpec, CanaryStatus, Phase, Transition};
use weir_api::rt::{Drain, unix_ms};

use crate::metrics::Metrics;
use crate::reports::{Reports, Totals};
use crate::state::MeshState;
use crate::translator::{CanaryDef, CanaryRouting};

/// Transitions kept in status.
const HISTORY: usize = 32;

/// The routing every canary wants, published on each change.
pub type RoutingRx = watch::Receiver<Arc<Vec<CanaryRouting>>>;

/// Why a manual control was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActError {
    #[error("no Canary {0}")]
    NotFound(String),
    /// The rollout's state does not allow it (the message says why).
    #[error("{0}")]
    Refused(String),
}

/// A manual control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Promote,
    Abort,
    Pause,
    Resume,
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "promote" => Ok(Action::Promote),
            "abort" => Ok(Action::Abort),
            "pause" => Ok(Action::Pause),
            "resume" => Ok(Action::Resume),
            other => Err(format!("unknown action {other:?} (promote, abort, pause, resume)")),
        }
    }
}

struct Entry {
    status: CanaryStatus,
    next_due: Instant,
    /// Totals (canary, stable) at the start of the current interval; `None` until measured.
    baseline: Option<(Totals, Totals)>,
}

/// Every canary's state, shared by the reconciler, the admin endpoints and the state builder.
pub struct Canaries {
    entries: Mutex<BTreeMap<(String, String), Entry>>,
    /// Statuses loaded from the state file, adopted when their spec still matches.
    loaded: Mutex<BTreeMap<String, CanaryStatus>>,
    routing: watch::Sender<Arc<Vec<CanaryRouting>>>,
    /// Bumped whenever a status changes (Kubernetes mode writes them to the Canary objects).
    revision: watch::Sender<u64>,
    state_file: Option<PathBuf>,
    reports: Arc<Mutex<Reports>>,
    metrics: Metrics,
    /// Manual controls asked through the Kubernetes API, keyed `namespace/name`.
    requests: Mutex<BTreeMap<String, String>>,
}

impl Canaries {
    /// Loads saved state from `state_file` (a missing file is a fresh start; an unreadable one
    /// is an error, so a restart never silently starts rollouts over).
    pub fn new(
        state_file: Option<PathBuf>,
        reports: Arc<Mutex<Reports>>,
        metrics: Metrics,
    ) -> anyhow::Result<(Arc<Self>, RoutingRx)> {
        let loaded = match &state_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => serde_json::from_str::<BTreeMap<String, CanaryStatus>>(&text)
                    .map_err(|e| anyhow::anyhow!("canary state file {}: {e}", path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => anyhow::bail!("canary state file {}: {e}", path.display()),
            },
            None => BTreeMap::new(),
        };
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let me = Arc::new(Self {
            entries: Mutex::default(),
            loaded: Mutex::new(loaded),
            routing: tx,
            revision: watch::channel(0).0,
            state_file,
            reports,
            metrics,
            requests: Mutex::default(),
        });
        Ok((me, rx))
    }

    /// Routing as of the saved state, before the first tick (so a restart keeps the weights).
    pub fn adopt(&self, defs: &[CanaryDef], now: Instant) {
        let mut entries = self.entries.lock().unwrap();
        self.sync(&mut entries, defs, now);
        self.publish(&entries, defs);
    }

    /// Mirrors the statuses the leading replica wrote to the Canary objects (Kubernetes mode,
    /// on replicas that do not lead), so every replica routes with the same weights. A status
    /// written for another rollout of the Canary (another spec hash) is ignored.
    pub fn follow(&self, defs: &[CanaryDef], written: &BTreeMap<String, CanaryStatus>, now: Instant) {
        let mut entries = self.entries.lock().unwrap();
        let mut changed = self.sync(&mut entries, defs, now);
        for ((ns, n), e) in entries.iter_mut() {
            let Some(w) = written.get(&format!("{ns}/{n}")) else { continue };
            let mut w = w.clone();
            w.conditions.clear();
            if w.spec_hash == e.status.spec_hash && w != e.status {
                e.status = w;
                // Whoever leads next measures from its own first report on.
                e.baseline = None;
                changed = true;
            }
        }
        if changed {
            self.publish(&entries, defs);
        }
    }

    /// Changes whenever a status does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// The statuses, keyed `namespace/name`.
    pub fn statuses(&self) -> BTreeMap<String, CanaryStatus> {
        self.entries.lock().unwrap().iter().map(|((ns, n), e)| (format!("{ns}/{n}"), e.status.clone())).collect()
    }

    /// Runs every due analysis.
    pub fn tick(&self, defs: &[CanaryDef], now: Instant) {
        let mut entries = self.entries.lock().unwrap();
        let mut changed = self.sync(&mut entries, defs, now);
        changed |= self.handle_requests(&mut entries, defs);
        for def in defs {
            let key = (def.namespace.clone(), def.name.clone());
            let Some(entry) = entries.get_mut(&key) else { continue };
            if now < entry.next_due {
                continue;
            }
            entry.next_due = now + def.spec.interval();
            let totals = {
                let reports = self.reports.lock().unwrap();
                let svc = format!("{}/{}", def.namespace, def.spec.service);
                (
                    reports.outbound_totals(&svc, &format!("{}/{}", def.namespace, def.spec.canary)),
                    reports.outbound_totals(&svc, &format!("{}/{}", def.namespace, def.spec.stable)),
                )
            };
            changed |= self.step(def, entry, totals);
        }
        if changed {
            self.publish(&entries, defs);
            self.save(&entries);
        }
    }

    /// Applies a manual control to `namespace/name`.
    pub fn act(
        &self,
        defs: &[CanaryDef],
        namespace: &str,
        name: &str,
        action: Action,
        now: Instant,
    ) -> Result<CanaryStatus, ActError> {
        let mut entries = self.entries.lock().unwrap();
        self.sync(&mut entries, defs, now);
        let status = Self::act_on(&mut entries, defs, namespace, name, action)?;
        self.publish(&entries, defs);
        self.save(&entries);
        Ok(status)
    }

    /// The manual controls asked through the Kubernetes API (`weir.io/request` values, keyed
    /// `namespace/name`): the leader applies each new one at its next tick.
    pub fn set_requests(&self, requests: BTreeMap<String, String>) {
        *self.requests.lock().unwrap() = requests;
    }

    /// Applies every request not handled yet, recording in the status that it was handled and
    /// how (so it is handled once, also across a change of leader). Returns whether any was.
    fn handle_requests(&self, entries: &mut BTreeMap<(String, String), Entry>, defs: &[CanaryDef]) -> bool {
        let requests = self.requests.lock().unwrap().clone();
        let mut changed = false;
        for (key, request) in requests {
            let Some((ns, name)) = key.split_once('/') else { continue };
            let id = (ns.to_string(), name.to_string());
            if entries.get(&id).is_none_or(|e| e.status.handled_request == request) {
                continue;
            }
            let outcome = match request.split_once(':').map(|(a, _)| a.parse::<Action>()) {
                Some(Ok(action)) => Self::act_on(entries, defs, ns, name, action).map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e),
                None => Err(format!("{request:?} is not ACTION:ID")),
            };
            let entry = entries.get_mut(&id).expect("checked above");
            entry.status.handled_request = request.clone();
            entry.status.request_result = match &outcome {
                Ok(_) => "applied".into(),
                Err(e) => format!("refused: {e}"),
            };
            match outcome {
                Ok(_) => tracing::info!(canary = %key, %request, "manual control applied"),
                Err(e) => tracing::warn!(canary = %key, %request, reason = %e, "manual control refused"),
            }
            changed = true;
        }
        changed
    }

    /// A manual control on synced `entries` (the caller publishes and saves).
    fn act_on(
        entries: &mut BTreeMap<(String, String), Entry>,
        defs: &[CanaryDef],
        namespace: &str,
        name: &str,
        action: Action,
    ) -> Result<CanaryStatus, ActError> {
        let def = defs
            .iter()
            .find(|d| d.namespace == namespace && d.name == name)
            .ok_or_else(|| ActError::NotFound(format!("{namespace}/{name}")))?;
        let entry = entries.get_mut(&(namespace.to_string(), name.to_string())).expect("synced");
        let phase = entry.status.phase;
        if phase.is_final() {
            let done = if phase == Phase::Succeeded { "succeeded" } else { "failed" };
            return Err(ActError::Refused(format!("Canary {namespace}/{name} has already {done}")));
        }
        match action {
            Action::Promote => transition(&mut entry.status, Phase::Succeeded, 100, "promoted by hand".into()),
            Action::Abort => transition(&mut entry.status, Phase::Failed, 0, "aborted by hand".into()),
            Action::Pause if phase == Phase::Paused => return Err(ActError::Refused("already paused".into())),
            Action::Pause => {
                entry.status.paused_from = Some(phase);
                entry.status.paused_by_spec = false;
                let w = entry.status.weight;
                transition(&mut entry.status, Phase::Paused, w, "paused by hand".into())
            }
            Action::Resume if phase != Phase::Paused => {
                return Err(ActError::Refused(format!("not paused (phase {})", phase.as_str())));
            }
            Action::Resume if def.spec.paused => {
                return Err(ActError::Refused("spec.paused is true: set it to false to resume".into()));
            }
            Action::Resume => resume(entry, "resumed by hand".into()),
        }
        Ok(entry.status.clone())
    }

    /// Creates entries for new (or changed) Canaries, forgets removed ones, applies
    /// `spec.paused`. Returns whether anything changed.
    fn sync(&self, entries: &mut BTreeMap<(String, String), Entry>, defs: &[CanaryDef], now: Instant) -> bool {
        let mut changed = false;
        let before = entries.len();
        entries.retain(|(ns, n), _| defs.iter().any(|d| &d.namespace == ns && &d.name == n));
        changed |= entries.len() != before;
        for def in defs {
            let key = (def.namespace.clone(), def.name.clone());
            let hash = spec_hash(&def.spec);
            let stale = entries.get(&key).is_none_or(|e| e.status.spec_hash != hash);
            if stale {
                let saved = self.loaded.lock().unwrap().remove(&format!("{}/{}", def.namespace, def.name));
                // A new rollout of the same Canary does not replay the request the last one
                // handled (the annotation stays on the object).
                let handled = entries.get(&key).map(|e| e.status.handled_request.clone()).unwrap_or_default();
                let status = match saved {
                    Some(s) if s.spec_hash == hash => s,
                    _ => CanaryStatus {
                        phase: Phase::Initializing,
                        steps: def.spec.expanded_steps(),
                        spec_hash: hash,
                        handled_request: handled,
                        ..Default::default()
                    },
                };
                entries.insert(key.clone(), Entry { status, next_due: now, baseline: None });
                changed = true;
            }
            let entry = entries.get_mut(&key).expect("inserted");
            let note = conflict_note(&entry.status.message, &def.conflicting_routes);
            if note != entry.status.message {
                entry.status.message = note;
                changed = true;
            }
            // Edited steps apply in place (the rollout keeps its place, within the new steps).
            let steps = def.spec.expanded_steps();
            if steps != entry.status.steps && !entry.status.phase.is_final() {
                entry.status.step = entry.status.step.min(steps.len().saturating_sub(1) as u32);
                entry.status.steps = steps;
                changed = true;
            }
            let phase = entry.status.phase;
            if def.spec.paused && !phase.is_final() && phase != Phase::Paused {
                entry.status.paused_from = Some(phase);
                entry.status.paused_by_spec = true;
                let w = entry.status.weight;
                transition(&mut entry.status, Phase::Paused, w, "spec.paused is true".into());
                changed = true;
            } else if !def.spec.paused && phase == Phase::Paused && entry.status.paused_by_spec {
                resume(entry, "spec.paused is false".into());
                changed = true;
            }
        }
        changed
    }

    /// One interval of one canary. Returns whether its status changed.
    fn step(&self, def: &CanaryDef, entry: &mut Entry, (canary_now, stable_now): (Totals, Totals)) -> bool {
        let spec = &def.spec;
        let label = format!("{}/{}", def.namespace, def.name);
        let status = &mut entry.status;
        let previous = status.clone();
        let baseline = entry.baseline.replace((canary_now.clone(), stable_now.clone()));
        match status.phase {
            Phase::Succeeded | Phase::Failed | Phase::Paused => return false,
            Phase::Initializing => {
                if spec.ab_test.is_some() {
                    transition(
                        status,
                        Phase::Progressing,
                        0,
                        "A/B stage: only matching requests reach the canary".into(),
                    );
                } else {
                    let w = status.steps.first().copied().unwrap_or(100);
                    status.step = 0;
                    transition(status, Phase::Progressing, w, format!("started at {w}%"));
                }
                return true;
            }
            _ => {}
        }
        // After a restart or a resume the first interval only measures.
        let Some((canary_base, stable_base)) = baseline else { return *status != previous };
        let canary = canary_now.since(&canary_base);
        let stable = stable_now.since(&stable_base);
        let verdict = judge(spec, &canary, status.weight);
        self.metrics.canary_analyses.with_label_values(&[&label, verdict.as_str()]).inc();
        status.last_analysis = Some(AnalysisResult {
            at_unix_ms: unix_ms(),
            canary: backend_metrics(&canary),
            stable: backend_metrics(&stable),
            verdict: verdict.as_str().into(),
        });
        apply(spec, status, verdict);
        *status != previous
    }

    fn publish(&self, entries: &BTreeMap<(String, String), Entry>, defs: &[CanaryDef]) {
        let mut routing = Vec::new();
        for def in defs {
            let Some(e) = entries.get(&(def.namespace.clone(), def.name.clone())) else { continue };
            let label = format!("{}/{}", def.namespace, def.name);
            self.metrics.canary_weight.with_label_values(&[&label]).set(i64::from(e.status.weight));
            for p in Phase::ALL {
                self.metrics.canary_phase.with_label_values(&[&label, p.as_str()]).set(i64::from(p == e.status.phase));
            }
            let in_ab = spec_in_ab(&def.spec, &e.status);
            routing.push(CanaryRouting {
                namespace: def.namespace.clone(),
                name: def.name.clone(),
                service: def.spec.service.clone(),
                stable: def.spec.stable.clone(),
                canary: def.spec.canary.clone(),
                weight: e.status.weight,
                ab: if in_ab { def.spec.ab_test.clone() } else { None },
                force: if e.status.phase == Phase::Failed { None } else { def.spec.force_header.clone() },
            });
        }
        self.routing.send_if_modified(|cur| {
            if **cur == routing {
                false
            } else {
                *cur = Arc::new(routing);
                true
            }
        });
    }

    fn save(&self, entries: &BTreeMap<(String, String), Entry>) {
        self.revision.send_modify(|r| *r += 1);
        let Some(path) = &self.state_file else { return };
        // Saved statuses not adopted yet (their Canary is absent or rejected for now) are kept.
        let loaded = self.loaded.lock().unwrap().clone();
        let mut all: BTreeMap<String, CanaryStatus> = loaded;
        all.extend(entries.iter().map(|((ns, n), e)| (format!("{ns}/{n}"), e.status.clone())));
        let result = (|| -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp~");
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(&all).unwrap_or_default())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, path = %path.display(), "cannot save canary state");
        }
    }
}

/// Runs the reconciler until `drain` fires: ticks every 50 ms, analysing each canary when its
/// interval is due.
/// Only while `leading` holds (always, in local mode): in Kubernetes mode one replica drives
/// and the others follow the statuses it writes.
pub async fn run(
    canaries: Arc<Canaries>,
    state: watch::Receiver<Arc<MeshState>>,
    leading: watch::Receiver<bool>,
    drain: Drain,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = drain.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        if !*leading.borrow() {
            continue;
        }
        let defs = state.borrow().canaries.clone();
        canaries.tick(&defs, Instant::now());
    }
}

enum Verdict {
    Pass,
    Fail(String),
    Inconclusive(String),
}

impl Verdict {
    fn as_str(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "fail",
            Verdict::Inconclusive(_) => "inconclusive",
        }
    }
}

fn judge(spec: &CanarySpec, canary: &Totals, weight: u32) -> Verdict {
    if spec.skip_analysis {
        return Verdict::Pass;
    }
    let min = spec.analysis.min_requests;
    if canary.requests < min {
        return Verdict::Inconclusive(format!(
            "inconclusive: {} canary requests in the interval, fewer than minRequests {min}; holding at {weight}%",
            canary.requests
        ));
    }
    let success = 100.0 * (1.0 - canary.failures as f64 / canary.requests as f64);
    if success < spec.analysis.min_success_rate {
        return Verdict::Fail(format!(
            "success rate {success:.1}% below minSuccessRate {}% ({} of {} requests failed)",
            spec.analysis.min_success_rate, canary.failures, canary.requests
        ));
    }
    if let (Some(max), Some((lower, p99))) = (spec.max_p99(), canary.quantile_bucket(0.99))
        && p99 > max.as_secs_f64()
    {
        return Verdict::Fail(format!(
            "p99 latency {}–{} above maxP99 {}",
            fmt_secs(lower),
            fmt_secs(p99),
            fmt_secs(max.as_secs_f64())
        ));
    }
    Verdict::Pass
}

fn fmt_secs(s: f64) -> String {
    if s.is_infinite() { "∞".into() } else { format!("{}ms", (s * 1000.0).round()) }
}

/// What a verdict does to a rollout: a pass advances it (see [`advance`]), a failure counts
/// toward the failure limit and rolls back at it, an inconclusive interval holds the weight.
fn apply(spec: &CanarySpec, status: &mut CanaryStatus, verdict: Verdict) {
    match verdict {
        Verdict::Inconclusive(why) => {
            let w = status.weight;
            if status.phase != Phase::Inconclusive {
                transition(status, Phase::Inconclusive, w, why);
            } else {
                status.message = why;
            }
        }
        Verdict::Fail(why) => {
            status.failed_intervals += 1;
            let limit = spec.analysis.failure_limit;
            if status.failed_intervals >= limit {
                let n = status.failed_intervals;
                transition(status, Phase::Failed, 0, format!("rolled back: {why} ({n} of {limit} failed intervals)"));
            } else {
                let (w, n) = (status.weight, status.failed_intervals);
                let why = format!("interval failed: {why} ({n} of {limit})");
                transition(status, Phase::Progressing, w, why);
            }
        }
        Verdict::Pass => advance(spec, status),
    }
}

fn advance(spec: &CanarySpec, status: &mut CanaryStatus) {
    if status.phase == Phase::Promoting {
        transition(status, Phase::Succeeded, 100, "promoted".into());
        return;
    }
    if spec_in_ab(spec, status) {
        status.ab_intervals += 1;
        let need = spec.ab_test.as_ref().map(|a| a.intervals).unwrap_or(0);
        if status.ab_intervals >= need {
            let w = status.steps.first().copied().unwrap_or(100);
            status.step = 0;
            transition(status, Phase::Progressing, w, format!("A/B stage passed; weighted steps from {w}%"));
        } else {
            let n = status.ab_intervals;
            transition(status, Phase::Progressing, 0, format!("A/B interval {n} of {need} passed"));
        }
        return;
    }
    let last = status.steps.len().saturating_sub(1);
    if (status.step as usize) < last {
        status.step += 1;
        let w = status.steps[status.step as usize];
        transition(status, Phase::Progressing, w, format!("advanced to {w}%"));
    } else if spec.auto_promote {
        transition(status, Phase::Promoting, 100, "last step passed: promoting".into());
    } else if status.phase != Phase::Holding {
        let w = status.weight;
        transition(status, Phase::Holding, w, "last step passed: waiting for promote".into());
    }
}

/// Whether the rollout is in its A/B stage (before the first weighted step).
fn spec_in_ab(spec: &CanarySpec, status: &CanaryStatus) -> bool {
    spec.ab_test.as_ref().is_some_and(|ab| status.ab_intervals < ab.intervals)
        && matches!(status.phase, Phase::Progressing | Phase::Inconclusive | Phase::Paused)
        && status.weight == 0
}

fn backend_metrics(t: &Totals) -> BackendMetrics {
    BackendMetrics {
        requests: t.requests,
        success_rate: (t.requests > 0).then(|| 100.0 * (1.0 - t.failures as f64 / t.requests as f64)),
        p99_ms: t.quantile(0.99).filter(|p| p.is_finite()).map(|p| p * 1000.0),
    }
}

/// Back to the phase the rollout was paused in; the paused time is not judged.
fn resume(entry: &mut Entry, reason: String) {
    let phase = entry.status.paused_from.take().unwrap_or(Phase::Progressing);
    entry.status.paused_by_spec = false;
    let w = entry.status.weight;
    transition(&mut entry.status, phase, w, reason);
    entry.baseline = None;
}

fn transition(status: &mut CanaryStatus, phase: Phase, weight: u32, reason: String) {
    status.phase = phase;
    status.weight = weight;
    status.message = reason.clone();
    status.history.push(Transition { at_unix_ms: unix_ms(), phase, weight, reason });
    if status.history.len() > HISTORY {
        let extra = status.history.len() - HISTORY;
        status.history.drain(..extra);
    }
}

/// A message with the note about Routes that also steer the Service (replacing an older note).
fn conflict_note(message: &str, routes: &[String]) -> String {
    const MARK: &str = " [note: ";
    let base = message.split(MARK).next().unwrap_or("");
    if routes.is_empty() {
        base.to_string()
    } else {
        format!("{base}{MARK}Route {} also steers this Service; the canary's rules come first]", routes.join(", "))
    }
}

/// A fingerprint of what the rollout rolls out, stable across builds (FNV-1a): a new stable or
/// canary Service starts a new rollout; every other edit applies to the running one.
fn spec_hash(spec: &CanarySpec) -> String {
    let json = format!("{}\n{}\n{}", spec.service, spec.stable, spec.canary);
    let h = json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_api::proto;

    fn def(extra: &str) -> CanaryDef {
        let yaml = format!("service: web\nstable: web-v1\ncanary: web-v2\ninterval: 1s\nsteps: [20, 50]\n{extra}");
        let spec: CanarySpec = serde_yaml::from_str(&yaml).unwrap();
        spec.validate().unwrap();
        CanaryDef { namespace: "ns".into(), name: "web".into(), spec, conflicting_routes: vec![] }
    }

    /// `n` requests to each backend, `failed` of the canary's failing, all fast.
    fn report(reports: &Arc<Mutex<Reports>>, n: u64, failed: u64) {
        let stats = |backend: &str, failures: u64| proto::TrafficStats {
            direction: "outbound".into(),
            service: "ns/web".into(),
            route: "canary/ns/web:split".into(),
            backend: backend.into(),
            requests: n,
            failures,
            latency_counts: vec![n, 0],
            latency_sum_seconds: 0.0,
            mtls_requests: 0,
        };
        let r = proto::Report {
            window_start_ms: 0,
            window_end_ms: 1,
            latency_bounds_seconds: vec![0.01],
            stats: vec![stats("ns/web-v2", failed), stats("ns/web-v1", 0)],
        };
        reports.lock().unwrap().record(&r, |_| true);
    }

    fn setup() -> (Arc<Canaries>, Arc<Mutex<Reports>>, Instant) {
        let reports = Arc::new(Mutex::new(Reports::default()));
        let (c, _rx) = Canaries::new(None, reports.clone(), Metrics::new()).unwrap();
        (c, reports, Instant::now())
    }

    fn status(c: &Canaries) -> CanaryStatus {
        c.statuses()["ns/web"].clone()
    }

    #[test]
    fn steps_pauses_and_edits() {
        let (c, reports, t0) = setup();
        let at = |s: u64| t0 + Duration::from_millis(s * 1000 + 1);
        let d = def("");
        c.tick(std::slice::from_ref(&d), t0);
        assert_eq!((status(&c).phase, status(&c).weight), (Phase::Progressing, 20));
        // First interval after start only measures; then a passing one advances.
        c.tick(std::slice::from_ref(&d), at(1));
        report(&reports, 100, 0);
        c.tick(std::slice::from_ref(&d), at(2));
        assert_eq!((status(&c).phase, status(&c).weight), (Phase::Progressing, 50));

        // spec.paused holds it; clearing it resumes where it was.
        let paused = def("paused: true");
        c.tick(std::slice::from_ref(&paused), at(3));
        assert_eq!((status(&c).phase, status(&c).paused_from), (Phase::Paused, Some(Phase::Progressing)));
        report(&reports, 100, 0);
        c.tick(std::slice::from_ref(&paused), at(4));
        assert_eq!(status(&c).weight, 50, "a paused rollout does not move");
        c.tick(std::slice::from_ref(&d), at(5));
        assert_eq!((status(&c).phase, status(&c).weight), (Phase::Progressing, 50));

        // A threshold edit keeps the rollout's place.
        let edited = def("analysis: { minRequests: 5 }");
        c.tick(std::slice::from_ref(&edited), at(6));
        assert_eq!(status(&c).weight, 50);
        // Failing intervals roll back at the limit, naming the metric.
        for s in 7..9 {
            report(&reports, 100, 30);
            c.tick(std::slice::from_ref(&edited), at(s));
        }
        let st = status(&c);
        assert_eq!((st.phase, st.weight), (Phase::Failed, 0));
        assert!(st.message.contains("success rate 70.0% below minSuccessRate 99%"), "{}", st.message);
    }

    #[test]
    fn requests_through_the_annotation_apply_once_and_say_why_not() {
        let (c, _reports, t0) = setup();
        let d = def("");
        c.tick(std::slice::from_ref(&d), t0);
        let ask = |r: &str| c.set_requests([("ns/web".to_string(), r.to_string())].into());
        ask("pause:1");
        c.tick(std::slice::from_ref(&d), t0 + Duration::from_millis(10));
        let s = status(&c);
        assert_eq!(
            (s.phase, s.handled_request.as_str(), s.request_result.as_str()),
            (Phase::Paused, "pause:1", "applied")
        );
        // The same request is not applied twice (a resume by hand in between stays).
        c.act(std::slice::from_ref(&d), "ns", "web", Action::Resume, t0).unwrap();
        c.tick(std::slice::from_ref(&d), t0 + Duration::from_millis(20));
        assert_ne!(status(&c).phase, Phase::Paused);
        // A refused one says why; a malformed one too.
        ask("resume:2");
        c.tick(std::slice::from_ref(&d), t0 + Duration::from_millis(30));
        assert_eq!(status(&c).request_result, "refused: not paused (phase Progressing)");
        ask("launch:3");
        c.tick(std::slice::from_ref(&d), t0 + Duration::from_millis(40));
        assert!(status(&c).request_result.contains("unknown action \"launch\""), "{}", status(&c).request_result);
        ask("promote:4");
        c.tick(std::slice::from_ref(&d), t0 + Duration::from_millis(50));
        assert_eq!((status(&c).phase, status(&c).weight), (Phase::Succeeded, 100));
        // A new rollout (another canary Service) does not replay the last request.
        let next = CanaryDef { spec: CanarySpec { canary: "web-v3".into(), ..d.spec.clone() }, ..d.clone() };
        c.tick(std::slice::from_ref(&next), t0 + Duration::from_millis(60));
        assert_eq!((status(&c).phase, status(&c).weight), (Phase::Progressing, 20), "started over, not promoted");
        assert_eq!(status(&c).handled_request, "promote:4");
    }

    #[test]
    fn a_canary_created_paused_starts_from_the_beginning_when_resumed() {
        let (c, _reports, t0) = setup();
        let paused = def("paused: true");
        c.tick(std::slice::from_ref(&paused), t0);
        assert_eq!((status(&c).phase, status(&c).weight), (Phase::Paused, 0));
        let resumed = c.act(std::slice::from_ref(&paused), "ns", "web", Action::Resume, t0);
        assert!(resumed.unwrap_err().to_string().contains("spec.paused is true"));
        c.tick(&[def("")], t0 + Duration::from_millis(10));
        // Back to Initializing, which the next due tick turns into the first step.
        c.tick(&[def("")], t0 + Duration::from_secs(2));
        assert_eq!((status(&c).phase, status(&c).weight), (Phase::Progressing, 20));
    }

    /// Every phase × every event, from a status built in that phase: what the state machine
    /// does is written out here row by row, so any change to a transition fails a row.
    #[test]
    fn every_phase_answers_every_event() {
        #[derive(Clone, Copy, Debug)]
        enum Event {
            Pass,
            Fail,
            FailAtLimit,
            TooFewRequests,
            Pause,
            Resume,
            Promote,
            Abort,
            EditThresholds,
            NewRollout,
            Restart,
        }
        /// What an event leads to: a phase and weight, or a refusal (status unchanged).
        #[derive(Clone, Debug, PartialEq)]
        enum Then {
            Is(Phase, u32),
            Refused(String),
        }
        use Event::*;
        use Phase::*;
        use Then::{Is, Refused};

        let spec = "analysis: { minRequests: 10, minSuccessRate: 99, failureLimit: 2 }\nautoPromote: false\n";
        // The status a canary has in each phase (steps [20, 50]).
        let in_phase = |phase: Phase| {
            let (step, weight) = match phase {
                Initializing | Failed => (0, 0),
                Progressing | Inconclusive | Paused => (0, 20),
                Holding => (1, 50),
                Promoting | Succeeded => (1, 100),
            };
            CanaryStatus {
                phase,
                step,
                weight,
                steps: vec![20, 50],
                spec_hash: spec_hash(&def(spec).spec),
                paused_from: (phase == Paused).then_some(Progressing),
                ..Default::default()
            }
        };
        let refused = |why: &str| Refused(why.to_string());
        let rows: Vec<(Phase, Event, Then)> = vec![
            (Initializing, Pass, Is(Progressing, 20)),
            (Initializing, Fail, Is(Progressing, 20)),
            (Initializing, TooFewRequests, Is(Progressing, 20)),
            (Initializing, Pause, Is(Paused, 0)),
            (Initializing, Resume, refused("not paused (phase Initializing)")),
            (Initializing, Promote, Is(Succeeded, 100)),
            (Initializing, Abort, Is(Failed, 0)),
            (Progressing, Pass, Is(Progressing, 50)),
            (Progressing, Fail, Is(Progressing, 20)),
            (Progressing, FailAtLimit, Is(Failed, 0)),
            (Progressing, TooFewRequests, Is(Inconclusive, 20)),
            (Progressing, Pause, Is(Paused, 20)),
            (Progressing, Resume, refused("not paused (phase Progressing)")),
            (Progressing, Promote, Is(Succeeded, 100)),
            (Progressing, Abort, Is(Failed, 0)),
            (Inconclusive, Pass, Is(Progressing, 50)),
            (Inconclusive, Fail, Is(Progressing, 20)),
            (Inconclusive, FailAtLimit, Is(Failed, 0)),
            (Inconclusive, TooFewRequests, Is(Inconclusive, 20)),
            (Inconclusive, Pause, Is(Paused, 20)),
            (Inconclusive, Resume, refused("not paused (phase Inconclusive)")),
            (Inconclusive, Promote, Is(Succeeded, 100)),
            (Inconclusive, Abort, Is(Failed, 0)),
            // The last step passed and waits for a promote by hand (autoPromote: false).
            (Holding, Pass, Is(Holding, 50)),
            (Holding, Fail, Is(Progressing, 50)),
            (Holding, FailAtLimit, Is(Failed, 0)),
            (Holding, TooFewRequests, Is(Inconclusive, 50)),
            (Holding, Pause, Is(Paused, 50)),
            (Holding, Resume, refused("not paused (phase Holding)")),
            (Holding, Promote, Is(Succeeded, 100)),
            (Holding, Abort, Is(Failed, 0)),
            // Paused: intervals are not judged; resume goes back to the phase it paused in.
            (Paused, Pass, Is(Paused, 20)),
            (Paused, Fail, Is(Paused, 20)),
            (Paused, TooFewRequests, Is(Paused, 20)),
            (Paused, Pause, refused("already paused")),
            (Paused, Resume, Is(Progressing, 20)),
            (Paused, Promote, Is(Succeeded, 100)),
            (Paused, Abort, Is(Failed, 0)),
            // Promoting (autoPromote): one more passing interval at 100 %, then done; a failed
            // one counts toward the limit like any other.
            (Promoting, Pass, Is(Succeeded, 100)),
            (Promoting, Fail, Is(Progressing, 100)),
            (Promoting, FailAtLimit, Is(Failed, 0)),
            (Promoting, TooFewRequests, Is(Inconclusive, 100)),
            (Promoting, Pause, Is(Paused, 100)),
            (Promoting, Resume, refused("not paused (phase Promoting)")),
            (Promoting, Promote, Is(Succeeded, 100)),
            (Promoting, Abort, Is(Failed, 0)),
            // Final phases: nothing moves them but a new rollout.
            (Succeeded, Pass, Is(Succeeded, 100)),
            (Succeeded, Fail, Is(Succeeded, 100)),
            (Succeeded, TooFewRequests, Is(Succeeded, 100)),
            (Succeeded, Pause, refused("Canary ns/web has already succeeded")),
            (Succeeded, Resume, refused("Canary ns/web has already succeeded")),
            (Succeeded, Promote, refused("Canary ns/web has already succeeded")),
            (Succeeded, Abort, refused("Canary ns/web has already succeeded")),
            (Failed, Pass, Is(Failed, 0)),
            (Failed, Fail, Is(Failed, 0)),
            (Failed, TooFewRequests, Is(Failed, 0)),
            (Failed, Pause, refused("Canary ns/web has already failed")),
            (Failed, Resume, refused("Canary ns/web has already failed")),
            (Failed, Promote, refused("Canary ns/web has already failed")),
            (Failed, Abort, refused("Canary ns/web has already failed")),
        ];
        // Spec edits and restarts, for every phase: thresholds apply in place, another canary
        // Service starts over, a restart resumes exactly where it was.
        let mut all = rows;
        for phase in Phase::ALL {
            let st = in_phase(phase);
            all.push((phase, EditThresholds, Is(phase, st.weight)));
            all.push((phase, NewRollout, Is(Initializing, 0)));
            all.push((phase, Restart, Is(phase, st.weight)));
        }

        let passing =
            |requests: u64, failures: u64| Totals { requests, failures, bounds: vec![0.01], counts: vec![requests, 0] };
        let mut failures = Vec::new();
        for (phase, event, want) in all {
            let (c, _reports, t0) = setup();
            let d = def(spec);
            let dir = tempfile::tempdir().unwrap();
            let mut entries = BTreeMap::new();
            let mut st = in_phase(phase);
            if matches!(event, FailAtLimit) {
                st.failed_intervals = 1;
            }
            entries.insert(
                ("ns".to_string(), "web".to_string()),
                Entry { status: st.clone(), next_due: t0, baseline: Some((Totals::default(), Totals::default())) },
            );
            let got: Then = match event {
                Pass | Fail | FailAtLimit | TooFewRequests => {
                    let canary = match event {
                        Pass => passing(100, 0),
                        TooFewRequests => passing(3, 0),
                        _ => passing(100, 50),
                    };
                    let entry = entries.get_mut(&("ns".into(), "web".into())).unwrap();
                    c.step(&d, entry, (canary, passing(100, 0)));
                    Is(entry.status.phase, entry.status.weight)
                }
                Pause | Resume | Promote | Abort => {
                    let action = match event {
                        Pause => Action::Pause,
                        Resume => Action::Resume,
                        Promote => Action::Promote,
                        _ => Action::Abort,
                    };
                    match Canaries::act_on(&mut entries, std::slice::from_ref(&d), "ns", "web", action) {
                        Ok(s) => Is(s.phase, s.weight),
                        Err(ActError::Refused(why)) => {
                            let left = &entries[&("ns".to_string(), "web".to_string())].status;
                            assert_eq!(left, &st, "{phase:?} × {event:?}: a refusal changed the status");
                            Refused(why)
                        }
                        Err(e) => panic!("{phase:?} × {event:?}: {e}"),
                    }
                }
                EditThresholds | NewRollout => {
                    let edited = match event {
                        EditThresholds => def(
                            "analysis: { minRequests: 50, minSuccessRate: 90, failureLimit: 5 }\nautoPromote: false\n",
                        ),
                        _ => CanaryDef { spec: CanarySpec { canary: "web-v3".into(), ..d.spec.clone() }, ..d.clone() },
                    };
                    c.sync(&mut entries, std::slice::from_ref(&edited), t0);
                    let s = &entries[&("ns".to_string(), "web".to_string())].status;
                    Is(s.phase, s.weight)
                }
                Restart => {
                    let file = dir.path().join("canaries.json");
                    let (before, _rx) =
                        Canaries::new(Some(file.clone()), Arc::new(Mutex::new(Reports::default())), Metrics::new())
                            .unwrap();
                    before.save(&entries);
                    let (after, _rx) =
                        Canaries::new(Some(file), Arc::new(Mutex::new(Reports::default())), Metrics::new()).unwrap();
                    after.adopt(std::slice::from_ref(&d), t0);
                    let s = after.statuses()["ns/web"].clone();
                    assert_eq!(s, st, "{phase:?} × restart: the status must come back as it was saved");
                    Is(s.phase, s.weight)
                }
            };
            if got != want {
                failures.push(format!("{phase:?} × {event:?}: want {want:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "transitions that differ from the table:\n{}", failures.join("\n"));
    }
}
