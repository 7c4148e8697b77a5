use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "weir", version, about = "Weir service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the whole mesh on loopback (no Kubernetes) and shift traffic between two versions.
    Demo(weir::demo::DemoArgs),
    /// Canary rollouts: status (with --watch), promote, abort, pause, resume.
    Canary(weir::canary::CanaryArgs),
    /// What the controller would reject or warn about in files, directories or a cluster, before anything is applied.
    Analyze(weir::analyze::AnalyzeArgs),
    /// Check the installation: controller, configuration, trust anchor, sidecars, CRDs.
    Check(weir::check::CheckArgs),
    /// Every connected sidecar and whether it runs the latest snapshot (SYNCED, STALE, NACKED).
    ProxyStatus(weir::inspect::ProxyStatusArgs),
    /// Add the sidecar to workload manifests (Deployments, StatefulSets, DaemonSets, Jobs, Pods, …).
    Inject(weir::inject::InjectArgs),
    /// What one sidecar runs: its routes, endpoints, policies and identity (from its /config).
    ProxyConfig(weir::proxy_config::ProxyConfigArgs),
    /// Success rate, request rate and latency per service, route and backend, from the sidecars' reports.
    Stat(weir::inspect::StatArgs),
    /// The service graph: who calls which Service, as which identity, over mTLS or not.
    Edges(weir::inspect::EdgesArgs),
    /// The requests one sidecar handles, live (filtered and rate-limited inside the sidecar).
    Tap(weir::tap::TapArgs),
    /// Print a shell completion script: `weir completions bash > /etc/bash_completion.d/weir`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// A test application that can fail a share of requests or add latency.
    DemoBackend(BackendArgs),
    /// Run the controller (same as `weir-controller`).
    #[command(hide = true)]
    Controller(weir_controller::Args),
    /// Run the sidecar (same as `weir-proxy`).
    #[command(hide = true)]
    Proxy(weir_proxy::Args),
}

#[derive(clap::Args, Debug)]
struct BackendArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Name returned in the body and the `x-weir-backend` header.
    #[arg(long, default_value = "backend")]
    name: String,
    /// Share of requests answered with 500 (0.0–1.0).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Added latency per request, e.g. `20ms`.
    #[arg(long, default_value = "0ms", value_parser = weir_api::duration::flag)]
    latency: Duration,
    /// Print the bound address as one JSON line on stdout.
    #[arg(long)]
    print_listen_addrs: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Controller(args) => weir_controller::main_with(args),
        Cmd::Proxy(args) => weir_proxy::main_with(args),
        Cmd::Demo(args) => runtime().and_then(|rt| rt.block_on(weir::demo::run(args))),
        Cmd::Canary(args) => runtime().and_then(|rt| rt.block_on(weir::canary::run(args))),
        Cmd::ProxyStatus(args) => match runtime().and_then(|rt| rt.block_on(weir::inspect::proxy_status(args))) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::from(weir::inspect::NOT_SYNCED),
            Err(e) => Err(e),
        },
        Cmd::Analyze(args) => match runtime().and_then(|rt| rt.block_on(weir::analyze::run(args))) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Cmd::Check(args) => match runtime().and_then(|rt| rt.block_on(weir::check::run(args))) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Cmd::Stat(args) => runtime().and_then(|rt| rt.block_on(weir::inspect::stat(args))),
        Cmd::Edges(args) => runtime().and_then(|rt| rt.block_on(weir::inspect::edges(args))),
        Cmd::Tap(args) => runtime().and_then(|rt| rt.block_on(weir::tap::run(args))),
        Cmd::Inject(args) => weir::inject::run(args),
        Cmd::ProxyConfig(args) => runtime().and_then(|rt| rt.block_on(weir::proxy_config::run(args))),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "weir", &mut std::io::stdout());
            Ok(())
        }
        Cmd::DemoBackend(args) => runtime().and_then(|rt| rt.block_on(backend(args))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn backend(args: BackendArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        anyhow::bail!("--fail-rate must be between 0 and 1, got {}", args.fail_rate);
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    if args.print_listen_addrs {
        println!("{}", serde_json::json!({ "listen": listener.local_addr()? }));
    }
    let behaviour = weir::backend::Behaviour::new(&args.name, args.fail_rate, args.latency);
    weir::backend::serve(listener, behaviour, weir_api::rt::shutdown_signal()).await;
    Ok(())
}
