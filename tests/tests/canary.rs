//! Canaries that run themselves, in local mode with real sidecars and backends at a 1 s
//! interval: a healthy canary is promoted step by step, a failing or slow one is rolled back
//! with the metric named, no traffic holds as inconclusive, a controller restart resumes at the
//! same step, manual controls do what they say, and the A/B stage sends only matching requests
//! to the canary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weir_tests::*;

fn canary(extra: &str) -> String {
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: Canary\nmetadata: {{ name: web, namespace: test }}\nspec:\n  service: web\n  \
         stable: web-v1\n  canary: web-v2\n  interval: 1s\n{extra}"
    )
}

/// The Canary's entry from the controller's `/canaries`.
async fn status(controller: &ChildProc) -> serde_json::Value {
    let all = admin_json(controller.addr("admin"), "/canaries").await;
    let first = all["canaries"].as_array().and_then(|l| l.first());
    first.map(|c| c["status"].clone()).unwrap_or_else(|| panic!("no Canary in /canaries: {all}"))
}

async fn wait_phase(controller: &ChildProc, phase: &str, limit: Duration) -> serde_json::Value {
    let admin = controller.addr("admin");
    let want = phase.to_string();
    wait_until(&format!("phase {phase}"), limit, || {
        let want = want.clone();
        async move {
            let all = admin_json(admin, "/canaries").await;
            all["canaries"][0]["status"]["phase"] == want.as_str()
        }
    })
    .await;
    status(controller).await
}

