use clap::Parser;

fn main() -> std::process::ExitCode {
    match weir_controller::main_with(weir_controller::Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
