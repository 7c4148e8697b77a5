//! Request correlation through two sidecars: the app sees the caller's `x-request-id` (or one
//! the first sidecar made) and the caller's trace with a new parent span per hop, and each
//! sidecar's access log names the span it created.

use std::time::Duration;

use weir_tests::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The access-log line of `log` carrying `request_id`, as `field=value` pairs.
fn access_line(log: &std::path::Path, request_id: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    let clean: String = strip_ansi(&text);
    clean
        .lines()
        .find(|l| l.contains("weir::access") && l.contains(&format!("request_id={request_id}")))
        .unwrap_or_else(|| panic!("no access line for {request_id} in {}:\n{clean}", log.display()))
        .to_string()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let at = line.find(&format!(" {name}=")).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len() + 2;
    line[at..].split_whitespace().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_trace_context_cross_two_sidecars() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let controller = scratch.controller(None).await;
    let grpc = controller.addr("grpc");
    let backend = Backend::start("web").await;
    let access = ["--access-log".to_string()];
    let server = scratch.proxy_with(grpc, "test/web", Some(backend.addr), &access).await;
    let client = scratch.proxy_with(grpc, "test/client", None, &access).await;
    scratch.write("services.yaml", &service("test", "web", &[meshed(server.addr("inbound"))]));
    wait_config(client.addr("admin"), "the endpoint", |c| endpoint_count(c, "test", "web") == 1).await;

    // The caller's context: kept, with a new span at each of the two hops.
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let headers = [("traceparent", traceparent.as_str()), ("tracestate", "vendor=1"), ("x-request-id", "req-42")];
    let r = send(&http1(), client.addr("outbound"), "GET", "web.test", "/headers", &headers).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["headers"]["x-request-id"], "req-42");
    assert_eq!(seen["headers"]["tracestate"], "vendor=1");
    let app_tp = seen["headers"]["traceparent"].as_str().unwrap().to_string();
    let parts: Vec<&str> = app_tp.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE, "01"), "{app_tp}");
    let app_parent = parts[2];

    let log_line = |name: &str| access_line(&scratch.log(name), "req-42");
    let wait_logged = |name: &'static str| {
        let path = scratch.log(name);
        async move {
            wait_until("the access log line", Duration::from_secs(10), || {
                let path = path.clone();
                async move { strip_ansi(&std::fs::read_to_string(&path).unwrap_or_default()).contains("request_id=req-42") }
            })
            .await;
        }
    };
    wait_logged("test-client").await;
    wait_logged("test-web").await;
    let (out, inb) = (log_line("test-client"), log_line("test-web"));
    // Client sidecar span → server sidecar span → the app's parent.
    assert_eq!(field(&out, "trace_id"), TRACE);
    assert_eq!(field(&inb, "trace_id"), TRACE);
    let (client_span, server_span) = (field(&out, "span_id"), field(&inb, "span_id"));
    assert_eq!(server_span, app_parent, "the app's parent is the server sidecar's span");
    let spans = [CALLER_SPAN, client_span, server_span];
    assert!(spans.iter().all(|s| spans.iter().filter(|t| t == &s).count() == 1), "{spans:?}");
    assert_eq!(field(&out, "status"), "200");
    assert_eq!(field(&out, "upstream"), "test/web");
    assert_eq!(field(&inb, "path"), "/headers");

    // No context at all: the first sidecar makes a request id and a (not sampled) trace.
    let r = send(&http1(), client.addr("outbound"), "GET", "web.test", "/headers", &[]).await.unwrap();
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let id = seen["headers"]["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    let tp = seen["headers"]["traceparent"].as_str().unwrap();
    assert!(tp.starts_with("00-") && tp.ends_with("-00") && !tp.contains(TRACE), "{tp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_changes_at_run_time() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let controller = scratch.controller(None).await;
    let sidecar = scratch.proxy(controller.addr("grpc"), "test/web", None).await;
    for admin in [sidecar.addr("admin"), controller.addr("admin")] {
        assert_eq!(admin_text(admin, "/log-level").await, "debug\n");
        let r = send(&http1(), admin, "POST", "admin", "/log-level?level=info,weir_proxy=trace", &[]).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "info,weir_proxy=trace\n"));
        assert_eq!(admin_text(admin, "/log-level").await, "info,weir_proxy=trace\n");
        let r = send(&http1(), admin, "POST", "admin", "/log-level?level=[nonsense", &[]).await.unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("invalid log level"), "{}", r.body);
        assert_eq!(admin_text(admin, "/log-level").await, "info,weir_proxy=trace\n", "a bad level changes nothing");
    }
    // The new level is in force: at `trace`, trace lines appear (the control stream's frames).
    let log = scratch.log("test-web");
    let before = std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.contains("TRACE")).count();
    let admin = sidecar.addr("admin");
    let r = send(&http1(), admin, "POST", "admin", "/log-level?level=trace", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    wait_until("trace output", Duration::from_secs(10), || {
        let log = log.clone();
        async move {
            let _ = admin_text(admin, "/metrics").await;
            std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.contains("TRACE")).count() > before
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_traffic_sent() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    for _ in 0..30 {
        assert_eq!(send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap().status, 200);
    }
    mesh.v1.behaviour.set_fail_rate(1.0);
    for _ in 0..5 {
        assert_eq!(send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap().status, 500);
    }
    let scrape = |admin: std::net::SocketAddr| async move {
        let text = admin_text(admin, "/metrics").await;
        let lines = text.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("the exposition parses")
    };
    // One sample of `metric` whose labels include every pair of `want`.
    fn one<'a>(s: &'a prometheus_parse::Scrape, metric: &str, want: &[(&str, &str)]) -> &'a prometheus_parse::Value {
        let found: Vec<_> = s
            .samples
            .iter()
            .filter(|x| x.metric == metric && want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "{metric} {want:?}: {found:?}");
        &found[0].value
    }
    let client = scrape(mesh.client.addr("admin")).await;
    let out = [("direction", "outbound"), ("service", "test/web"), ("backend", "test/web-v1"), ("tls", "false")];
    assert_eq!(one(&client, "weir_requests_total", &out), &prometheus_parse::Value::Counter(35.0));
    let with = |extra: (&'static str, &'static str)| [out.as_slice(), &[extra]].concat();
    assert_eq!(
        one(&client, "weir_responses_total", &with(("status_code", "200"))),
        &prometheus_parse::Value::Counter(30.0)
    );
    assert_eq!(
        one(&client, "weir_responses_total", &with(("status_code", "500"))),
        &prometheus_parse::Value::Counter(5.0)
    );
    for (class, n) in [("2xx", 30.0), ("5xx", 5.0)] {
        let prometheus_parse::Value::Histogram(buckets) =
            one(&client, "weir_request_duration_seconds", &with(("status_class", class)))
        else {
            panic!("not a histogram")
        };
        // Cumulative buckets: never decreasing, all `n` requests under +Inf, sub-millisecond first bound.
        assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count), "{buckets:?}");
        assert_eq!(buckets.last().map(|b| (b.less_than, b.count)), Some((f64::INFINITY, n)), "{buckets:?}");
        assert_eq!(buckets[0].less_than, 0.0005);
    }
    // The server sidecar saw the same 35 requests inbound.
    let server = scrape(mesh.sidecars[0].addr("admin")).await;
    let inbound = [("direction", "inbound"), ("service", "test/web-v1")];
    assert_eq!(one(&server, "weir_requests_total", &inbound), &prometheus_parse::Value::Counter(35.0));
}
