//! `vmlink ping`, `vmlink info`, `vmlink exec`: drive a `vmlink-agent`
//! through `vmlink_agent::client`. TARGET is any connecting address of an
//! agent, e.g. `vsock:3:7878` from the host, `unix:/run/vmlink.sock`.

use std::process::ExitCode;

use crate::target::{Resolved, Target};
use anyhow::{bail, Context};
use vmlink_agent::client::{signal_channel, Client};
use vmlink_agent::ExecRequest;

#[derive(clap::Args, Debug)]
pub struct PingArgs {
    /// The agent: an address (vsock:3:7878, unix:PATH, hvsock:UDS:PORT), lab:NAME, or qga+ADDR.
    #[arg(value_parser = crate::target::parse_target)]
    target: Target,
    /// Ping this many times (one connection each), printing each round trip.
    #[arg(short, long, default_value_t = 1)]
    count: u32,
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// The agent: an address (vsock:3:7878, unix:PATH, hvsock:UDS:PORT), lab:NAME, or qga+ADDR.
    #[arg(value_parser = crate::target::parse_target)]
    target: Target,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Run a command in the guest; its stdout and stderr stream back as they
/// are produced, and its exit status is this command's (128+N when a signal
/// N killed it). Ctrl-C (SIGINT) and SIGTERM are forwarded to the command's
/// process group; if this process dies, the agent kills the group.
///
/// Examples:
///   vmlink exec vsock:3:7878 -- uname -a
///   vmlink exec vsock:3:7878 --env LANG=C --cwd /var/log -- sh -c 'ls | wc -l'
///   tar c dir | vmlink exec -i vsock:3:7878 -- tar x -C /tmp
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ExecArgs {
    /// The agent: an address (vsock:3:7878, unix:PATH, hvsock:UDS:PORT), lab:NAME, or qga+ADDR.
    #[arg(value_parser = crate::target::parse_target)]
    target: Target,
    /// Set an environment variable for the command (repeatable).
    #[arg(long, value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Forward this process's stdin, EOF included (otherwise /dev/null).
    #[arg(short, long)]
    interactive: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not K=V")),
    }
}

pub fn ping(a: PingArgs) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(async {
        let addr = match a.target.resolve()? {
            Resolved::Qga(q) => return crate::qga_target::ping(&q, a.count).await,
            r => r.agent("ping")?,
        };
        let c = Client::connect(&addr)
            .await
            .with_context(|| format!("agent at {}", a.target))?;
        for _ in 0..a.count.max(1) {
            let rtt = c.ping().await?;
            println!("pong from {}: {:.2} ms", a.target, rtt.as_secs_f64() * 1e3);
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(async {
        let addr = match a.target.resolve()? {
            Resolved::Qga(q) => return crate::qga_target::info(&q, a.json).await,
            r => r.agent("info")?,
        };
        let c = Client::connect(&addr)
            .await
            .with_context(|| format!("agent at {}", a.target))?;
        let i = c.info().await?;
        if a.json {
            println!("{}", serde_json::to_string(&i)?);
        } else {
            println!("hostname  {}", i.hostname);
            println!("os        {}", i.os);
            println!("kernel    {}", i.kernel);
            println!("uptime    {} s", i.uptime_secs);
            println!("agent     vmlink-agent {}", i.agent_version);
            println!("channels  {}", i.channels.join(", "));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn exec(a: ExecArgs) -> anyhow::Result<ExitCode> {
    if a.cmd.is_empty() {
        bail!("exec needs a command after --");
    }
    crate::runtime()?.block_on(async {
        let addr = match a.target.resolve()? {
            Resolved::Qga(q) => {
                let spec = crate::qga_target::ExecSpec {
                    argv: a.cmd,
                    env: a.env,
                    cwd: a.cwd,
                    stdin: a.interactive,
                };
                return crate::qga_target::exec(&q, spec).await;
            }
            r => r.agent("exec")?,
        };
        let c = Client::connect(&addr)
            .await
            .with_context(|| format!("agent at {}", a.target))?;
        let (tx, signals) = signal_channel();
        // Forward SIGINT and SIGTERM to the guest command instead of dying.
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            loop {
                let signo = tokio::select! {
                    _ = int.recv() => libc::SIGINT,
                    _ = term.recv() => libc::SIGTERM,
                };
                if !tx.send(signo) {
                    return;
                }
            }
        });
        let req = ExecRequest {
            argv: a.cmd,
            env: a.env,
            cwd: a.cwd,
            ..ExecRequest::default()
        };
        let stdin = a.interactive.then(tokio::io::stdin);
        let exit = c
            .exec_with_signals(
                req,
                stdin,
                tokio::io::stdout(),
                tokio::io::stderr(),
                signals,
            )
            .await?;
        Ok(ExitCode::from(exit.shell_status().clamp(0, 255) as u8))
    })
}
