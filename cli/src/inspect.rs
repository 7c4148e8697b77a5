//! `weir proxy-status`, `weir stat` and `weir edges`: what the controllers know about their
//! sidecars (which snapshot each runs), their traffic (aggregated from their reports) and who
//! calls whom (the same reports, per calling workload). No Prometheus server
//! is needed. In Kubernetes every controller replica is asked, each for the sidecars connected
//! to it, and the answers are merged.

use std::time::Duration;

use std::collections::BTreeMap;

use weir_controller::reports::Totals;

use crate::admin::{Admin, Target};

/// Exit code when some sidecar is not in sync (`proxy-status`).
pub const NOT_SYNCED: u8 = 3;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status: 0 when every sidecar runs the latest snapshot, 3 when some is STALE or NACKED, 1 on errors.

Examples:
  weir proxy-status --controller-admin 127.0.0.1:9990
  weir proxy-status --kube
  weir proxy-status -o json"
)]
pub struct ProxyStatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  weir stat --controller-admin 127.0.0.1:9990
  weir stat reviews -n demo --window 5s --kube
  weir stat --from productpage -n demo
  weir stat -o json")]
pub struct StatArgs {
    /// Only this Service (NAMESPACE/NAME or NAME).
    pub service: Option<String>,
    /// Namespace of a SERVICE or WORKLOAD given without one.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Only the calls this workload made (NAMESPACE/NAME or NAME): its outbound traffic.
    #[arg(long, value_name = "WORKLOAD", conflicts_with = "direction")]
    pub from: Option<String>,
    #[command(flatten)]
    pub target: Target,
    /// How long to watch for the request rate.
    #[arg(long, default_value = "2s", value_parser = weir_api::duration::flag)]
    pub window: Duration,
    /// `inbound`, `outbound` or `all`.
    #[arg(long, default_value = "outbound", value_parser = ["inbound", "outbound", "all"])]
    pub direction: String,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// `NAMESPACE/NAME` from a name given with or without its namespace.
pub(crate) fn qualify(name: &str, namespace: &str) -> String {
    if name.contains('/') { name.to_string() } else { format!("{namespace}/{name}") }
}

/// Every connected sidecar, as each controller replica lists it in `/resources`, with the
/// replica it is connected to (`controller`).
pub(crate) async fn connected(admin: &Admin) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for (replica, r) in admin.get_all("/resources").await? {
        for mut p in r["proxies"].as_array().cloned().unwrap_or_default() {
            p["controller"] = replica.clone().into();
            out.push(p);
        }
    }
    Ok(out)
}

/// Prints the table (or JSON); returns whether every sidecar is in sync.
pub async fn proxy_status(args: ProxyStatusArgs) -> anyhow::Result<bool> {
    let admin = args.target.connect().await?;
    let rows: Vec<serde_json::Value> = connected(&admin).await?.iter().map(sync_row).collect();
    let all_synced = rows.iter().all(|r| r["status"] == "SYNCED");
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "proxies": rows }))?);
    } else {
        print!("{}", proxy_table(&rows, args.target.is_kube()));
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
        "workload": p["workload"], "controller": p["controller"], "proxyVersion": p["proxyVersion"],
        "sent": sent, "acked": acked, "status": status, "detail": detail,
    })
}

/// The table; with the CONTROLLER column (the replica each sidecar is connected to) when
/// there may be several.
fn proxy_table(rows: &[serde_json::Value], replicas: bool) -> String {
    let controller = |c: &str| if replicas { format!("{c:<32} ") } else { String::new() };
    let mut out = format!(
        "{:<28} {}{:<8} {:>6} {:>6}  {:<7} {}\n",
        "WORKLOAD",
        controller("CONTROLLER"),
        "PROXY",
        "SENT",
        "ACKED",
        "STATUS",
        "DETAIL"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<28} {}{:<8} {:>6} {:>6}  {:<7} {}\n",
            r["workload"].as_str().unwrap_or(""),
            controller(r["controller"].as_str().unwrap_or("")),
            r["proxyVersion"].as_str().unwrap_or(""),
            r["sent"].as_str().unwrap_or(""),
            r["acked"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or("")
        ));
    }
    out
}

