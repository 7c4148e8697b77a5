//! MeshAuthorization: allowed identities pass, others get 403 with a reason and never reach
//! the app; strict mode refuses plaintext while permissive admits what a rule allows; paths are
//! judged normalised; decisions are counted by policy, rule and client identity.

use std::sync::atomic::Ordering;
use std::time::Duration;

use weir_tests::*;

const FRONTEND: &str = "spiffe://cluster.local/ns/test/sa/frontend";
const INTRUDER: &str = "spiffe://cluster.local/ns/test/sa/intruder";

fn policy(mode: &str, rules: &str) -> String {
    mesh_authorization("web", mode, rules)
}

const FRONTEND_READS: &str = "  - name: frontend-reads\n    from: { serviceAccounts: [frontend] }\n    to: { paths: [/public, /headers], methods: [GET] }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_identities_reach_the_app() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    scratch.write("authz.yaml", &policy("strict", FRONTEND_READS));
    let backend = Backend::start("web").await;
    let mesh = IdentityMesh::start(&scratch, "web", backend.addr, &["frontend", "intruder"], &[]).await;
    let (server, frontend, intruder) = (&mesh.server, &mesh.clients[0], &mesh.clients[1]);
    let inbound = server.addr("inbound");
    // The policy selects the server by its label, and only the server.
    wait_config(server.addr("admin"), "the authorization", |c| authorizations(c) == 1).await;
    assert_eq!(authorizations(&admin_json(frontend.addr("admin"), "/config").await), 0);

    let served = || backend.behaviour.served.load(Ordering::Relaxed);
    let (front, intr) = (frontend.addr("outbound"), intruder.addr("outbound"));

    // Allowed: the right identity, path and method.
    let r = send(&http1(), front, "GET", "web.test", "/public/page", &[]).await.unwrap();
    assert_eq!((r.status, r.backend()), (200, "web"), "{}", r.body);
    assert_eq!(served(), 1);

    // Denied, with the reason, and nothing reaches the app: another method, another identity,
    // a path outside the rule, one that only looks inside it, a hidden separator.
    let denied = [
        (front, "POST", "/public", "does not allow test/frontend to POST /public"),
        (intr, "GET", "/public", "does not allow test/intruder to GET /public"),
        (front, "GET", "/admin", "does not allow test/frontend to GET /admin"),
        (front, "GET", "/public/../admin", "to GET /admin"),
        (front, "GET", "/public%2F..%2Fadmin", "hidden separator"),
        (front, "GET", "/public/..;/admin", "hidden separator or parameter"),
    ];
    for (via, method, path, reason) in denied {
        let r = send(&http1(), via, method, "web.test", path, &[]).await.unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        let header = r.headers.get("weir-error").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(header.contains(reason), "{method} {path}: weir-error {header:?}, want {reason:?}");
    }
    assert_eq!(served(), 1, "a denied request reached the app");

    // A path that normalises into an allowed one goes on normalised: the app sees what was judged.
    let r = send(&http1(), front, "GET", "web.test", "/public/../headers", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["path"], "/headers");

    // Strict: plaintext straight to the inbound is refused and counted.
    let r = send(&http1(), inbound, "GET", "web.test", "/public", &[]).await.unwrap();
    assert_eq!(r.status, 403);
    assert!(r.body.contains("plaintext refused: test/web requires mesh mTLS"), "{}", r.body);
    assert_eq!(served(), 2);

    let port = backend.addr.port();
    let metrics = admin_text(server.addr("admin"), "/metrics").await;
    let decision = |rule: &str, client: &str, decision: &str, n: u32| {
        format!(
            "weir_inbound_authorization_total{{client_identity=\"{client}\",decision=\"{decision}\",policy=\"test/web\",rule=\"{rule}\",server=\"{port}\"}} {n}"
        )
    };
    for want in [
        decision("frontend-reads", FRONTEND, "allow", 2),
        decision("", FRONTEND, "deny", 5),
        decision("", INTRUDER, "deny", 1),
        decision("", "", "deny", 1),
    ] {
        assert!(metrics.contains(&want), "missing {want}\n{metrics}");
    }
    // Request metrics say which transport each inbound request came over.
    assert!(
        metrics.contains(
            "weir_responses_total{backend=\"test/web\",classification=\"success\",direction=\"inbound\",grpc_status=\"\",route=\"\",service=\"test/web\",status_class=\"4xx\",status_code=\"403\",tls=\"false\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("status_code=\"200\",tls=\"true\"} 2"), "{metrics}");

    // Permissive with a rule for unauthenticated clients: plaintext gets what that rule allows.
    let public = "  - name: anyone-public\n    from: { unauthenticated: true }\n    to: { paths: [/public] }\n";
    scratch.write("authz.yaml", &policy("permissive", &format!("{FRONTEND_READS}{public}")));
    wait_config(server.addr("admin"), "permissive mode", |c| {
        c["snapshot"]["inbound"]["authorizations"][0]["strict"] == serde_json::Value::Bool(false)
    })
    .await;
    let r = send(&http1(), inbound, "GET", "web.test", "/public", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send(&http1(), inbound, "GET", "web.test", "/headers", &[]).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("does not allow an unauthenticated client to GET /headers"), "{}", r.body);

    // No policy: everyone is allowed again.
    std::fs::remove_file(scratch.config_dir().join("authz.yaml")).unwrap();
    wait_config(server.addr("admin"), "no authorization", |c| authorizations(c) == 0).await;
    let r = send(&http1(), intr, "POST", "web.test", "/admin", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_authorizations_are_rejected_and_the_previous_one_kept() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    scratch.write("authz.yaml", &policy("strict", FRONTEND_READS));
    let controller = scratch.controller(None).await;
    let admin = controller.addr("admin");
    let resources = admin_json(admin, "/resources").await;
    assert!(resources.to_string().contains("MeshAuthorization"), "{resources}");

    // Strict mode cannot admit unauthenticated clients: rejected with the field at fault.
    scratch.write("authz.yaml", &policy("strict", "  - from: { unauthenticated: true }\n"));
    wait_until("the rejection", Duration::from_secs(10), || async {
        admin_json(admin, "/resources").await.to_string().contains("spec.allow[0].from.unauthenticated")
    })
    .await;
    let resources = admin_json(admin, "/resources").await.to_string();
    assert!(resources.contains("strict mode refuses every client without a mesh identity"), "{resources}");
    // The accepted version stays in force.
    assert!(resources.contains("MeshAuthorization"), "{resources}");
}

