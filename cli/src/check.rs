//! `weir check`: what a user would otherwise debug by hand, one line each, ✔ or ✘ with the fix.
//! Local mode checks the controller through its admin port; with `--kubeconfig` it also checks
//! that Weir's CRDs are installed at the expected version.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::inspect::{Http, get};

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when every check passes, 1 otherwise.

Examples:
  weir check --controller-admin 127.0.0.1:9990
  weir check --kubeconfig ~/.kube/config")]
pub struct CheckArgs {
    /// The controller's admin address (local mode).
    #[arg(long, env = "WEIR_CONTROLLER_ADMIN", default_value = "127.0.0.1:9990")]
    pub controller_admin: SocketAddr,
    /// Also check the cluster this kubeconfig points at (CRDs installed).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Warn when the trust anchor or issuer expires sooner than this.
    #[arg(long, default_value = "720h", value_parser = |s: &str| weir_api::duration::parse(s).map_err(|e| e.to_string()))]
    pub expiry_warning: Duration,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub check: String,
    /// `ok`, `fail` or `skip`.
    pub result: &'static str,
    pub detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Outcome {
    fn ok(check: &str, detail: String) -> Self {
        Self { check: check.into(), result: "ok", detail, fix: String::new() }
    }
    fn fail(check: &str, detail: String, fix: String) -> Self {
        Self { check: check.into(), result: "fail", detail, fix }
    }
    fn skip(check: &str, detail: String) -> Self {
        Self { check: check.into(), result: "skip", detail, fix: String::new() }
    }
}

/// Runs every check; returns whether all passed.
pub async fn run(args: CheckArgs) -> anyhow::Result<bool> {
    let mut out = Vec::new();
    if let Some(path) = &args.kubeconfig {
        out.extend(crds(path).await);
    }
    out.extend(controller(&args).await);
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for o in &out {
            let mark = match o.result {
                "ok" => "✔",
                "fail" => "✘",
                _ => "–",
            };
            println!("{mark} {}: {}", o.check, o.detail);
            if !o.fix.is_empty() {
                println!("    fix: {}", o.fix);
            }
        }
    }
    Ok(out.iter().all(|o| o.result != "fail"))
}

async fn crds(kubeconfig: &std::path::Path) -> Vec<Outcome> {
    let client = async {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
        anyhow::Ok(kube::Client::try_from(config)?)
    };
    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            return vec![Outcome::fail(
                "kubernetes",
                format!("cannot use kubeconfig {}: {e:#}", kubeconfig.display()),
                "check the file and its current context (kubectl config view)".into(),
            )];
        }
    };
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client);
    let mut out = Vec::new();
    for want in weir_api::crds() {
        let name = want.metadata.name.clone().unwrap_or_default();
        let check = format!("CRD {name}");
        match api.get_opt(&name).await {
            Ok(Some(have)) => {
                let served = have.spec.versions.iter().any(|v| v.name == weir_api::VERSION && v.served);
                if served {
                    out.push(Outcome::ok(&check, format!("installed, {} served", weir_api::VERSION)));
                } else {
                    out.push(Outcome::fail(
                        &check,
                        format!("installed but {} is not served", weir_api::VERSION),
                        "upgrade the CRDs: kubectl apply -f charts/weir/crds/".into(),
                    ));
                }
            }
            Ok(None) => out.push(Outcome::fail(
                &check,
                "missing".into(),
                "install the CRDs: kubectl apply -f charts/weir/crds/ (or install the Helm chart)".into(),
            )),
            Err(e) => out.push(Outcome::fail(
                &check,
                format!("cannot read it: {e}"),
                "check that the API server is reachable and that you may get customresourcedefinitions".into(),
            )),
        }
    }
    out
}

