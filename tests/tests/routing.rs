//! Weighted splits and request matching through real sidecars.

use std::collections::HashMap;

use weir_tests::*;

async fn served_by(mesh: &TwoVersions, n: usize) -> HashMap<String, usize> {
    let client = http1();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        *counts.entry(r.backend().to_string()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_lands_within_five_points() {
    let mesh = TwoVersions::start(&split_route(80, 20)).await;
    let n = 2000;
    let counts = served_by(&mesh, n).await;
    let v2 = counts.get("v2").copied().unwrap_or(0) as f64 / n as f64 * 100.0;
    // 20 % of 2000: the standard deviation is ~0.9 points, so ±5 points never flakes.
    assert!((15.0..=25.0).contains(&v2), "v2 served {v2:.1}% of requests, expected 20±5: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), n);

    // The sidecars' Reports reach the controller, which aggregates them per backend.
    let admin = mesh.controller.addr("admin");
    wait_until("reports for 2000 requests", std::time::Duration::from_secs(20), || async move {
        let stats = admin_json(admin, "/stats").await;
        let outbound: u64 = stats["series"]
            .as_array()
            .map(|s| s.iter().filter(|s| s["direction"] == "outbound" && s["service"] == "test/web"))
            .into_iter()
            .flatten()
            .filter_map(|s| s["requests"].as_u64())
            .sum();
        outbound >= 2000
    })
    .await;

    // 0/100: the zero-weight backend gets nothing.
    mesh.scratch.write("route.yaml", &split_route(0, 100));
    let admin = mesh.client.addr("admin");
    wait_config(admin, "weights 0/100", |c| weights(c, "test", "web") == [0, 100]).await;
    let before = mesh.v1.behaviour.served.load(std::sync::atomic::Ordering::Relaxed);
    let counts = served_by(&mesh, 500).await;
    assert_eq!(counts.get("v2"), Some(&500), "{counts:?}");
    assert_eq!(mesh.v1.behaviour.served.load(std::sync::atomic::Ordering::Relaxed), before);
}

const MATCHING: &str = r#"
apiVersion: weir.io/v1alpha1
kind: Route
metadata: { name: web, namespace: test }
spec:
  service: web
  rules:
  - name: header
    matches: [{ headers: [{ name: x-canary, value: "yes" }] }]
    backendRefs: [{ name: web-v2 }]
  - name: exact
    matches: [{ path: { type: Exact, value: /exact } }]
    backendRefs: [{ name: web-v2 }]
  - name: regex
    matches: [{ path: { type: RegularExpression, value: "/items/[0-9]+" } }]
    backendRefs: [{ name: web-v2 }]
  - name: method-and-query
    matches: [{ method: POST, queryParams: [{ name: mode, value: beta }] }]
    backendRefs: [{ name: web-v2 }]
  - name: shadowed              # /api/v2 is caught here before the broader prefix below
    matches: [{ path: { type: PathPrefix, value: /api/v2 } }]
    backendRefs: [{ name: web-v2 }]
  - name: prefix
    matches: [{ path: { type: PathPrefix, value: /api } }]
    backendRefs: [{ name: web-v1 }]
  - name: default
    backendRefs: [{ name: web-v1 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_match_headers_paths_methods_and_queries_in_order() {
    let mesh = TwoVersions::start(MATCHING).await;
    let client = http1();
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("GET", "/", &[("x-canary", "yes")], "v2"),
        ("GET", "/", &[("x-canary", "no")], "v1"),
        ("GET", "/exact", &[], "v2"),
        ("GET", "/exact/more", &[], "v1"),
        ("GET", "/items/42", &[], "v2"),
        ("GET", "/items/abc", &[], "v1"),
        ("POST", "/?mode=beta", &[], "v2"),
        ("GET", "/?mode=beta", &[], "v1"),
        ("POST", "/?mode=alpha", &[], "v1"),
        ("GET", "/api/v2/users", &[], "v2"),
        ("GET", "/api/v1/users", &[], "v1"),
        ("GET", "/api", &[("x-canary", "yes")], "v2"),
    ];
    for (method, path, headers, want) in cases {
        for _ in 0..5 {
            let r = send(&client, mesh.outbound(), method, "web.test", path, headers).await.unwrap();
            assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
            assert_eq!(r.backend(), *want, "{method} {path} {headers:?}");
        }
    }
    // Every name form of the service resolves; an unknown one is a 404 naming the authority.
    for host in ["web.test", "web.test:80", "web.test.svc", "web.test.svc.cluster.local"] {
        let r = send(&client, mesh.outbound(), "GET", host, "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{host}");
    }
    let r = send(&client, mesh.outbound(), "GET", "nope.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.headers.get("weir-error").unwrap().to_str().unwrap().contains("nope.test"));
    // The short name resolves only in the sidecar's own namespace (test).
    let r = send(&client, mesh.outbound(), "GET", "web", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_errors_carry_weir_error() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let client = http1();
    // `web` itself has no endpoints: a request that matches no rule would go there, but the
    // split rule matches everything; stop v1's sidecar to get a connect failure (502).
    let scratch = &mesh.scratch;
    scratch.write(
        "services.yaml",
        &format!(
            "{}{}{}",
            service("test", "web", &[]),
            service("test", "web-v1", &[meshed("127.0.0.1:1".parse().unwrap())]),
            service("test", "web-v2", &[])
        ),
    );
    wait_config(mesh.client.addr("admin"), "dead endpoint", |c| c.to_string().contains("127.0.0.1:1\"")).await;
    let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.headers.contains_key("weir-error"));
    scratch.write("route.yaml", &split_route(0, 1));
    wait_config(mesh.client.addr("admin"), "route to v2", |c| weights(c, "test", "web") == [0, 1]).await;
    let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.get("weir-error").unwrap().to_str().unwrap().contains("test/web-v2"));
}