fn authorizations(config: &serde_json::Value) -> usize {
    config["snapshot"]["inbound"]["authorizations"].as_array().map(Vec::len).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_rate_limits_keyed_by_client_identity_give_each_caller_its_own_bucket() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: web, namespace: test }\nspec:\n  \
         targetRef: { service: web }\n  rateLimit: { requestsPerSecond: 1, burst: 5, direction: Inbound, key: { clientIdentity: true } }\n",
    );
    let flags = scratch.identity_flags(&[("t-web", "test/web"), ("t-a", "test/a"), ("t-b", "test/b")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let grpc = controller.addr("grpc");
    let backend = Backend::start("web").await;
    let server = scratch.proxy_with(grpc, "test/web", Some(backend.addr), &scratch.token_flags("t-web")).await;
    let a = scratch.proxy_with(grpc, "test/a", None, &scratch.token_flags("t-a")).await;
    let b = scratch.proxy_with(grpc, "test/b", None, &scratch.token_flags("t-b")).await;
    for admin in [server.addr("admin"), a.addr("admin"), b.addr("admin")] {
        wait_ready(admin).await;
    }
    let inbound = server.addr("inbound");
    let endpoint = format!("{{ address: \"{inbound}\", meshed: true, serviceAccount: web, workload: web }}");
    scratch.write("services.yaml", &service("test", "web", &[endpoint]));
    for admin in [a.addr("admin"), b.addr("admin")] {
        wait_config(admin, "the endpoint", |c| endpoint_count(c, "test", "web") == 1).await;
    }
    wait_config(server.addr("admin"), "the inbound limit", |c| {
        c["snapshot"]["inbound"]["rate_limits"][0]["limit"]["client_identity"] == true
    })
    .await;

    let allowed = |via: std::net::SocketAddr, n: usize| async move {
        let mut ok = 0;
        for _ in 0..n {
            let r = send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap();
            match r.status {
                200 => ok += 1,
                429 => {}
                s => panic!("unexpected {s}: {}", r.body),
            }
        }
        ok
    };
    // a exhausts its own bucket of 5 (plus at most a refill or two at 1/s)...
    let a_ok = allowed(a.addr("outbound"), 12).await;
    assert!((5..=7).contains(&a_ok), "a: {a_ok} of 12 allowed");
    // ...which leaves b's and the plaintext callers' buckets full.
    assert_eq!(allowed(b.addr("outbound"), 5).await, 5, "b shares a's bucket");
    assert_eq!(allowed(inbound, 5).await, 5, "plaintext callers share a's bucket");
}

/// A strict namespace's pod passes its kubelet probes: the injector hands the pod's HTTP probes
/// to its sidecar, which admits plaintext GETs of exactly those (as Linkerd's default policy
/// does); every other plaintext request is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_probes_pass_a_strict_policy_and_nothing_else_does() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    scratch.write("authz.yaml", &policy("strict", FRONTEND_READS));
    let backend = Backend::start("web").await;
    let probes = format!(r#"[{{"port": {}, "path": "/healthz"}}]"#, backend.addr.port());
    let mesh = IdentityMesh::start(&scratch, "web", backend.addr, &[], &["--probe-paths".to_string(), probes]).await;
    let server = &mesh.server;
    wait_config(server.addr("admin"), "the authorization", |c| authorizations(c) == 1).await;
    let inbound = server.addr("inbound");

    // The kubelet: plaintext, no identity, straight to the pod.
    let r = send(&http1(), inbound, "GET", &inbound.to_string(), "/healthz", &[]).await.unwrap();
    assert_eq!((r.status, r.backend()), (200, "web"), "the probe failed: {}", r.body);
    let r = send(&http1(), inbound, "GET", &inbound.to_string(), "/healthz?verbose=1", &[]).await.unwrap();
    assert_eq!(r.status, 200, "a probe with a query: {}", r.body);
    // Anything else plaintext is still refused: another path, another method, a path that only
    // normalises to the probe's.
    for (method, path) in
        [("GET", "/public"), ("POST", "/healthz"), ("GET", "/healthz/../public"), ("GET", "/healthz/x")]
    {
        let r = send(&http1(), inbound, method, &inbound.to_string(), path, &[]).await.unwrap();
        assert_eq!(r.status, 403, "{method} {path} was let through: {}", r.body);
    }
    assert_eq!(backend.behaviour.served.load(Ordering::Relaxed), 2, "only the probes reached the app");
    let m = admin_text(server.addr("admin"), "/metrics").await;
    assert!(
        m.lines().any(|l| l.starts_with("weir_inbound_authorization_total{")
            && l.contains("rule=\"kubelet-probe\"")
            && l.contains("decision=\"allow\"")
            && l.ends_with(" 2")),
        "{m}"
    );

    // A bad list is refused at start, naming the flag.
    let out = std::process::Command::new(bin("weir-proxy")).args(["--probe-paths", "8080:/healthz"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--probe-paths") && err.contains("JSON list"), "{err}");
}
