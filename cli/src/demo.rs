//! `weir demo`: the whole mesh on loopback, no Kubernetes. Starts a controller in local mode
//! over a temporary copy of `examples/demo/`, two versions of `reviews` behind their
//! sidecars, a client sidecar, and a load generator; shifts the route's weights
//! 100/0 → 90/10 → 50/50 → 0/100 by rewriting the YAML; prints, per step, how long the change
//! took to reach the client sidecar, the request rate and the share each version served.

use std::io::Write;
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
const ROUTE_YAML: &str = include_str!("../../examples/demo/route.yaml");
const AUTHORIZATION_YAML: &str = include_str!("../../examples/demo/authorization.yaml");
const STEPS: [(u32, u32); 4] = [(100, 0), (90, 10), (50, 50), (0, 100)];

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Total running time, split evenly over the four steps.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Share of requests the v2 backend fails (0.0–1.0), to see errors flow through.
    #[arg(long, default_value_t = 0.0)]
    pub v2_fail_rate: f64,
    /// Print a machine-readable summary as JSON at the end (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Run the sidecars without workload certificates (no mTLS between them).
    #[arg(long)]
    pub plaintext: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    weir_api::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StepResult {
    weights: (u32, u32),
    propagation_ms: f64,
    requests: u64,
    rps: f64,
    v1_share: f64,
    v2_share: f64,
    errors: u64,
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
    if args.duration < Duration::from_secs(4) {
        bail!("--duration must be at least 4s (one second per step)");
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
    write_atomic(&config_dir.join("route.yaml"), &route_yaml(STEPS[0]))?;

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
    let grpc = controller.addr("grpc");
    say(format!("controller   grpc {grpc}  admin http://{}", controller.addr("admin")));
    mesh.children.push(controller);

    let mut backends = Vec::new();
    for (name, fail) in [("v1", 0.0), ("v2", args.v2_fail_rate)] {
        let b = ChildProc::spawn(
            &format!("backend-{name}"),
            exe,
            &[
                s(&["demo-backend", "--listen", "127.0.0.1:0", "--print-listen-addrs", "--name", name]),
                vec![format!("--fail-rate={fail}")],
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
            a.extend(["--token-file".to_string(), logs.join(format!("{name}.token")).display().to_string()]);
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

    let step_time = args.duration / STEPS.len() as u32;
    let mut results = Vec::new();
    let peak_rss = Arc::new(AtomicU64::new(0));
    say(format!(
        "\nload: {} connections to http://reviews.demo/ through {outbound}, {step_time:?} per step\n",
        args.concurrency
    ));
    for (i, weights) in STEPS.iter().copied().enumerate() {
        let changed = Instant::now();
        if i > 0 {
            write_atomic(&config_dir.join("route.yaml"), &route_yaml(weights))?;
            wait_for_config(&http, client_admin, Duration::from_secs(10), |c| split_weights(c) == Some(weights))
                .await
                .context("the weight change never reached the client sidecar")?;
        }
        let propagation_ms = if i > 0 { changed.elapsed().as_secs_f64() * 1000.0 } else { 0.0 };
        let label = format!("step {}/{}  v1 {:>3}% v2 {:>3}%", i + 1, STEPS.len(), weights.0, weights.1);
        let counts =
            load(outbound, args.concurrency, step_time, &label, !args.json, client_pid, peak_rss.clone()).await;
        let total = counts.v1 + counts.v2 + counts.errors;
        let served = (counts.v1 + counts.v2).max(1) as f64;
        let r = StepResult {
            weights,
            propagation_ms,
            requests: total,
            rps: total as f64 / step_time.as_secs_f64(),
            v1_share: counts.v1 as f64 / served,
            v2_share: counts.v2 as f64 / served,
            errors: counts.errors,
        };
        say(format!(
            "\r{label}  {:>8.0} rps  served v1 {:>5.1}%  v2 {:>5.1}%  errors {:<5}  config applied in {:.0} ms",
            r.rps,
            r.v1_share * 100.0,
            r.v2_share * 100.0,
            r.errors,
            r.propagation_ms
        ));
        results.push(r);
    }
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
        "\nclient sidecar RSS: {:.1} MiB idle, {:.1} MiB peak under load",
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0
    ));
    if args.json {
        let summary = serde_json::json!({
            "steps": results,
            "clientSidecarRssKiB": { "idle": idle_rss, "peakUnderLoad": peak },
            "mtls": { "enabled": mtls, "requestsOverMtls": mtls_requests, "requestsInPlaintext": plain_requests },
            "concurrency": args.concurrency,
            "stepSeconds": step_time.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

#[derive(Default)]
struct Counts {
    v1: u64,
    v2: u64,
    errors: u64,
}

async fn load(
    outbound: SocketAddr,
    concurrency: usize,
    duration: Duration,
    label: &str,
    progress: bool,
    watch_pid: u32,
    peak_rss: Arc<AtomicU64>,
) -> Counts {
    let (v1, v2, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (v1, v2, errors) = (v1.clone(), v2.clone(), errors.clone());
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1).build(HttpConnector::new());
        workers.push(tokio::spawn(async move {
            let uri: http::Uri = format!("http://{outbound}/").parse().unwrap();
            while Instant::now() < deadline {
                let req =
                    http::Request::get(uri.clone()).header("host", "reviews.demo").body(Empty::<Bytes>::new()).unwrap();
                let ok = match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                    Ok(Ok(rsp)) if rsp.status().is_success() => {
                        let backend = rsp.headers().get("x-weir-backend").cloned();
                        let _ = rsp.into_body().collect().await;
                        match backend.as_ref().map(|b| b.as_bytes()) {
                            Some(b"v1") => v1.fetch_add(1, Ordering::Relaxed),
                            Some(b"v2") => v2.fetch_add(1, Ordering::Relaxed),
                            _ => errors.fetch_add(1, Ordering::Relaxed),
                        };
                        true
                    }
                    Ok(Ok(rsp)) => {
                        let _ = rsp.into_body().collect().await;
                        false
                    }
                    _ => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while Instant::now() < deadline {
        tick.tick().await;
        if let Some((_, rss)) = memory_kib(watch_pid) {
            peak_rss.fetch_max(rss, Ordering::Relaxed);
        }
        if progress {
            let frac = (start.elapsed().as_secs_f64() / duration.as_secs_f64()).min(1.0);
            let filled = (frac * 30.0) as usize;
            let done = v1.load(Ordering::Relaxed) + v2.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed);
            eprint!("\r{label}  [{}{}] {done} requests", "#".repeat(filled), ".".repeat(30 - filled));
            let _ = std::io::stderr().flush();
        }
    }
    for w in workers {
        let _ = w.await;
    }
    if progress {
        eprint!("\r{}\r", " ".repeat(100));
    }
    Counts { v1: v1.load(Ordering::Relaxed), v2: v2.load(Ordering::Relaxed), errors: errors.load(Ordering::Relaxed) }
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

/// `examples/demo/route.yaml` with the split's weights set.
fn route_yaml((v1, v2): (u32, u32)) -> String {
    ROUTE_YAML
        .replace("{ name: reviews-v1, weight: 100 }", &format!("{{ name: reviews-v1, weight: {v1} }}"))
        .replace("{ name: reviews-v2, weight: 0 }", &format!("{{ name: reviews-v2, weight: {v2} }}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_files_parse_and_rewrite() {
        use weir_controller::index::{Index, Resource};
        use weir_controller::source::local::parse_file;
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for (services, endpoints) in [(services_yaml(None), 0), (services_yaml(Some((a, a))), 2)] {
            let mut defs = parse_file("services.yaml", &services).unwrap();
            defs.extend(parse_file("route.yaml", &route_yaml((90, 10))).unwrap());
            defs.extend(parse_file("authorization.yaml", AUTHORIZATION_YAML).unwrap());
            let mut index = Index::default();
            index.replace_all(defs, vec![]);
            assert!(index.rejections().is_empty(), "{:?}", index.rejections());
            let mut found = 0;
            for e in index.entries().values() {
                match &e.resource {
                    Resource::Service(s) => found += s.endpoints.iter().filter(|e| e.address == "127.0.0.1:1").count(),
                    Resource::Route(r) => {
                        let w: Vec<u32> = r.rules[1].backend_refs.iter().map(|b| b.weight).collect();
                        assert_eq!(w, [90, 10]);
                    }
                    Resource::ResiliencePolicy(_) | Resource::MeshAuthorization(_) | Resource::Canary(_) => {}
                }
            }
            assert_eq!(found, endpoints);
        }
    }
}
