//! Status conditions of Weir's custom resources in Kubernetes: what the index made of each
//! object's generation, written by the leader only.
//!
//! - `Accepted`: `True` when this generation is in force; `False` with reason `Invalid`,
//!   `BackendNotFound` or `Conflict` otherwise (the message says what is wrong and whether the
//!   previous version keeps serving).
//! - `ResolvedRefs`: `False` / `BackendNotFound` when a referenced Service (or rule) is missing;
//!   `Unknown` when the spec itself is invalid.
//!
//! Writes are JSON merge patches of the `status` subresource and only happen when a condition
//! (status, reason, message or observedGeneration) differs from what the object shows, so a
//! status write never loops back into another.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use weir_api::rt::Drain;

use crate::index::{Index, Kind, Reason, Resource, ResourceKey};
use crate::source::kubernetes::{KubeSource, weir_kinds};

/// What the controller concluded about one object's generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub generation: Option<i64>,
    /// Why this generation is not in force.
    pub problem: Option<(Reason, String)>,
    /// Whether some version (this one or a previous one) is in force.
    pub in_force: bool,
    /// Routes: rules in force.
    pub rule_count: Option<u32>,
}

pub type Verdicts = BTreeMap<ResourceKey, Verdict>;

/// Verdicts for the objects whose generations the source read.
pub fn verdicts(index: &Index, generations: &HashMap<ResourceKey, Option<i64>>) -> Verdicts {
    let mut problems: HashMap<&ResourceKey, (Reason, String)> = HashMap::new();
    for r in index.rejections() {
        if let Some(key) = &r.resource {
            let message = match &r.field {
                Some(f) => format!("{f}: {}", r.message),
                None => r.message.clone(),
            };
            problems.entry(key).or_insert((r.reason, message));
        }
    }
    generations
        .iter()
        .filter(|(k, _)| k.kind != Kind::Service)
        .map(|(key, generation)| {
            let entry = index.entries().get(key);
            let problem = problems.get(key).cloned();
            let rule_count = match entry.map(|e| &e.resource) {
                Some(Resource::Route(r)) => Some(r.rules.len() as u32),
                _ => None,
            };
            (key.clone(), Verdict { generation: *generation, problem, in_force: entry.is_some(), rule_count })
        })
        .collect()
}

