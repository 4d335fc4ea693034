//! `vmlink lab demo`: boot one lab guest and show every channel working,
//! with a bench table. The README's first command.
//!
//! The host starts a guest with `vsock_loopback` and virtio-serial ports,
//! and runs this same binary inside it (`--guest-side`). In the guest, the
//! program first serves one bench session on the virtio-serial port, which
//! the host drives through QEMU's chardev socket. Then the guest runs the
//! agent (in-process, `vmlink_agent::run_all`) on the ports org.vmlink.ctl
//! and org.vmlink.data, and the host drives it through the serial bridge as
//! a user would: ping, exec, cp both ways (timed against the raw port), and
//! logs -f across a rotation. When
//! the host is done it creates a file in the guest through the agent, and
//! the guest goes on: it benchmarks vsock
//! stream and seqpacket over the loopback transport, Unix and TCP
//! loopback, a hybrid vsock connection (through a small VMM-side fixture
//! that answers `CONNECT`), and a relay (`vmlink relay` and, in the same
//! run, socat) from vsock to a Unix socket. Each result comes back to the
//! host as one JSON line on stdout; the host prints the table.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlink_lab::{GuestIo, LabConfig};
use vmlink_transport::relay::{self, RelayOptions, ServeStats};
use vmlink_transport::{Addr, AsyncListener, AsyncStream, Endpoint};

use crate::bench::{self, Report, RunArgs};

/// The virtio-serial port the demo benchmarks.
const PORT_NAME: &str = "org.vmlink.bench";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Bytes to move each way on each channel.
    #[arg(long, default_value = "16M", value_parser = vmlink_transport::addr::parse_size)]
    bytes: u64,
    /// Round trips for the latency test.
    #[arg(long, default_value_t = 500)]
    round_trips: u64,
    /// Print the results as JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: run the guest half (inside a lab guest).
    #[arg(long, hide = true)]
    guest_side: bool,
}

/// One measured channel.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Row {
    /// What was measured, in words.
    pub channel: String,
    /// The bench result.
    pub report: Report,
    /// The result this row is compared with, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.guest_side {
        return crate::block_on_detached(guest_side(a))?;
    }
    host_side(a)
}

