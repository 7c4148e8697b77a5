//! `weir proxy-status` and `weir stat`: what a local-mode controller knows about its sidecars
//! (which snapshot each runs) and their traffic (aggregated from their reports). No Prometheus
//! server is needed. Kubernetes support arrives with the Kubernetes source.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

/// Exit code when some sidecar is not in sync (`proxy-status`).
pub const NOT_SYNCED: u8 = 3;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status: 0 when every sidecar runs the latest snapshot, 3 when some is STALE or NACKED, 1 on errors.

Examples:
  weir proxy-status --controller-admin 127.0.0.1:9990
  weir proxy-status -o json"
)]
pub struct ProxyStatusArgs {
    /// The controller's admin address (local mode).
    #[arg(long, env = "WEIR_CONTROLLER_ADMIN", default_value = "127.0.0.1:9990")]
    pub controller_admin: SocketAddr,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  weir stat --controller-admin 127.0.0.1:9990
  weir stat reviews -n demo --window 5s
  weir stat -o json")]
pub struct StatArgs {
    /// Only this Service (NAMESPACE/NAME or NAME).
    pub service: Option<String>,
    /// Namespace of a SERVICE given without one.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The controller's admin address (local mode).
    #[arg(long, env = "WEIR_CONTROLLER_ADMIN", default_value = "127.0.0.1:9990")]
    pub controller_admin: SocketAddr,
    /// How long to watch for the request rate.
    #[arg(long, default_value = "2s", value_parser = |s: &str| weir_api::duration::parse(s).map_err(|e| e.to_string()))]
    pub window: Duration,
    /// `inbound`, `outbound` or `all`.
    #[arg(long, default_value = "outbound", value_parser = ["inbound", "outbound", "all"])]
    pub direction: String,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

pub(crate) type Http = Client<HttpConnector, Empty<Bytes>>;

/// `NAMESPACE/NAME` from a name given with or without its namespace.
pub(crate) fn qualify(name: &str, namespace: &str) -> String {
    if name.contains('/') { name.to_string() } else { format!("{namespace}/{name}") }
}

/// GETs a JSON document from the controller's admin port.
pub(crate) async fn get(http: &Http, admin: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    get_from(http, admin, path, "the controller's admin port").await
}

/// GETs a JSON document from `what` at `addr`.
pub(crate) async fn get_from(
    http: &Http,
    addr: SocketAddr,
    path: &str,
    what: &str,
) -> anyhow::Result<serde_json::Value> {
    let rsp = http
        .get(format!("http://{addr}{path}").parse()?)
        .await
        .with_context(|| format!("reaching {what} at {addr}"))?;
    if !rsp.status().is_success() {
        bail!("{addr}{path}: {}", rsp.status());
    }
    Ok(serde_json::from_slice(&rsp.into_body().collect().await?.to_bytes())?)
}

/// Prints the table (or JSON); returns whether every sidecar is in sync.
pub async fn proxy_status(args: ProxyStatusArgs) -> anyhow::Result<bool> {
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let r = get(&http, args.controller_admin, "/resources").await?;
    let rows: Vec<serde_json::Value> =
        r["proxies"].as_array().cloned().unwrap_or_default().iter().map(sync_row).collect();
    let all_synced = rows.iter().all(|r| r["status"] == "SYNCED");
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "generation": r["generation"], "proxies": rows }))?
        );
    } else {
        print!("{}", proxy_table(&rows));
    }
    Ok(all_synced)
}

/// SYNCED: acked what was sent; STALE: a sent snapshot not acked yet; NACKED: the last one was
/// refused (with the sidecar's reason).
pub(crate) fn sync_row(p: &serde_json::Value) -> serde_json::Value {
    let sent = p["sentVersion"].as_str().unwrap_or("");
    let acked = p["ackedVersion"].as_str().unwrap_or("");
    let (status, detail) = if let Some(n) = p["nack"].as_object() {
        ("NACKED", format!("version {}: {}", n["version"].as_str().unwrap_or("?"), n["reason"].as_str().unwrap_or("")))
    } else if sent.is_empty() || sent != acked {
        ("STALE", format!("waiting for an ack of version {}", if sent.is_empty() { "-" } else { sent }))
    } else {
        ("SYNCED", String::new())
    };
    serde_json::json!({
        "workload": p["workload"], "proxyVersion": p["proxyVersion"], "sent": sent, "acked": acked,
        "status": status, "detail": detail,
    })
}

