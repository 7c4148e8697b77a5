//! `weir proxy-status` and `weir stat` against a local-mode controller: a real sidecar is
//! SYNCED, one that has not acked is STALE, one that refused is NACKED with its reason; the
//! traffic numbers match what was sent.

use std::time::Duration;

use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_tells_synced_stale_and_nacked_apart() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let controller = scratch.controller(None).await;
    let (grpc, admin) = (controller.addr("grpc"), controller.addr("admin"));
    let real = scratch.proxy(grpc, "test/real", None).await;
    wait_config(real.addr("admin"), "a snapshot", |c| !c["version"].is_null()).await;
    let stale = fake_sidecar(grpc, "silent", None).await;
    let nacked = fake_sidecar(grpc, "refuser", Some("service test/web: cannot apply this")).await;
    let a = admin.to_string();
    wait_until("three sidecars, one nack", Duration::from_secs(10), || async move {
        let r = admin_json(admin, "/resources").await;
        r["proxies"].as_array().is_some_and(|p| p.len() == 3 && p.iter().any(|p| !p["nack"].is_null()))
    })
    .await;
    let (code, table, _) = run_weir(&["proxy-status", "--controller-admin", &a]).await;
    assert_eq!(code, Some(3), "not all in sync:\n{table}");
    let line = |w: &str| table.lines().find(|l| l.starts_with(w)).unwrap_or_else(|| panic!("{w}: {table}")).to_string();
    assert!(line("test/real").contains("SYNCED"), "{table}");
    assert!(line("test/silent").contains("STALE") && line("test/silent").contains("waiting for an ack"), "{table}");
    assert!(
        line("test/refuser").contains("NACKED  version") && line("test/refuser").contains("cannot apply this"),
        "{table}"
    );
    let (_, json, _) = run_weir(&["proxy-status", "--controller-admin", &a, "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["proxies"].as_array().unwrap().len(), 3);

    // Only the real sidecar left: all in sync, exit 0.
    stale.abort();
    nacked.abort();
    wait_until("the fakes gone", Duration::from_secs(10), || async move {
        admin_json(admin, "/resources").await["proxies"].as_array().is_some_and(|p| p.len() == 1)
    })
    .await;
    let (code, table, _) = run_weir(&["proxy-status", "--controller-admin", &a]).await;
    assert_eq!(code, Some(0), "{table}");
    // An unreachable controller is an error with the address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (code, _, err) = run_weir(&["proxy-status", "--controller-admin", &closed]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("reaching the controller's admin port at {closed}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_numbers_match_the_traffic_sent() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    mesh.v1.behaviour.set_fail_rate(0.0);
    // 40 good requests and 10 that fail (v1 answers 500 for /_control?fail=1 onwards).
    for _ in 0..40 {
        assert_eq!(send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap().status, 200);
    }
    mesh.v1.behaviour.set_fail_rate(1.0);
    for _ in 0..10 {
        assert_eq!(send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap().status, 500);
    }
    let admin = mesh.controller.addr("admin");
    let row = stat_row(admin, "web", "test", "test/web-v1", 50).await;
    let a = admin.to_string();
    assert_eq!((row["requests"].as_u64(), row["failures"].as_u64()), (Some(50), Some(10)), "{row}");
    assert_eq!(row["successRate"].as_f64(), Some(80.0));
    // Loopback requests to an idle backend: p50 well inside the first buckets.
    assert!(row["p50Ms"].as_f64().unwrap() <= 50.0, "{row}");
    let (_, table, _) = run_weir(&["stat", "--controller-admin", &a, "--window", "100ms"]).await;
    let line = table.lines().find(|l| l.contains("test/web-v1")).unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("80.00%") && line.contains(" 50 "), "{table}");
}