fn host_side(a: Args) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("vmlink-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sock = dir.join("bench.sock");
    let (ctl, data) = (dir.join("ctl.sock"), dir.join("data.sock"));
    let cfg = LabConfig {
        vsock_loopback: true,
        serials: vec![
            (PORT_NAME.to_string(), sock.clone()),
            (vmlink_agent::DEFAULT_CTL_PORT.to_string(), ctl.clone()),
            (vmlink_agent::DEFAULT_DATA_PORT.to_string(), data.clone()),
        ],
        timeout: Some(Duration::from_secs(600)),
        ..LabConfig::default()
    };
    let exe = std::env::current_exe().context("finding this program")?;
    let argv: Vec<OsString> = vec![
        exe.into(),
        "lab".into(),
        "demo".into(),
        "--guest-side".into(),
        "--bytes".into(),
        a.bytes.to_string().into(),
        "--round-trips".into(),
        a.round_trips.to_string().into(),
    ];
    eprintln!("vmlink: booting a lab guest (vsock_loopback, virtio-serial port {PORT_NAME}) ...");
    let t = Instant::now();
    let guest = vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture)?;
    let serial_addr: Addr = format!("unix:{}", sock.display()).parse()?;
    let rt = crate::runtime()?;
    let host_report = rt.block_on(async { bench::measure(&run_args(serial_addr, &a)).await });
    let agent_rows = match &host_report {
        Ok(raw) => Some(rt.block_on(agent_demo(ctl, data, &dir, &a, raw))),
        Err(_) => None,
    };
    let out = guest.wait()?;
    let _ = std::fs::remove_dir_all(&dir);
    if out.code != 0 {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("the guest half of the demo failed with status {}", out.code);
    }
    let mut rows = vec![Row {
        channel: format!("virtio-serial  host unix socket <-> guest vport:{PORT_NAME}"),
        report: host_report.context("benchmarking the virtio-serial port from the host")?,
        note: None,
    }];
    if let Some(r) = agent_rows {
        rows.extend(r.context("driving the agent over virtio-serial")?);
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match serde_json::from_str::<Row>(line) {
            Ok(r) => rows.push(r),
            Err(_) => println!("{line}"),
        }
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_rows(&rows, a.bytes, t.elapsed());
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the guest half waits for the host's agent steps to finish.
const AGENT_DONE: &str = "/run/vmlink-demo-agent-done";

/// The host drives the guest's agent through the serial bridge, as `vmlink exec` / `cp` do.
async fn agent_demo(
    ctl: std::path::PathBuf,
    data: std::path::PathBuf,
    dir: &std::path::Path,
    a: &Args,
    raw: &Report,
) -> anyhow::Result<Vec<Row>> {
    use std::sync::atomic::AtomicU64;
    use vmlink_agent::client::{Client, GetDest, PutSource};
    let sock = dir.join("agent.sock");
    let listener = crate::bridge::bind_unix(&sock)?;
    let bridge = tokio::spawn(vmlink_agent::mux::serve_bridge(
        ctl,
        Some(data),
        listener,
        std::future::pending(),
    ));
    let addr: Addr = format!("unix:{}", sock.display()).parse()?;
    let c = Client::connect(&addr)
        .await
        .context("connecting to the agent")?;
    eprintln!("vmlink: agent over virtio-serial: ping, exec, cp both ways ...");
    let mut pings = Vec::new();
    for _ in 0..20 {
        pings.push(c.ping().await?.as_secs_f64() * 1e6);
    }
    let exec = |argv: &[&str]| vmlink_agent::ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..vmlink_agent::ExecRequest::default()
    };
    let mut out = Vec::new();
    let st = c
        .exec(
            exec(&["uname", "-sr"]),
            None::<tokio::io::Empty>,
            &mut out,
            tokio::io::sink(),
        )
        .await?;
    anyhow::ensure!(st.shell_status() == 0, "uname failed: {st:?}");
    let uname = String::from_utf8_lossy(&out).trim().to_string();
    let mut execs = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        c.exec(
            exec(&["true"]),
            None::<tokio::io::Empty>,
            tokio::io::sink(),
            tokio::io::sink(),
        )
        .await?;
        execs.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let payload = dir.join("payload.bin");
    let bytes = vmlink_lab::testing::payload(7, a.bytes as usize);
    std::fs::write(&payload, &bytes)?;
    let t = Instant::now();
    c.put(
        PutSource::Path(payload),
        "/run/vmlink-demo.bin",
        Arc::new(AtomicU64::new(0)),
    )
    .await?;
    let up = a.bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let back = dir.join("back.bin");
    let t = Instant::now();
    c.get(
        "/run/vmlink-demo.bin",
        GetDest::Path(back.clone()),
        Arc::new(AtomicU64::new(0)),
    )
    .await?;
    let down = a.bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(
        std::fs::read(&back)? == bytes,
        "the file copied back differs from the one sent"
    );
    let followed = follow_logs(&c, &exec).await?;
    c.exec(
        exec(&["touch", AGENT_DONE]),
        None::<tokio::io::Empty>,
        tokio::io::sink(),
        tokio::io::sink(),
    )
    .await?;
    bridge.abort();
    let pct = |x: f64, raw: Option<f64>| match raw {
        Some(r) if r > 0.0 => format!("{:.0}%", 100.0 * x / r),
        _ => "-".into(),
    };
    let latency = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        bench::Latency {
            round_trips: v.len() as u64,
            median: v[v.len() / 2],
            p99: v[v.len() - 1],
            min: v[0],
            max: v[v.len() - 1],
        }
    };
    let exec_lat = latency(execs);
    Ok(vec![Row {
        channel: "vmlink cp/ping   agent over virtio-serial (ctl+data ports)".into(),
        report: Report {
            addr: addr.to_string(),
            bytes: a.bytes,
            conns: None,
            upload_mib_s: Some(up),
            download_mib_s: Some(down),
            latency_us: Some(latency(pings)),
        },
        note: Some(format!(
            "cp vs raw virtio-serial: up {}, down {}; exec `true` round trip p50 {:.1} ms; \
             {} checksums, compared; guest says: {uname}; logs -f: {followed}",
            pct(up, raw.upload_mib_s),
            pct(down, raw.download_mib_s),
            exec_lat.median / 1e3,
            c.copy_checksum().name()
        )),
    }])
}

