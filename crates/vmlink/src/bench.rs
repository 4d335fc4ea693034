//! `vmlink bench serve ADDR` and `vmlink bench run ADDR`: throughput both
//! ways and 1-byte round-trip latency over any address, using the
//! `vmlink_proto::bench` protocol (one connection carries every test, so a
//! virtio-serial port works like a socket).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlink_proto::bench::{Request, MAX_RECORD, REQUEST_LEN};
use vmlink_transport::{Addr, AsyncListener, AsyncStream};

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Serve bench sessions on ADDR (a -listen address serves many clients;
    /// any other address, e.g. vport:NAME, is opened and served in turn).
    Serve {
        /// Where to serve.
        #[arg(value_parser = crate::parse_addr)]
        addr: Addr,
        /// Serve one session, then exit.
        #[arg(long)]
        once: bool,
        /// Serve at most N sessions at a time (each holds a 256 KiB buffer); further
        /// clients wait in the listen queue until one ends. The default fits
        /// `bench run --conns 1024`.
        #[arg(long, default_value_t = MAX_CONNS, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        max_connections: u16,
    },
    /// Measure against a `bench serve` peer at ADDR.
    ///
    /// Prints upload (client to server) and download MiB/s and the 1-byte
    /// round-trip time (median and p99), as a table or, with --json, as one
    /// JSON object.
    Run(RunArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The `bench serve` peer.
    #[arg(value_parser = crate::parse_addr)]
    pub addr: Addr,
    /// Bytes to move in each direction, e.g. 64M or 1G.
    #[arg(long, default_value = "64M", value_parser = vmlink_transport::addr::parse_size, value_name = "N")]
    pub bytes: u64,
    /// Measure only the round-trip latency.
    #[arg(long, conflicts_with = "throughput")]
    pub latency: bool,
    /// Measure only throughput.
    #[arg(long)]
    pub throughput: bool,
    /// Round trips for the latency test.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub round_trips: u64,
    /// Measure throughput over N connections at once, each moving --bytes each way; upload
    /// and download are then the aggregate MiB/s (all connections' bytes over the time from
    /// the first start to the last finish). The round trips still use one connection. Not
    /// for virtio-serial ports or stdio, which carry a single stream. At most 1024.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=MAX_CONNS as i64))]
    pub conns: u16,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(async move {
        match cmd {
            Cmd::Serve {
                addr,
                once,
                max_connections,
            } => serve(addr, once, max_connections.into()).await,
            Cmd::Run(a) => client(a).await,
        }
    })
}

/// Serves bench sessions on `addr` (at most `max` at a time on a listening address) until
/// SIGINT or SIGTERM, or after one session with `once`.
pub async fn serve(addr: Addr, once: bool, max: usize) -> anyhow::Result<ExitCode> {
    let stop = crate::relay::shutdown_signal();
    tokio::pin!(stop);
    if addr.is_listen() {
        let l = AsyncListener::bind(&addr)?;
        eprintln!("vmlink: bench serving on {}", l.local_addr());
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        loop {
            // A free slot first: beyond the bound, clients wait in the listen queue.
            let slot = tokio::select! {
                p = slots.clone().acquire_owned() => p.context("the session bound")?,
                _ = &mut stop => return Ok(ExitCode::SUCCESS),
            };
            let s = tokio::select! {
                s = l.accept() => s,
                _ = &mut stop => return Ok(ExitCode::SUCCESS),
            };
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: the listener stays readable, so wait a moment
                    // rather than spin (and log) until a descriptor is free.
                    tracing::warn!(error = %vmlink_transport::error_chain(&e), "accept failed; trying again in 100 ms");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        _ = &mut stop => return Ok(ExitCode::SUCCESS),
                    }
                    continue;
                }
            };
            let task = session(s);
            if once {
                return task.await.map(|()| ExitCode::SUCCESS);
            }
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    tracing::info!(error = %format!("{e:#}"), "bench session ended with an error");
                }
                drop(slot);
            });
        }
    }
    loop {
        let s = tokio::select! {
            s = AsyncStream::connect(&addr) => s?,
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        };
        eprintln!("vmlink: bench serving on {addr}");
        let r = tokio::select! {
            r = session(s) => r,
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        };
        if once {
            return r.map(|()| ExitCode::SUCCESS);
        }
        if let Err(e) = r {
            tracing::info!(error = %format!("{e:#}"), "bench session ended with an error");
        }
    }
}