/// The traffic series of every replica's `/stats`, summed per direction, service, route and
/// backend (each sidecar reports to the one replica it is connected to).
/// Direction, service, route, backend.
type SeriesKey = (String, String, String, String);

async fn stats(admin: &Admin, from: Option<&str>) -> anyhow::Result<BTreeMap<SeriesKey, Totals>> {
    let mut out: BTreeMap<_, Totals> = BTreeMap::new();
    match from {
        None => {
            for (_, doc) in admin.get_all("/stats").await? {
                for s in doc["series"].as_array().into_iter().flatten() {
                    let text = |k: &str| s[k].as_str().unwrap_or("").to_string();
                    let key = (text("direction"), text("service"), text("route"), text("backend"));
                    out.entry(key).or_default().add(&totals(s));
                }
            }
        }
        // One caller's calls: its edges of the service graph.
        Some(caller) => {
            for e in edge_rows(admin).await?.iter().filter(|e| e["caller"] == caller) {
                let text = |k: &str| e[k].as_str().unwrap_or("").to_string();
                let key = ("outbound".to_string(), text("service"), text("route"), text("backend"));
                out.entry(key).or_default().add(&totals(e));
            }
        }
    }
    Ok(out)
}

/// The counts of one `/stats` series or `/edges` row.
fn totals(s: &serde_json::Value) -> Totals {
    Totals {
        requests: s["requests"].as_u64().unwrap_or(0),
        failures: s["failures"].as_u64().unwrap_or(0),
        bounds: s["latencyBoundsSeconds"].as_array().into_iter().flatten().filter_map(|v| v.as_f64()).collect(),
        counts: s["latencyCounts"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect(),
    }
}

/// Every replica's `/edges` rows (each sidecar reports to the replica it is connected to).
async fn edge_rows(admin: &Admin) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    for (_, doc) in admin.get_all("/edges").await? {
        rows.extend(doc["edges"].as_array().into_iter().flatten().cloned());
    }
    Ok(rows)
}

