//! The `reprovm` binary: parse arguments, set up logging, run, exit with the
//! code of the CLI contract.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // QEMU runs `reprovm egress-relay SOCKET` for each guest connection to
    // the egress proxy: an internal entry point, not a user command, with
    // no runtime and no logging (its standard error is the guest's socket).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let [_, command, socket] = argv.as_slice() {
        if command == reprovm::vm::relay::RELAY_COMMAND {
            return match reprovm::vm::relay::relay(std::path::Path::new(socket)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(reprovm::Exit::Failed.code()),
            };
        }
    }
    let args = reprovm::cli::Args::parse();
    reprovm::terminal::set_quiet(args.quiet);
    reprovm::cli::init_logging(args.verbose, args.quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(reprovm::Exit::Usage.code());
        }
    };
    let code = runtime.block_on(reprovm::cli::execute(args));
    // After an interrupt, blocking stages (archiving, mkfs, extraction) see
    // the signal, stop and remove their files; SSH threads end as their
    // connection closes with QEMU. Give them that time, not forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    if let Ok(usage) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        // QEMU and other children are not included (scripts/bench reads this).
        tracing::debug!("peak memory of reprovm itself: {} KiB", usage.max_rss());
    }
    ExitCode::from(code)
}
