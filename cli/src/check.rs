//! `weir check`: what a user would otherwise debug by hand, one line each, ✔ or ✘ with the fix.
//! The controllers through their admin ports (directly, or every replica through the API
//! server); with a cluster (`--kubeconfig`, `--kube`) also Weir's CRDs at the expected version
//! and the injection webhook's configuration and CA bundle.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::admin::{Admin, Target};

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when every check passes, 1 otherwise.

Examples:
  weir check --controller-admin 127.0.0.1:9990
  weir check --kube
  weir check --kubeconfig ~/.kube/config --controller-admin 127.0.0.1:9990")]
pub struct CheckArgs {
    #[command(flatten)]
    pub target: Target,
    /// Warn when the trust anchor or issuer expires sooner than this.
    #[arg(long, default_value = "720h", value_parser = weir_api::duration::flag)]
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
    if args.target.kubeconfig.is_some() || args.target.kube {
        out.extend(cluster(&args).await);
    }
    match args.target.connect().await {
        Ok(admin) => out.extend(controllers(&args, &admin).await),
        Err(e) => out.push(Outcome::fail(
            "controller",
            format!("{e:#}"),
            "check the kubeconfig and that you may reach the API server".into(),
        )),
    }
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

/// What only the cluster shows: Weir's CRDs and the injection webhook's configuration.
async fn cluster(args: &CheckArgs) -> Vec<Outcome> {
    let client = match crate::admin::kube_client(args.target.kubeconfig.as_ref()).await {
        Ok(c) => c,
        Err(e) => {
            return vec![Outcome::fail(
                "kubernetes",
                format!("cannot use the kubeconfig: {e:#}"),
                "check the file and its current context (kubectl config view)".into(),
            )];
        }
    };
    let mut out = crds(&client).await;
    out.push(webhook(&client, &args.target.weir_namespace, args.expiry_warning).await);
    out
}

/// The chart's MutatingWebhookConfiguration: present, pointing at the Weir namespace's
/// webhook Service, with a CA bundle that is a certificate valid for a while yet.
async fn webhook(client: &kube::Client, namespace: &str, warning: Duration) -> Outcome {
    const NAME: &str = "weir-sidecar-injector";
    let check = "injection webhook";
    let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client.clone());
    let config = match api.get_opt(NAME).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return Outcome::fail(
                check,
                format!("no MutatingWebhookConfiguration {NAME}: pods are not injected at creation"),
                "install the chart with webhook.enabled=true, or add sidecars with weir inject".into(),
            );
        }
        Err(e) => {
            return Outcome::fail(
                check,
                format!("cannot read MutatingWebhookConfiguration {NAME}: {e}"),
                "check that you may get mutatingwebhookconfigurations".into(),
            );
        }
    };
    let hooks = config.webhooks.unwrap_or_default();
    if hooks.is_empty() {
        return Outcome::fail(check, format!("{NAME} has no webhooks"), "reinstall the chart".into());
    }
    let now = weir_api::rt::unix_secs();
    let mut soonest = i64::MAX;
    for h in &hooks {
        let svc = h.client_config.service.as_ref();
        if svc.is_none_or(|s| s.namespace != namespace) {
            return Outcome::fail(
                check,
                format!("{} does not call a Service in {namespace}", h.name),
                format!("reinstall the chart in {namespace}, or pass --weir-namespace"),
            );
        }
        let Some(bundle) = h.client_config.ca_bundle.as_ref() else {
            return Outcome::fail(check, format!("{} has no caBundle", h.name), "reinstall the chart".into());
        };
        match not_after(&bundle.0) {
            Ok(t) => soonest = soonest.min(t),
            Err(e) => {
                return Outcome::fail(
                    check,
                    format!("{}: the caBundle is not a certificate: {e}", h.name),
                    "reinstall the chart (it generates the bundle with the serving certificate)".into(),
                );
            }
        }
    }
    let days = (soonest - now) / 86_400;
    if soonest <= now {
        Outcome::fail(
            check,
            "the webhook's CA has expired: the API server refuses to call it".into(),
            format!("delete the Secret {namespace}/weir-webhook-tls and run helm upgrade (a new one is generated)"),
        )
    } else if ((soonest - now) as u64) < warning.as_secs() {
        Outcome::fail(
            check,
            format!("the webhook's CA expires in {days} days"),
            format!("delete the Secret {namespace}/weir-webhook-tls and run helm upgrade (a new one is generated)"),
        )
    } else {
        Outcome::ok(check, format!("{} entries, CA bundle valid for {days} days", hooks.len()))
    }
}

