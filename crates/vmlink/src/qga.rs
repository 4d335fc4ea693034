//! `vmlink qga TARGET COMMAND [JSON-ARGS]`: one raw qemu-guest-agent command.
//!
//! Works against a stock qemu-ga and against `vmlink-agent --qga` alike. The session is the
//! one libvirt uses (`crate::qga_target::Session`): first a resynchronisation (0xFF, then `guest-sync-delimited` with a
//! random id; everything up to the 0xFF that prefixes the matching answer is discarded, which
//! clears stale output left on a virtio-serial port), then the command, then one answer line.
//! Commands that do not answer on success (`guest-shutdown`) are not waited for.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args as ClapArgs;
use serde_json::Value;
use vmlink_proto::qga::Response;
use vmlink_proto::text::printable;
use vmlink_transport::Addr;

/// Send one raw qemu-guest-agent command (qemu-ga or vmlink-agent --qga); print its return
///
/// Sends the command to the agent at ADDR and prints its "return" as one line
/// of JSON. An error answer is printed on stderr and exits 1.
///
/// Examples:
///
///   vmlink qga unix:/var/lib/libvirt/qemu/channel/target/domain-1-vm/org.qemu.guest_agent.0 guest-info
///
///   vmlink qga unix:/tmp/qga.sock guest-exec '{"path":"/bin/uname","arg":["-a"],"capture-output":true}'
#[derive(Debug, ClapArgs)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The agent's address (QEMU's chardev socket on the host, or any transport address).
    #[arg(value_parser = crate::parse_addr)]
    target: Addr,
    /// The command, e.g. guest-ping, guest-info, guest-exec.
    command: String,
    /// The command's arguments, one JSON object.
    json_args: Option<String>,
    /// Give up waiting for an answer after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let arguments = match &args.json_args {
        None => None,
        Some(text) => {
            let v: Value = serde_json::from_str(text)
                .with_context(|| format!("JSON-ARGS is not valid JSON: {text}"))?;
            if !v.is_object() {
                bail!("JSON-ARGS must be a JSON object, not {text}");
            }
            Some(v)
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    crate::runtime()?.block_on(async {
        let answer = tokio::time::timeout(timeout, session(&args, arguments.as_ref()))
            .await
            .map_err(|_| anyhow!("{}: no answer within {}s", args.target, args.timeout))??;
        match answer {
            None => Ok(ExitCode::SUCCESS),
            Some(Response::Return(v)) => {
                println!("{v}");
                Ok(ExitCode::SUCCESS)
            }
            Some(Response::Error(e)) => {
                eprintln!(
                    "vmlink: {}: {}: {}",
                    args.target,
                    printable(&e.class),
                    printable(&e.desc)
                );
                Ok(ExitCode::from(1))
            }
        }
    })
}

async fn session(args: &Args, arguments: Option<&Value>) -> anyhow::Result<Option<Response>> {
    let mut s = crate::qga_target::Session::connect(&args.target).await?;
    if args.command == "guest-shutdown" {
        s.send(&args.command, arguments).await?;
        return Ok(None);
    }
    Ok(Some(s.call_response(&args.command, arguments).await?))
}