/// `vmlink logs -f` across the VM boundary: tail a guest file, append to it, rotate it
/// (rename + recreate), and see every new line arrive.
async fn follow_logs(
    c: &vmlink_agent::client::Client,
    exec: &dyn Fn(&[&str]) -> vmlink_agent::ExecRequest,
) -> anyhow::Result<String> {
    use tokio::io::AsyncBufReadExt;
    let log = "/run/vmlink-demo.log";
    let sh = |script: &str| exec(&["sh", "-c", script]);
    let none = None::<tokio::io::Empty>;
    c.exec(
        sh(&format!("printf 'line1\\nline2\\n' > {log}")),
        none,
        tokio::io::sink(),
        tokio::io::sink(),
    )
    .await?;
    let (w, r) = tokio::io::duplex(64 * 1024);
    let req = vmlink_proto::agent::Logs {
        path: log.into(),
        lines: 1,
        follow: true,
    };
    let tail = c.logs(req, w);
    let watch = async {
        let mut lines = tokio::io::BufReader::new(r).lines();
        let mut seen = Vec::new();
        let mut appended = false;
        while let Some(l) = lines.next_line().await? {
            seen.push(l);
            if !appended {
                appended = true;
                let rotate = format!("echo line3 >> {log}; mv {log} {log}.1; echo line4 > {log}");
                c.exec(
                    sh(&rotate),
                    None::<tokio::io::Empty>,
                    tokio::io::sink(),
                    tokio::io::sink(),
                )
                .await?;
            }
            if seen.last().map(String::as_str) == Some("line4") {
                return Ok::<_, anyhow::Error>(seen);
            }
        }
        anyhow::bail!("the log stream ended early: {seen:?}")
    };
    let seen = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(60), watch) => r
            .map_err(|_| anyhow::anyhow!("logs -f did not show the rotated file's line in 60 s"))??,
        r = tail => {
            r?;
            anyhow::bail!("logs -f ended by itself");
        }
    };
    anyhow::ensure!(
        seen == ["line2", "line3", "line4"],
        "logs -f showed {seen:?}, expected the last line, the appended one and the one after rotation"
    );
    Ok("tail -n 1, then an appended line and one after rotation arrived".into())
}

fn print_rows(rows: &[Row], bytes: u64, took: Duration) {
    println!();
    println!(
        "vmlink channels, measured in a TCG lab guest ({} each way, 1-byte round trips)",
        vmlink_transport::addr::format_size(bytes)
    );
    println!(
        "{:<58} {:>10} {:>10} {:>9} {:>9}",
        "channel", "up MiB/s", "down MiB/s", "rtt p50", "rtt p99"
    );
    for r in rows {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let (p50, p99) = match &r.report.latency_us {
            Some(l) => (format!("{:.0}us", l.median), format!("{:.0}us", l.p99)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<58} {:>10} {:>10} {:>9} {:>9}",
            r.channel,
            f(r.report.upload_mib_s),
            f(r.report.download_mib_s),
            p50,
            p99
        );
        if let Some(n) = &r.note {
            println!("    {n}");
        }
    }
    println!(
        "(whole demo: {:.1} s, boot included; up = client to server)",
        took.as_secs_f64()
    );
}

/// Starts a bench server on a listening address; returns the bound address.
fn spawn_bench_server(addr: &str) -> anyhow::Result<Addr> {
    let l = AsyncListener::bind(&addr.parse()?)?;
    let bound = l.local_addr().clone();
    tokio::spawn(async move {
        loop {
            let Ok(s) = l.accept().await else { continue };
            tokio::spawn(async move {
                if let Err(e) = bench::session(s).await {
                    tracing::info!(error = %format!("{e:#}"), "bench session failed");
                }
            });
        }
    });
    Ok(bound)
}

/// The connecting twin of a bound listening address.
fn connect_addr(bound: &Addr) -> anyhow::Result<Addr> {
    let s = match &bound.endpoint {
        Endpoint::VsockListen { ty, port, .. } => {
            let kind = match ty {
                vmlink_transport::VsockType::Seqpacket => "vsock-seqpacket",
                _ => "vsock",
            };
            format!("{kind}:local:{port}")
        }
        Endpoint::UnixListen(p) => format!("unix:{}", p.display()),
        Endpoint::TcpListen { port, .. } => format!("tcp:127.0.0.1:{port}"),
        other => bail!("no connecting form for {other:?}"),
    };
    Ok(s.parse()?)
}