fn proxy_table(rows: &[serde_json::Value]) -> String {
    let mut out =
        format!("{:<28} {:<8} {:>6} {:>6}  {:<7} {}\n", "WORKLOAD", "PROXY", "SENT", "ACKED", "STATUS", "DETAIL");
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:<8} {:>6} {:>6}  {:<7} {}\n",
            r["workload"].as_str().unwrap_or(""),
            r["proxyVersion"].as_str().unwrap_or(""),
            r["sent"].as_str().unwrap_or(""),
            r["acked"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or("")
        ));
    }
    out
}

pub async fn stat(args: StatArgs) -> anyhow::Result<()> {
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let admin = args.controller_admin;
    let service = args.service.as_deref().map(|s| qualify(s, &args.namespace));
    let keep = |s: &serde_json::Value| {
        (args.direction == "all" || s["direction"] == args.direction.as_str())
            && service.as_ref().is_none_or(|want| s["service"] == want.as_str())
    };
    let first = get(&http, admin, "/stats").await?;
    tokio::time::sleep(args.window).await;
    let second = get(&http, admin, "/stats").await?;
    let key = |s: &serde_json::Value| format!("{}|{}|{}|{}", s["direction"], s["service"], s["route"], s["backend"]);
    let before: std::collections::HashMap<String, u64> = first["series"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (key(s), s["requests"].as_u64().unwrap_or(0)))
        .collect();
    let rows: Vec<serde_json::Value> = second["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| keep(s))
        .map(|s| {
            let now = s["requests"].as_u64().unwrap_or(0);
            let rps = now.saturating_sub(before.get(&key(s)).copied().unwrap_or(0)) as f64 / args.window.as_secs_f64();
            let ms = |k: &str| s[k].as_f64().map(|v| v * 1000.0);
            serde_json::json!({
                "direction": s["direction"], "service": s["service"], "route": s["route"], "backend": s["backend"],
                "requests": now, "failures": s["failures"], "successRate": s["successRate"].as_f64().map(|r| r * 100.0),
                "rps": rps, "p50Ms": ms("p50Seconds"), "p95Ms": ms("p95Seconds"), "p99Ms": ms("p99Seconds"),
            })
        })
        .collect();
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    print!("{}", stat_table(&rows));
    Ok(())
}

fn stat_table(rows: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<9} {:<22} {:<26} {:<22} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}\n",
        "DIRECTION", "SERVICE", "ROUTE", "BACKEND", "SUCCESS", "RPS", "REQUESTS", "P50", "P95", "P99"
    );
    let ms = |v: &serde_json::Value| v.as_f64().map(|m| format!("{m:.1}ms")).unwrap_or_else(|| "-".into());
    for r in rows {
        let route = r["route"].as_str().filter(|r| !r.is_empty()).unwrap_or("-");
        out.push_str(&format!(
            "{:<9} {:<22} {:<26} {:<22} {:>8} {:>8.1} {:>8} {:>9} {:>9} {:>9}\n",
            r["direction"].as_str().unwrap_or(""),
            r["service"].as_str().unwrap_or(""),
            route,
            r["backend"].as_str().unwrap_or(""),
            r["successRate"].as_f64().map(|s| format!("{s:.2}%")).unwrap_or_else(|| "-".into()),
            r["rps"].as_f64().unwrap_or(0.0),
            r["requests"],
            ms(&r["p50Ms"]),
            ms(&r["p95Ms"]),
            ms(&r["p99Ms"]),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_states() {
        let synced = serde_json::json!({"workload": "a/b", "sentVersion": "7", "ackedVersion": "7", "nack": null});
        assert_eq!(sync_row(&synced)["status"], "SYNCED");
        let stale = serde_json::json!({"workload": "a/b", "sentVersion": "8", "ackedVersion": "7", "nack": null});
        assert_eq!(sync_row(&stale)["status"], "STALE");
        let nacked = serde_json::json!({"sentVersion": "8", "ackedVersion": "7", "nack": {"version": "8", "reason": "bad regex"}});
        let r = sync_row(&nacked);
        assert_eq!((r["status"].as_str(), r["detail"].as_str()), (Some("NACKED"), Some("version 8: bad regex")));
        assert!(proxy_table(&[r]).contains("NACKED  version 8: bad regex"));
    }
}
