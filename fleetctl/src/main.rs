//! `fleetctl`: argument parsing and exit codes only; see `fleetctl::cli`.

use clap::Parser as _;

fn main() {
    let cli = fleetctl::cli::Cli::parse();
    if let Err(e) = fleetctl::cli::run(cli) {
        eprintln!("error: {}", fleetctl::cli::clean(&e.to_string()));
        std::process::exit(fleetctl::cli::exit_code(&e));
    }
}