/// A VMM's side of hybrid vsock for the demo: accept on `uds`, parse
/// `CONNECT <port>`, connect to that port on the local vsock, answer `OK`,
/// relay. What Firecracker or vmlink-vhost do, in a few lines.
fn spawn_hybrid_fixture(uds: std::path::PathBuf) -> anyhow::Result<()> {
    let l = AsyncListener::bind(&format!("unix-listen:{},unlink", uds.display()).parse()?)?;
    tokio::spawn(async move {
        while let Ok(mut s) = l.accept().await {
            tokio::spawn(async move {
                let mut hs =
                    vmlink_proto::hybrid::Handshake::<vmlink_proto::hybrid::ConnectRequest>::new(
                        Instant::now(),
                        vmlink_proto::hybrid::DEFAULT_TIMEOUT,
                    );
                let mut b = [0u8; 64];
                let req = loop {
                    let n = match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    match hs.push(&b[..n]) {
                        Ok(Some(r)) => break r,
                        Ok(None) => continue,
                        Err(_) => return,
                    }
                };
                let Ok(target) = format!("vsock:local:{}", req.port).parse::<Addr>() else {
                    return;
                };
                let Ok(mut g) = AsyncStream::connect(&target).await else {
                    return;
                };
                let reply = vmlink_proto::hybrid::ConnectReply {
                    port: 1_000_000 + req.port % 1000,
                };
                if s.write_all(&reply.encode()).await.is_err() {
                    return;
                }
                let left = hs.take_leftover();
                if !left.is_empty() && g.write_all(&left).await.is_err() {
                    return;
                }
                let _ = relay::relay(s, g, &RelayOptions::default()).await;
            });
        }
    });
    Ok(())
}

/// The full bench (both directions and latency) at the demo's sizes.
fn run_args(addr: Addr, a: &Args) -> RunArgs {
    RunArgs {
        addr,
        bytes: a.bytes,
        latency: false,
        throughput: false,
        round_trips: a.round_trips,
        conns: 1,
        json: false,
    }
}

async fn measure_row(channel: &str, addr: Addr, a: &Args) -> anyhow::Result<Row> {
    let report = bench::measure(&run_args(addr, a))
        .await
        .with_context(|| format!("benchmarking {channel}"))?;
    Ok(Row {
        channel: channel.to_string(),
        report,
        note: None,
    })
}

fn emit(row: &Row) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(row)?);
    Ok(())
}

