//! `fleetctl`: argument parsing and exit codes only; see `fleet_server::fleetctl`.

use clap::Parser as _;

fn main() {
    let cli = fleet_server::fleetctl::Cli::parse();
    if let Err(e) = fleet_server::fleetctl::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(fleet_server::fleetctl::exit_code(&e));
    }
}
