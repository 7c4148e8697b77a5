//! Load-balancing algorithms through a real sidecar, each shown by its distinctive property.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use weir_tests::*;

struct Pool {
    scratch: Scratch,
    backends: Vec<Backend>,
    _controller: ChildProc,
    client: ChildProc,
}

/// Service `pool` in namespace `test` with one direct endpoint per backend (weights given)
/// and a ResiliencePolicy with `lb` as its `loadBalancer` (none when empty).
async fn pool(weights: &[u32], lb: &str) -> Pool {
    let scratch = Scratch::new();
    let mut backends = Vec::new();
    for i in 0..weights.len() {
        backends.push(Backend::start(&format!("b{i}")).await);
    }
    let eps: Vec<String> =
        backends.iter().zip(weights).map(|(b, w)| format!("{{ address: \"{}\", weight: {w} }}", b.addr)).collect();
    scratch.write("services.yaml", &service("test", "pool", &eps));
    write_policy(&scratch, lb);
    let controller = scratch.controller(None).await;
    let client = scratch.proxy(controller.addr("grpc"), "test/client", None).await;
    let n = weights.len();
    wait_config(client.addr("admin"), "the pool", |c| endpoint_count(c, "test", "pool") == n).await;
    Pool { scratch, backends, _controller: controller, client }
}

fn write_policy(scratch: &Scratch, lb: &str) {
    if !lb.is_empty() {
        scratch.write(
            "policy.yaml",
            &format!(
                "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{ name: pool, namespace: test }}\nspec:\n  targetRef: {{ service: pool }}\n  loadBalancer: {lb}\n"
            ),
        );
    }
}

impl Pool {
    async fn get(&self, headers: &[(&str, &str)]) -> String {
        let r = send(&http1(), self.client.addr("outbound"), "GET", "pool.test", "/", headers).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.backend().to_string()
    }

