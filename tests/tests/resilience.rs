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
    // Not before the 500 ms timeout; and long before the backend's hour (the bound is wide so a
    // loaded machine never fails it: the failure it catches is a timeout that does not fire).
    assert!(
        took >= Duration::from_millis(490) && took < Duration::from_secs(10),
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
    // Three tries of 200 ms; well before the 10 s request timeout that would end a try whose
    // timeout did not fire.
    assert!(
        took >= Duration::from_millis(590) && took < Duration::from_secs(6),
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
        "  circuitBreaker: { consecutiveFailures: 5, openDuration: 2s, halfOpenRequests: 1, successThreshold: 2 }\n",
    )
    .await;
    let client = http1();
    let get = || send(&client, mesh.outbound(), "GET", "web.test", "/", &[]);
    mesh.v1.behaviour.set_fail_rate(1.0);
    for _ in 0..5 {
        assert_eq!(get().await.unwrap().status, 500);
    }
    let opened = Instant::now();
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
    wait_until("a half-open probe to succeed", Duration::from_secs(10), || async {
        get().await.map(|r| r.status == 200).unwrap_or(false)
    })
    .await;
    // The breaker opened just before the 5th response left the sidecar; allow for that gap.
    assert!(opened.elapsed() >= Duration::from_millis(1980), "probe let through before the open duration");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulkhead_fails_the_eleventh_request_fast() {
    let mesh = mesh_with("  bulkhead: { maxInFlight: 10, maxPending: 0 }\n").await;
    mesh.v1.behaviour.set_latency(Duration::from_secs(3));
    let via = mesh.outbound();
    let before = served(&mesh);
    let slow: Vec<_> =
        (0..10).map(|_| tokio::spawn(async move { send(&http1(), via, "GET", "web.test", "/", &[]).await })).collect();
    wait_until("ten requests in flight", Duration::from_secs(10), || {
        let n = served(&mesh);
        async move { n >= before + 10 }
    })
    .await;
    let started = Instant::now();
    let r = send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers["weir-error"].to_str().unwrap().contains("bulkhead full"));
    // Refused without waiting for a slot (one would free only when a 3 s response ends).
    assert!(started.elapsed() < Duration::from_secs(3), "the 11th request waited {:?}", started.elapsed());
    assert_eq!(served(&mesh), before + 10, "the 11th request must not reach the backend");
    mesh.v1.behaviour.set_latency(Duration::ZERO);
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().status, 200);
    }
    // Slots are released when responses end.
    assert_eq!(send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap().status, 200);
    let metrics = admin_text(mesh.client.addr("admin"), "/metrics").await;
    assert!(
        metrics.contains("weir_bulkhead_rejected_total{backend=\"test/web-v1\",service=\"test/web\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_allows_the_rate_and_keeps_buckets_per_key() {
    let mesh = mesh_with("  rateLimit: { requestsPerSecond: 100, burst: 20, key: { header: x-user } }\n").await;
    let via = mesh.outbound();
    let started = Instant::now();
    // Four clients in parallel, so that even a loaded CI machine asks faster than the bucket refills.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let (mut allowed, mut limited, mut attempts) = (0u64, 0u64, 0u64);
                while started.elapsed() < Duration::from_secs(2) {
                    let r = send(&http1(), via, "GET", "web.test", "/", &[("x-user", "alice")]).await.unwrap();
                    attempts += 1;
                    match r.status {
                        200 => allowed += 1,
                        429 => {
                            limited += 1;
                            assert!(r.headers.contains_key("retry-after"));
                        }
                        s => panic!("unexpected status {s}: {}", r.body),
                    }
                }
                (allowed, limited, attempts)
            })
        })
        .collect();
    let (mut allowed, mut limited, mut attempts) = (0u64, 0u64, 0u64);
    for c in clients {
        let (a, l, t) = c.await.unwrap();
        (allowed, limited, attempts) = (allowed + a, limited + l, attempts + t);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ceiling = 20.0 + 100.0 * elapsed;
    // A token bucket never allows more than burst + rate × time; it allows about that much
    // when asked often enough.
    assert!((allowed as f64) <= ceiling + 1.0, "{allowed} allowed in {elapsed:.2}s (ceiling {ceiling:.0})");
    assert!(
        (allowed as f64) >= 0.7 * ceiling.min(attempts as f64),
        "only {allowed} of {attempts} allowed in {elapsed:.2}s"
    );
    assert!(limited > 0, "nothing was limited ({attempts} attempts)");
    // Bob has his own bucket.
    let r = send(&http1(), via, "GET", "web.test", "/", &[("x-user", "bob")]).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_hit_their_share_and_only_matching_requests() {
    let mesh = mesh_with(
        "  faults:\n    abort: { httpStatus: 503, percent: 50 }\n    delay: { fixed: 10ms, percent: 100 }\n    headers: [{ name: x-chaos, value: \"yes\" }]\n",
    )
    .await;
    let client = http1();
    let before = served(&mesh);
    let n = 400;
    let mut aborted = 0;
    let started = Instant::now();
    for _ in 0..n {
        let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[("x-chaos", "yes")]).await.unwrap();
        if r.status == 503 {
            assert_eq!(r.headers["weir-error"], "fault injected");
            aborted += 1;
        }
    }
    // Every request was delayed 10 ms.
    assert!(started.elapsed() >= Duration::from_millis(10 * n as u64));
    // 50 % of 400: σ = 10, so 150–250 is five σ either way.
    assert!((150..=250).contains(&aborted), "{aborted} of {n} aborted, expected about 200");
    wait_until("backend counts", Duration::from_secs(5), || {
        let s = served(&mesh);
        async move { s == before + (n - aborted) as u64 }
    })
    .await;
    for _ in 0..100 {
        let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "requests without the header get no faults");
    }

    // A gRPC abort: a trailers-only response with the code.
    mesh.scratch.write("policy.yaml", &policy("  faults: { abort: { grpcStatus: unavailable, percent: 100 } }\n"));
    wait_config(mesh.client.addr("admin"), "grpc abort", |c| c.to_string().contains("\"abort_grpc_status\":14")).await;
    let r =
        send(&client, mesh.outbound(), "POST", "web.test", "/pkg.Svc/Call", &[("content-type", "application/grpc")])
            .await
            .unwrap();
    assert_eq!((r.status, r.headers["grpc-status"].to_str().unwrap()), (200, "14"));
    let metrics = admin_text(mesh.client.addr("admin"), "/metrics").await;
    assert!(metrics.contains("weir_faults_injected_total{kind=\"abort\",service=\"test/web\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_ejection_removes_a_bad_endpoint_and_respects_the_cap() {
    let scratch = Scratch::new();
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let eps: Vec<String> = backends.iter().map(|b| format!("{{ address: \"{}\" }}", b.addr)).collect();
    scratch.write("services.yaml", &service("test", "pool", &eps));
    scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: pool, namespace: test }\nspec:\n  targetRef: { service: pool }\n  outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 1m, maxEjectedPercent: 34 }\n  loadBalancer: { algorithm: RoundRobin }\n",
    );
    let controller = scratch.controller(None).await;
    let client = scratch.proxy(controller.addr("grpc"), "test/client", None).await;
    wait_config(client.addr("admin"), "pool with policy", |c| endpoint_count(c, "test", "pool") == 3).await;
    let http = http1();
    let run = |n: usize| {
        let http = &http;
        let via = client.addr("outbound");
        async move {
            let mut failed = 0;
            for _ in 0..n {
                if send(http, via, "GET", "pool.test", "/", &[]).await.unwrap().status != 200 {
                    failed += 1;
                }
            }
            failed
        }
    };
    backends[0].behaviour.set_fail_rate(1.0);
    let failed = run(300).await;
    assert!(failed <= 3, "{failed} failures: the bad endpoint should be ejected after 3 in a row");
    let after = backends[0].behaviour.served.load(Ordering::Relaxed);
    run(100).await;
    assert_eq!(backends[0].behaviour.served.load(Ordering::Relaxed), after, "an ejected endpoint got traffic");

    // A second bad endpoint: 34 % of 3 allows one ejection, so it stays in rotation.
    backends[1].behaviour.set_fail_rate(1.0);
    let failed = run(300).await;
    assert!(failed > 20, "only {failed} failures: the cap on ejections did not hold");
    let metrics = admin_text(client.addr("admin"), "/metrics").await;
    assert!(
        metrics.contains("weir_endpoint_ejections_total{backend=\"test/pool\",service=\"test/pool\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_reset_after_stream_idle() {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let mesh = mesh_with("  timeouts: { streamIdle: 300ms }\n").await;
    let req = http::Request::get(format!("http://{}/sse?n=2&every=60s", mesh.outbound()))
        .header("host", "web.test")
        .body(empty())
        .unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(10), http1().request(req)).await.unwrap().unwrap();
    let mut body = rsp.into_body().into_data_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(&first[..], b"data: event 0\n\n");
    let started = Instant::now();
    // The next event is a minute away: the sidecar gives up on the stream after 300 ms.
    let end = tokio::time::timeout(Duration::from_secs(10), body.next()).await.expect("the stalled stream must end");
    // Cut off, the client must see a broken body, never a clean end it would take as complete.
    assert!(matches!(end, Some(Err(_))), "the stalled stream must end in an error, not cleanly: {end:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The request timeout covers the response body: a stream still running at the deadline is
/// cut off there, although every event came well within `streamIdle` would allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_covers_the_response_body() {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let mesh = mesh_with("  timeouts: { request: 1s }\n").await;
    let req = http::Request::get(format!("http://{}/sse?n=50&every=100ms", mesh.outbound()))
        .header("host", "web.test")
        .body(empty())
        .unwrap();
    let started = Instant::now();
    let rsp = tokio::time::timeout(Duration::from_secs(10), http1().request(req)).await.unwrap().unwrap();
    assert_eq!(rsp.status(), 200, "the headers come at once");
    let mut body = rsp.into_body().into_data_stream();
    let mut events = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), body.next()).await.expect("the stream must end") {
            Some(Ok(_)) => events += 1,
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    let took = started.elapsed();
    assert!(ended, "the 5 s stream was delivered whole ({events} events) past a 1 s request timeout");
    // Cut at the 1 s deadline: not before it, and well before the stream's own 5 s end (4x the
    // deadline, so a loaded machine does not fail it).
    assert!(
        events < 50 && took >= Duration::from_millis(990) && took < Duration::from_secs(4),
        "{events} events, {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_timeout_applies_per_policy() {
    // A listener that never accepts, with its accept queue full: new SYNs are dropped, so a
    // connect hangs until the caller's timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "stuck", &[format!("{{ address: \"{addr}\" }}")]));
    scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: stuck, namespace: test }\nspec:\n  targetRef: { service: stuck }\n  timeouts: { connect: 250ms }\n",
    );
    let controller = scratch.controller(None).await;
    // The sidecar's own connect timeout is 30 s: giving up near 250 ms is the policy's doing.
    let flags = ["--connect-timeout".to_string(), "30s".to_string()];
    let client = scratch.proxy_with(controller.addr("grpc"), "test/client", None, &flags).await;
    wait_config(client.addr("admin"), "stuck service", |c| endpoint_count(c, "test", "stuck") == 1).await;
    let started = Instant::now();
    let r = send(&http1(), client.addr("outbound"), "GET", "stuck.test", "/", &[]).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("timed out") || r.body.contains("timeout"), "{}", r.body);
    assert!(took >= Duration::from_millis(240) && took < Duration::from_secs(10), "connect gave up after {took:?}");
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_rate_limit_protects_the_server_from_every_caller() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    // web-v1's endpoint names its workload, so web-v1's sidecar gets the Service's inbound policy.
    let s1 = mesh.sidecars[0].addr("inbound");
    let s2 = mesh.sidecars[1].addr("inbound");
    mesh.scratch.write(
        "services.yaml",
        &format!(
            "{}{}{}",
            service("test", "web", &[]),
            service("test", "web-v1", &[format!("{{ address: \"{s1}\", meshed: true, workload: web-v1 }}")]),
            service("test", "web-v2", &[meshed(s2)]),
        ),
    );
    mesh.scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: web-v1, namespace: test }\nspec:\n  targetRef: { service: web-v1 }\n  rateLimit: { requestsPerSecond: 1, burst: 10, direction: Inbound }\n",
    );
    let server_admin = mesh.sidecars[0].addr("admin");
    wait_config(server_admin, "the inbound limit", |c| {
        c["snapshot"]["inbound"]["rate_limits"][0]["policy"] == "test/web-v1"
    })
    .await;
    // Only the server's sidecar holds it; callers do not limit themselves.
    let client_config = admin_json(mesh.client.addr("admin"), "/config").await;
    // (admin_json panics on a dead or failing sidecar, so an absent list is a real absence.)
    assert!(client_config["snapshot"]["version"].is_string(), "{client_config}");
    let limits = &client_config["snapshot"]["inbound"]["rate_limits"];
    assert!(limits.as_array().is_none_or(|l| l.is_empty()), "{client_config}");

    // Two callers, one through the mesh and one plain, share the server's bucket of 10.
    let (mut ok, mut limited) = (0, 0);
    for i in 0..30 {
        let r = if i % 2 == 0 {
            send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap()
        } else {
            send(&http1(), s1, "GET", "web-v1.test", "/", &[]).await.unwrap()
        };
        match r.status {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    // 10 of burst plus at most a couple refilled at 1/s while the 30 requests run.
    assert!((10..=13).contains(&ok), "{ok} allowed, {limited} limited");
    let metrics = admin_text(server_admin, "/metrics").await;
    assert!(metrics.contains("weir_rate_limited_total{direction=\"inbound\",service=\"test/web-v1\"}"), "{metrics}");
    let client_metrics = admin_text(mesh.client.addr("admin"), "/metrics").await;
    assert!(!client_metrics.contains("weir_rate_limited_total{"), "the caller limited itself: {client_metrics}");
}

/// A circuit that opens during a retry does not hide the real answer: the client gets the
/// upstream's own 500, not a 503 the sidecar made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_opened_by_an_attempt_returns_that_attempts_answer() {
    let mesh = mesh_with(
        "  circuitBreaker: { consecutiveFailures: 1, openDuration: 10s, halfOpenRequests: 1, successThreshold: 1 }\n  \
         retries: { attempts: 2, retryOn: [5xx], backoff: { base: 1ms, max: 1ms } }\n",
    )
    .await;
    mesh.v1.behaviour.set_fail_rate(1.0);
    let r = send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 500, "{:?} {}", r.headers.get("weir-error"), r.body);
    assert!(r.body.contains("failed on purpose"), "{}", r.body);
    assert_eq!(served(&mesh), 1, "the open circuit stopped the retry");
    // Later requests meet the open circuit itself.
    let r = send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.headers["weir-error"].to_str().unwrap().contains("circuit open"));
}