/// Serves one connection's requests until `Q` or EOF.
pub async fn session(mut s: AsyncStream) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut req = [0u8; REQUEST_LEN];
        match s.read_exact(&mut req).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading a bench request"),
        }
        let Some(r) = Request::parse(&req)? else {
            bail!("short bench request")
        };
        match r {
            Request::Upload(n) => {
                let mut got = 0u64;
                while got < n {
                    // Never past the upload: the client's next request may follow at once.
                    let want = (n - got).min(buf.len() as u64) as usize;
                    let k = s.read(&mut buf[..want]).await?;
                    if k == 0 {
                        bail!("peer closed after {got} of {n} upload bytes");
                    }
                    got += k as u64;
                }
                s.write_all(&got.to_le_bytes()).await?;
            }
            Request::Download(n) => send_bytes(&mut s, n, &buf).await?,
            Request::Latency(n) => {
                for _ in 0..n {
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    s.write_all(&b).await?;
                }
            }
            Request::Quit => return Ok(()),
        }
    }
}

async fn send_bytes(s: &mut AsyncStream, n: u64, buf: &[u8]) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = (left as usize).min(MAX_RECORD).min(buf.len());
        s.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// How long `bench serve` waits after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The most connections `bench run --conns` opens.
pub const MAX_CONNS: u16 = 1024;

/// The result of one `bench run`, as printed with `--json`.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Report {
    /// The address measured.
    pub addr: String,
    /// Bytes moved each way (per connection, with `conns`).
    pub bytes: u64,
    /// Connections that moved the throughput bytes at once, when more than one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub conns: Option<u16>,
    /// Client to server.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub upload_mib_s: Option<f64>,
    /// Server to client.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub download_mib_s: Option<f64>,
    /// 1-byte round trips, microseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub latency_us: Option<Latency>,
}

/// Round-trip statistics in microseconds.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Latency {
    /// How many.
    pub round_trips: u64,
    /// 50th percentile.
    pub median: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Fastest.
    pub min: f64,
    /// Slowest.
    pub max: f64,
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

async fn client(a: RunArgs) -> anyhow::Result<ExitCode> {
    let rep = measure(&a).await?;
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    } else {
        print_table(&rep);
    }
    Ok(ExitCode::SUCCESS)
}

/// Connects to a `bench serve` peer and makes one round trip before any clock starts: the
/// peer is serving now (a virtio-serial port's guest end may not have been opened yet).
async fn connect_ready(addr: &Addr) -> anyhow::Result<AsyncStream> {
    let mut s = AsyncStream::connect(addr).await?;
    s.write_all(&Request::Latency(1).encode()).await?;
    s.write_all(&[0xa5]).await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .await
        .context("waiting for the peer's first echo")?;
    Ok(s)
}

/// Sends `n` bytes; returns once the server confirms it has every one.
async fn upload(s: &mut AsyncStream, n: u64, buf: &[u8]) -> anyhow::Result<()> {
    s.write_all(&Request::Upload(n).encode()).await?;
    send_bytes(s, n, buf).await.context("uploading")?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)
        .await
        .context("waiting for the upload count")?;
    let got = u64::from_le_bytes(ack);
    if got != n {
        bail!("the server counted {got} upload bytes, {n} were sent");
    }
    Ok(())
}

/// Asks for `n` bytes and reads them.
async fn download(s: &mut AsyncStream, n: u64, rbuf: &mut [u8]) -> anyhow::Result<()> {
    s.write_all(&Request::Download(n).encode()).await?;
    let mut got = 0u64;
    while got < n {
        let k = s.read(rbuf).await.context("downloading")?;
        if k == 0 {
            bail!("server closed after {got} of {n} download bytes");
        }
        got += k as u64;
    }
    Ok(())
}

/// Runs `phase` on every stream at once; returns the streams (in order) and the time from
/// the start to the last one's end. The first error ends the measurement.
async fn all_at_once<F, Fut>(
    streams: Vec<AsyncStream>,
    phase: F,
) -> anyhow::Result<(Vec<AsyncStream>, Duration)>
where
    F: Fn(AsyncStream) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<AsyncStream>> + Send + 'static,
{
    let t = Instant::now();
    let n = streams.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in streams.into_iter().enumerate() {
        let f = phase(s);
        tasks.spawn(async move { f.await.map(|s| (i, s)) });
    }
    let mut done = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        let (i, s) = r
            .context("a connection's task failed")?
            .with_context(|| format!("one of {n} connections"))?;
        done.push((i, s));
    }
    let d = t.elapsed();
    done.sort_by_key(|(i, _)| *i);
    Ok((done.into_iter().map(|(_, s)| s).collect(), d))
}