    async fn shares(&self, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            *counts.entry(self.get(&[]).await).or_default() += 1;
        }
        counts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_endpoint() {
    let pool = pool(&[1, 1, 1], "").await;
    pool.backends[2].behaviour.set_latency(Duration::from_millis(40));
    let counts = pool.shares(300).await;
    let slow = counts.get("b2").copied().unwrap_or(0);
    // Round robin would send it 100; P2C on latency learns after the first and avoids it.
    assert!(slow < 30, "the slow endpoint served {slow} of 300: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_serves_exact_shares() {
    let pool = pool(&[1, 1, 2], "{ algorithm: RoundRobin }").await;
    let counts = pool.shares(400).await;
    for (b, want) in [("b0", 100), ("b1", 100), ("b2", 200)] {
        let got = counts.get(b).copied().unwrap_or(0);
        assert!(got.abs_diff(want) <= 2, "{b} served {got}, expected {want}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_keeps_each_key_on_one_endpoint() {
    let pool = pool(&[1, 1, 1, 1], "{ algorithm: RingHash, hashKey: { header: x-user } }").await;
    for algorithm in ["RingHash", "Maglev"] {
        write_policy(&pool.scratch, &format!("{{ algorithm: {algorithm}, hashKey: {{ header: x-user }} }}"));
        let want = if algorithm == "Maglev" { 6 } else { 5 };
        wait_config(pool.client.addr("admin"), algorithm, |c| {
            c["snapshot"]["services"][0]["policies"][0]["load_balancer"]["algorithm"] == want
        })
        .await;
        let mut used = HashSet::new();
        for user in 0..40 {
            let user = format!("user-{user}");
            let first = pool.get(&[("x-user", &user)]).await;
            for _ in 0..4 {
                assert_eq!(pool.get(&[("x-user", &user)]).await, first, "{algorithm}: {user} moved");
            }
            used.insert(first);
        }
        assert!(used.len() >= 3, "{algorithm}: 40 keys landed on only {used:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_failing_endpoint_out_and_bring_it_back() {
    let pool = pool(&[1, 1], "{ algorithm: RoundRobin }").await;
    let policy = "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: pool, namespace: test }\nspec:\n  targetRef: { service: pool }\n  loadBalancer: { algorithm: RoundRobin }\n  healthCheck: { path: /healthz, interval: 100ms, timeout: 500ms, healthyThreshold: 2, unhealthyThreshold: 2 }\n";
    pool.scratch.write("policy.yaml", policy);
    let admin = pool.client.addr("admin");
    wait_config(admin, "health check policy", |c| c.to_string().contains("\"path\":\"/healthz\"")).await;
    wait_until("probes to run", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics").await.contains("weir_health_checks_total{result=\"pass\"")
    })
    .await;

    // b1 starts failing everything, probes included: it is taken out.
    pool.backends[1].behaviour.set_fail_rate(1.0);
    wait_until("b1 marked unhealthy", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics")
            .await
            .contains("weir_health_transitions_total{service=\"test/pool\",state=\"unhealthy\"} 1")
    })
    .await;
    for _ in 0..50 {
        assert_eq!(pool.get(&[]).await, "b0", "an unhealthy endpoint got traffic");
    }

    // It recovers: two passing probes bring it back.
    pool.backends[1].behaviour.set_fail_rate(0.0);
    wait_until("b1 marked healthy", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics")
            .await
            .contains("weir_health_transitions_total{service=\"test/pool\",state=\"healthy\"} 1")
    })
    .await;
    let counts = pool.shares(20).await;
    assert_eq!(counts.get("b1"), Some(&10), "round robin over both again: {counts:?}");
    let panics = || async move {
        admin_text(admin, "/metrics")
            .await
            .lines()
            .find_map(|l| l.strip_prefix("weir_lb_healthy_panic_total{backend=\"test/pool\",service=\"test/pool\"} "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(panics().await, 0);

    // Both fail: rather than failing every request, traffic goes to all of them, counted and
    // logged (not silently).
    for b in &pool.backends {
        b.behaviour.set_fail_rate(1.0);
    }
    wait_until("both marked unhealthy", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics")
            .await
            .contains("weir_health_transitions_total{service=\"test/pool\",state=\"unhealthy\"} 3")
    })
    .await;
    for _ in 0..4 {
        let r = send(&http1(), pool.client.addr("outbound"), "GET", "pool.test", "/", &[]).await.unwrap();
        assert_eq!(r.status, 500, "the endpoints' own answer, not a 503 from the sidecar");
    }
    assert_eq!(panics().await, 4);
    let log = std::fs::read_to_string(&pool.client.log).unwrap();
    assert_eq!(log.matches("every endpoint fails its health check").count(), 1, "logged once, not per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_another_endpoint() {
    let pool = pool(&[1, 1], "{ algorithm: RoundRobin }").await;
    pool.scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: pool, namespace: test }\nspec:\n  targetRef: { service: pool }\n  loadBalancer: { algorithm: RoundRobin }\n  retries: { attempts: 1, retryOn: [gateway-error], budget: { percent: 100 } }\n",
    );
    wait_config(pool.client.addr("admin"), "retry policy", |c| c.to_string().contains("\"retries\":1")).await;
    pool.backends[0].behaviour.set_fail_status(503);
    pool.backends[0].behaviour.set_fail_rate(1.0);
    // Every request that lands on the failing endpoint is retried once, on the other one.
    for _ in 0..100 {
        assert_eq!(pool.get(&[]).await, "b1");
    }
    let failed_attempts = pool.backends[0].behaviour.served.load(std::sync::atomic::Ordering::Relaxed);
    // Round robin keeps sending first attempts to b0 too (the retries prove they were needed).
    assert!(failed_attempts >= 20, "only {failed_attempts} attempts reached the failing endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_http1_connections_to_a_backend() {
    let pool = pool(&[1], "").await;
    pool.scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: pool, namespace: test }\nspec:\n  targetRef: { service: pool }\n  timeouts: { connect: 300ms }\n  bulkhead: { maxConnections: 2 }\n",
    );
    wait_config(pool.client.addr("admin"), "max connections", |c| c.to_string().contains("\"max_connections\":2"))
        .await;
    let b = &pool.backends[0].behaviour;
    b.set_latency(Duration::from_secs(2));
    let via = pool.client.addr("outbound");
    let slow: Vec<_> =
        (0..2).map(|_| tokio::spawn(async move { send(&http1(), via, "GET", "pool.test", "/", &[]).await })).collect();
    wait_until("two requests in flight", Duration::from_secs(10), || async {
        b.served.load(std::sync::atomic::Ordering::Relaxed) >= 2
    })
    .await;
    // A third concurrent request finds no connection free within the connect timeout.
    let r = send(&http1(), via, "GET", "pool.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("max connections"), "{}", r.body);
    assert_eq!(b.served.load(std::sync::atomic::Ordering::Relaxed), 2);
    b.set_latency(Duration::ZERO);
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().status, 200);
    }
    // Pooled connections are reused afterwards.
    assert_eq!(pool.get(&[]).await, "b0");
}

/// An endpoint that fails fast looks cheapest on latency alone; failures count as slow answers,
/// so peak EWMA sends it little without any outlier policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_shuns_an_endpoint_that_fails_fast() {
    let p = pool(&[1, 1, 1], "").await;
    p.backends[0].behaviour.set_fail_rate(1.0);
    let client = http1();
    let mut failed = 0;
    const REQUESTS: usize = 300;
    for _ in 0..REQUESTS {
        let r = send(&client, p.client.addr("outbound"), "GET", "pool.test", "/", &[]).await.unwrap();
        if r.status >= 500 {
            failed += 1;
        } else {
            assert_ne!(r.backend(), "b0");
        }
    }
    let reached = p.backends[0].behaviour.served.load(std::sync::atomic::Ordering::Relaxed) as usize;
    assert_eq!(reached, failed, "every failure came from the failing endpoint");
    assert!(failed < REQUESTS / 10, "{failed} of {REQUESTS} requests went to the endpoint failing fast");
}

/// Endpoint weights hold under the default algorithm (no policy): 1:3 gives about a quarter
/// and three quarters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_balancer_honours_endpoint_weights() {
    let p = pool(&[1, 3], "").await;
    // Shares follow weight ÷ latency: with 10 ms of work per request on both endpoints, the
    // scheduling noise of a loaded machine (a millisecond or two) moves them little.
    for b in &p.backends {
        b.behaviour.set_latency(Duration::from_millis(10));
    }
    let client = http1();
    const REQUESTS: u64 = 400;
    for _ in 0..REQUESTS {
        let r = send(&client, p.client.addr("outbound"), "GET", "pool.test", "/", &[]).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let light = p.backends[0].behaviour.served.load(std::sync::atomic::Ordering::Relaxed);
    let heavy = p.backends[1].behaviour.served.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(light + heavy, REQUESTS);
    // 25 % expected (σ of 400 draws: 2.2 points, so the bounds are over 4σ away); an
    // unweighted balancer gives 50 %, one that always prefers the heavier endpoint nearly 0 %.
    let share = light as f64 / REQUESTS as f64;
    assert!((0.15..=0.35).contains(&share), "the weight-1 endpoint got {:.1} %", share * 100.0);
}

/// Active health checks to a meshed endpoint go over mesh mTLS with the sidecar's identity, so
/// a strict MeshAuthorization that admits the caller admits its probes too (in plaintext they
/// would get 403 and every endpoint would look unhealthy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_to_meshed_endpoints_ride_mtls_through_strict_authorization() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    scratch.write(
        "authz.yaml",
        &mesh_authorization("web", "strict", "  - name: frontend\n    from: { serviceAccounts: [frontend] }\n"),
    );
    scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: web, namespace: test }\nspec:\n  \
         targetRef: { service: web }\n  healthCheck: { path: /healthz, interval: 100ms, timeout: 2s, healthyThreshold: 1, unhealthyThreshold: 2 }\n",
    );
    let backend = Backend::start("web").await;
    let mesh = IdentityMesh::start(&scratch, "web", backend.addr, &["frontend"], &[]).await;
    let (server, admin) = (&mesh.server, mesh.clients[0].addr("admin"));

    let sum = |m: &str, prefix: &str| -> f64 {
        m.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    wait_until("five passing probes", Duration::from_secs(10), || async move {
        sum(&admin_text(admin, "/metrics").await, "weir_health_checks_total{result=\"pass\"") >= 5.0
    })
    .await;
    let m = admin_text(admin, "/metrics").await;
    assert_eq!(sum(&m, "weir_health_checks_total{result=\"fail\""), 0.0, "a probe failed: {m}");
    assert!(!m.contains("state=\"unhealthy\""), "{m}");
    // The server saw them as the frontend's, over mTLS.
    let s = admin_text(server.addr("admin"), "/metrics").await;
    let allowed = "weir_inbound_authorization_total{client_identity=\"spiffe://cluster.local/ns/test/sa/frontend\",decision=\"allow\"";
    assert!(sum(&s, allowed) >= 5.0, "{s}");

    // They do reach the application: it failing takes the endpoint out.
    backend.behaviour.set_fail_rate(1.0);
    wait_until("the endpoint marked unhealthy", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics")
            .await
            .contains("weir_health_transitions_total{service=\"test/web\",state=\"unhealthy\"} 1")
    })
    .await;
}
