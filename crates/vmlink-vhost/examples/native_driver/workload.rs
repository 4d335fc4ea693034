//! Workloads: the driver in this thread plays the guest, host endpoints on the backend's
//! hybrid-vsock Unix sockets run in their own threads. Every byte is checked against the
//! pattern on arrival, so a broken path fails instead of measuring nothing.
//!
//! - upload: the guest connects to host port P (a listener at `<uds>_<P>`) and writes N bytes;
//!   the host reads them to end of stream. Time: REQUEST sent to the host's last byte.
//! - download: the host connects (`CONNECT P`), writes N bytes and closes; the guest reads
//!   them. Time: the host's `OK` to the guest's last byte.
//! - round trips: the host writes 1 byte, the guest echoes it, the host reads it; R times.
//! - concurrent: C host connections at once, N/C bytes each host -> guest. Time: first `OK`
//!   to the last byte of the last connection.
//! - half-close: the guest writes, shuts down its sending side, the host reads to end of
//!   stream, answers and closes, the guest reads the answer.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Serialize;

use super::driver::{App, CloseKind, ConnReport, Driver, Pattern, Recv, PATTERN_MAX};

/// Host ports (guest-initiated) and guest ports (host-initiated) of the workloads.
pub const UPLOAD_PORT: u32 = 5001;
pub const DOWNLOAD_PORT: u32 = 6001;
pub const RTT_PORT: u32 = 7001;
pub const CONNS_PORT: u32 = 8001;
pub const HALF_CLOSE_PORT: u32 = 9001;
/// The seed of single host -> guest streams (concurrent ones use their index).
const DOWNLOAD_SEED: u32 = 200;

/// A throughput figure.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub bytes: u64,
    pub secs: f64,
    pub mib_s: f64,
    /// The backend process's user + system CPU during the workload (with `--backend-pid`).
    pub backend_cpu_s: Option<f64>,
}

/// Round-trip latencies.
#[derive(Clone, Debug, Serialize)]
pub struct RoundTrips {
    pub round_trips: usize,
    pub median_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub backend_cpu_s: Option<f64>,
}

/// What a connection's end looked like when it was not a clean SHUTDOWN/RST exchange.
#[derive(Clone, Debug, Serialize)]
pub struct Unclean {
    pub workload: &'static str,
    pub local_port: u32,
    pub peer_port: u32,
    pub close: CloseKind,
    pub sent: u64,
    pub received: u64,
}

/// The driver plus what a workload needs around it.
#[derive(Debug)]
pub struct Bench {
    pub driver: Driver,
    /// The backend's hybrid vsock socket (`uds-path`).
    pub uds: PathBuf,
    /// For the backend's CPU time from `/proc/PID/stat`.
    pub backend_pid: Option<u32>,
    /// Bound on each workload (and on every host-side socket operation).
    pub timeout: Duration,
    /// Connections that did not end cleanly, every workload.
    pub unclean: Vec<Unclean>,
    /// How connections ended, every workload.
    pub closes: std::collections::BTreeMap<String, u64>,
}

/// User + system CPU seconds of process `pid`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat has no command name"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(ticks as f64 / hz as f64)
}

impl Bench {
    fn cpu(&self) -> Option<f64> {
        self.backend_pid.and_then(|p| cpu_seconds(p).ok())
    }

    fn cpu_since(&self, before: Option<f64>) -> Option<f64> {
        Some(self.cpu()? - before?)
    }

    /// Takes the reports of connections with guest port `port` (listeners) or host port
    /// `port` (guest-initiated), and records the unclean ones.
    fn reports(&mut self, workload: &'static str, port: u32) -> Vec<ConnReport> {
        let (mine, rest): (Vec<_>, Vec<_>) = self
            .driver
            .take_done()
            .into_iter()
            .partition(|r| r.local_port == port || r.peer_port == port);
        self.driver.done = rest;
        for r in &mine {
            *self.closes.entry(format!("{:?}", r.close)).or_default() += 1;
            if !r.close.is_clean() {
                self.unclean.push(Unclean {
                    workload,
                    local_port: r.local_port,
                    peer_port: r.peer_port,
                    close: r.close,
                    sent: r.sent,
                    received: r.received,
                });
            }
        }
        mine
    }

