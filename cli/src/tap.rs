//! `weir tap WORKLOAD`: the requests one sidecar handles, live, as its `/tap` streams them
//! (filtered, sampled and rate-limited inside the sidecar; see `weir_proxy::tap`). Never a
//! header value or a body: method, authority, path, status, latency, identities, route and
//! backend.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::admin::{Admin, Http, Target};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  weir tap demo/productpage
  weir tap reviews-v1 -n demo --direction inbound --status 5xx
  weir tap --proxy-admin 127.0.0.1:4191 --path /api --max 10 -o json

Taps answer only loopback clients: in Kubernetes the sidecar is reached the way `kubectl
port-forward` reaches it, so RBAC (create on pods/portforward) decides who may tap.")]
pub struct TapArgs {
    /// The sidecar's workload: NAMESPACE/NAME, or NAME with -n (optional with --proxy-admin).
    pub workload: Option<String>,
    /// Namespace of a WORKLOAD given without one.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub target: Target,
    /// Tap the sidecar at this admin address directly.
    #[arg(long)]
    pub proxy_admin: Option<SocketAddr>,
    /// Only `inbound` or `outbound` requests.
    #[arg(long, value_parser = ["inbound", "outbound"])]
    pub direction: Option<String>,
    /// Only requests to this Service (NAMESPACE/NAME) or authority.
    #[arg(long)]
    pub service: Option<String>,
    /// Only paths under this prefix.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only this status class: 2xx, 3xx, 4xx or 5xx.
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many events per second (the sidecar drops the rest).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Stop after this many events.
    #[arg(long)]
    pub max: Option<u64>,
    /// Stop after this long (e.g. `30s`).
    #[arg(long, value_parser = weir_api::duration::flag)]
    pub duration: Option<Duration>,
    /// `text` or `json` (one JSON object per line).
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

pub async fn run(args: TapArgs) -> anyhow::Result<()> {
    let (admin, proxy) = match (args.proxy_admin, &args.workload) {
        (Some(a), _) => {
            let http: Http = Client::builder(TokioExecutor::new()).build_http();
            (
                Admin::Direct { http: Box::new(http), addr: a },
                json!({"workload": "the sidecar", "admin": a.to_string()}),
            )
        }
        (None, None) => bail!("name a WORKLOAD (NAMESPACE/NAME), or give --proxy-admin ADDR"),
        (None, Some(w)) => {
            let workload = crate::inspect::qualify(w, &args.namespace);
            let admin = args.target.connect().await?;
            let proxy = crate::proxy_config::find(&admin, &workload).await?;
            (admin, proxy)
        }
    };
    let mut query = vec![format!("rate={}", args.rate)];
    let filters = [
        ("direction", &args.direction),
        ("service", &args.service),
        ("path", &args.path),
        ("method", &args.method),
        ("status", &args.status),
    ];
    for (k, v) in filters {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(v)));
        }
    }
    let path = format!("/tap?{}", query.join("&"));
    let mut seen = 0u64;
    let json_out = args.output == "json";
    let tap = admin.sidecar_stream(&proxy, &path, |line| {
        if json_out {
            println!("{}", String::from_utf8_lossy(line));
        } else if let Ok(e) = serde_json::from_slice::<Value>(line) {
            println!("{}", describe(&e));
        }
        seen += 1;
        args.max.is_none_or(|max| seen < max)
    });
    match args.duration {
        Some(d) => match tokio::time::timeout(d, tap).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        },
        None => tap.await,
    }
}

/// One event as a line: direction, method, authority and path, status, latency, where it went
/// and who asked.
fn describe(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    let mut line = format!(
        "{:<8} {:<6} {}{}  {}  {:.1}ms",
        s("direction"),
        s("method"),
        s("authority"),
        s("path"),
        e["status"],
        e["latencyMs"].as_f64().unwrap_or(0.0)
    );
    if !s("backend").is_empty() {
        let route = s("route");
        line.push_str(&format!("  {} -> {}", if route.is_empty() { s("service") } else { route }, s("backend")));
    }
    if !s("clientIdentity").is_empty() {
        line.push_str(&format!("  from {}", s("clientIdentity")));
    }
    line.push_str(&format!("  id={}", s("requestId")));
    line
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