async fn controller(args: &CheckArgs) -> Vec<Outcome> {
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let admin = args.controller_admin;
    let ready = async {
        let rsp = http.get(format!("http://{admin}/ready").parse()?).await?;
        anyhow::Ok(rsp.status().is_success())
    };
    match tokio::time::timeout(Duration::from_secs(5), ready).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            return vec![Outcome::fail(
                "controller",
                format!("reachable at {admin} but not ready"),
                "see its log: it is still loading its configuration or shutting down".into(),
            )];
        }
        Ok(Err(e)) => {
            return vec![Outcome::fail(
                "controller",
                format!("not reachable at {admin}: {e}"),
                "start it (weir-controller --config-dir DIR --admin-addr ADDR) or pass --controller-admin ADDR".into(),
            )];
        }
        Err(_) => {
            return vec![Outcome::fail(
                "controller",
                format!("no answer from {admin} within 5s"),
                "check the address and that the controller is not overloaded".into(),
            )];
        }
    }
    let mut out = vec![Outcome::ok("controller", format!("ready at {admin}"))];
    let resources = match get(&http, admin, "/resources").await {
        Ok(r) => r,
        Err(e) => {
            out.push(Outcome::fail("configuration", format!("cannot read /resources: {e:#}"), String::new()));
            return out;
        }
    };
    let rejected = resources["rejected"].as_array().cloned().unwrap_or_default();
    let in_force = resources["resources"].as_array().map(Vec::len).unwrap_or(0);
    if rejected.is_empty() {
        out.push(Outcome::ok("configuration", format!("{in_force} resources in force, none rejected")));
    } else {
        let first = rejected[0]["error"].as_str().unwrap_or("?");
        out.push(Outcome::fail(
            "configuration",
            format!("{} definition(s) rejected, e.g. {first}", rejected.len()),
            format!("fix the definitions; http://{admin}/resources lists every rejection"),
        ));
    }
    out.push(trust(&http, admin, args.expiry_warning).await);
    let proxies = resources["proxies"].as_array().cloned().unwrap_or_default();
    if proxies.is_empty() {
        out.push(Outcome::fail(
            "sidecars",
            "none connected".into(),
            "start sidecars with --controller pointing at the controller's gRPC address".into(),
        ));
    } else {
        let behind: Vec<String> = proxies
            .iter()
            .filter(|p| crate::inspect::sync_row(p)["status"] != "SYNCED")
            .map(|p| p["workload"].as_str().unwrap_or("?").to_string())
            .collect();
        if behind.is_empty() {
            out.push(Outcome::ok("sidecars", format!("{} connected, all in sync", proxies.len())));
        } else {
            out.push(Outcome::fail(
                "sidecars",
                format!("{} of {} not in sync: {}", behind.len(), proxies.len(), behind.join(", ")),
                "weir proxy-status shows which snapshot each runs and any Nack reason".into(),
            ));
        }
    }
    out
}

async fn trust(http: &Http, admin: SocketAddr, warning: Duration) -> Outcome {
    let text = async {
        let rsp = http.get(format!("http://{admin}/metrics").parse()?).await?;
        use http_body_util::BodyExt;
        anyhow::Ok(String::from_utf8_lossy(&rsp.into_body().collect().await?.to_bytes()).into_owned())
    };
    let Ok(text) = text.await else {
        return Outcome::fail("trust anchor", format!("cannot read http://{admin}/metrics"), String::new());
    };
    let expiry = |cert: &str| {
        let prefix = format!("weir_controller_ca_expiration_timestamp_seconds{{cert=\"{cert}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse::<f64>().ok())
    };
    let (Some(root), Some(issuer)) = (expiry("trust-anchor"), expiry("issuer")) else {
        return Outcome::skip("trust anchor", "identity is off (no --identity-dir): sidecars talk plaintext".into());
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let days = |t: f64| ((t - now) / 86_400.0).floor();
    let soonest = root.min(issuer);
    if soonest - now < warning.as_secs_f64() {
        let which = if root <= issuer { "trust anchor" } else { "issuer" };
        Outcome::fail(
            "trust anchor",
            format!("the {which} expires in {} days", days(soonest)),
            "rotate it: put a new issuer (and anchor) in --identity-dir and restart the controller".into(),
        )
    } else {
        Outcome::ok("trust anchor", format!("valid for {} days (issuer {} days)", days(root), days(issuer)))
    }
}