/// Steady load through the client sidecar: requests by backend, and failures.
struct Load {
    stop: Arc<AtomicBool>,
    pub total: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(via: std::net::SocketAddr, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (total, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let workers = (0..workers)
            .map(|_| {
                let (stop, total, failed) = (stop.clone(), total.clone(), failed.clone());
                tokio::spawn(async move {
                    let http = http1();
                    while !stop.load(Ordering::Relaxed) {
                        total.fetch_add(1, Ordering::Relaxed);
                        match send(&http, via, "GET", "web.test", "/", &[]).await {
                            Ok(r) if r.status < 500 => {}
                            other => {
                                if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                    let what = other
                                        .map(|r| format!("{} {}", r.status, r.body))
                                        .unwrap_or_else(|e| e.to_string());
                                    eprintln!("first failed request: {what}");
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Self { stop, total, failed, workers }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.await;
        }
        (self.total.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// Writes the Canary and waits until the client sidecar routes `web` by it (before that, `web`
/// has no endpoints of its own).
async fn start_canary(mesh: &TwoVersions, yaml: &str) {
    mesh.scratch.write("canary.yaml", yaml);
    wait_config(mesh.client.addr("admin"), "the canary's split", |c| {
        c["snapshot"]["services"].as_array().is_some_and(|s| {
            s.iter().any(|s| {
                s["name"] == "web" && s["rules"].as_array().is_some_and(|r| r.iter().any(|r| r["name"] == "split"))
            })
        })
    })
    .await;
}

/// The sum of every sample whose line starts with `prefix` (a metric name, or name and labels).
fn sum_metric(metrics: &str, prefix: &str) -> f64 {
    metrics.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// The weights the rollout went through, in order (inconclusive holds collapse into one).
fn weights_seen(status: &serde_json::Value) -> Vec<u64> {
    let mut w: Vec<u64> = status["history"].as_array().unwrap().iter().map(|t| t["weight"].as_u64().unwrap()).collect();
    w.dedup();
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_advances_through_every_step_and_succeeds() {
    let mesh = TwoVersions::start("").await;
    start_canary(&mesh, &canary("  steps: [20, 50]\n  analysis: { minRequests: 20 }\n")).await;
    let load = Load::start(mesh.outbound(), 2);
    let s = wait_phase(&mesh.controller, "Succeeded", Duration::from_secs(60)).await;
    assert_eq!(weights_seen(&s), vec![20, 50, 100], "{s:#}");
    assert_eq!(s["weight"], 100);
    // The sidecars run the final split: all of web's traffic to web-v2.
    wait_config(mesh.client.addr("admin"), "the final split", |c| weights(c, "test", "web") == vec![0, 100]).await;
    let r = send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.backend(), "v2");
    let (total, failed) = load.stop().await;
    assert_eq!(failed, 0, "of {total} requests");
    let m = admin_text(mesh.controller.addr("admin"), "/metrics").await;
    assert!(m.contains("weir_canary_weight{canary=\"test/web\"} 100"), "{m}");
    assert!(m.contains("weir_canary_phase{canary=\"test/web\",phase=\"Succeeded\"} 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_with_the_metric_named() {
    let mesh = TwoVersions::start("").await;
    mesh.v2.behaviour.set_fail_rate(0.2);
    let started = Instant::now();
    start_canary(
        &mesh,
        &canary("  steps: [20, 50]\n  analysis: { minRequests: 20, minSuccessRate: 95, failureLimit: 2 }\n"),
    )
    .await;
    let load = Load::start(mesh.outbound(), 2);
    let s = wait_phase(&mesh.controller, "Failed", Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert_eq!(s["weight"], 0);
    assert_eq!(s["failedIntervals"], 2);
    let msg = s["message"].as_str().unwrap();
    assert!(msg.contains("rolled back: success rate") && msg.contains("below minSuccessRate 95%"), "{msg}");
    // It never advanced past the first step: two failed intervals, then straight to 0.
    assert!(weights_seen(&s).iter().all(|w| *w <= 20), "{s:#}");
    wait_config(mesh.client.addr("admin"), "the rollback", |c| weights(c, "test", "web") == vec![100, 0]).await;
    let (total, failed) = load.stop().await;
    eprintln!("bad canary to full rollback: {took:?} ({failed} of {total} requests failed meanwhile)");
    // The canary was judged on real failures the clients saw: some requests failed, and no more
    // than the canary's share at 20 % could (a fifth of its fifth, 4 %, expected; 25 % is a
    // bound no run can reach unless more than the canary's share failed).
    assert!(failed > 0 && failed * 4 < total, "{failed} of {total} requests failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_is_rolled_back_on_p99() {
    let mesh = TwoVersions::start("").await;
    mesh.v2.behaviour.set_latency(Duration::from_millis(300));
    start_canary(&mesh, &canary("  steps: [50]\n  analysis: { minRequests: 5, maxP99: 100ms, failureLimit: 1 }\n"))
        .await;
    let load = Load::start(mesh.outbound(), 4);
    let s = wait_phase(&mesh.controller, "Failed", Duration::from_secs(30)).await;
    let msg = s["message"].as_str().unwrap();
    assert!(msg.contains("p99 latency") && msg.contains("above maxP99 100ms"), "{msg}");
    assert!(s["lastAnalysis"]["canary"]["p99Ms"].as_f64().unwrap() > 100.0, "{s:#}");
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_traffic_is_inconclusive_and_traffic_resumes_it() {
    let mesh = TwoVersions::start("").await;
    mesh.scratch.write("canary.yaml", &canary("  steps: [20, 50]\n  analysis: { minRequests: 20 }\n"));
    let s = wait_phase(&mesh.controller, "Inconclusive", Duration::from_secs(20)).await;
    assert_eq!(s["weight"], 20);
    assert!(s["message"].as_str().unwrap().contains("fewer than minRequests 20; holding at 20%"), "{s:#}");
    // Several intervals later it still holds: no data never promotes or fails.
    let admin = mesh.controller.addr("admin");
    wait_until("three inconclusive analyses", Duration::from_secs(20), || async move {
        let m = admin_text(admin, "/metrics").await;
        sum_metric(&m, "weir_canary_analyses_total{canary=\"test/web\",verdict=\"inconclusive\"}") >= 3.0
    })
    .await;
    let s = status(&mesh.controller).await;
    assert_eq!(
        (s["phase"].as_str(), s["weight"].as_u64(), s["failedIntervals"].as_u64()),
        (Some("Inconclusive"), Some(20), Some(0))
    );
    // Traffic returns: it moves on.
    let load = Load::start(mesh.outbound(), 2);
    let s = wait_phase(&mesh.controller, "Succeeded", Duration::from_secs(60)).await;
    assert_eq!(s["weight"], 100);
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_resumes_at_the_same_step_without_disruption() {
    let mut mesh = TwoVersions::start("").await;
    start_canary(&mesh, &canary("  steps: [20, 40, 60, 80]\n  analysis: { minRequests: 20 }\n")).await;
    let load = Load::start(mesh.outbound(), 2);
    let controller = &mesh.controller;
    let admin = controller.addr("admin");
    wait_until("the second step", Duration::from_secs(30), || async move {
        admin_json(admin, "/canaries").await["canaries"][0]["status"]["weight"].as_u64() >= Some(40)
    })
    .await;
    let before = status(&mesh.controller).await;
    let grpc = mesh.controller.addr("grpc");
    mesh.controller.kill().await;
    let restarted = mesh.scratch.controller(Some(grpc)).await;
    let admin = restarted.addr("admin");
    wait_until("the restarted controller to list the Canary", Duration::from_secs(10), || async move {
        admin_json(admin, "/canaries").await["canaries"][0]["status"]["step"].is_u64()
    })
    .await;
    let after = status(&restarted).await;
    // The saved state is adopted as it was; steps only move forward from there.
    let step = |s: &serde_json::Value| s["step"].as_u64().unwrap_or_else(|| panic!("no step in {s:#}"));
    assert!(step(&after) >= step(&before), "before {before:#}\nafter {after:#}");
    assert_eq!(
        after["history"].as_array().unwrap()[..before["history"].as_array().unwrap().len()],
        before["history"].as_array().unwrap()[..]
    );
    let s = wait_phase(&restarted, "Succeeded", Duration::from_secs(60)).await;
    assert_eq!(weights_seen(&s), vec![20, 40, 60, 80, 100], "{s:#}");
    let (total, failed) = load.stop().await;
    assert_eq!(failed, 0, "of {total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_promote_and_abort_do_what_they_say() {
    let mesh = TwoVersions::start("").await;
    start_canary(&mesh, &canary("  steps: [20, 40]\n  autoPromote: false\n  analysis: { minRequests: 20 }\n")).await;
    let load = Load::start(mesh.outbound(), 2);
    let admin = mesh.controller.addr("admin");
    let act = |action: &'static str| async move {
        let r =
            send(&http1(), admin, "POST", "controller", &format!("/canaries/test/web/{action}"), &[]).await.unwrap();
        (r.status, r.body)
    };
    wait_until("the first step", Duration::from_secs(20), || async move {
        admin_json(admin, "/canaries").await["canaries"][0]["status"]["weight"] == 20
    })
    .await;
    // Pause: the weight holds over several intervals.
    assert_eq!(act("pause").await.0, 200);
    let paused = status(&mesh.controller).await;
    let analyses = sum_metric(&admin_text(admin, "/metrics").await, "weir_canary_analyses_total{canary=\"test/web\"");
    // Reports worth three intervals arrive (three sidecars report twice a second)...
    let reports = sum_metric(&admin_text(admin, "/metrics").await, "weir_controller_reports_received_total");
    wait_until("three intervals of reports", Duration::from_secs(20), || async move {
        sum_metric(&admin_text(admin, "/metrics").await, "weir_controller_reports_received_total") >= reports + 18.0
    })
    .await;
    // ...and a paused rollout judges none of them and stays where it was.
    let m = admin_text(admin, "/metrics").await;
    assert_eq!(sum_metric(&m, "weir_canary_analyses_total{canary=\"test/web\""), analyses, "analysed while paused");
    let still = status(&mesh.controller).await;
    assert_eq!((still["phase"].as_str(), still["weight"].as_u64()), (Some("Paused"), paused["weight"].as_u64()));
    assert_eq!(act("pause").await.0, 409);
    // Resume: it goes on, and without autoPromote holds at the last step.
    assert_eq!(act("resume").await.0, 200);
    let s = wait_phase(&mesh.controller, "Holding", Duration::from_secs(30)).await;
    assert_eq!(s["weight"], 40);
    // Promote: straight to 100 %.
    let (code, body) = act("promote").await;
    assert_eq!(code, 200, "{body}");
    let s = status(&mesh.controller).await;
    assert_eq!((s["phase"].as_str(), s["weight"].as_u64()), (Some("Succeeded"), Some(100)));
    wait_config(mesh.client.addr("admin"), "the promotion", |c| weights(c, "test", "web") == vec![0, 100]).await;
    assert_eq!(act("abort").await.0, 409, "a finished rollout cannot be aborted");

    // Editing the thresholds leaves a finished rollout alone...
    let version = || async move {
        let r = admin_json(admin, "/resources").await;
        r["resources"].as_array().unwrap().iter().find(|r| r["kind"] == "Canary").map(|r| r["version"].clone())
    };
    let before = version().await;
    mesh.scratch
        .write("canary.yaml", &canary("  steps: [20, 40]\n  autoPromote: false\n  analysis: { minRequests: 30 }\n"));
    wait_until("the edit", Duration::from_secs(10), || {
        let before = before.clone();
        async move { version().await != before }
    })
    .await;
    assert_eq!(status(&mesh.controller).await["phase"], "Succeeded");
    // ...a new canary (here: back from v2 to v1) starts a new rollout; abort sends everything
    // back to stable.
    let back = canary("  steps: [30]\n  analysis: { minRequests: 20 }\n")
        .replace("stable: web-v1\n  canary: web-v2", "stable: web-v2\n  canary: web-v1");
    mesh.scratch.write("canary.yaml", &back);
    wait_until("the new rollout", Duration::from_secs(20), || async move {
        admin_json(admin, "/canaries").await["canaries"][0]["status"]["weight"] == 30
    })
    .await;
    assert_eq!(act("abort").await.0, 200);
    let s = status(&mesh.controller).await;
    assert_eq!((s["phase"].as_str(), s["weight"].as_u64()), (Some("Failed"), Some(0)));
    assert_eq!(s["message"], "aborted by hand");
    wait_config(mesh.client.addr("admin"), "the abort", |c| weights(c, "test", "web") == vec![100, 0]).await;
    assert_eq!(act("jump").await.0, 400);
    // A second Canary for the same Service is rejected; the first keeps it.
    mesh.scratch.write("canary2.yaml", &canary("  steps: [30]\n").replace("name: web,", "name: zweb,"));
    wait_until("the rejection", Duration::from_secs(10), || async move {
        admin_json(admin, "/resources").await.to_string().contains("Canary test/web already rolls out Service web")
    })
    .await;
    let (total, failed) = load.stop().await;

    assert_eq!(failed, 0, "of {total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ab_stage_sends_only_matching_requests_to_the_canary() {
    let mesh = TwoVersions::start("").await;
    mesh.scratch.write(
        "canary.yaml",
        &canary(
            "  steps: [50]\n  abTest: { headers: [{ name: x-beta, value: \"1\" }], cookie: \"beta=yes\", intervals: 1000 }\n  analysis: { minRequests: 1000000 }\n",
        ),
    );
    wait_config(mesh.client.addr("admin"), "the A/B rule", |c| c.to_string().contains("\"name\":\"ab\"")).await;
    let via = mesh.outbound();
    for _ in 0..20 {
        let plain = send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!(plain.backend(), "v1");
        let beta = send(&http1(), via, "GET", "web.test", "/", &[("x-beta", "1")]).await.unwrap();
        assert_eq!(beta.backend(), "v2");
        let cookie = send(&http1(), via, "GET", "web.test", "/", &[("cookie", "a=b; beta=yes")]).await.unwrap();
        assert_eq!(cookie.backend(), "v2");
        let other = send(&http1(), via, "GET", "web.test", "/", &[("cookie", "beta=no")]).await.unwrap();
        assert_eq!(other.backend(), "v1");
    }
    let s = status(&mesh.controller).await;
    assert_eq!(s["weight"], 0, "{s:#}");
}

/// Runs `weir canary ARGS --controller-admin ADMIN`: (success, stdout, stderr).
async fn weir_canary(admin: std::net::SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin("weir"))
        .arg("canary")
        .args(args)
        .args(["--controller-admin", &admin.to_string()])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_and_controls_canaries() {
    let mesh = TwoVersions::start("").await;
    start_canary(&mesh, &canary("  steps: [20, 40]\n  analysis: { minRequests: 20 }\n")).await;
    let admin = mesh.controller.addr("admin");
    let (ok, table, _) = weir_canary(admin, &["status"]).await;
    assert!(ok);
    let line = table.lines().find(|l| l.starts_with("test/web")).unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("[####................]  20%") && line.contains("1/2"), "{table}");
    let (ok, json, _) = weir_canary(admin, &["status", "web", "-n", "test", "-o", "json"]).await;
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(list[0]["status"]["weight"], 20);
    let (ok, _, err) = weir_canary(admin, &["status", "test/nope"]).await;
    assert!(!ok && err.contains("no Canary test/nope"), "{err}");

    let (ok, out, _) = weir_canary(admin, &["abort", "web", "-n", "test"]).await;
    assert!(ok && out.contains("test/web: Failed at 0% — aborted by hand"), "{out}");
    let (ok, _, err) = weir_canary(admin, &["promote", "test/web"]).await;
    assert!(!ok && err.contains("has already failed"), "{err}");
}
