//! `weir demo`: the whole mesh on loopback, no Kubernetes. Starts a controller in local mode
//! over a temporary copy of `examples/demo/`, two versions of `reviews` behind their sidecars
//! (mTLS, a strict MeshAuthorization), a client sidecar and a load generator, then runs the
//! Canary of `examples/demo/canary.yaml`: the controller judges reviews-v2 every interval from
//! the sidecars' reports and promotes it step by step, or rolls it back when it fails
//! (`--canary-error-rate`, `--canary-latency`). Prints each analysis as it happens.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::procs::{ChildProc, loopback_controller_args, loopback_sidecar_args, memory_kib, write_atomic};

const SERVICES_YAML: &str = include_str!("../../examples/demo/services.yaml");
const CANARY_YAML: &str = include_str!("../../examples/demo/canary.yaml");
const AUTHORIZATION_YAML: &str = include_str!("../../examples/demo/authorization.yaml");

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// The canary's analysis interval (the rollout takes about five of them).
    #[arg(long, default_value = "5s", value_parser = weir_api::duration::flag)]
    pub interval: Duration,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Share of requests the canary (reviews-v2) fails (0.0–1.0): the rollout is rolled back.
    #[arg(long, default_value_t = 0.0)]
    pub canary_error_rate: f64,
    /// Latency the canary adds to every request, e.g. `300ms`: rolled back on p99.
    #[arg(long, default_value = "0ms", value_parser = weir_api::duration::flag)]
    pub canary_latency: Duration,
    /// Print a machine-readable summary as JSON at the end (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Run the sidecars without workload certificates (no mTLS between them).
    #[arg(long)]
    pub plaintext: bool,
}

struct Mesh {
    dir: tempfile::TempDir,
    children: Vec<ChildProc>,
}