/// Runs the tests `a` asks for against a `bench serve` peer.
pub async fn measure(a: &RunArgs) -> anyhow::Result<Report> {
    if a.addr.is_listen() {
        bail!(
            "{} listens; `bench run` needs the address of a `bench serve` peer",
            a.addr
        );
    }
    let conns = usize::from(a.conns.max(1));
    if conns > 1
        && (matches!(
            a.addr.endpoint,
            vmlink_transport::Endpoint::Vport(_) | vmlink_transport::Endpoint::Stdio
        ) || a.addr.is_message_oriented())
    {
        bail!(
            "--conns {conns}: {} carries one stream; use a socket address (vsock, hvsock, unix, tcp)",
            a.addr
        );
    }
    let mut rep = Report {
        addr: a.addr.to_string(),
        bytes: a.bytes,
        // `--latency` uses one connection whatever `--conns` says.
        conns: (conns > 1 && !a.latency).then_some(a.conns),
        upload_mib_s: None,
        download_mib_s: None,
        latency_us: None,
    };
    let mut streams = Vec::with_capacity(conns);
    if conns == 1 || a.latency {
        streams.push(connect_ready(&a.addr).await?);
    } else {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let addr = a.addr.clone();
            tasks.spawn(async move { connect_ready(&addr).await });
        }
        while let Some(r) = tasks.join_next().await {
            streams.push(r.context("a connecting task failed")??);
        }
    }
    let buf = std::sync::Arc::new(vec![0x5au8; MAX_RECORD]);
    if !a.latency {
        let n = a.bytes;
        let total = n * conns as u64;
        let (s, d) = all_at_once(streams, |mut s| {
            let buf = buf.clone();
            async move { upload(&mut s, n, &buf).await.map(|()| s) }
        })
        .await?;
        rep.upload_mib_s = Some(mib_s(total, d));
        let (s, d) = all_at_once(s, |mut s| async move {
            let mut rbuf = vec![0u8; 256 * 1024];
            download(&mut s, n, &mut rbuf).await.map(|()| s)
        })
        .await?;
        rep.download_mib_s = Some(mib_s(total, d));
        streams = s;
    }
    if !a.throughput && a.round_trips > 0 {
        let s = &mut streams[0];
        s.write_all(&Request::Latency(a.round_trips).encode())
            .await?;
        let mut samples = Vec::with_capacity(a.round_trips as usize);
        let mut b = [0u8; 1];
        for i in 0..a.round_trips {
            let t = Instant::now();
            s.write_all(&[i as u8]).await?;
            s.read_exact(&mut b).await.context("waiting for an echo")?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            if b[0] != i as u8 {
                bail!("echo {i} came back as {} instead of {}", b[0], i as u8);
            }
        }
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        rep.latency_us = Some(Latency {
            round_trips: a.round_trips,
            median: pick(0.5),
            p99: pick(0.99),
            min: samples[0],
            max: samples[samples.len() - 1],
        });
    }
    for s in &mut streams {
        s.write_all(&Request::Quit.encode()).await?;
        let _ = s.shutdown_write();
    }
    Ok(rep)
}

fn print_table(r: &Report) {
    match r.conns {
        Some(n) => println!(
            "bench {}  ({} each way on each of {n} connections; MiB/s all together)",
            r.addr,
            vmlink_transport::addr::format_size(r.bytes)
        ),
        None => println!(
            "bench {}  ({} each way)",
            r.addr,
            vmlink_transport::addr::format_size(r.bytes)
        ),
    }
    println!("  {:<22} {:>12}", "test", "result");
    if let Some(v) = r.upload_mib_s {
        println!("  {:<22} {:>8.1} MiB/s", "upload (to server)", v);
    }
    if let Some(v) = r.download_mib_s {
        println!("  {:<22} {:>8.1} MiB/s", "download (from server)", v);
    }
    if let Some(l) = &r.latency_us {
        println!("  {:<22} {:>8.1} us", "1-byte RTT median", l.median);
        println!("  {:<22} {:>8.1} us", "1-byte RTT p99", l.p99);
    }
}
