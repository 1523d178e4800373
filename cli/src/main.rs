//! `relayctl`: the operator's CLI for relay's control plane.
//!
//! This crate owns the command line (accounts, API keys, groups, prices,
//! settings, data planes, audit log, usage, admin tokens, config version), its
//! output formats (table, JSON, CSV) and the exact money/time parsing behind
//! it. It talks only to the control plane's `relay.v1.Admin` gRPC service,
//! authenticating every call with `authorization: Bearer <admin token>`.
//! Secrets (upstream credentials, tokens) are read from files or stdin, never
//! from arguments, and never appear in errors.

mod args;
mod client;
mod commands;
mod output;
mod parse;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Usage errors print themselves (with a tip where a common slip is recognized) and exit with 2.
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `args_os`: an argument that is not UTF-8 is clap's usage error, not a panic here.
            let argv: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
            if let Some(tip) = args::parse_error_tip(&e, &argv) {
                let _ = e.print();
                eprintln!("\n  tip: {tip}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `relayctl ... | head` closing the pipe early is not a failure.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