async fn guest_side(a: Args) -> anyhow::Result<ExitCode> {
    // 1. The virtio-serial port, driven by the host.
    let port: Addr = format!("vport:{PORT_NAME},connect-timeout=60s").parse()?;
    let s = AsyncStream::connect(&port).await?;
    bench::session(s)
        .await
        .context("serving the host's bench session on the virtio-serial port")?;

    // 2. The agent on org.vmlink.ctl + org.vmlink.data, until the host is done with it.
    let agent = tokio::spawn(vmlink_agent::run_all(
        Vec::new(),
        vec![vmlink_agent::SerialPorts {
            ctl: Addr::new(Endpoint::Vport(vmlink_agent::DEFAULT_CTL_PORT.into())),
            data: Some(Addr::new(Endpoint::Vport(
                vmlink_agent::DEFAULT_DATA_PORT.into(),
            ))),
        }],
        vmlink_agent::Policy::default(),
        std::future::pending(),
    ));
    let deadline = Instant::now() + Duration::from_secs(300);
    // The host's last step creates the file through the agent; nothing else signals it.
    while !std::path::Path::new(AGENT_DONE).exists() {
        if agent.is_finished() || Instant::now() > deadline {
            bail!("the host did not finish its agent steps");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent stays up (idle) so the exec that created the file can still report its exit.

    // Not the temp dir: it may be the shared (9p) working directory, where Unix sockets cannot
    // be created.
    let dir = std::path::PathBuf::from("/run/vmlink-demo");
    std::fs::create_dir_all(&dir)?;

    // 3. Direct channels.
    let vsock = spawn_bench_server("vsock-listen:local:any")?;
    let seqp = spawn_bench_server("vsock-seqpacket-listen:local:any")?;
    let unix = spawn_bench_server(&format!("unix-listen:{}/bench.sock,unlink", dir.display()))?;
    let tcp = spawn_bench_server("tcp-listen:127.0.0.1:0")?;
    let raw_vsock = measure_row(
        "vsock stream     (vsock_loopback, CID 1)",
        connect_addr(&vsock)?,
        &a,
    )
    .await?;
    emit(&raw_vsock)?;
    emit(
        &measure_row(
            "vsock seqpacket  (vsock_loopback, CID 1)",
            connect_addr(&seqp)?,
            &a,
        )
        .await?,
    )?;
    emit(&measure_row("unix socket", connect_addr(&unix)?, &a).await?)?;
    emit(&measure_row("tcp 127.0.0.1", connect_addr(&tcp)?, &a).await?)?;

    // 4. Hybrid vsock through a VMM-side fixture.
    let uds = dir.join("vmm.sock");
    spawn_hybrid_fixture(uds.clone())?;
    let vport = match &vsock.endpoint {
        Endpoint::VsockListen { port, .. } => port.0,
        _ => bail!("vsock listener has no port"),
    };
    let hv: Addr = format!("hvsock:{}:{vport}", uds.display()).parse()?;
    emit(&measure_row("hybrid vsock     (CONNECT over unix, then vsock)", hv, &a).await?)?;

    // 5. Relays from vsock to the Unix bench server: vmlink, then socat.
    let target = connect_addr(&unix)?;
    let l = AsyncListener::bind(&"vsock-listen:local:any".parse()?)?;
    let relay_at = connect_addr(l.local_addr())?;
    let stats = Arc::new(ServeStats::default());
    let t2 = target.clone();
    tokio::spawn(async move {
        let _ = relay::serve(
            l,
            t2,
            RelayOptions::default(),
            stats,
            std::future::pending(),
        )
        .await;
    });
    let mut vm = measure_row("vmlink relay     vsock -> unix", relay_at, &a).await?;
    let socat = which("socat");
    let mut socat_row = None;
    if let Some(socat) = socat {
        let port = free_vsock_port()?;
        let mut child = tokio::process::Command::new(socat)
            .arg(format!("VSOCK-LISTEN:{port},fork,reuseaddr"))
            .arg(format!("UNIX-CONNECT:{}/bench.sock", dir.display()))
            .kill_on_drop(true)
            .spawn()
            .context("starting socat")?;
        let addr: Addr = format!("vsock:local:{port}").parse()?;
        // Wait until socat listens: connect attempts are the only signal it gives.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match AsyncStream::connect(&addr).await {
                Ok(mut s) => {
                    s.write_all(&vmlink_proto::bench::Request::Quit.encode())
                        .await?;
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => return Err(e).context("socat did not start listening"),
            }
        }
        let row = measure_row("socat relay      vsock -> unix (same path)", addr, &a).await?;
        let _ = child.kill().await;
        socat_row = Some(row);
    }
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
        _ => "-".into(),
    };
    let mut note = format!(
        "vs raw vsock: up {}, down {}",
        ratio(vm.report.upload_mib_s, raw_vsock.report.upload_mib_s),
        ratio(vm.report.download_mib_s, raw_vsock.report.download_mib_s)
    );
    if let Some(s) = &socat_row {
        note.push_str(&format!(
            "; vs socat: up {}, down {}",
            ratio(vm.report.upload_mib_s, s.report.upload_mib_s),
            ratio(vm.report.download_mib_s, s.report.download_mib_s)
        ));
    }
    vm.note = Some(note);
    emit(&vm)?;
    if let Some(s) = socat_row {
        emit(&s)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A vsock port nobody listens on right now (bind `any`, read it, close).
fn free_vsock_port() -> anyhow::Result<u32> {
    let l = vmlink_transport::Listener::bind(&"vsock-listen:local:any".parse()?)?;
    match l.local_addr().endpoint {
        Endpoint::VsockListen { port, .. } => Ok(port.0),
        _ => bail!("vsock listener has no port"),
    }
}
