//! `weir proxy-config WORKLOAD [routes|endpoints|policies|identity]`: what one sidecar is
//! running, read from its own `/config` (found through the controllers' registries of connected
//! sidecars and reached directly or, in Kubernetes, through its pod's proxy subresource; or
//! asked directly with `--proxy-admin`).

use std::net::SocketAddr;

use anyhow::bail;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::admin::Http;
use crate::admin::{Admin, Target};

pub const SECTIONS: [&str; 5] = ["all", "routes", "endpoints", "policies", "identity"];

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  weir proxy-config demo/productpage
  weir proxy-config productpage -n demo endpoints
  weir proxy-config demo/reviews-v2 policies -o yaml
  weir proxy-config --proxy-admin 127.0.0.1:4191 routes -o json")]
pub struct ProxyConfigArgs {
    /// The sidecar's workload: NAMESPACE/NAME, or NAME with -n (optional with --proxy-admin).
    pub workload: Option<String>,
    /// What to show: all, routes, endpoints, policies or identity.
    #[arg(default_value = "all", value_parser = SECTIONS)]
    pub section: String,
    /// Namespace of a WORKLOAD given without one.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub target: Target,
    /// Ask the sidecar at this admin address directly.
    #[arg(long)]
    pub proxy_admin: Option<SocketAddr>,
    /// `table`, `json` or `yaml`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
    pub output: String,
}

pub async fn run(mut args: ProxyConfigArgs) -> anyhow::Result<()> {
    // `weir proxy-config --proxy-admin ADDR routes`: the lone positional is the section.
    if args.proxy_admin.is_some()
        && args.section == "all"
        && let Some(w) = args.workload.as_deref().filter(|w| SECTIONS.contains(w))
    {
        args.section = w.to_string();
        args.workload = None;
    }
    let (config, which) = match (args.proxy_admin, &args.workload) {
        (Some(a), _) => {
            let http: Http = Client::builder(TokioExecutor::new()).build_http();
            let admin = Admin::Direct { http: Box::new(http), addr: a };
            (
                admin.sidecar_get(&json!({"workload": "the sidecar", "admin": a.to_string()}), "/config").await?,
                a.to_string(),
            )
        }
        (None, None) => bail!("name a WORKLOAD (NAMESPACE/NAME), or give --proxy-admin ADDR"),
        (None, Some(w)) => {
            let workload = crate::inspect::qualify(w, &args.namespace);
            let admin = args.target.connect().await?;
            let proxy = find(&admin, &workload).await?;
            (admin.sidecar_get(&proxy, "/config").await?, workload)
        }
    };
    if config["version"].is_null() {
        bail!("the sidecar of {which} has no configuration from the controller yet");
    }
    let view = section(&config, &args.section);
    match args.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&view)?),
        "yaml" => print!("{}", serde_yaml::to_string(&view)?),
        _ => print!("{}", tables(&config, &args.section)),
    }
    Ok(())
}

/// The one connected sidecar of `workload`, as a controller lists it.
pub(crate) async fn find(admin: &Admin, workload: &str) -> anyhow::Result<Value> {
    let proxies = crate::inspect::connected(admin).await?;
    let matching: Vec<&Value> = proxies.iter().filter(|p| p["workload"] == workload).collect();
    match matching.as_slice() {
        [] => {
            let connected: Vec<&str> = proxies.iter().filter_map(|p| p["workload"].as_str()).collect();
            bail!(
                "no connected sidecar of workload {workload} (connected: {})",
                if connected.is_empty() { "none".to_string() } else { connected.join(", ") }
            )
        }
        [p] => Ok((*p).clone()),
        many => {
            let addrs: Vec<&str> = many.iter().filter_map(|p| p["admin"].as_str()).collect();
            bail!("{} sidecars of workload {workload}: pick one with --proxy-admin ({})", many.len(), addrs.join(", "))
        }
    }
}

fn services(config: &Value) -> Vec<Value> {
    config["snapshot"]["services"].as_array().cloned().unwrap_or_default()
}

fn key(s: &Value) -> String {
    format!("{}/{}", s["namespace"].as_str().unwrap_or(""), s["name"].as_str().unwrap_or(""))
}

