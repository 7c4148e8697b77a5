//! `weir inject FILE|-`: adds the sidecar to workload manifests offline, with the same code as
//! the admission webhook. Documents that are not workloads pass through unchanged.

use std::io::Read;

use anyhow::{Context, bail};
use serde::Deserialize;
use weir_controller::inject::{Settings, Skipped, inject_manifest};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  weir inject deployment.yaml | kubectl apply -f -
  kubectl get deploy web -o yaml | weir inject - | kubectl apply -f -
  weir inject --proxy-image registry.example/weir-proxy:0.1.0 manifests.yaml")]
pub struct InjectArgs {
    /// A YAML file (several documents, or a `List`), or `-` for standard input.
    pub file: String,
    /// The proxy image.
    #[arg(long, env = "WEIR_PROXY_IMAGE", default_value_t = Settings::default().proxy_image)]
    pub proxy_image: String,
    /// Where sidecars reach the controller.
    #[arg(long, env = "WEIR_CONTROLLER_ADDR", default_value_t = Settings::default().controller_addr)]
    pub controller_addr: String,
    /// Audience of the projected ServiceAccount token.
    #[arg(long, default_value = "weir")]
    pub token_audience: String,
    /// A Secret for pulling the proxy image (repeat, or separate with commas).
    #[arg(long = "proxy-image-pull-secret", value_delimiter = ',')]
    pub proxy_image_pull_secrets: Vec<String>,
    /// The mesh's trust anchors (PEM bundle) the sidecars verify the controller with: the
    /// chart's ConfigMap, `kubectl -n weir-system get configmap weir-trust-anchors -o
    /// jsonpath='{.data.ca-bundle\.crt}'`.
    #[arg(long)]
    pub trust_anchors: std::path::PathBuf,
    /// The controller's identity, NAMESPACE/SERVICEACCOUNT.
    #[arg(long, default_value_t = Settings::default().controller_identity)]
    pub controller_identity: String,
}

/// The injected manifests as YAML, and one line per workload saying what happened.
pub fn inject_text(text: &str, settings: &Settings) -> anyhow::Result<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut report = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut value =
            serde_json::Value::deserialize(doc).with_context(|| format!("document {}: invalid YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        let mut targets: Vec<&mut serde_json::Value> = match value["kind"].as_str() {
            Some("List") => value["items"].as_array_mut().map(|a| a.iter_mut().collect()).unwrap_or_default(),
            _ => vec![&mut value],
        };
        for t in targets.iter_mut() {
            let what = format!(
                "{}/{}",
                t["kind"].as_str().unwrap_or("?").to_lowercase(),
                t["metadata"]["name"].as_str().unwrap_or("?")
            );
            match inject_manifest(t, settings) {
                Ok(None) => {}
                Ok(Some(Ok(()))) => report.push(format!("{what}: injected")),
                Ok(Some(Err(Skipped::OptedOut))) => report.push(format!("{what}: skipped (weir.io/inject: disabled)")),
                Ok(Some(Err(Skipped::AlreadyInjected))) => report.push(format!("{what}: already injected")),
                Ok(Some(Err(Skipped::HostNetwork))) => report.push(format!("{what}: skipped (hostNetwork)")),
                Err(e) => bail!("document {}: {what}: {e}", i + 1),
            }
        }
        out.push(serde_yaml::to_string(&value)?);
    }
    Ok((out.join("---\n"), report))
}

/// The anchors file, checked to hold at least one PEM certificate.
fn read_anchors(path: &std::path::Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading --trust-anchors {}", path.display()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!("--trust-anchors {}: no PEM certificate in it", path.display());
    }
    Ok(pem)
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let text = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let settings = Settings {
        proxy_image: args.proxy_image,
        controller_addr: args.controller_addr,
        token_audience: args.token_audience,
        image_pull_secrets: args.proxy_image_pull_secrets,
        trust_anchors_pem: read_anchors(&args.trust_anchors)?,
        controller_identity: args.controller_identity,
        // Pods ask for span export with their `weir.io/trace-*` annotations.
        tracing: Default::default(),
    };
    let (yaml, report) = inject_text(&text, &settings)?;
    print!("{yaml}");
    for line in report {
        eprintln!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_injected_and_the_rest_passes_through() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\n\
                    apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: app, image: web}]}\n---\n\
                    apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p, annotations: {weir.io/inject: disabled}}, spec: {containers: [{name: a}]}}\n";
        let (yaml, report) = inject_text(text, &Settings::default()).unwrap();
        assert_eq!(report, ["deployment/web: injected", "pod/p: skipped (weir.io/inject: disabled)"]);
        let docs: Vec<serde_json::Value> =
            serde_yaml::Deserializer::from_str(&yaml).map(|d| serde_json::Value::deserialize(d).unwrap()).collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["spec"]["ports"][0]["port"], 80);
        assert_eq!(docs[1]["spec"]["template"]["spec"]["initContainers"][1]["name"], "weir-proxy");
        // Running it again changes nothing.
        let (again, report) = inject_text(&yaml, &Settings::default()).unwrap();
        assert_eq!(again, yaml);
        assert_eq!(report[0], "deployment/web: already injected");
        let e = inject_text("kind: Deployment\nmetadata: {name: x}\nspec: {}\n", &Settings::default()).unwrap_err();
        assert!(e.to_string().contains("document 1: deployment/x: spec.template"), "{e}");
    }
}
