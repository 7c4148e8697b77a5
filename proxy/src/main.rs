use clap::Parser;

/// `weir-proxy init`: the interception rules (a separate command line from the sidecar's).
#[derive(Parser)]
#[command(
    name = "weir-proxy init",
    version,
    about = "Write the iptables rules that send a pod's TCP traffic through its sidecar"
)]
struct InitCli {
    #[command(flatten)]
    init: weir_proxy::init::InitArgs,
}

fn main() -> std::process::ExitCode {
    let result = if std::env::args().nth(1).as_deref() == Some("init") {
        let cli = InitCli::parse_from(std::env::args().skip(1));
        weir_proxy::init::run(&cli.init)
    } else {
        weir_proxy::main_with(weir_proxy::Args::parse())
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