    fn ended(d: &Driver, port: u32) -> usize {
        d.done
            .iter()
            .filter(|r| r.local_port == port || r.peer_port == port)
            .count()
    }

    /// Guest -> host: `bytes` to host port [`UPLOAD_PORT`].
    pub fn upload(&mut self, bytes: u64) -> Result<Throughput> {
        let port = UPLOAD_PORT;
        let listener = host_listen(&self.uds, port)?;
        let timeout = self.timeout;
        let host = spawn("upload host", move || {
            let mut s = accept_within(&listener, timeout)?;
            read_checked(&mut s, Pattern::to_host_seed(port), bytes)
        })?;
        let cpu0 = self.cpu();
        let t0 = Instant::now();
        self.driver.connect(
            port,
            App {
                send: bytes,
                half_close: false,
                recv: Recv::Nothing,
            },
        );
        let r = self
            .driver
            .run_until("upload", timeout, |d| Self::ended(d, port) == 1);
        let host = join(host);
        r?;
        let last_byte = host.context("upload: host side")?;
        let cpu = self.cpu_since(cpu0);
        let reps = self.reports("upload", port);
        ensure!(
            reps[0].sent == bytes,
            "upload: the guest sent {} of {bytes} bytes",
            reps[0].sent
        );
        Ok(throughput(bytes, last_byte - t0, cpu))
    }

    /// Host -> guest: `bytes` from a host connection to guest port [`DOWNLOAD_PORT`].
    pub fn download(&mut self, bytes: u64) -> Result<Throughput> {
        let port = DOWNLOAD_PORT;
        self.driver.listen(
            port,
            App {
                send: 0,
                half_close: false,
                recv: Recv::Expect(bytes),
            },
        );
        let (uds, timeout) = (self.uds.clone(), self.timeout);
        let cpu0 = self.cpu();
        let host = spawn("download host", move || {
            let mut s = host_connect(&uds, port, timeout)?;
            let t0 = Instant::now();
            write_pattern(&mut s, DOWNLOAD_SEED, bytes)?;
            Ok(t0)
        })?;
        let r = self
            .driver
            .run_until("download", timeout, |d| Self::ended(d, port) == 1);
        self.driver.unlisten(port);
        let host = join(host);
        r?;
        let t0 = host.context("download: host side")?;
        let cpu = self.cpu_since(cpu0);
        let reps = self.reports("download", port);
        let rep = &reps[0];
        ensure!(
            rep.received == bytes,
            "download: the guest got {} of {bytes} bytes",
            rep.received
        );
        let last = rep.last_rx_at.context("download: no byte arrived")?;
        Ok(throughput(bytes, last - t0, cpu))
    }

    /// `n` 1-byte round trips: host writes, guest echoes.
    pub fn round_trips(&mut self, n: usize) -> Result<RoundTrips> {
        self.round_trips_spaced(n, Duration::ZERO)
    }

