//! `vmlink-agent`: the guest agent. A thin shell over [`vmlink_agent::run`].

use anyhow::Context;
use clap::Parser;
use vmlink_agent::{
    parse_allow_cids, Policy, SerialPorts, DEFAULT_CTL_PORT, DEFAULT_LISTEN, DEFAULT_MAX_SESSIONS,
};
use vmlink_transport::{Addr, AsyncListener, Endpoint};

/// The vmlink guest agent: answers ping, info, exec and cp from the host over vsock,
/// virtio-serial, or any listening address of vmlink's transport.
///
/// With no --listen it serves vsock port 7878 (when the guest has vsock) and the
/// virtio-serial ports org.vmlink.ctl + org.vmlink.data (when the guest has them).
/// A `vport:NAME` address serves many connections multiplexed over that port; a port
/// named like it with `ctl` replaced by `data` carries the bulk data (docs/serial-mux.md).
///
/// Examples:
///
///   vmlink-agent                                  # defaults above, host (CID 2) only
///
///   vmlink-agent --listen vport:org.vmlink.ctl    # virtio-serial only
///
///   vmlink-agent --listen vsock-listen:7878 --listen unix-listen:/run/vmlink-agent.sock
///
///   vmlink-agent --allow-cid 1                    # also serve clients in this guest (vsock_loopback)
///
///   vmlink-agent --allow-exec systemctl,journalctl --read-only   # a narrow, read-only agent
///
///   vmlink-agent --no-exec                        # ping, info, cp and logs only
///
/// Requests the exec rules forbid get an error of kind "refused" naming the rule. Program rules
/// match the file a request would run (bare names are looked up in the agent's PATH), so
/// --allow-exec ls does not allow /tmp/ls. A deny list is a guard rail, not a boundary: an
/// allowed shell or interpreter can run anything. See docs/agent-protocol.md.
#[derive(Debug, Parser)]
#[command(name = "vmlink-agent", version, verbatim_doc_comment)]
struct Args {
    /// An address to listen on, or vport:NAME for a virtio-serial port; repeatable.
    /// Default: vsock-listen:any:7878 and vport:org.vmlink.ctl, each when present.
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<Addr>,
    /// A vsock CID that may connect (a number, host, local, or any); repeatable.
    /// Default: 2 (the host). Unix sockets are protected by their file permissions instead.
    #[arg(long = "allow-cid", value_name = "CID")]
    allow_cid: Vec<String>,
    /// How many connections are served at once; more get a "busy" error.
    #[arg(long, default_value_t = DEFAULT_MAX_SESSIONS, value_name = "N")]
    max_sessions: usize,
    /// Also serve qemu-guest-agent's JSON protocol on ADDR (default: the virtio-serial port
    /// org.qemu.guest_agent.0, as libvirt and Proxmox wire it). See docs/qga-compat.md.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = vmlink_agent::DEFAULT_QGA_ADDR)]
    qga: Option<Addr>,
    /// With --qga: enable only these commands (comma-separated), as qemu-ga's --allow-rpcs.
    #[arg(long, value_name = "LIST")]
    allow_rpcs: Option<String>,
    /// With --qga: disable these commands (comma-separated), as qemu-ga's --block-rpcs.
    #[arg(long, value_name = "LIST")]
    block_rpcs: Option<String>,
    /// Allow exec of only these programs (comma-separated names or absolute paths;
    /// repeatable). Scripts (vmlink run) are then refused.
    #[arg(long, value_name = "PROG,...")]
    allow_exec: Vec<String>,
    /// Refuse exec of these programs (comma-separated names or absolute paths; repeatable).
    #[arg(long, value_name = "PROG,...")]
    deny_exec: Vec<String>,
    /// Refuse every exec and script (vmlink exec, vmlink run).
    #[arg(long)]
    no_exec: bool,
    /// Refuse copies into the guest (vmlink cp to the guest); reading stays allowed.
    #[arg(long)]
    read_only: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.allow_exec.is_empty()
        && args
            .allow_exec
            .iter()
            .all(|l| vmlink_agent::parse_program_list(l).is_empty())
    {
        use clap::CommandFactory;
        Args::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--allow-exec needs at least one program (use --no-exec to refuse all)",
            )
            .exit();
    }
    if let Err(e) = real_main(args) {
        eprintln!("vmlink-agent: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let allow_cids = parse_allow_cids(&args.allow_cid).map_err(anyhow::Error::msg)?;
    let list = |v: &[String]| -> Vec<String> {
        v.iter()
            .flat_map(|s| vmlink_agent::parse_program_list(s))
            .collect()
    };
    let allow = list(&args.allow_exec);
    let policy = Policy {
        allow_cids,
        max_sessions: args.max_sessions,
        exec: vmlink_agent::ExecPolicy {
            no_exec: args.no_exec,
            allow: (!allow.is_empty()).then_some(allow),
            deny: list(&args.deny_exec),
            read_only: args.read_only,
        },
        ..Policy::default()
    };
    let defaults = args.listen.is_empty();
    let listen = if defaults {
        vec![
            DEFAULT_LISTEN.parse::<Addr>().context("default address")?,
            Addr::new(Endpoint::Vport(DEFAULT_CTL_PORT.into())),
        ]
    } else {
        args.listen.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = rt.block_on(async move {
        let mut listeners = Vec::new();
        let mut serial = Vec::new();
        for addr in &listen {
            if let Some(ports) = SerialPorts::for_ctl(addr) {
                if defaults && !Addr::vport_path(DEFAULT_CTL_PORT).exists() {
                    continue;
                }
                eprintln!("vmlink-agent: serving virtio-serial {}", ports.describe());
                serial.push(ports);
                continue;
            }
            match AsyncListener::bind(addr) {
                Ok(l) => {
                    eprintln!("vmlink-agent: listening on {}", l.local_addr());
                    listeners.push(l);
                }
                // By default vsock is used only where the guest has it.
                Err(e) if defaults => eprintln!(
                    "vmlink-agent: not serving {addr}: {}",
                    vmlink_transport::error_chain(&e)
                ),
                Err(e) => return Err(e.into()),
            }
        }
        // --qga alone is enough to serve: a guest wired for qemu-ga only (Proxmox's default,
        // no vsock, no org.vmlink.ctl) runs `vmlink-agent --qga` in qemu-ga's place.
        let qga_only = listeners.is_empty() && serial.is_empty();
        if qga_only && args.qga.is_none() {
            anyhow::bail!(
                "nothing to serve: this guest has neither vsock nor the virtio-serial port \
                 {DEFAULT_CTL_PORT}; give --listen ADDR (or --qga to serve only \
                 qemu-guest-agent's protocol)"
            );
        }
        // Tells the qga side to stop (it thaws what it froze first).
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut qga_task = None;
        if let Some(addr) = args.qga.clone() {
            // Opening a virtio-serial port waits for the host side to connect, which may be
            // never: open it in the background so the other channels serve meanwhile. A
            // port that does not exist is still an error at startup.
            if let Endpoint::Vport(name) = &addr.endpoint {
                if !Addr::vport_path(name).exists() {
                    anyhow::bail!("--qga {addr}: this guest has no such virtio-serial port");
                }
            }
            let rpcs = vmlink_agent::QgaPolicy::from_lists(
                args.allow_rpcs.as_deref(),
                args.block_rpcs.as_deref(),
            );
            let mut stopped = stop_rx.clone();
            let task = tokio::spawn(async move {
                let served = async {
                    // A virtio-serial port may wait for its host side until the agent stops.
                    let channel = tokio::select! {
                        c = vmlink_agent::QgaChannel::open(&addr) => c?,
                        _ = stopped.wait_for(|s| *s) => return Ok(()),
                    };
                    eprintln!("vmlink-agent: qga on {}", channel.local_addr());
                    let stopped = async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    };
                    // Returns once `stopped`, after thawing what guest-fsfreeze-freeze froze.
                    vmlink_agent::serve_qga(channel, rpcs, stopped).await;
                    Ok::<(), vmlink_agent::QgaError>(())
                }
                .await;
                match served {
                    Err(e) if !qga_only => {
                        // The other channels serve on; say why this one does not.
                        eprintln!("vmlink-agent: qga: {}", vmlink_transport::error_chain(&e));
                        Ok(())
                    }
                    r => r,
                }
            });
            if qga_only {
                eprintln!("vmlink-agent: serving only qemu-guest-agent's protocol");
                let mut task = task;
                tokio::select! {
                    r = &mut task => return qga_ended(r),
                    () = shutdown_signal() => {}
                }
                let _ = stop_tx.send(true);
                return qga_ended(task.await);
            }
            qga_task = Some(task);
        }
        let shutdown = async {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        };
        let served = vmlink_agent::run_all(listeners, serial, policy, shutdown).await;
        if let Some(task) = qga_task {
            // The qga side thaws frozen filesystems before it ends; wait for that.
            let _ = stop_tx.send(true);
            qga_ended(task.await)?;
        }
        served?;
        Ok(())
    });
    // Opening a virtio-serial port waits on the blocking pool until the host connects, maybe
    // forever; dropping the runtime would wait for it. Exit without waiting.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

/// The agent's result once its qga task has ended, with the whole chain of a failure.
fn qga_ended(
    r: Result<Result<(), vmlink_agent::QgaError>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("qga")),
        Err(e) => Err(anyhow::Error::new(e).context("qga")),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