impl Mesh {
    async fn stop(mut self) {
        // Clients first, then servers, then the controller.
        while let Some(mut c) = self.children.pop() {
            c.stop(Duration::from_secs(5)).await;
        }
        drop(self.dir);
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.interval < Duration::from_secs(1) {
        bail!("--interval must be at least 1s (sidecars report every 500ms)");
    }
    if !(0.0..=1.0).contains(&args.canary_error_rate) {
        bail!("--canary-error-rate must be between 0 and 1");
    }
    let exe = std::env::current_exe().context("finding the weir executable")?;
    let dir = tempfile::Builder::new().prefix("weir-demo-").tempdir()?;
    let mut mesh = Mesh { dir, children: Vec::new() };
    let result = drive(&args, &exe, &mut mesh).await;
    if let Err(e) = &result {
        eprintln!("\ndemo failed: {e:#}");
        for c in &mesh.children {
            let log = std::fs::read_to_string(&c.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            eprintln!("--- last lines of {} ---", c.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    mesh.stop().await;
    result
}

async fn drive(args: &DemoArgs, exe: &Path, mesh: &mut Mesh) -> anyhow::Result<()> {
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let config_dir = mesh.dir.path().join("config");
    let logs = mesh.dir.path().to_path_buf();
    std::fs::create_dir(&config_dir)?;
    // Start with the Services but no endpoints, so nothing points at a port we do not own.
    write_atomic(&config_dir.join("services.yaml"), &services_yaml(None))?;

    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let log = |name: &str| logs.join(format!("{name}.log"));
    let mut controller_args =
        [vec!["controller".to_string()], loopback_controller_args(&config_dir, None, "warn")].concat();
    // Workload identities: a token per sidecar in the controller's table, a CA generated into
    // the temporary directory.
    let mtls = !args.plaintext;
    let workloads = ["reviews-v1", "reviews-v2", "productpage"];
    if mtls {
        let mut table = String::from("# weir demo: token namespace/serviceaccount\n");
        for w in workloads {
            let token: String = (0..32).map(|_| format!("{:x}", rand::random_range(0..16u8))).collect();
            std::fs::write(logs.join(format!("{w}.token")), &token)?;
            table.push_str(&format!("{token} demo/{w}\n"));
        }
        std::fs::write(logs.join("tokens"), table)?;
        write_atomic(&config_dir.join("authorization.yaml"), AUTHORIZATION_YAML)?;
        controller_args.extend([
            "--identity-dir".to_string(),
            logs.join("identity").display().to_string(),
            "--tokens".to_string(),
            logs.join("tokens").display().to_string(),
        ]);
    }
    let controller = ChildProc::spawn("controller", exe, &controller_args, log("controller")).await?;
    let (grpc, admin_addr) = (controller.addr("grpc"), controller.addr("admin"));
    say(format!("controller   grpc {grpc}  admin http://{admin_addr}"));
    mesh.children.push(controller);

    let mut backends = Vec::new();
    for (name, fail, latency) in [("v1", 0.0, Duration::ZERO), ("v2", args.canary_error_rate, args.canary_latency)] {
        let b = ChildProc::spawn(
            &format!("backend-{name}"),
            exe,
            &[
                s(&["demo-backend", "--listen", "127.0.0.1:0", "--print-listen-addrs", "--name", name]),
                vec![format!("--fail-rate={fail}"), format!("--latency={}ms", latency.as_millis())],
            ]
            .concat(),
            log(&format!("backend-{name}")),
        )
        .await?;
        backends.push(b.addr("listen"));
        mesh.children.push(b);
    }
    let sidecar = |workload: &str, app: Option<SocketAddr>| {
        let mut a = [vec!["proxy".to_string()], loopback_sidecar_args(grpc, workload, app, "warn")].concat();
        if workload.starts_with("demo/reviews") {
            a.extend(["--label".to_string(), "app=reviews".to_string()]);
        }
        if mtls {
            let name = workload.rsplit('/').next().unwrap_or(workload);
            // The trust anchors out of band (the file the controller generated), never from
            // the network: the sidecars verify the controller before sending their tokens.
            a.extend([
                "--token-file".to_string(),
                logs.join(format!("{name}.token")).display().to_string(),
                "--trust-anchors".to_string(),
                logs.join("identity").join("root.crt").display().to_string(),
            ]);
        }
        a
    };
    let mut admins = Vec::new();
    let mut inbound = Vec::new();
    for (i, name) in ["reviews-v1", "reviews-v2"].iter().enumerate() {
        let p = ChildProc::spawn(
            &format!("sidecar-{name}"),
            exe,
            &sidecar(&format!("demo/{name}"), Some(backends[i])),
            log(name),
        )
        .await?;
        say(format!("{name:<12} backend {}  sidecar inbound {}", backends[i], p.addr("inbound")));
        inbound.push(p.addr("inbound"));
        admins.push(p.addr("admin"));
        mesh.children.push(p);
    }
    let client =
        ChildProc::spawn("sidecar-client", exe, &sidecar("demo/productpage", None), log("productpage")).await?;
    let (outbound, client_admin, client_pid) = (client.addr("outbound"), client.addr("admin"), client.pid());
    say(format!("productpage  sidecar outbound {outbound}  admin http://{client_admin}"));
    mesh.children.push(client);

    // Now that the sidecars listen, publish their addresses as the Services' endpoints.
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    write_atomic(&config_dir.join("services.yaml"), &services_yaml(Some((inbound[0], inbound[1]))))?;
    wait_for_config(&http, client_admin, Duration::from_secs(20), |c| endpoints_in(c) == 2)
        .await
        .context("the client sidecar never received the endpoints")?;
    admins.push(client_admin);
    for admin in &admins {
        wait_ready(&http, *admin, Duration::from_secs(20)).await.context("a sidecar never became ready")?;
    }
    if mtls {
        say("mTLS: on between all sidecars (identities spiffe://cluster.local/ns/demo/sa/{productpage,reviews-v1,reviews-v2})".into());
        // The MeshAuthorization in force: a plaintext caller is turned away at the sidecar.
        for admin in &admins[..2] {
            wait_for_config(&http, *admin, Duration::from_secs(20), |c| {
                c["snapshot"]["inbound"]["authorizations"].as_array().is_some_and(|a| !a.is_empty())
            })
            .await
            .context("a reviews sidecar never received the MeshAuthorization")?;
        }
        let probe = http::Request::get(format!("http://{}/", inbound[0])).header("host", "reviews-v1.demo");
        let refused = http.request(probe.body(Empty::new())?).await?;
        let reason = refused.headers().get("weir-error").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        say(format!(
            "authorization: MeshAuthorization demo/reviews (strict) admits only productpage; a plaintext probe of reviews-v1 got {} ({reason})",
            refused.status().as_u16()
        ));
    } else {
        say("mTLS: off (--plaintext)".into());
    }
    let idle_rss = memory_kib(client_pid).map(|m| m.1).unwrap_or(0);

    // The rollout: the Canary goes in, and once the client sidecar routes reviews by it, the
    // load starts and runs until the controller has promoted or rolled back.
    let canary_yaml = CANARY_YAML.replace("interval: 5s", &format!("interval: {}ms", args.interval.as_millis()));
    write_atomic(&config_dir.join("canary.yaml"), &canary_yaml)?;
    wait_for_config(&http, client_admin, Duration::from_secs(20), |c| split_weights(c).is_some())
        .await
        .context("the canary's split never reached the client sidecar")?;
    say(format!(
        "\ncanary demo/reviews: reviews-v1 (stable) → reviews-v2 (canary{}), steps 10/25/50/75%, every {:?}; \
         pass = success ≥ 99%, p99 ≤ 100ms, ≥ 50 canary requests; 2 failed intervals roll back",
        describe_canary(args),
        args.interval
    ));
    say(format!("load: {} connections to http://reviews.demo/ through {outbound}\n", args.concurrency));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let traffic = Load::start(outbound, args.concurrency, client_pid, peak_rss.clone());
    let started = Instant::now();
    let limit = args.interval * 12 + Duration::from_secs(30);
    let mut seen_analysis = 0u64;
    let mut seen_history = 0usize;
    let mut analyses = Vec::new();
    let final_status = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let all: serde_json::Value = serde_json::from_str(&get_text(&http, admin_addr, "/canaries").await?)?;
        let status = all["canaries"][0]["status"].clone();
        let history = status["history"].as_array().cloned().unwrap_or_default();
        let at = status["lastAnalysis"]["atUnixMs"].as_u64().unwrap_or(0);
        if at != seen_analysis {
            seen_analysis = at;
            let a = &status["lastAnalysis"];
            say(format!(
                "t={:>5.1}s  stable {}  canary {}  {:<12} → {}",
                started.elapsed().as_secs_f64(),
                backend_line(&a["stable"]),
                backend_line(&a["canary"]),
                a["verdict"].as_str().unwrap_or("?"),
                status["message"].as_str().unwrap_or(""),
            ));
            analyses.push(a.clone());
        } else if history.len() > seen_history && seen_history == 0 {
            say(format!(
                "t={:>5.1}s  {}",
                started.elapsed().as_secs_f64(),
                history.last().and_then(|h| h["reason"].as_str()).unwrap_or("")
            ));
        }
        seen_history = history.len();
        let phase = status["phase"].as_str().unwrap_or("");
        if phase == "Succeeded" || phase == "Failed" {
            break status;
        }
        if started.elapsed() > limit {
            bail!("the canary did not finish within {limit:?} (phase {phase})");
        }
    };
    let took = started.elapsed();
    let counts = traffic.stop().await;
    let phase = final_status["phase"].as_str().unwrap_or("");
    let verb = if phase == "Succeeded" { "promoted" } else { "rolled back" };
    say(format!(
        "\n{phase}: reviews-v2 {verb} after {:.1}s at weight {}% — {}",
        took.as_secs_f64(),
        final_status["weight"],
        final_status["message"].as_str().unwrap_or("")
    ));
    let total = counts.v1 + counts.v2 + counts.errors;
    say(format!(
        "traffic: {total} requests ({:.0} rps): {} served by v1, {} by v2, {} failed",
        total as f64 / took.as_secs_f64().max(0.001),
        counts.v1,
        counts.v2,
        counts.errors
    ));
    let peak = peak_rss.load(Ordering::Relaxed);
    // What the servers saw: requests by client identity and transport.
    let mut mtls_requests = 0u64;
    let mut plain_requests = 0u64;
    for admin in &admins[..2] {
        let text = get_text(&http, *admin, "/metrics").await.unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("weir_inbound_requests_by_client_total")) {
            let n = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
            if line.contains("tls=\"true\"") { mtls_requests += n } else { plain_requests += n }
        }
    }
    say(format!(
        "servers received {mtls_requests} requests over mTLS from spiffe://cluster.local/ns/demo/sa/productpage, {plain_requests} in plaintext"
    ));
    say(format!(
        "client sidecar RSS: {:.1} MiB idle, {:.1} MiB peak under load",
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0
    ));
    if args.json {
        let summary = serde_json::json!({
            "canary": { "phase": phase, "weight": final_status["weight"], "reason": final_status["message"],
                        "seconds": took.as_secs_f64(), "history": final_status["history"] },
            "analyses": analyses,
            "requests": { "v1": counts.v1, "v2": counts.v2, "failed": counts.errors },
            "clientSidecarRssKiB": { "idle": idle_rss, "peakUnderLoad": peak },
            "mtls": { "enabled": mtls, "requestsOverMtls": mtls_requests, "requestsInPlaintext": plain_requests },
            "concurrency": args.concurrency,
            "intervalSeconds": args.interval.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

fn describe_canary(args: &DemoArgs) -> String {
    let mut faults = Vec::new();
    if args.canary_error_rate > 0.0 {
        faults.push(format!("failing {:.0}% of requests", args.canary_error_rate * 100.0));
    }
    if !args.canary_latency.is_zero() {
        faults.push(format!("{}ms slower", args.canary_latency.as_millis()));
    }
    if faults.is_empty() { ", healthy".into() } else { format!(", {}", faults.join(" and ")) }
}

/// `99.95% p99   2.5ms   1234 req` for one backend's interval.
fn backend_line(m: &serde_json::Value) -> String {
    let rate = m["successRate"].as_f64().map(|r| format!("{r:6.2}%")).unwrap_or_else(|| "     -".into());
    let p99 = m["p99Ms"].as_f64().map(|p| format!("{p:6.1}ms")).unwrap_or_else(|| "     -  ".into());
    format!("{rate} p99 {p99} {:>6} req", m["requests"].as_u64().unwrap_or(0))
}

#[derive(Default)]
struct Counts {
    v1: u64,
    v2: u64,
    errors: u64,
}

/// Closed-loop load through the client sidecar until stopped, counting responses by version,
/// and sampling the client sidecar's RSS.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    counts: Arc<[AtomicU64; 3]>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(outbound: SocketAddr, concurrency: usize, watch_pid: u32, peak_rss: Arc<AtomicU64>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (stop, counts) = (stop.clone(), counts.clone());
            let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1).build(HttpConnector::new());
            tasks.push(tokio::spawn(async move {
                let uri: http::Uri = format!("http://{outbound}/").parse().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let req = http::Request::get(uri.clone())
                        .header("host", "reviews.demo")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let slot = match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                        Ok(Ok(rsp)) => {
                            let ok = rsp.status().is_success();
                            let backend = rsp.headers().get("x-weir-backend").cloned();
                            let _ = rsp.into_body().collect().await;
                            match backend.as_ref().map(|b| b.as_bytes()) {
                                Some(b"v1") if ok => 0,
                                Some(b"v2") if ok => 1,
                                _ => 2,
                            }
                        }
                        _ => 2,
                    };
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let sampler_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !sampler_stop.load(Ordering::Relaxed) {
                if let Some((_, rss)) = memory_kib(watch_pid) {
                    peak_rss.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
        Self { stop, counts, tasks }
    }

    async fn stop(self) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let c = &self.counts;
        Counts {
            v1: c[0].load(Ordering::Relaxed),
            v2: c[1].load(Ordering::Relaxed),
            errors: c[2].load(Ordering::Relaxed),
        }
    }
}

async fn wait_for_config(
    http: &Client<HttpConnector, Empty<Bytes>>,
    admin: SocketAddr,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let uri: http::Uri = format!("http://{admin}/config").parse()?;
    loop {
        if let Ok(rsp) = http.get(uri.clone()).await
            && let Ok(body) = rsp.into_body().collect().await
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
            && ok(&v)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn get_text(http: &Client<HttpConnector, Empty<Bytes>>, admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let rsp = http.get(format!("http://{admin}{path}").parse()?).await?;
    let ok = rsp.status().is_success();
    let body = String::from_utf8_lossy(&rsp.into_body().collect().await?.to_bytes()).into_owned();
    if ok { Ok(body) } else { bail!("{path}: {body}") }
}

async fn wait_ready(
    http: &Client<HttpConnector, Empty<Bytes>>,
    admin: SocketAddr,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match get_text(http, admin, "/ready").await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("timed out after {limit:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

fn services(c: &serde_json::Value) -> &[serde_json::Value] {
    c["snapshot"]["services"].as_array().map(|v| v.as_slice()).unwrap_or(&[])
}

fn endpoints_in(c: &serde_json::Value) -> usize {
    services(c).iter().map(|s| s["endpoints"].as_array().map(|e| e.len()).unwrap_or(0)).sum()
}

fn split_weights(c: &serde_json::Value) -> Option<(u32, u32)> {
    let svc = services(c).iter().find(|s| s["name"] == "reviews")?;
    let rule = svc["rules"].as_array()?.iter().find(|r| r["name"] == "split")?;
    let w = |i: usize| rule["backends"][i]["weight"].as_u64().map(|w| w as u32);
    Some((w(0)?, w(1)?))
}

/// `examples/demo/services.yaml` with the endpoint addresses replaced (or removed).
fn services_yaml(inbound: Option<(SocketAddr, SocketAddr)>) -> String {
    let mut out = SERVICES_YAML.to_string();
    for (placeholder, actual) in [("127.0.0.1:14143", inbound.map(|i| i.0)), ("127.0.0.1:24143", inbound.map(|i| i.1))]
    {
        out = match actual {
            Some(a) => out.replace(placeholder, &a.to_string()),
            None => strip_endpoints(&out),
        };
    }
    out
}

/// Drops every `endpoints:` block (used before the sidecars exist).
fn strip_endpoints(yaml: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in yaml.lines() {
        if line.trim_start().starts_with("endpoints:") {
            skipping = true;
            continue;
        }
        if skipping && (line.starts_with("  -") || line.starts_with("    ")) {
            continue;
        }
        skipping = false;
        out.push(line);
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_files_parse_and_rewrite() {
        assert!(CANARY_YAML.contains("interval: 5s"), "drive() rewrites this line");
        use weir_controller::index::{Index, Resource};
        use weir_controller::source::local::parse_file;
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for (services, endpoints) in [(services_yaml(None), 0), (services_yaml(Some((a, a))), 2)] {
            let mut defs = parse_file("services.yaml", &services).unwrap();
            defs.extend(parse_file("canary.yaml", CANARY_YAML).unwrap());
            defs.extend(parse_file("authorization.yaml", AUTHORIZATION_YAML).unwrap());
            let mut index = Index::default();
            index.replace_all(defs, vec![]);
            assert!(index.rejections().is_empty(), "{:?}", index.rejections());
            let mut found = 0;
            for e in index.entries().values() {
                match &e.resource {
                    Resource::Service(s) => found += s.endpoints.iter().filter(|e| e.address == "127.0.0.1:1").count(),
                    Resource::Canary(c) => assert_eq!(c.expanded_steps(), [10, 25, 50, 75]),
                    Resource::Route(_) | Resource::ResiliencePolicy(_) | Resource::MeshAuthorization(_) => {}
                }
            }
            assert_eq!(found, endpoints);
        }
    }
}