/// The earliest expiry (Unix seconds) of the PEM certificates in `pem`.
fn not_after(pem: &[u8]) -> Result<i64, String> {
    let mut soonest = None;
    for p in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let p = p.map_err(|e| e.to_string())?;
        let cert = p.parse_x509().map_err(|e| e.to_string())?;
        let t = cert.validity().not_after.timestamp();
        soonest = Some(soonest.map_or(t, |s: i64| s.min(t)));
    }
    soonest.ok_or_else(|| "no PEM certificate in it".to_string())
}

async fn crds(client: &kube::Client) -> Vec<Outcome> {
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
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

/// Every controller replica ready, then what the first ready one says about the
/// configuration and the trust anchor, and every replica's sidecars.
async fn controllers(args: &CheckArgs, admin: &Admin) -> Vec<Outcome> {
    let replicas = match admin.replicas().await {
        Ok(r) => r,
        Err(e) => {
            let ns = &args.target.weir_namespace;
            return vec![Outcome::fail(
                "controller",
                format!("{e:#}"),
                format!(
                    "kubectl -n {ns} get deploy,pods -l app.kubernetes.io/name=weir; kubectl -n {ns} logs deploy/weir-controller"
                ),
            )];
        }
    };
    let direct = matches!(admin, Admin::Direct { .. });
    let mut out = Vec::new();
    let mut ready = Vec::new();
    for r in &replicas {
        let check = if direct { "controller".to_string() } else { format!("controller {r}") };
        let where_ = if direct { format!("at {r}") } else { "(through the API server)".to_string() };
        match tokio::time::timeout(Duration::from_secs(5), admin.call(r, http::Method::GET, "/ready")).await {
            Ok(Ok(a)) if a.status.is_success() => {
                out.push(Outcome::ok(&check, format!("ready {where_}")));
                ready.push(r.clone());
            }
            Ok(Ok(_)) => out.push(Outcome::fail(
                &check,
                format!("reachable {where_} but not ready"),
                "see its log: it is still loading its configuration or shutting down".into(),
            )),
            Ok(Err(e)) if direct => out.push(Outcome::fail(
                &check,
                format!("not reachable at {r}: {e:#}"),
                "start it (weir-controller --config-dir DIR --admin-addr ADDR) or pass --controller-admin ADDR".into(),
            )),
            Ok(Err(e)) => out.push(Outcome::fail(
                &check,
                format!("not reachable {where_}: {e:#}"),
                "check that you may get pods/proxy in the Weir namespace".into(),
            )),
            Err(_) => out.push(Outcome::fail(
                &check,
                format!("no answer {where_} within 5s"),
                "check the address and that the controller is not overloaded".into(),
            )),
        }
    }
    let Some(first) = ready.first() else { return out };
    let resources = match admin.call(first, http::Method::GET, "/resources").await.and_then(|a| a.json("/resources")) {
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
        let first_error = rejected[0]["error"].as_str().unwrap_or("?");
        out.push(Outcome::fail(
            "configuration",
            format!("{} definition(s) rejected, e.g. {first_error}", rejected.len()),
            "fix the definitions; the admin port's /resources lists every rejection".into(),
        ));
    }
    out.push(trust(admin, first, args.expiry_warning).await);
    let proxies = match crate::inspect::connected(admin).await {
        Ok(p) => p,
        Err(e) => {
            out.push(Outcome::fail("sidecars", format!("cannot list them: {e:#}"), String::new()));
            return out;
        }
    };
    if proxies.is_empty() {
        out.push(Outcome::fail(
            "sidecars",
            "none connected".into(),
            if direct {
                "start sidecars with --controller pointing at the controller's gRPC address".into()
            } else {
                "label a namespace weir.io/inject=enabled and restart its workloads".into()
            },
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

async fn trust(admin: &Admin, replica: &str, warning: Duration) -> Outcome {
    let text = match admin.call(replica, http::Method::GET, "/metrics").await {
        Ok(a) if a.status.is_success() => String::from_utf8_lossy(&a.body).into_owned(),
        _ => return Outcome::fail("trust anchor", format!("cannot read {replica}'s /metrics"), String::new()),
    };
    let expiry = |cert: &str| {
        let prefix = format!("weir_controller_ca_expiration_timestamp_seconds{{cert=\"{cert}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse::<f64>().ok())
    };
    let (Some(root), Some(issuer)) = (expiry("trust-anchor"), expiry("issuer")) else {
        return Outcome::skip("trust anchor", "identity is off (no --identity-dir): sidecars talk plaintext".into());
    };
    let now = weir_api::rt::since_epoch().as_secs_f64();
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