/// The structured view of one section (`all`: every section).
pub fn section(config: &Value, which: &str) -> Value {
    let svcs = services(config);
    let routes = || -> Value {
        svcs.iter().map(|s| json!({ "service": key(s), "clusterIPs": s["cluster_ips"], "rules": s["rules"] })).collect()
    };
    let endpoints = || -> Value {
        svcs.iter().map(|s| json!({ "service": key(s), "ports": s["ports"], "endpoints": s["endpoints"] })).collect()
    };
    let policies = || -> Value {
        json!({
            "outbound": svcs.iter().filter(|s| s["policies"].as_array().is_some_and(|p| !p.is_empty()))
                .map(|s| json!({ "service": key(s), "policies": s["policies"] })).collect::<Vec<_>>(),
            "inbound": config["snapshot"]["inbound"],
        })
    };
    let identity = || config["identity"].clone();
    match which {
        "routes" => routes(),
        "endpoints" => endpoints(),
        "policies" => policies(),
        "identity" => identity(),
        _ => json!({
            "version": config["version"], "routes": routes(), "endpoints": endpoints(),
            "policies": policies(), "identity": identity(),
        }),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn string_match(m: &Value) -> String {
    // MatchKind: 1 exact, 2 prefix, 3 regex.
    let op = match m["kind"].as_i64() {
        Some(1) => "=",
        Some(2) => "^",
        Some(3) => "~",
        _ => "?",
    };
    format!("{op}{}", s(&m["value"]))
}

fn describe_match(m: &Value) -> String {
    let mut parts = Vec::new();
    if !m["method"].is_null() && !s(&m["method"]).is_empty() {
        parts.push(s(&m["method"]));
    }
    if m["path"].is_object() {
        parts.push(format!("path{}", string_match(&m["path"])));
    }
    for h in m["headers"].as_array().into_iter().flatten() {
        parts.push(format!("{}{}", s(&h["name"]), string_match(&h["value"])));
    }
    for q in m["query_params"].as_array().into_iter().flatten() {
        parts.push(format!("?{}{}", s(&q["name"]), string_match(&q["value"])));
    }
    if parts.is_empty() { "*".into() } else { parts.join(" ") }
}

/// The human-readable tables of a section.
pub fn tables(config: &Value, which: &str) -> String {
    let svcs = services(config);
    let mut out = String::new();
    let all = which == "all";
    if all {
        out.push_str(&format!("CONFIG VERSION {}\n\n", s(&config["version"])));
    }
    if all || which == "routes" {
        out.push_str(&format!("{:<28} {:<30} {:<28} {:<34} {}\n", "SERVICE", "RULE", "MATCH", "BACKENDS", "TIMEOUT"));
        for svc in &svcs {
            let rules = svc["rules"].as_array().cloned().unwrap_or_default();
            if rules.is_empty() {
                out.push_str(&format!("{:<28} {:<30} {:<28} {:<34} -\n", key(svc), "(default)", "*", "own endpoints"));
            }
            for r in rules {
                let matches: Vec<String> = r["matches"].as_array().into_iter().flatten().map(describe_match).collect();
                let backends: Vec<String> = r["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| format!("{}={}", s(&b["name"]), s(&b["weight"])))
                    .collect();
                let timeout =
                    r["timeout_ms"].as_u64().filter(|t| *t > 0).map(|t| format!("{t}ms")).unwrap_or("-".into());
                out.push_str(&format!(
                    "{:<28} {:<30} {:<28} {:<34} {}\n",
                    key(svc),
                    format!("{}:{}", s(&r["route"]), s(&r["name"])),
                    if matches.is_empty() { "*".into() } else { matches.join(" | ") },
                    backends.join(" "),
                    timeout
                ));
            }
        }
        out.push('\n');
    }
    if all || which == "endpoints" {
        out.push_str(&format!(
            "{:<28} {:<24} {:>5} {:<6} {:<16} {:>6} {}\n",
            "SERVICE", "ADDRESS", "PORT", "MESHED", "IDENTITY", "WEIGHT", "WORKLOAD"
        ));
        for svc in &svcs {
            for e in svc["endpoints"].as_array().into_iter().flatten() {
                let port = e["service_port"].as_u64().filter(|p| *p > 0).map(|p| p.to_string()).unwrap_or("*".into());
                out.push_str(&format!(
                    "{:<28} {:<24} {:>5} {:<6} {:<16} {:>6} {}\n",
                    key(svc),
                    s(&e["address"]),
                    port,
                    if e["meshed"] == true { "yes" } else { "no" },
                    s(&e["identity"]),
                    e["weight"].as_u64().filter(|w| *w > 0).unwrap_or(1),
                    s(&e["workload"])
                ));
            }
        }
        out.push('\n');
    }
    if all || which == "policies" {
        out.push_str(&format!(
            "{:<28} {:<28} {:<12} {:>5} {:>9} {:>9} {:>7} {}\n",
            "SERVICE", "POLICY", "RULE", "PORT", "TIMEOUT", "PER-TRY", "RETRIES", "ALSO"
        ));
        for svc in &svcs {
            for p in svc["policies"].as_array().into_iter().flatten() {
                let ms = |v: &Value| v.as_u64().filter(|t| *t > 0).map(|t| format!("{t}ms")).unwrap_or("-".into());
                let also: Vec<&str> = [
                    ("circuit_breaker", "breaker"),
                    ("outlier_detection", "outliers"),
                    ("bulkhead", "bulkhead"),
                    ("rate_limit", "rate-limit"),
                    ("faults", "faults"),
                    ("health_check", "health-check"),
                ]
                .iter()
                .filter(|(k, _)| p[*k].is_object())
                .map(|(_, n)| *n)
                .collect();
                out.push_str(&format!(
                    "{:<28} {:<28} {:<12} {:>5} {:>9} {:>9} {:>7} {}\n",
                    key(svc),
                    s(&p["name"]),
                    if s(&p["rule"]).is_empty() { "*".into() } else { s(&p["rule"]) },
                    p["port"].as_u64().filter(|p| *p > 0).map(|p| p.to_string()).unwrap_or("*".into()),
                    ms(&p["request_timeout_ms"]),
                    ms(&p["per_try_timeout_ms"]),
                    p["retry"]["retries"].as_u64().map(|a| a.to_string()).unwrap_or("-".into()),
                    also.join(",")
                ));
            }
        }
        let inbound = &config["snapshot"]["inbound"];
        out.push_str(&format!("\n{:<28} {:<8} {:>5} {}\n", "INBOUND AUTHORIZATION", "MODE", "PORT", "RULES"));
        for a in inbound["authorizations"].as_array().into_iter().flatten() {
            let rules: Vec<String> = a["rules"].as_array().into_iter().flatten().map(|r| s(&r["name"])).collect();
            out.push_str(&format!(
                "{:<28} {:<8} {:>5} {}\n",
                s(&a["name"]),
                if a["strict"] == true { "strict" } else { "permissive" },
                a["port"].as_u64().filter(|p| *p > 0).map(|p| p.to_string()).unwrap_or("*".into()),
                rules.join(", ")
            ));
        }
        for l in inbound["rate_limits"].as_array().into_iter().flatten() {
            out.push_str(&format!("inbound rate limit {} for {}\n", s(&l["policy"]), s(&l["service"])));
        }
        out.push('\n');
    }
    if all || which == "identity" {
        let id = &config["identity"];
        match id["spiffeId"].as_str() {
            Some(spiffe) => {
                let expires = id["notAfterUnix"].as_i64().unwrap_or(0);
                let left = expires - weir_api::rt::unix_secs();
                out.push_str(&format!(
                    "IDENTITY {spiffe}\nCERTIFICATE expires in {}s (at unix {expires})\n",
                    left.max(0)
                ));
            }
            None if id.is_null() => out.push_str("IDENTITY none (no --token-file: plaintext between sidecars)\n"),
            None => out.push_str(&format!("IDENTITY pending: {}\n", s(&id["message"]))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Value {
        json!({
            "version": "7",
            "identity": {"spiffeId": "spiffe://cluster.local/ns/shop/sa/web", "notAfterUnix": 4_000_000_000i64, "chainLength": 2},
            "snapshot": {
                "services": [{
                    "namespace": "shop", "name": "reviews", "ports": [80], "cluster_ips": ["10.96.0.20"],
                    "endpoints": [{"address": "127.0.0.1:9081", "service_port": 80, "meshed": true, "identity": "reviews", "weight": 0, "workload": "reviews-1"}],
                    "rules": [{"route": "shop/reviews", "name": "testers", "timeout_ms": 0,
                               "matches": [{"headers": [{"name": "x-tester", "value": {"kind": 1, "value": "true"}}]}],
                               "backends": [{"namespace": "shop", "name": "reviews-v2", "weight": 1}]}],
                    "policies": [{"name": "shop/reviews", "rule": "", "port": 0, "request_timeout_ms": 2000, "per_try_timeout_ms": 500,
                                  "retry": {"retries": 2}, "circuit_breaker": {"consecutive_failures": 5}}]
                }],
                "inbound": {"rate_limits": [], "authorizations": [{"name": "shop/web", "strict": true, "port": 0, "rules": [{"name": "frontend"}]}]}
            }
        })
    }

    #[test]
    fn tables_show_each_section() {
        let c = config();
        let routes = tables(&c, "routes");
        assert!(routes.contains("shop/reviews:testers"), "{routes}");
        assert!(routes.contains("x-tester=true"), "{routes}");
        assert!(routes.contains("reviews-v2=1"), "{routes}");
        let eps = tables(&c, "endpoints");
        assert!(eps.contains("127.0.0.1:9081") && eps.contains("reviews-1") && eps.contains(" yes "), "{eps}");
        let pol = tables(&c, "policies");
        assert!(pol.contains("2000ms") && pol.contains("500ms") && pol.contains("breaker"), "{pol}");
        assert!(pol.contains("shop/web") && pol.contains("strict") && pol.contains("frontend"), "{pol}");
        assert!(tables(&c, "identity").contains("spiffe://cluster.local/ns/shop/sa/web"));
        assert!(tables(&c, "all").starts_with("CONFIG VERSION 7"));
    }

    #[test]
    fn sections_are_structured() {
        let c = config();
        assert_eq!(section(&c, "endpoints")[0]["endpoints"][0]["address"], "127.0.0.1:9081");
        assert_eq!(section(&c, "routes")[0]["clusterIPs"][0], "10.96.0.20");
        assert_eq!(section(&c, "policies")["inbound"]["authorizations"][0]["name"], "shop/web");
        assert_eq!(section(&c, "identity")["chainLength"], 2);
        assert_eq!(section(&c, "all")["version"], "7");
    }
}