/// A sliding window admits its limit in any window-long span: a burst just after a window's
/// edge finds the burst just before it still counted (a fixed window would admit both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliding_window_lets_no_second_burst_through_at_its_edge() {
    let mesh = mesh_with("  rateLimit: { requestsPerSecond: 10, algorithm: SlidingWindow, window: 1s }\n").await;
    let via = mesh.outbound();
    let burst = |n: usize| async move {
        let sent: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move { send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap().status })
            })
            .collect();
        let mut ok = 0;
        for s in sent {
            match s.await.unwrap() {
                200 => ok += 1,
                429 => {}
                s => panic!("unexpected status {s}"),
            }
        }
        ok
    };
    let t0 = Instant::now();
    // The first request starts the window (at t0 or later).
    assert_eq!(burst(1).await, 1);
    tokio::time::sleep_until((t0 + Duration::from_millis(900)).into()).await;
    let before_edge = burst(20).await;
    tokio::time::sleep_until((t0 + Duration::from_millis(1050)).into()).await;
    let after_edge = burst(20).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let admitted = 1 + before_edge + after_edge;
    // Past the edge by at most `elapsed - 1` of the window, the sliding window lets at most
    // that share of the limit more through; a fixed window would have admitted 10 + 10.
    let bound = 10 + (10.0 * (elapsed - 1.0).max(0.0)).ceil() as usize;
    assert!(
        admitted <= bound,
        "{admitted} admitted ({before_edge} before the edge, {after_edge} after) within {elapsed:.2}s; at most {bound}"
    );
    assert!(admitted >= 9, "the limit is admitted when asked: only {admitted}");
}

