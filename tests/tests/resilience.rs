//! Resilience policies enforced by the calling sidecar, against backends that fail, hang or
//! recover on command.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use weir_tests::*;

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{ name: web, namespace: test }}\nspec:\n  targetRef: {{ service: web }}\n{spec}"
    )
}

/// Starts the two-version mesh with all traffic on v1 and `policy_spec` applied to `web`.
async fn mesh_with(policy_spec: &str) -> TwoVersions {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    mesh.scratch.write("policy.yaml", &policy(policy_spec));
    wait_config(mesh.client.addr("admin"), "the policy", |c| c.to_string().contains("\"policies\":[{")).await;
    mesh
}

fn served(mesh: &TwoVersions) -> u64 {
    mesh.v1.behaviour.served.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_flaky_backend() {
    let mesh = mesh_with(
        "  retries:\n    attempts: 4\n    retryOn: [gateway-error]\n    budget: { percent: 100, minRetriesPerSecond: 0 }\n",
    )
    .await;
    mesh.v1.behaviour.set_fail_status(503);
    mesh.v1.behaviour.set_fail_rate(0.3);
    let client = http1();
    let (mut failed, mut retried) = (0, 0);
    let n = 2000;
    for _ in 0..n {
        let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
        if r.status != 200 {
            failed += 1;
        }
        if r.headers.contains_key("weir-attempts") {
            retried += 1;
        }
    }
    // Five attempts all failing: 0.3^5 = 0.24 % expected (about 5 of 2000); 1 % is 20.
    assert!(failed < n / 100, "{failed} of {n} failed despite retries");
    // About 30 % of requests need a retry; any sane count proves retries happened.
    assert!(retried > n / 10, "only {retried} responses carried weir-attempts");
    let metrics = admin_text(mesh.client.addr("admin"), "/metrics").await;
    assert!(metrics.contains("weir_retries_total{service=\"test/web\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_extra_load_during_an_outage() {
    let mesh = mesh_with(
        "  retries:\n    attempts: 3\n    retryOn: [5xx]\n    budget: { percent: 20, minRetriesPerSecond: 0, window: 1m }\n",
    )
    .await;
    mesh.v1.behaviour.set_fail_rate(1.0);
    let client = http1();
    let before = served(&mesh);
    let n = 500;
    for _ in 0..n {
        let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!(r.status, 500);
    }
    let attempts = served(&mesh) - before;
    // Without a budget this would be 4 × 500 = 2000 attempts; the budget allows 20 % extra.
    assert!(attempts <= n + n / 5, "{attempts} attempts for {n} requests: the budget did not hold");
    assert!(attempts >= n + n / 5 - 5, "{attempts} attempts: the budget should have been used");
    let metrics = admin_text(mesh.client.addr("admin"), "/metrics").await;
    assert!(metrics.contains("weir_retry_budget_exhausted_total{service=\"test/web\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_per_try_timeouts_fire_with_504() {
    let mesh = mesh_with("  timeouts: { request: 500ms }\n").await;
    mesh.v1.behaviour.set_latency(Duration::from_secs(3600));
    let client = http1();
    let started = Instant::now();
    let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.headers["weir-error"].to_str().unwrap().contains("timed out"));
    assert!(
        took >= Duration::from_millis(490) && took < Duration::from_secs(3),
        "request timeout fired after {took:?}"
    );

    // Per-try 200 ms with two retries on 5xx (a per-try timeout counts): three attempts, then 504.
    mesh.scratch.write(
        "policy.yaml",
        &policy("  timeouts: { request: 10s, perTry: 200ms }\n  retries: { attempts: 2, retryOn: [5xx], backoff: { base: 1ms, max: 1ms } }\n"),
    );
    wait_config(mesh.client.addr("admin"), "per-try policy", |c| c.to_string().contains("\"per_try_timeout_ms\":200"))
        .await;
    let before = served(&mesh);
    let started = Instant::now();
    let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.headers["weir-attempts"], "3");
    assert!(
        took >= Duration::from_millis(590) && took < Duration::from_secs(3),
        "three per-try timeouts took {took:?}"
    );
    wait_until("three attempts at the backend", Duration::from_secs(5), || {
        let n = served(&mesh);
        async move { n == before + 3 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_fails_fast_probes_and_closes() {
    let mesh = mesh_with(
        "  circuitBreaker: { consecutiveFailures: 5, openDuration: 300ms, halfOpenRequests: 1, successThreshold: 2 }\n",
    )
    .await;
    let client = http1();
    let get = || send(&client, mesh.outbound(), "GET", "web.test", "/", &[]);
    mesh.v1.behaviour.set_fail_rate(1.0);
    for _ in 0..5 {
        assert_eq!(get().await.unwrap().status, 500);
    }
    // Open: fail fast, no attempt reaches the backend.
    let before = served(&mesh);
    for _ in 0..20 {
        let r = get().await.unwrap();
        assert_eq!(r.status, 503);
        assert!(r.headers["weir-error"].to_str().unwrap().contains("circuit open"), "{:?}", r.headers);
    }
    assert_eq!(served(&mesh), before, "requests reached the backend while the circuit was open");

    // The backend recovers; after the open period a probe goes through, and two successful
    // probes close the circuit.
    mesh.v1.behaviour.set_fail_rate(0.0);
    let opened = Instant::now();
    wait_until("a half-open probe to succeed", Duration::from_secs(10), || async {
        get().await.map(|r| r.status == 200).unwrap_or(false)
    })
    .await;
    assert!(opened.elapsed() >= Duration::from_millis(250), "probe let through before the open duration");
    assert_eq!(get().await.unwrap().status, 200);
    for _ in 0..20 {
        assert_eq!(get().await.unwrap().status, 200, "the circuit should be closed");
    }
    let metrics = admin_text(mesh.client.addr("admin"), "/metrics").await;
    assert!(metrics.contains("weir_circuit_state{backend=\"test/web-v1\",service=\"test/web\"} 0"), "{metrics}");
    for state in ["open", "half-open", "closed"] {
        assert!(metrics.contains(&format!("state=\"{state}\"")), "no transition to {state}: {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_rejected_with_the_field() {
    let mesh = mesh_with("  timeouts: { request: 5s }\n").await;
    let admin = mesh.controller.addr("admin");
    for (spec, field) in [
        ("  retries: { retryOn: [5xx, sometimes] }\n", "spec.retries.retryOn[1]"),
        ("  timeouts: { request: 1s, perTry: 2s }\n", "spec.timeouts.perTry"),
        ("  retries: { budget: { percent: 101 } }\n", "spec.retries.budget.percent"),
        ("  timeouts: { request: soon }\n", "spec.timeouts.request"),
    ] {
        mesh.scratch.write("policy.yaml", &policy(spec));
        wait_until(field, Duration::from_secs(5), || async move {
            let v = admin_json(admin, "/resources").await;
            v["rejected"].as_array().is_some_and(|r| r.iter().any(|r| r["field"] == field))
        })
        .await;
    }
    mesh.scratch
        .write("policy.yaml", &policy("  timeouts: { request: 5s }\n").replace("service: web", "service: ghost"));
    wait_until("missing target", Duration::from_secs(5), || async move {
        let v = admin_json(admin, "/resources").await;
        v["rejected"].as_array().is_some_and(|r| r.iter().any(|r| r["field"] == "spec.targetRef.service"))
    })
    .await;
    // The accepted policy stays in force throughout.
    let c = admin_json(mesh.client.addr("admin"), "/config").await;
    assert!(c.to_string().contains("\"request_timeout_ms\":5000"), "{c}");
}
