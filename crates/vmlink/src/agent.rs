//! `vmlink ping`, `vmlink info`, `vmlink exec`: drive a `vmlink-agent`
//! through `vmlink_agent::client`. TARGET is any connecting address of an
//! agent, e.g. `vsock:3:7878` from the host, `unix:/run/vmlink.sock`.

use std::process::ExitCode;

use crate::target::{Resolved, Target};
use anyhow::bail;
use vmlink_agent::client::Client;
use vmlink_agent::ExecRequest;
use vmlink_proto::text::printable;

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

/// Run a command in a guest through its vmlink-agent, output streamed
///
/// Its stdout and stderr stream back as they are produced, and its exit
/// status is this command's (128+N when a signal N killed it; 124 when
/// --timeout killed it). Ctrl-C (SIGINT) and SIGTERM are forwarded to the
/// command's process group; if this process dies, the agent kills the group.
///
/// With -t the command gets a terminal in the guest (stdout and stderr both
/// arrive on stdout); with -ti from a terminal, the local one is in raw mode
/// while it runs (Ctrl-C goes to the guest) and its size follows yours.
///
/// Examples:
///   vmlink exec vsock:3:7878 -- uname -a
///   vmlink exec vsock:3:7878 --env LANG=C --cwd /var/log -- sh -c 'ls | wc -l'
///   tar c dir | vmlink exec -i vsock:3:7878 -- tar x -C /tmp
///   vmlink exec -ti lab:dev -- bash                 # an interactive shell
///   vmlink exec --user nobody --timeout 30s vsock:3:7878 -- make check
///
/// Over qga+ADDR (a guest running only qemu-guest-agent) the output arrives
/// only when the command has ended (qemu-ga keeps up to 16 MiB per stream),
/// -i reads stdin to EOF first (up to 32 MiB), signals are forwarded with
/// `kill` to the command's own process, and -t, --user, --timeout are
/// refused (qemu-ga has no such thing).
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
    /// Run the command on a terminal (a pty in the guest); TERM is passed on.
    #[arg(short, long)]
    tty: bool,
    /// With -t: the terminal's size, instead of this terminal's (default 24x80).
    #[arg(long, value_name = "ROWSxCOLS", value_parser = crate::session::parse_window, requires = "tty")]
    tty_size: Option<vmlink_proto::agent::WindowSize>,
    /// Run as this guest user (the agent must run as root); HOME, USER, LOGNAME and
    /// SHELL are set from the guest's /etc/passwd.
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
    /// Kill the command's process group after this long (30, 1.5s, 500ms, 5m, 2h)
    /// and exit with status 124, like timeout(1).
    #[arg(long, value_name = "DURATION", value_parser = crate::session::parse_timeout)]
    timeout: Option<std::time::Duration>,
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
        let c = Client::connect(&addr).await?;
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
        let c = Client::connect(&addr).await?;
        let i = c.info().await?;
        if a.json {
            println!("{}", serde_json::to_string(&i)?);
        } else {
            print!("{}", info_text(&i));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `vmlink info`'s human-readable lines. The guest chose these strings: their control
/// characters are escaped, so no escape sequence reaches the terminal.
fn info_text(i: &vmlink_proto::agent::Info) -> String {
    format!(
        "hostname  {}\nos        {}\nkernel    {}\nuptime    {} s\nagent     vmlink-agent {}\nchannels  {}\n",
        printable(&i.hostname),
        printable(&i.os),
        printable(&i.kernel),
        i.uptime_secs,
        printable(&i.agent_version),
        printable(&i.channels.join(", ")),
    )
}

pub fn exec(a: ExecArgs) -> anyhow::Result<ExitCode> {
    if a.cmd.is_empty() {
        bail!("exec needs a command after --");
    }
    let rt = crate::runtime()?;
    let result = rt.block_on(async {
        let addr = match a.target.resolve()? {
            Resolved::Qga(q) => {
                if a.tty || a.user.is_some() || a.timeout.is_some() {
                    bail!(
                        "-t, --user and --timeout need vmlink-agent; qemu-guest-agent \
                         (target {}) cannot honour them",
                        a.target
                    );
                }
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
        let req = ExecRequest {
            argv: a.cmd,
            env: a.env,
            cwd: a.cwd,
            tty: a.tty,
            user: a.user,
            ..ExecRequest::default()
        };
        crate::session::run(crate::session::Session {
            addr,
            req,
            script: None,
            interactive: a.interactive,
            tty_size: a.tty_size,
            timeout: a.timeout,
        })
        .await
    });
    // A read of a terminal stdin (-i) may still be blocked on a thread: exit without waiting
    // for a key press that would end it.
    rt.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlink_proto::agent::Info;

    #[test]
    fn info_escapes_what_the_guest_chose() {
        let hostile = "\u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[2J";
        let i = Info {
            hostname: format!("web-1{hostile}"),
            os: format!("Débian{hostile}"),
            kernel: hostile.into(),
            uptime_secs: 5,
            agent_version: hostile.into(),
            channels: vec![hostile.into(), "vsock-listen:-1:7878".into()],
        };
        let text = info_text(&i);
        assert_eq!(text.lines().count(), 6, "{text}");
        for line in text.lines() {
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
        assert!(text.starts_with("hostname  web-1\\u{1b}]52;"), "{text}");
        assert!(text.contains("os        Débian\\u{1b}"), "{text}");
    }
}