/// The conditions a verdict calls for, keeping `lastTransitionTime` of conditions whose status
/// did not change.
pub fn conditions(v: &Verdict, existing: &[Condition], now: Timestamp) -> Vec<Condition> {
    let kept = if v.in_force { "; the previous version stays in force" } else { "" };
    let (accepted, resolved) = match &v.problem {
        None => (
            ("True", "Accepted", "in force".to_string()),
            ("True", "ResolvedRefs", "every referenced Service exists".to_string()),
        ),
        Some((Reason::BackendNotFound, m)) => {
            (("False", "BackendNotFound", format!("not in force: {m}{kept}")), ("False", "BackendNotFound", m.clone()))
        }
        Some((reason, m)) => (
            ("False", reason.as_str(), format!("{m}{kept}")),
            if *reason == Reason::Invalid {
                ("Unknown", "Invalid", "not checked: the spec is invalid".to_string())
            } else {
                ("True", "ResolvedRefs", "every referenced Service exists".to_string())
            },
        ),
    };
    [("Accepted", accepted), ("ResolvedRefs", resolved)]
        .into_iter()
        .map(|(type_, (status, reason, message))| {
            let since = existing
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                observed_generation: v.generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether `existing` already says what `desired` says (times aside).
fn same(existing: &[Condition], desired: &[Condition]) -> bool {
    existing.len() == desired.len()
        && desired.iter().all(|d| {
            existing.iter().any(|e| {
                e.type_ == d.type_
                    && e.status == d.status
                    && e.reason == d.reason
                    && e.message == d.message
                    && e.observed_generation == d.observed_generation
            })
        })
}

fn existing_conditions(obj: &DynamicObject) -> Vec<Condition> {
    obj.data
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// Writes status whenever this replica leads and a verdict differs from an object's status.
pub fn spawn(
    client: Client,
    source: Arc<KubeSource>,
    mut verdicts: watch::Receiver<Arc<Verdicts>>,
    mut leader: watch::Receiver<bool>,
    canaries: Arc<crate::canary::Canaries>,
    writes: prometheus::IntCounterVec,
    drain: Drain,
) -> tokio::task::JoinHandle<()> {
    let mut rollouts = canaries.subscribe();
    tokio::spawn(async move {
        let resources: HashMap<Kind, kube::api::ApiResource> = weir_kinds().into_iter().collect();
        // Failed writes are retried on the next pass; a periodic pass also catches objects whose
        // status someone else overwrote.
        let mut resync = tokio::time::interval(Duration::from_secs(30));
        let draining = drain.clone();
        let mut drained = std::pin::pin!(drain.signaled());
        loop {
            tokio::select! {
                _ = &mut drained => break,
                r = verdicts.changed() => if r.is_err() { break },
                r = leader.changed() => if r.is_err() { break },
                r = rollouts.changed() => if r.is_err() { break },
                _ = resync.tick() => {}
            }
            if !*leader.borrow_and_update() {
                continue;
            }
            let current = verdicts.borrow_and_update().clone();
            rollouts.borrow_and_update();
            let rollout = canaries.statuses();
            for (kind, stores) in &source.weir {
                let ar = &resources[kind];
                for obj in stores.objects() {
                    // A deposed or stopping leader stops writing at once, not after the pass.
                    if !*leader.borrow() || draining.is_draining() {
                        break;
                    }
                    let ns = obj.namespace().unwrap_or_default();
                    let key = ResourceKey::new(*kind, ns.clone(), obj.name_any());
                    let Some(v) = current.get(&key) else { continue };
                    let existing = existing_conditions(&obj);
                    let desired = conditions(v, &existing, Timestamp::now());
                    let have = obj.data.get("status").cloned().unwrap_or_else(|| serde_json::json!({}));
                    // What the status should be: ours overwrites the fields we own.
                    let mut want = match kind {
                        // A Canary's status is the rollout this replica drives, in full.
                        Kind::Canary => rollout
                            .get(&format!("{ns}/{}", obj.name_any()))
                            .and_then(|r| serde_json::to_value(r).ok())
                            .unwrap_or_else(|| have.clone()),
                        _ => have.clone(),
                    };
                    if !want.is_object() {
                        want = serde_json::json!({});
                    }
                    want["conditions"] = serde_json::to_value(&desired).unwrap_or_default();
                    if *kind == Kind::Route {
                        want["ruleCount"] =
                            v.rule_count.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null);
                        if want["ruleCount"].is_null() {
                            want.as_object_mut().expect("object").remove("ruleCount");
                        }
                    }
                    let mut patch = merge_patch_to(&have, &want);
                    // Conditions that say the same (times aside) are not rewritten.
                    if same(&existing, &desired)
                        && let Some(p) = patch.as_object_mut()
                    {
                        p.remove("conditions");
                    }
                    if patch.as_object().is_some_and(|p| p.is_empty()) {
                        continue;
                    }
                    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, ar);
                    let patch = Patch::Merge(serde_json::json!({ "status": patch }));
                    match api.patch_status(&obj.name_any(), &PatchParams::default(), &patch).await {
                        Ok(_) => writes.with_label_values(&["ok"]).inc(),
                        // Deleted meanwhile: nothing to report on.
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => {
                            writes.with_label_values(&["error"]).inc();
                            tracing::warn!(resource = %key, error = %e, "cannot write status; retrying later");
                        }
                    }
                }
            }
        }
    })
}

/// JSON equality where numbers compare by value (the API server writes `100.0` back as `100`).
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => x.as_f64() == y.as_f64(),
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Object(x), Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w))),
        _ => a == b,
    }
}