/// A leaky bucket lets requests go on evenly at its rate, holding up to `burst` of them in
/// its queue, and refuses the rest at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaky_bucket_spaces_requests_at_its_rate_and_bounds_its_queue() {
    // One request every 500 ms; three may wait.
    let mesh = mesh_with("  rateLimit: { requestsPerSecond: 2, burst: 3, algorithm: LeakyBucket }\n").await;
    let via = mesh.outbound();
    let t0 = Instant::now();
    let sent: Vec<_> = (0..12)
        .map(|_| {
            tokio::spawn(async move {
                let r = send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap();
                (r.status, t0.elapsed(), r.headers.contains_key("retry-after"))
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for s in sent {
        match s.await.unwrap() {
            (200, at, _) => admitted.push(at),
            (429, at, retry_after) => {
                refused += 1;
                assert!(retry_after, "a refusal says when to come back");
                assert!(at < Duration::from_millis(500 * 4), "a refusal is immediate, not queued: {at:?}");
            }
            (s, ..) => panic!("unexpected status {s}"),
        }
    }
    admitted.sort();
    // The queue holds three behind the one going on now (one more if the twelve took longer
    // than an interval to arrive on a loaded machine); the rest are refused.
    assert!((4..=5).contains(&admitted.len()), "{} admitted, {refused} refused: {admitted:?}", admitted.len());
    // The k-th admitted request cannot finish before k - 1 intervals have passed.
    for (k, at) in admitted.iter().enumerate() {
        assert!(*at >= Duration::from_millis(500 * k as u64), "request {k} went on after {at:?}: {admitted:?}");
    }
}