pub async fn stat(args: StatArgs) -> anyhow::Result<()> {
    let admin = args.target.connect().await?;
    let service = args.service.as_deref().map(|s| qualify(s, &args.namespace));
    let from = args.from.as_deref().map(|w| qualify(w, &args.namespace));
    let keep = |(direction, svc, _, _): &SeriesKey| {
        (args.direction == "all" || *direction == args.direction) && service.as_ref().is_none_or(|want| svc == want)
    };
    let first = stats(&admin, from.as_deref()).await?;
    tokio::time::sleep(args.window).await;
    let second = stats(&admin, from.as_deref()).await?;
    let rows: Vec<serde_json::Value> = second
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, t)| {
            let before = first.get(k).map(|b| b.requests).unwrap_or(0);
            let rps = t.requests.saturating_sub(before) as f64 / args.window.as_secs_f64();
            let ms = |q: f64| t.quantile(q).map(|v| v * 1000.0);
            let success = (t.requests > 0).then(|| 100.0 * (1.0 - t.failures as f64 / t.requests as f64));
            let (direction, service, route, backend) = k;
            serde_json::json!({
                "direction": direction, "service": service, "route": route, "backend": backend,
                "requests": t.requests, "failures": t.failures, "successRate": success,
                "rps": rps, "p50Ms": ms(0.5), "p95Ms": ms(0.95), "p99Ms": ms(0.99),
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

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  weir edges --controller-admin 127.0.0.1:9990
  weir edges demo --kube
  weir edges -o json")]
pub struct EdgesArgs {
    /// Only edges from or to this namespace.
    pub namespace: Option<String>,
    #[command(flatten)]
    pub target: Target,
    /// How long to watch for the request rate.
    #[arg(long, default_value = "2s", value_parser = weir_api::duration::flag)]
    pub window: Duration,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// Caller, its identity, the Service called.
type EdgeKey = (String, String, String);

/// Every edge of the service graph, summed over routes and backends: (totals, mTLS requests).
async fn edges_by_caller(admin: &Admin) -> anyhow::Result<BTreeMap<EdgeKey, (Totals, u64)>> {
    let mut out: BTreeMap<EdgeKey, (Totals, u64)> = BTreeMap::new();
    for e in edge_rows(admin).await? {
        let text = |k: &str| e[k].as_str().unwrap_or("").to_string();
        let entry = out.entry((text("caller"), text("identity"), text("service"))).or_default();
        entry.0.add(&totals(&e));
        entry.1 += e["mtlsRequests"].as_u64().unwrap_or(0);
    }
    Ok(out)
}

/// `weir edges`: who calls which Service, as which identity, over mTLS or not.
pub async fn edges(args: EdgesArgs) -> anyhow::Result<()> {
    let admin = args.target.connect().await?;
    let in_namespace =
        |name: &str| args.namespace.as_ref().is_none_or(|ns| name.split('/').next() == Some(ns.as_str()));
    let first = edges_by_caller(&admin).await?;
    tokio::time::sleep(args.window).await;
    let second = edges_by_caller(&admin).await?;
    let rows: Vec<serde_json::Value> = second
        .iter()
        .filter(|((caller, _, service), _)| in_namespace(caller) || in_namespace(service))
        .map(|((caller, identity, service), (t, mtls))| {
            let before =
                first.get(&(caller.clone(), identity.clone(), service.clone())).map(|b| b.0.requests).unwrap_or(0);
            serde_json::json!({
                "from": caller, "to": service, "identity": identity,
                "requests": t.requests, "failures": t.failures, "mtlsRequests": mtls,
                "successRate": (t.requests > 0).then(|| 100.0 * (1.0 - t.failures as f64 / t.requests as f64)),
                "rps": t.requests.saturating_sub(before) as f64 / args.window.as_secs_f64(),
                "p99Ms": t.quantile(0.99).map(|v| v * 1000.0),
            })
        })
        .collect();
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    print!("{}", edges_table(&rows));
    Ok(())
}

fn edges_table(rows: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<26} {:<26} {:<48} {:>5} {:>8} {:>8} {:>8} {:>9}\n",
        "FROM", "TO", "IDENTITY", "MTLS", "SUCCESS", "RPS", "REQUESTS", "P99"
    );
    for r in rows {
        let requests = r["requests"].as_u64().unwrap_or(0);
        let mtls = r["mtlsRequests"].as_u64().unwrap_or(0);
        // All, none, or the share that was (a caller whose endpoints are partly meshed).
        let mtls = match (mtls, requests) {
            (_, 0) => "-".to_string(),
            (m, n) if m == n => "yes".into(),
            (0, _) => "no".into(),
            (m, n) => format!("{}%", m * 100 / n),
        };
        let identity = r["identity"].as_str().filter(|i| !i.is_empty()).unwrap_or("-");
        out.push_str(&format!(
            "{:<26} {:<26} {:<48} {:>5} {:>8} {:>8.1} {:>8} {:>9}\n",
            r["from"].as_str().unwrap_or(""),
            r["to"].as_str().unwrap_or(""),
            identity,
            mtls,
            r["successRate"].as_f64().map(|s| format!("{s:.2}%")).unwrap_or_else(|| "-".into()),
            r["rps"].as_f64().unwrap_or(0.0),
            requests,
            r["p99Ms"].as_f64().map(|m| format!("{m:.1}ms")).unwrap_or_else(|| "-".into()),
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
        assert!(proxy_table(&[r], false).contains("NACKED  version 8: bad regex"));
    }
}
