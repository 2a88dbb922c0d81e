//! `fleetctl`: argument parsing and exit codes only; see `fleetctl::cli`.

use clap::Parser as _;

fn main() {
    // The packer loads, converts and times models with tract.
    #[allow(unsafe_code)]
    // SAFETY: first thing in `main`, while the process has one thread.
    unsafe {
        edgefleet_runtime::quiet_error_backtraces();
    }
    edgefleet_runtime::keep_kernels_in_bounds();
    let cli = fleetctl::cli::Cli::parse();
    if let Err(e) = fleetctl::cli::run(cli) {
        eprintln!("error: {}", fleetctl::cli::clean(&e.to_string()));
        std::process::exit(fleetctl::cli::exit_code(&e));
    }
}
