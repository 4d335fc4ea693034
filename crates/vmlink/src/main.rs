//! `vmlink`: the host CLI. This file only parses flags, sets up logging and
//! hands over to one module per verb; the work is in the library crates.
//!
//! Exit codes (documented in `--help` and the README):
//! 0 success; 1 a runtime error (refused, timed out, dead peer, I/O);
//! 2 a usage error (bad flag or bad address); `lab run` passes the guest
//! command's status through (124 timeout, 125 the guest failed).

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod agent;
mod bench;
mod bridge;
mod capture;
mod cp;
mod demo;
mod lab;
mod lab_up;
mod logs;
mod qga;
mod qga_target;
mod relay;
mod run;
mod session;
mod target;

const AFTER_HELP: &str = "\
ADDRESSES (docs/addresses.md):
  vsock:CID:PORT            vsock-listen:[CID:]PORT
  vsock-seqpacket:CID:PORT  vsock-seqpacket-listen:[CID:]PORT
  vsock-dgram:CID:PORT      vsock-dgram-listen:[CID:]PORT
  unix:PATH                 unix-listen:PATH
  unix-abstract:NAME        unix-abstract-listen:NAME
  hvsock:UDS_PATH:PORT      hvsock-listen:UDS_PATH:PORT
  vport:NAME_OR_PATH        tcp:HOST:PORT    tcp-listen:[HOST:]PORT
  stdio (or -)
  CID: a number, any, hypervisor (0), local (1), host (2).
  Options after commas: connect-timeout=5s buffer-size=1M
  buffer-min-size=SIZE buffer-max-size=SIZE backlog=N unlink

EXIT STATUS: 0 ok; 1 runtime error (refused, timeout, dead peer);
2 usage error or bad address; exec, run: the command's status (128+N for
signal N, 124 after --timeout); lab run: the command's status (124
timeout, 125 guest failure).
Logs go to stderr; RUST_LOG=debug (or info, trace) shows more.";

/// Fast host<->guest channels: relay, benchmark, drive a guest agent, and
/// test it all on a real guest.
#[derive(Parser, Debug)]
#[command(name = "vmlink", version, about, after_help = AFTER_HELP, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    // The help (with examples) of these is on their argument structs.
    Relay(relay::Args),
    /// Measure throughput and round-trip latency over any address.
    #[command(subcommand)]
    Bench(bench::Cmd),
    /// Boot throwaway QEMU guests with every channel wired.
    #[command(subcommand)]
    Lab(lab::Cmd),
    /// Check that a vmlink-agent answers, and how fast.
    Ping(agent::PingArgs),
    /// Show a guest's hostname, OS, kernel, uptime and agent version.
    Info(agent::InfoArgs),
    // The help (with examples) is on the argument structs.
    Exec(agent::ExecArgs),
    Cp(cp::Args),
    Run(run::Args),
    Logs(logs::Args),
    Qga(qga::Args),
    Capture(capture::Args),
    SerialBridge(bridge::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a lab supervisor's stderr is its log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Relay(a) => relay::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Lab(c) => lab::run(c),
        Command::Ping(a) => agent::ping(a),
        Command::Info(a) => agent::info(a),
        Command::Exec(a) => agent::exec(a),
        Command::Cp(a) => cp::run(a),
        Command::Run(a) => run::run(a),
        Command::Logs(a) => logs::run(a),
        Command::Qga(a) => qga::run(a),
        Command::SerialBridge(a) => bridge::run(a),
        Command::Capture(a) => capture::run(a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vmlink", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmlink: error: {}", chain(&e));
            if let Some(n) = e.downcast_ref::<session::NotStarted>() {
                ExitCode::from(n.status)
            } else if e.downcast_ref::<vmlink_transport::AddrError>().is_some()
                || matches!(
                    e.downcast_ref::<vmlink_transport::Error>(),
                    Some(vmlink_transport::Error::Addr(_))
                )
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// One line: the error and its causes, `: `-separated.
fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        // thiserror's `transparent` and anyhow's context can repeat a message.
        if parts.last() != Some(&s) {
            parts.push(s);
        }
    }
    // A guest's text can reach an error by a path that does not escape it (a context, a
    // library's message): no control character but the newline reaches the terminal.
    parts
        .join(": ")
        .split('\n')
        .map(vmlink_proto::text::printable)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses an address for clap, so a bad one is a usage error (exit 2) that
/// names the wrong part.
pub(crate) fn parse_addr(s: &str) -> Result<vmlink_transport::Addr, String> {
    s.parse::<vmlink_transport::Addr>()
        .map_err(|e| e.to_string())
}

/// Runs `f` on a fresh runtime and then drops the runtime without waiting for blocking tasks
/// (a virtio-serial open that waits for its host side can block forever).
pub(crate) fn block_on_detached<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = runtime()?;
    let out = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    Ok(out)
}

/// A tokio runtime for one verb.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_keeps_newlines_and_escapes_other_controls() {
        let e = anyhow::anyhow!("guest said \u{1b}]0;pwned\u{7}\u{9b}2J\ttab")
            .context("line one\nline two");
        let shown = chain(&e);
        assert_eq!(
            shown,
            r"line one
line two: guest said \u{1b}]0;pwned\u{7}\u{9b}2J\ttab"
        );
    }
}