    /// [`Bench::round_trips`] with `gap` of quiet between two round trips.
    pub fn round_trips_spaced(&mut self, n: usize, gap: Duration) -> Result<RoundTrips> {
        let port = RTT_PORT;
        self.driver.listen(
            port,
            App {
                send: 0,
                half_close: false,
                recv: Recv::Echo,
            },
        );
        let (uds, timeout) = (self.uds.clone(), self.timeout);
        let cpu0 = self.cpu();
        let host = spawn("round-trip host", move || {
            let mut s = host_connect(&uds, port, timeout)?;
            let mut times = Vec::with_capacity(n);
            let mut b = [0u8; 1];
            for i in 0..n {
                let want = (i % 251) as u8;
                let t = Instant::now();
                s.write_all(&[want]).context("round trip: host write")?;
                s.read_exact(&mut b)
                    .with_context(|| format!("round trip {i}: host read of the echo"))?;
                times.push(t.elapsed());
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
                ensure!(
                    b[0] == want,
                    "round trip {i}: echo {:#x}, sent {want:#x}",
                    b[0]
                );
            }
            Ok(times)
        })?;
        let r = self
            .driver
            .run_until("round trips", timeout, |d| Self::ended(d, port) == 1);
        self.driver.unlisten(port);
        let host = join(host);
        r?;
        let mut times = host.context("round trips: host side")?;
        let cpu = self.cpu_since(cpu0);
        let reps = self.reports("round trips", port);
        ensure!(
            reps[0].received == n as u64 && reps[0].sent == n as u64,
            "round trips: the guest echoed {} of {} bytes it got ({n} sent)",
            reps[0].sent,
            reps[0].received
        );
        times.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mean = times.iter().map(|d| us(*d)).sum::<f64>() / n.max(1) as f64;
        Ok(RoundTrips {
            round_trips: n,
            median_us: us(times[n / 2]),
            p99_us: us(times[(n * 99 / 100).min(n - 1)]),
            mean_us: mean,
            backend_cpu_s: cpu,
        })
    }

    /// `conns` concurrent host connections moving `bytes` in total to the guest.
    pub fn concurrent(&mut self, conns: usize, bytes: u64) -> Result<Throughput> {
        let port = CONNS_PORT;
        let each = bytes / conns as u64;
        self.driver.listen(
            port,
            App {
                send: 0,
                half_close: false,
                recv: Recv::Expect(each),
            },
        );
        let cpu0 = self.cpu();
        let mut hosts = Vec::with_capacity(conns);
        for i in 0..conns {
            let (uds, timeout) = (self.uds.clone(), self.timeout);
            hosts.push(spawn(&format!("host connection {i}"), move || {
                let mut s = host_connect(&uds, port, timeout)?;
                let t0 = Instant::now();
                write_pattern(&mut s, i as u32, each)?;
                Ok(t0)
            })?);
        }
        let r = self
            .driver
            .run_until("concurrent connections", self.timeout, |d| {
                Self::ended(d, port) == conns
            });
        self.driver.unlisten(port);
        let starts: Vec<Result<Instant>> = hosts.into_iter().map(join).collect();
        r?;
        let mut first = None::<Instant>;
        for (i, s) in starts.into_iter().enumerate() {
            let s = s.with_context(|| format!("host connection {i}"))?;
            first = Some(first.map_or(s, |f| f.min(s)));
        }
        let cpu = self.cpu_since(cpu0);
        let reps = self.reports("concurrent connections", port);
        ensure!(
            reps.len() == conns,
            "{} of {conns} connections ended",
            reps.len()
        );
        let mut last = None::<Instant>;
        for r in &reps {
            ensure!(
                r.received == each,
                "connection {}: the guest got {} of {each} bytes",
                r.peer_port,
                r.received
            );
            let l = r.last_rx_at.context("a connection got no byte")?;
            last = Some(last.map_or(l, |x| x.max(l)));
        }
        let (first, last) = (first.context("no connection")?, last.context("no byte")?);
        Ok(throughput(each * conns as u64, last - first, cpu))
    }

    /// The guest writes `up` bytes and shuts down its sending side; the host reads to end of
    /// stream, then writes `down` bytes and closes; the guest reads them.
    pub fn half_close(&mut self, up: u64, down: u64) -> Result<ConnReport> {
        let port = HALF_CLOSE_PORT;
        let listener = host_listen(&self.uds, port)?;
        let timeout = self.timeout;
        let host = spawn("half-close host", move || {
            let mut s = accept_within(&listener, timeout)?;
            read_checked(&mut s, Pattern::to_host_seed(port), up)?;
            write_pattern(&mut s, DOWNLOAD_SEED, down)
        })?;
        self.driver.connect(
            port,
            App {
                send: up,
                half_close: true,
                recv: Recv::Expect(down),
            },
        );
        let r = self
            .driver
            .run_until("half-close", timeout, |d| Self::ended(d, port) == 1);
        let host = join(host);
        r?;
        host.context("half-close: host side")?;
        let rep = self.reports("half-close", port).remove(0);
        ensure!(
            rep.sent == up && rep.received == down,
            "half-close: the guest sent {} of {up} and got {} of {down} bytes",
            rep.sent,
            rep.received
        );
        Ok(rep)
    }
}