/// A JSON merge patch (RFC 7386) that turns `from` into `to`: fields `to` lacks are nulled.
pub fn merge_patch_to(from: &serde_json::Value, to: &serde_json::Value) -> serde_json::Value {
    match (from, to) {
        (serde_json::Value::Object(f), serde_json::Value::Object(t)) => {
            let mut patch = serde_json::Map::new();
            for (k, fv) in f {
                match t.get(k) {
                    None => {
                        patch.insert(k.clone(), serde_json::Value::Null);
                    }
                    Some(tv) if !json_eq(tv, fv) => {
                        patch.insert(k.clone(), merge_patch_to(fv, tv));
                    }
                    Some(_) => {}
                }
            }
            for (k, tv) in t {
                if !f.contains_key(k) {
                    patch.insert(k.clone(), tv.clone());
                }
            }
            serde_json::Value::Object(patch)
        }
        _ => to.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(problem: Option<(Reason, &str)>, in_force: bool) -> Verdict {
        Verdict { generation: Some(3), problem: problem.map(|(r, m)| (r, m.to_string())), in_force, rule_count: None }
    }

    #[test]
    fn merge_patch_turns_one_status_into_another() {
        let from = serde_json::json!({"phase": "Progressing", "lastAnalysis": {"canary": {"p99": "5ms", "rate": 99}}, "old": 1});
        let to = serde_json::json!({"phase": "Failed", "lastAnalysis": {"canary": {"rate": 90}}});
        let patch = merge_patch_to(&from, &to);
        assert_eq!(
            patch,
            serde_json::json!({"phase": "Failed", "old": null, "lastAnalysis": {"canary": {"p99": null, "rate": 90}}})
        );
        fn apply(t: &mut serde_json::Value, p: &serde_json::Value) {
            match (t.as_object_mut(), p.as_object()) {
                (Some(t), Some(p)) => {
                    for (k, v) in p {
                        if v.is_null() {
                            t.remove(k);
                        } else {
                            apply(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                        }
                    }
                }
                _ => *t = p.clone(),
            }
        }
        let mut applied = from.clone();
        apply(&mut applied, &patch);
        assert_eq!(applied, to);
        assert_eq!(merge_patch_to(&to, &to), serde_json::json!({}));
        // Numbers compare by value, as the API server may re-encode them.
        assert_eq!(
            merge_patch_to(&serde_json::json!({"w": 100}), &serde_json::json!({"w": 100.0})),
            serde_json::json!({})
        );
    }

    #[test]
    fn conditions_say_why_and_keep_transition_times() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let t1 = Timestamp::from_second(2_000_000).unwrap();
        let ok = conditions(&verdict(None, true), &[], t0);
        assert_eq!(ok[0].type_, "Accepted");
        assert_eq!((ok[0].status.as_str(), ok[0].reason.as_str()), ("True", "Accepted"));
        assert_eq!(ok[0].observed_generation, Some(3));
        let missing = conditions(
            &verdict(Some((Reason::BackendNotFound, "spec.service: Service shop/ghost not found")), true),
            &ok,
            t1,
        );
        assert_eq!((missing[0].status.as_str(), missing[0].reason.as_str()), ("False", "BackendNotFound"));
        assert!(missing[0].message.ends_with("previous version stays in force"), "{}", missing[0].message);
        assert_eq!((missing[1].status.as_str(), missing[1].reason.as_str()), ("False", "BackendNotFound"));
        assert_eq!(missing[1].last_transition_time, Time(t1));
        // Unchanged status keeps its transition time; a new generation alone is a change to write.
        let again = conditions(&verdict(None, true), &ok, t1);
        assert_eq!(again[0].last_transition_time, Time(t0));
        assert!(same(&ok, &again));
        let mut newer = verdict(None, true);
        newer.generation = Some(4);
        assert!(!same(&ok, &conditions(&newer, &ok, t1)));
        let invalid = conditions(&verdict(Some((Reason::Invalid, "spec.rules: bad")), false), &[], t0);
        assert_eq!((invalid[0].status.as_str(), invalid[0].reason.as_str()), ("False", "Invalid"));
        assert_eq!(invalid[0].message, "spec.rules: bad");
        assert_eq!(invalid[1].status, "Unknown");
    }
}
