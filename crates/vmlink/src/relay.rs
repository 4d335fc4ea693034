//! `vmlink relay ADDR1 ADDR2`: socat's job, with half-close, a connection
//! bound, `splice(2)` and clean shutdown on SIGINT/SIGTERM.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use vmlink_transport::relay::{self, RelayOptions, ServeStats};
use vmlink_transport::{Addr, AsyncListener, AsyncStream};

/// Relay bytes both ways between two addresses, like socat
///
/// When ADDR1 listens, every connection it accepts is relayed to a fresh
/// connection to ADDR2, many at once, until SIGINT or SIGTERM. When only
/// ADDR2 listens, one connection is accepted there and relayed to ADDR1.
/// Otherwise both are opened and relayed once. EOF in one direction is passed
/// on as a half-close (shutdown of the write side): the other direction goes
/// on until it ends too.
///
/// Examples:
///   vmlink relay tcp-listen:127.0.0.1:8080 vsock:3:80
///   vmlink relay vsock-listen:5000 unix:/run/app.sock
///   vmlink relay stdio hvsock:/run/fc/v.sock:52
///   vmlink relay unix-listen:/tmp/ga.sock,unlink vport:org.qemu.guest_agent.0
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// First address (a -listen address serves many connections).
    #[arg(value_parser = crate::parse_addr)]
    addr1: Addr,
    /// Second address, opened anew for each connection on ADDR1.
    #[arg(value_parser = crate::parse_addr)]
    addr2: Addr,
    /// Relay at most N connections at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_connections: usize,
    /// Copy buffer (and splice pipe) size, e.g. 256K or 1M.
    #[arg(long, default_value = "256K", value_parser = parse_size, value_name = "SIZE")]
    buffer_size: usize,
    /// Copy through user space even where splice(2) would work.
    #[arg(long)]
    no_splice: bool,
    /// With a listening ADDR1: relay one connection, then exit.
    #[arg(long)]
    once: bool,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n = vmlink_transport::addr::parse_size(s)?;
    if !(4096..=(64 << 20)).contains(&n) {
        return Err(format!("`{s}` is outside 4K..64M"));
    }
    Ok(n as usize)
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.addr1.is_listen() && a.addr2.is_listen() {
        bail!(
            "both {} and {} listen; at most one address may listen (put the listening one first)",
            a.addr1,
            a.addr2
        );
    }
    let opts = RelayOptions {
        buffer_size: a.buffer_size,
        splice: !a.no_splice,
        max_connections: a.max_connections,
    };
    crate::runtime()?.block_on(async move {
        let stop = shutdown_signal();
        tokio::pin!(stop);
        if a.addr1.is_listen() && !a.once {
            let listener = AsyncListener::bind(&a.addr1)?;
            tracing::info!(listen = %listener.local_addr(), target = %a.addr2, "relaying");
            eprintln!("vmlink: relaying {} -> {}", listener.local_addr(), a.addr2);
            let stats = Arc::new(ServeStats::default());
            // `stop`, made before the "relaying" line: a handler made after it could miss a
            // SIGTERM sent as soon as that line is read (CI hit it: the relay never stopped).
            relay::serve(
                listener,
                a.addr2.clone(),
                opts,
                stats.clone(),
                stop.as_mut(),
            )
            .await?;
            tracing::info!(
                accepted = stats.accepted.load(Ordering::Relaxed),
                failed = stats.failed.load(Ordering::Relaxed),
                bytes = stats.bytes.load(Ordering::Relaxed),
                "shut down"
            );
            return Ok(ExitCode::SUCCESS);
        }
        let (s1, s2) = if a.addr1.is_listen() || a.addr2.is_listen() {
            let (l, other, listen_first) = if a.addr1.is_listen() {
                (&a.addr1, &a.addr2, true)
            } else {
                (&a.addr2, &a.addr1, false)
            };
            let listener = AsyncListener::bind(l)?;
            eprintln!(
                "vmlink: waiting for one connection on {}",
                listener.local_addr()
            );
            let accepted = tokio::select! {
                c = listener.accept() => c?,
                _ = &mut stop => return Ok(ExitCode::SUCCESS),
            };
            let o = AsyncStream::connect(other).await?;
            if listen_first {
                (accepted, o)
            } else {
                (o, accepted)
            }
        } else {
            let s1 = AsyncStream::connect(&a.addr1).await?;
            let s2 = AsyncStream::connect(&a.addr2).await?;
            (s1, s2)
        };
        tokio::select! {
            r = relay::relay(s1, s2, &opts) => {
                let st = r.context("relay failed")?;
                tracing::info!(forward = st.forward, backward = st.backward, "done");
            }
            _ = &mut stop => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Installs SIGINT and SIGTERM handlers now, and returns a future that
/// completes when either arrives. Installing before anything is printed or
/// bound matters: a signal that arrives between "listening" and the first
/// poll of a lazily installed handler would kill the process instead.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without handlers, never complete: the default action ends us.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
    }
}
