//! `weir analyze`: what the controller would reject or warn about, before anything is applied.

use std::path::PathBuf;

use weir_controller::analyze::Severity;

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// Files and directories of resources (multi-document YAML). A directory is read as the
    /// controller reads its config directory; Kubernetes manifests of other kinds are skipped,
    /// and core `v1` Services count as the Services routes may refer to.
    #[arg(required_unless_present = "kube")]
    pub paths: Vec<PathBuf>,
    /// Analyze the resources in the cluster instead (the current kubeconfig context).
    #[arg(long, conflicts_with = "paths")]
    pub kube: bool,
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With --kube: only these namespaces (repeatable; default every namespace).
    #[arg(long = "namespace", short = 'n')]
    pub namespaces: Vec<String>,
    /// Fail (exit 1) on warnings too, not only on errors.
    #[arg(long)]
    pub strict: bool,
    /// `text` or `json`.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// Prints the findings; returns whether the resources pass (no error, and with `--strict` no
/// warning).
pub async fn run(args: AnalyzeArgs) -> anyhow::Result<bool> {
    let (findings, read) = if args.kube {
        weir_controller::analyze::analyze_cluster(args.kubeconfig.as_deref(), &args.namespaces).await?
    } else {
        weir_controller::analyze::analyze_paths(&args.paths)?
    };
    let errors = findings.iter().filter(|f| f.severity == Severity::Error).count();
    let warnings = findings.len() - errors;
    if args.output == "json" {
        let out =
            serde_json::json!({ "resources": read, "errors": errors, "warnings": warnings, "findings": findings });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for f in &findings {
            println!("{f}");
        }
        println!("{read} resources: {errors} errors, {warnings} warnings");
    }
    Ok(errors == 0 && !(args.strict && warnings > 0))
}
