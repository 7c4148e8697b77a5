use clap::Parser;

fn main() -> std::process::ExitCode {
    match weir_proxy::main_with(weir_proxy::Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