/// A fake API server that has only the `routes.weir.io` CRD.
async fn fake_api_with_one_crd() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    fake_json_server(|req: FakeRequest| async move {
        let prefix = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/";
        let name = req.path.strip_prefix(prefix).unwrap_or("").to_string();
        let found = weir_api::crds().into_iter().find(|c| c.metadata.name.as_deref() == Some(name.as_str()));
        match found {
            Some(crd) if name == "routes.weir.io" => (200, serde_json::to_value(crd).unwrap()),
            _ => (
                404,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": format!("{name} not found")}),
            ),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_is_wrong_and_how_to_fix_it() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags = scratch.identity_flags(&[("t-web", "test/web")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let sidecar = scratch.proxy_with(controller.addr("grpc"), "test/web", None, &scratch.token_flags("t-web")).await;
    wait_config(sidecar.addr("admin"), "a snapshot", |c| !c["version"].is_null()).await;
    let a = controller.addr("admin").to_string();
    let (code, out, _) = run_weir(&["check", "--controller-admin", &a]).await;
    assert_eq!(code, Some(0), "{out}");
    let m = admin_text(controller.addr("admin"), "/metrics").await;
    assert!(
        m.contains(&format!("weir_controller_connected_proxies{{proxy_version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))),
        "{m}"
    );
    let (code, script, _) = run_weir(&["completions", "bash"]).await;
    assert!(code == Some(0) && script.contains("proxy-status") && script.contains("canary"), "{script}");
    for line in [
        "✔ controller: ready at",
        "✔ configuration: 1 resources in force, none rejected",
        "✔ trust anchor: valid for",
        "✔ sidecars: 1 connected, all in sync",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    // A rejected definition is named with the fix.
    scratch.write("bad.yaml", "kind: Service\nmetadata: { name: Bad_Name }\n");
    let admin = controller.addr("admin");
    wait_until("the rejection", Duration::from_secs(10), || async move {
        admin_json(admin, "/resources").await["rejected"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    let (code, out, _) = run_weir(&["check", "--controller-admin", &a]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("✘ configuration: 1 definition(s) rejected, e.g. bad.yaml")
            && out.contains("fix: fix the definitions"),
        "{out}"
    );

    // An unreachable controller, and a cluster missing CRDs.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (api, _api) = fake_api_with_one_crd().await;
    let kubeconfig = scratch.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\n\
             users: [{{name: me, user: {{token: t}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: me}}}}]\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    let k = kubeconfig.display().to_string();
    let (code, out, _) = run_weir(&["check", "--controller-admin", &closed, "--kubeconfig", &k]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("✔ CRD routes.weir.io: installed, v1alpha1 served"), "{out}");
    assert!(
        out.contains("✘ CRD canaries.weir.io: missing\n    fix: install the CRDs: kubectl apply -f charts/weir/crds/"),
        "{out}"
    );
    assert!(
        out.contains(&format!("✘ controller: not reachable at {closed}")) && out.contains("fix: start it"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_config_shows_what_one_sidecar_runs() {
    let mesh = TwoVersions::start(&split_route(90, 10)).await;
    let admin = mesh.controller.addr("admin").to_string();
    mesh.scratch.write(
        "policy.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: web, namespace: test }\nspec:\n  targetRef: { service: web }\n  timeouts: { request: 2s }\n  retries: { attempts: 2 }\n",
    );
    let client_admin = mesh.client.addr("admin");
    wait_config(client_admin, "the policy", |c| {
        c["snapshot"]["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["policies"].as_array().is_some_and(|p| !p.is_empty())))
    })
    .await;

    // Found through the controller by workload name.
    let (code, out, err) = run_weir(&["proxy-config", "test/client", "routes", "--controller-admin", &admin]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("test/web:split") && out.contains("web-v1=90") && out.contains("web-v2=10"), "{out}");
    let (code, out, err) =
        run_weir(&["proxy-config", "client", "-n", "test", "endpoints", "--controller-admin", &admin]).await;
    assert_eq!(code, Some(0), "{err}");
    for s in &mesh.sidecars {
        assert!(out.contains(&s.addr("inbound").to_string()), "{out}");
    }
    let (code, out, err) = run_weir(&["proxy-config", "test/client", "policies", "--controller-admin", &admin]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("test/web") && out.contains("2000ms"), "{out}");
    // Structured output for scripts, straight from the sidecar.
    let direct = client_admin.to_string();
    let (code, out, err) = run_weir(&["proxy-config", "--proxy-admin", &direct, "endpoints", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let web = v.as_array().unwrap().iter().find(|s| s["service"] == "test/web-v1").unwrap();
    assert!(!web["endpoints"].as_array().unwrap().is_empty(), "{out}");
    let (code, out, _) =
        run_weir(&["proxy-config", "test/client", "identity", "-o", "yaml", "--controller-admin", &admin]).await;
    assert_eq!(code, Some(0));
    assert!(out.trim() == "null", "no identity without --token-file: {out}");
    // A workload with no sidecar connected is an error that lists who is.
    let (code, _, err) = run_weir(&["proxy-config", "test/ghost", "--controller-admin", &admin]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no connected sidecar of workload test/ghost") && err.contains("test/client"), "{err}");
}

/// The service graph from the sidecars' reports: three workloads with identities of their own,
/// `frontend` and `batch` calling `web` over mesh mTLS and `frontend` also calling `legacy`,
/// which has no sidecar. `weir edges` shows exactly those three edges, each with its caller's
/// SPIFFE ID, mTLS or not, and the count sent; `weir stat --from` narrows to one caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_show_who_calls_whom_as_which_identity() {
    let scratch = Scratch::new();
    let web = Backend::start("web").await;
    let legacy = Backend::start("legacy").await;
    let mesh = IdentityMesh::start(&scratch, "web", web.addr, &["frontend", "batch"], &[]).await;
    let (frontend, batch) = (&mesh.clients[0], &mesh.clients[1]);
    let web_endpoint = format!("{{ address: \"{}\", meshed: true, serviceAccount: web }}", mesh.server.addr("inbound"));
    scratch.write(
        "services.yaml",
        &(service("test", "web", &[web_endpoint])
            + &service("test", "legacy", &[format!("{{ address: \"{}\" }}", legacy.addr)])),
    );
    wait_config(frontend.addr("admin"), "legacy", |c| endpoint_count(c, "test", "legacy") == 1).await;
    let sent = [(frontend, "web.test", 7u64), (batch, "web.test", 5), (frontend, "legacy.test", 3)];
    for (client, host, n) in sent {
        for _ in 0..n {
            let r = send(&http1(), client.addr("outbound"), "GET", host, "/", &[]).await.unwrap();
            assert_eq!(r.status, 200, "{host}: {}", r.body);
        }
    }
    let admin = mesh.controller.addr("admin");
    wait_until("every edge reported", Duration::from_secs(10), || async move {
        let v = admin_json(admin, "/edges").await;
        let total: u64 = v["edges"].as_array().into_iter().flatten().filter_map(|e| e["requests"].as_u64()).sum();
        total == 15
    })
    .await;

    let a = admin.to_string();
    let (code, json, err) =
        run_weir(&["edges", "test", "--controller-admin", &a, "--window", "100ms", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let mut edges: Vec<(String, String, String, u64, u64)> = rows
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            (s("from"), s("to"), s("identity"), r["requests"].as_u64().unwrap(), r["mtlsRequests"].as_u64().unwrap())
        })
        .collect();
    edges.sort();
    let id = |sa: &str| format!("spiffe://cluster.local/ns/test/sa/{sa}");
    assert_eq!(
        edges,
        vec![
            ("test/batch".into(), "test/web".into(), id("batch"), 5, 5),
            ("test/frontend".into(), "test/legacy".into(), id("frontend"), 3, 0),
            ("test/frontend".into(), "test/web".into(), id("frontend"), 7, 7),
        ],
        "{json}"
    );
    // The table says the same, mTLS as yes or no.
    let (_, table, _) = run_weir(&["edges", "--controller-admin", &a, "--window", "100ms"]).await;
    let line = |from: &str, to: &str| {
        table
            .lines()
            .find(|l| l.starts_with(from) && l.contains(to))
            .unwrap_or_else(|| panic!("{from} -> {to}:\n{table}"))
            .to_string()
    };
    let cols = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(cols(&line("test/frontend", "test/web"))[3], "yes", "{table}");
    assert_eq!(cols(&line("test/frontend", "test/legacy"))[3], "no", "{table}");
    assert!(table.lines().count() == 4, "a header and three edges:\n{table}");

    // One caller's calls only.
    let (code, json, err) = run_weir(&[
        "stat",
        "--from",
        "frontend",
        "-n",
        "test",
        "--controller-admin",
        &a,
        "--window",
        "100ms",
        "-o",
        "json",
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let mut seen: Vec<(String, u64)> =
        rows.iter().map(|r| (r["service"].as_str().unwrap().to_string(), r["requests"].as_u64().unwrap())).collect();
    seen.sort();
    assert_eq!(seen, vec![("test/legacy".to_string(), 3), ("test/web".to_string(), 7)], "{json}");
}

/// Starts `weir tap ARGS` and waits until the sidecar at `admin` counts one more open tap.
async fn start_tap(admin: std::net::SocketAddr, args: &[&str]) -> tokio::process::Child {
    let open = |m: String| {
        m.lines().find_map(|l| l.strip_prefix("weir_taps_open ")?.parse::<i64>().ok()).unwrap_or_else(|| panic!("{m}"))
    };
    let before = open(admin_text(admin, "/metrics").await);
    let child = tokio::process::Command::new(bin("weir"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("the tap to open", Duration::from_secs(10), || async move {
        open(admin_text(admin, "/metrics").await) == before + 1
    })
    .await;
    child
}

/// `weir tap` shows exactly the requests its filter matches, each once, with what the request
/// was and nothing of its headers; a tap's rate holds whatever the load; the sidecar closes a
/// tap when its client goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_exactly_the_matching_requests_at_its_rate() {
    let app = Backend::start("web").await;
    let scratch = Scratch::new();
    let pair = SidecarPair::start(&scratch, "web", app.addr).await;
    let admin = pair.client.addr("admin");
    let a = admin.to_string();
    let tap = start_tap(admin, &["tap", "--proxy-admin", &a, "--path", "/api", "--max", "10", "-o", "json"]).await;
    let mut sent = Vec::new();
    for i in 0..14 {
        let path = if i % 3 == 2 { "/other" } else { "/api/items" };
        let id = format!("req-{i}");
        let headers = [("authorization", "Bearer s3cret"), ("x-request-id", id.as_str())];
        let r =
            send(&http1(), pair.client.addr("outbound"), "GET", "web.test", &format!("{path}?token=q{i}"), &headers)
                .await
                .unwrap();
        assert_eq!(r.status, 200);
        if path == "/api/items" {
            sent.push(id);
        }
    }
    assert_eq!(sent.len(), 10);
    let out = tokio::time::timeout(Duration::from_secs(10), tap.wait_with_output())
        .await
        .expect("--max 10 ends the tap")
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&str> = events.iter().map(|e| e["requestId"].as_str().unwrap()).collect();
    assert_eq!(ids, sent.iter().map(String::as_str).collect::<Vec<_>>(), "{text}");
    for e in &events {
        assert_eq!(
            (e["direction"].as_str(), e["method"].as_str(), e["path"].as_str()),
            (Some("outbound"), Some("GET"), Some("/api/items"))
        );
        assert_eq!(
            (e["status"].as_u64(), e["service"].as_str(), e["backend"].as_str()),
            (Some(200), Some("test/web"), Some("test/web"))
        );
    }
    assert!(!text.contains("s3cret") && !text.contains("token="), "a header or the query leaked: {text}");
    // The tap closed with its client.
    wait_until("the tap to close", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics").await.contains("weir_taps_open 0")
    })
    .await;

    // At 2 events a second, a burst of 60 requests shows at most the burst (2) plus what the
    // time taken refills; the sidecar counts what it showed and what it held back.
    let events = |m: &str, result: &str| {
        let prefix = format!("weir_tap_events_total{{result=\"{result}\"}} ");
        m.lines().find_map(|l| l.strip_prefix(&prefix)?.parse::<u64>().ok()).unwrap_or(0)
    };
    let before = admin_text(admin, "/metrics").await;
    let mut tap = start_tap(admin, &["tap", "--proxy-admin", &a, "--rate", "2", "-o", "json"]).await;
    let started = std::time::Instant::now();
    for _ in 0..60 {
        send(&http1(), pair.client.addr("outbound"), "GET", "web.test", "/", &[]).await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Each event is handed to the tap before its response leaves the sidecar.
    let after = admin_text(admin, "/metrics").await;
    let shown = events(&after, "shown") - events(&before, "shown");
    let limited = events(&after, "rate_limited") - events(&before, "rate_limited");
    assert_eq!(shown + limited, 60, "{after}");
    assert!(shown >= 2 && shown as f64 <= 2.0 + 2.0 * elapsed + 1.0, "{shown} shown in {elapsed:.2}s at rate 2");
    // And the client prints exactly those.
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tap.stdout.take().unwrap()));
    for _ in 0..shown {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.expect("an event").unwrap();
        assert!(line.is_some_and(|l| l.contains("\"status\":200")));
    }
    tap.start_kill().unwrap();
    assert_eq!(lines.next_line().await.unwrap(), None, "more events printed than the sidecar showed");
    let _ = tap.wait().await;

    // A bad filter is refused with the reason.
    let (code, _, err) = run_weir(&["tap", "--proxy-admin", &a, "--status", "7xx"]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("status \"7xx\""), "{err}");
}