fn throughput(bytes: u64, d: Duration, cpu: Option<f64>) -> Throughput {
    let secs = d.as_secs_f64().max(1e-9);
    Throughput {
        bytes,
        secs,
        mib_s: bytes as f64 / secs / (1 << 20) as f64,
        backend_cpu_s: cpu,
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 * 1024)
        .spawn(f)
        .with_context(|| format!("spawn thread {name}"))
}

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow!("a host-side thread panicked"))?
}

/// The listener a guest's connection to host port `port` reaches: `<uds>_<port>`.
pub fn host_listen(uds: &Path, port: u32) -> Result<UnixListener> {
    let path = PathBuf::from(format!("{}_{port}", uds.display()));
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))
}

/// Accepts one connection, waiting at most `timeout`.
fn accept_within(l: &UnixListener, timeout: Duration) -> Result<UnixStream> {
    let mut p = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    ensure!(n > 0, "no connection from the guest within {timeout:?}");
    let (s, _) = l.accept().context("accept the guest's connection")?;
    set_timeouts(&s, timeout)?;
    Ok(s)
}

fn set_timeouts(s: &UnixStream, timeout: Duration) -> Result<()> {
    s.set_read_timeout(Some(timeout))
        .context("socket read timeout")?;
    s.set_write_timeout(Some(timeout))
        .context("socket write timeout")
}

/// Connects through the backend's hybrid socket to guest port `port` (`CONNECT <port>`,
/// answered `OK <n>`; what `n` is differs between backends and is not used).
pub fn host_connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let mut s = UnixStream::connect(uds).with_context(|| format!("connect {}", uds.display()))?;
    set_timeouts(&s, timeout)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .context("write CONNECT")?;
    // Byte by byte: nothing after the line may be taken from the stream.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        s.read_exact(&mut b)
            .with_context(|| format!("read the answer to CONNECT {port}"))?;
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line);
    text.strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| anyhow!("CONNECT {port} answered {text:?}, not OK <port>"))?;
    Ok(s)
}

/// Writes `n` bytes of stream `seed` and closes.
fn write_pattern(s: &mut UnixStream, seed: u32, n: u64) -> Result<()> {
    let p = Pattern::new();
    let mut off = 0;
    while off < n {
        let len = (n - off).min(PATTERN_MAX as u64) as usize;
        s.write_all(p.slice(seed, off, len))
            .with_context(|| format!("host write at byte {off} of {n}"))?;
        off += len as u64;
    }
    Ok(())
}

/// Reads to end of stream, checking every byte against stream `seed`; there must be exactly
/// `n`. Returns when the last byte arrived.
fn read_checked(s: &mut UnixStream, seed: u32, n: u64) -> Result<Instant> {
    let p = Pattern::new();
    let mut buf = vec![0u8; PATTERN_MAX];
    let mut got = 0u64;
    let mut last = Instant::now();
    loop {
        let r = s
            .read(&mut buf)
            .with_context(|| format!("host read after {got} of {n} bytes"))?;
        if r == 0 {
            break;
        }
        if got + r as u64 > n {
            bail!("host read {} bytes, {n} were sent", got + r as u64);
        }
        let want = p.slice(seed, got, r);
        if &buf[..r] != want {
            let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            bail!(
                "host: byte {} differs from the pattern (got {:#x}, want {:#x})",
                got + i as u64,
                buf[i],
                want[i]
            );
        }
        got += r as u64;
        last = Instant::now();
    }
    ensure!(
        got == n,
        "host read {got} of {n} bytes before end of stream"
    );
    Ok(last)
}
