//! `weir canary`: the state of every Canary, and the manual controls, against the leading
//! controller's admin port (`--controller-admin`, or in Kubernetes the Lease holder's pod
//! through the API server).

use std::time::Duration;

use anyhow::bail;

use crate::admin::Target;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  weir canary status --controller-admin 127.0.0.1:9990
  weir canary status demo/reviews --watch --kube
  weir canary promote reviews -n demo
  weir canary abort demo/reviews")]
pub struct CanaryArgs {
    #[command(subcommand)]
    pub command: CanaryCmd,
    #[command(flatten)]
    pub target: Target,
    /// Namespace of NAME when it has none.
    #[arg(short = 'n', long, global = true, default_value = "default")]
    pub namespace: String,
}

#[derive(clap::Subcommand, Debug)]
pub enum CanaryCmd {
    /// A table of canaries: phase, weight with a progress bar, last analysis.
    Status {
        /// NAMESPACE/NAME or NAME; all canaries when absent.
        name: Option<String>,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// `table` or `json`.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Promote now: all traffic to the canary.
    Promote { name: String },
    /// Roll back now: all traffic to stable.
    Abort { name: String },
    /// Hold the rollout where it is.
    Pause { name: String },
    /// Continue a paused rollout.
    Resume { name: String },
}

pub async fn run(args: CanaryArgs) -> anyhow::Result<()> {
    let qualify = |name: &str| crate::inspect::qualify(name, &args.namespace);
    let (action, name) = match &args.command {
        CanaryCmd::Status { name, watch, output } => {
            return status(&args.target, name.as_deref().map(qualify), *watch, output).await;
        }
        CanaryCmd::Promote { name } => ("promote", qualify(name)),
        CanaryCmd::Abort { name } => ("abort", qualify(name)),
        CanaryCmd::Pause { name } => ("pause", qualify(name)),
        CanaryCmd::Resume { name } => ("resume", qualify(name)),
    };
    if args.target.is_kube() {
        return request_through_the_api(&args.target, action, &name).await;
    }
    let admin = args.target.connect().await?;
    // Only the leader drives canaries (the others answer controls with 409).
    let leader = admin.leader().await?;
    let rsp = admin.call(&leader, http::Method::POST, &format!("/canaries/{name}/{action}")).await?;
    let body = String::from_utf8_lossy(&rsp.body).into_owned();
    if !rsp.status.is_success() {
        bail!("{action} {name}: {}", body.trim());
    }
    let s: serde_json::Value = serde_json::from_str(&body)?;
    println!(
        "{name}: {} at {}% — {}",
        s["phase"].as_str().unwrap_or("?"),
        s["weight"],
        s["message"].as_str().unwrap_or("")
    );
    Ok(())
}

/// The status table (or JSON) of every canary, or of `filter`, redrawn each second with `watch`.
async fn status(
    target: &crate::admin::Target,
    filter: Option<String>,
    watch: bool,
    output: &str,
) -> anyhow::Result<()> {
    let admin = target.connect().await?;
    let leader = admin.leader().await?;
    loop {
        let all = admin.call(&leader, http::Method::GET, "/canaries").await?.json("/canaries")?;
        let list: Vec<serde_json::Value> = all["canaries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| filter.as_ref().is_none_or(|f| key(c) == *f))
            .collect();
        if let Some(f) = &filter
            && list.is_empty()
        {
            bail!("no Canary {f}");
        }
        if output == "json" {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", table(&list));
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// How long `weir canary ACTION --kube` waits for the leader to handle the request.
const REQUEST_WAIT: Duration = Duration::from_secs(30);

/// Kubernetes mode: asks the leading controller for `action` by setting the Canary's
/// `weir.io/request` annotation (a merge patch, so Kubernetes RBAC decides who may: `patch` on
/// `canaries.weir.io`), then waits for the status to say the request was handled.
async fn request_through_the_api(target: &crate::admin::Target, action: &str, name: &str) -> anyhow::Result<()> {
    use weir_api::canary::{Canary, REQUEST_ANNOTATION};
    let (ns, short) = name.split_once('/').unwrap_or(("default", name));
    let client = crate::admin::kube_client(target.kubeconfig.as_ref()).await?;
    let api: kube::Api<Canary> = kube::Api::namespaced(client, ns);
    let nanos = weir_api::rt::since_epoch().as_nanos();
    let request = format!("{action}:{nanos:x}");
    let patch = serde_json::json!({ "metadata": { "annotations": { REQUEST_ANNOTATION: request } } });
    api.patch(short, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.map_err(
        |e| match e {
            kube::Error::Api(s) => anyhow::anyhow!("{action} {name}: {} ({}): {}", s.reason, s.code, s.message),
            other => anyhow::anyhow!("{action} {name}: {other}"),
        },
    )?;
    let deadline = tokio::time::Instant::now() + REQUEST_WAIT;
    loop {
        let canary = api.get(short).await?;
        if let Some(s) = canary.status.as_ref().filter(|s| s.handled_request == request) {
            if let Some(why) = s.request_result.strip_prefix("refused: ") {
                bail!("{action} {name}: refused: {why}");
            }
            println!("{name}: {} at {}% — {}", s.phase.as_str(), s.weight, s.message);
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{action} {name}: asked ({REQUEST_ANNOTATION}={request}) but no controller handled it within {}s: is a weir-controller replica leading?",
                REQUEST_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn key(c: &serde_json::Value) -> String {
    format!("{}/{}", c["namespace"].as_str().unwrap_or(""), c["name"].as_str().unwrap_or(""))
}

/// The status table, one canary per line.
pub fn table(list: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:<29} {:>5}  {:>8} {:>9} {:>8}  {}\n",
        "NAME", "PHASE", "WEIGHT", "STEP", "SUCCESS", "P99", "REQUESTS", "MESSAGE"
    );
    for c in list {
        let s = &c["status"];
        let weight = s["weight"].as_u64().unwrap_or(0);
        let filled = (weight as usize * 20).div_ceil(100).min(20);
        let bar = format!("[{}{}] {weight:>3}%", "#".repeat(filled), ".".repeat(20 - filled));
        let steps = s["steps"].as_array().map(|a| a.len()).unwrap_or(0);
        let step = format!("{}/{steps}", s["step"].as_u64().map(|n| n + 1).unwrap_or(0).min(steps as u64));
        let a = &s["lastAnalysis"]["canary"];
        let success = a["successRate"].as_f64().map(|r| format!("{r:.2}%")).unwrap_or_else(|| "-".into());
        let p99 = a["p99Ms"].as_f64().map(|p| format!("{p:.1}ms")).unwrap_or_else(|| "-".into());
        let requests = a["requests"].as_u64().map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<24} {:<12} {bar:<29} {step:>5}  {success:>8} {p99:>9} {requests:>8}  {}\n",
            key(c),
            s["phase"].as_str().unwrap_or("-"),
            s["message"].as_str().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_shows_phase_weight_and_analysis() {
        let c = serde_json::json!({
            "namespace": "demo", "name": "reviews",
            "status": { "phase": "Progressing", "weight": 25, "step": 1, "steps": [10, 25, 50, 75],
                        "message": "advanced to 25%",
                        "lastAnalysis": { "canary": { "requests": 1200, "successRate": 99.5, "p99Ms": 2.5 } } }
        });
        let t = super::table(&[c]);
        let line = t.lines().nth(1).unwrap();
        assert!(line.starts_with("demo/reviews"), "{t}");
        for part in ["Progressing", "[#####...............]  25%", "2/4", "99.50%", "2.5ms", "1200", "advanced to 25%"]
        {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
    }
}
