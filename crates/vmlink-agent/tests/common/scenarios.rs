//! Behaviours checked against an agent at any address: over Unix sockets on the host
//! (`host_agent.rs`) and over vsock in a lab guest (`guest_agent.rs`).
//!
//! Each prints its figures as `measured: ...` lines, which the guest runner copies to the host.

use std::time::{Duration, Instant, UNIX_EPOCH};

use tokio::io::AsyncReadExt;
use vmlink_agent::client::{signal_channel, Client};
use vmlink_agent::ExitStatus;
use vmlink_proto::agent::ErrorKind;

use super::{cmd, exec_error, process_gone, Hashing, Pattern, Stamped, NO_STDIN};

/// Runs `argv` without stdin; returns (stdout, stderr, status).
pub async fn run(client: &Client, argv: &[&str]) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = client
        .exec(cmd(argv), NO_STDIN, &mut out, &mut err)
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {}", vmlink_transport::error_chain(&e)));
    (out, err, status)
}

/// Ping and info answer; returns the median ping.
pub async fn ping_and_info(client: &Client, channel_prefix: &str) -> Duration {
    assert_eq!(client.agent().version, 1);
    assert!(client.agent().software.starts_with("vmlink-agent/"));
    let mut pings = Vec::new();
    for _ in 0..20 {
        pings.push(client.ping().await.expect("ping"));
    }
    pings.sort();
    let info = client.info().await.expect("info");
    assert!(!info.kernel.is_empty(), "{info:?}");
    assert!(!info.os.is_empty(), "{info:?}");
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(
        info.channels.iter().any(|c| c.starts_with(channel_prefix)),
        "{info:?}"
    );
    let uptime = std::fs::read_to_string("/proc/uptime").expect("uptime");
    let uptime: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("uptime parses");
    assert!(info.uptime_secs <= uptime as u64 && info.uptime_secs + 5 >= uptime as u64);
    println!(
        "measured: ping (connect + hello + ping/pong) p50 {:?} max {:?}; info {info:?}",
        pings[pings.len() / 2],
        pings[pings.len() - 1]
    );
    pings[pings.len() / 2]
}

/// Lines printed every 300 ms arrive within 100 ms (median) and each before the next is printed; exit codes, death by
/// a signal and forwarded signals pass through; spawn failures are clear errors.
pub async fn streaming_status_and_signals(client: &Client) {
    // Warm-up: under TCG the first run of the output path pays for translating its code, which
    // is not what this measures.
    let (out, _, _) = run(client, &["sh", "-c", "echo warm; sleep 0.1; echo up"]).await;
    assert_eq!(out, b"warm\nup\n");
    // Each line carries the wall-clock time at which it was printed (same machine as the client).
    let mut out = Stamped::default();
    let script = "for i in 1 2 3 4 5; do date +%s%N; sleep 0.3; done";
    let status = client
        .exec(
            cmd(&["sh", "-c", script]),
            NO_STDIN,
            &mut out,
            tokio::io::sink(),
        )
        .await
        .expect("exec");
    assert!(status.success(), "{status}");
    let mut lags = Vec::new();
    let mut arrivals = Vec::new();
    let mut partial = Vec::new();
    for (at, bytes) in &out.writes {
        for &b in bytes {
            if b != b'\n' {
                partial.push(b);
                continue;
            }
            let printed: u128 = String::from_utf8_lossy(&partial)
                .trim()
                .parse()
                .expect("a timestamp line");
            partial.clear();
            let arrived = at.duration_since(UNIX_EPOCH).expect("clock").as_nanos();
            lags.push(Duration::from_nanos(arrived.saturating_sub(printed) as u64));
            arrivals.push(*at);
        }
    }
    assert_eq!(lags.len(), 5, "{:?}", out.writes);
    // The median line arrives within 100 ms (the figure), and every line
    // long before the next is printed (300 ms later): streamed, not buffered. A
    // single line may be late under TCG while another guest loads the 2 cores
    // (seen: 163 ms), hence the two bounds.
    let mut sorted = lags.clone();
    sorted.sort();
    assert!(
        sorted[sorted.len() / 2] <= Duration::from_millis(100),
        "median lag {:?} over 100 ms; lags {lags:?}",
        sorted[sorted.len() / 2]
    );
    for (i, lag) in lags.iter().enumerate() {
        assert!(
            *lag < Duration::from_millis(300),
            "line {i} arrived {lag:?} after it was printed; lags {lags:?}"
        );
    }
    // Not held back and released together: the arrivals are spread like the prints.
    let spread = arrivals[4].duration_since(arrivals[0]).unwrap_or_default();
    assert!(
        spread >= Duration::from_millis(1000),
        "arrivals spread over {spread:?}"
    );
    println!("measured: streamed line lag {lags:?}");

    let (out, err, status) = run(client, &["sh", "-c", "echo out; echo err >&2; exit 7"]).await;
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(
        status,
        ExitStatus {
            code: Some(7),
            signal: None
        }
    );
    assert_eq!(status.shell_status(), 7);

    let (_, _, status) = run(client, &["sh", "-c", "kill -TERM $$"]).await;
    assert_eq!(
        status,
        ExitStatus {
            code: None,
            signal: Some(15)
        }
    );
    assert_eq!(status.shell_status(), 143);

    // A signal sent by the client reaches the process group.
    let (signals_tx, signals) = signal_channel();
    assert!(signals_tx.send(15));
    let status = client
        .exec_with_signals(
            cmd(&["sleep", "1000"]),
            NO_STDIN,
            tokio::io::sink(),
            tokio::io::sink(),
            signals,
        )
        .await
        .expect("exec sleep");
    assert_eq!(
        status,
        ExitStatus {
            code: None,
            signal: Some(15)
        }
    );

    // Clear errors for what cannot run.
    let message = exec_error(client, cmd(&["/nonexistent/prog"]), ErrorKind::NotFound).await;
    assert!(
        message.contains("/nonexistent/prog") && message.contains("No such file"),
        "{message}"
    );
    // A program that exists but cannot run, and a missing working directory, are
    // `spawn_failed` (a client exits 126), not `not_found` (127).
    let mut in_missing_dir = cmd(&["true"]);
    in_missing_dir.cwd = Some("/nonexistent/dir".into());
    for (req, expect) in [
        (cmd(&["/etc/passwd"]), "\"/etc/passwd\""),
        (in_missing_dir, "working directory \"/nonexistent/dir\""),
    ] {
        let message = exec_error(client, req, ErrorKind::SpawnFailed).await;
        assert!(message.contains(expect), "{message}");
    }
    // A terminal is supported (its details: `features::tty`).
    let mut tty = cmd(&["true"]);
    tty.tty = true;
    let status = client
        .exec(tty, NO_STDIN, tokio::io::sink(), tokio::io::sink())
        .await
        .expect("tty exec");
    assert!(status.success(), "{status}");

    // Environment and working directory.
    let mut req = cmd(&["sh", "-c", "echo \"$GREETING\"; pwd"]);
    req.env = vec![("GREETING".into(), "hello there".into())];
    req.cwd = Some("/proc".into());
    let mut out = Vec::new();
    client
        .exec(req, NO_STDIN, &mut out, tokio::io::sink())
        .await
        .expect("exec env");
    assert_eq!(String::from_utf8_lossy(&out), "hello there\n/proc\n");

    // The exec round trip of `true`.
    let mut times = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        let (_, _, status) = run(client, &["true"]).await;
        assert!(status.success());
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "measured: exec `true` round trip p50 {:?} max {:?}",
        times[5], times[9]
    );
}

/// `cat` gets `len` bytes and their EOF, and gives them back intact.
pub async fn stdin_round_trip(client: &Client, len: usize) {
    let data = super::payload(4, len);
    let mut out = Hashing::default();
    let start = Instant::now();
    let status = client
        .exec(
            cmd(&["cat"]),
            Some(data.as_slice()),
            &mut out,
            tokio::io::sink(),
        )
        .await
        .expect("exec cat");
    let took = start.elapsed();
    assert!(status.success(), "{status}");
    assert_eq!(out.len, len as u64);
    assert_eq!(out.digest(), super::sha(&data));
    println!("measured: cat round trip of {len} bytes in {took:?}");

    // EOF alone: `wc -c` of nothing ends and says 0.
    let mut out = Vec::new();
    let status = client
        .exec(
            cmd(&["wc", "-c"]),
            Some(tokio::io::empty()),
            &mut out,
            tokio::io::sink(),
        )
        .await
        .expect("exec wc");
    assert!(status.success());
    assert_eq!(String::from_utf8_lossy(&out).trim(), "0");
}

/// `len` bytes of stdout arrive complete and in order (each byte compared with what `yes`
/// prints, and counted); returns MiB/s.
pub async fn large_stdout(client: &Client, len: u64) -> f64 {
    const LINE: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n";
    let pattern = std::str::from_utf8(&LINE[..LINE.len() - 1]).expect("ascii");
    let script = format!("yes {pattern} | head -c {len}");
    let mut out = Pattern::new(LINE);
    let start = Instant::now();
    let status = client
        .exec(
            cmd(&["sh", "-c", &script]),
            NO_STDIN,
            &mut out,
            tokio::io::sink(),
        )
        .await
        .expect("exec yes | head");
    let took = start.elapsed();
    assert!(status.success(), "{status}");
    assert_eq!(out.len, len);
    assert_eq!(
        out.mismatch_at, None,
        "the output differs from what was printed"
    );
    let rate = len as f64 / (1 << 20) as f64 / took.as_secs_f64();
    println!("measured: {len} bytes of stdout in {took:?} ({rate:.1} MiB/s)");
    rate
}

/// While one exec floods output, pings on other connections are answered within `bound`; then
/// the client drops the exec's connection and the agent kills its whole process group.
pub async fn ping_during_flood_and_disconnect_kills(client: &Client, bound: Duration) {
    let (pipe_w, mut pipe_r) = tokio::io::duplex(64 * 1024);
    let flooder = client.clone();
    let exec = tokio::spawn(async move {
        // `sleep` in the background shares the group; `cat` replaces the shell.
        let script = "sleep 1000 & echo $$ $!; exec cat /dev/zero";
        flooder
            .exec(
                cmd(&["sh", "-c", script]),
                NO_STDIN,
                pipe_w,
                tokio::io::sink(),
            )
            .await
    });
    // The first line names the processes; the rest is counted.
    let (pids_tx, pids_rx) = tokio::sync::oneshot::channel::<Vec<u32>>();
    // Fires once the flood is really flowing: `cat` starts after the first line, and under
    // TCG starting it can take longer than the pings below.
    let (flowing_tx, flowing_rx) = tokio::sync::oneshot::channel::<()>();
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = counted.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        let mut pids_tx = Some(pids_tx);
        let mut flowing_tx = Some(flowing_tx);
        loop {
            let n = match pipe_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Some(tx) = pids_tx.take() {
                head.extend_from_slice(&buf[..n]);
                match head.iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        let pids = String::from_utf8_lossy(&head[..at])
                            .split_whitespace()
                            .filter_map(|p| p.parse().ok())
                            .collect();
                        let _ = tx.send(pids);
                    }
                    None => pids_tx = Some(tx),
                }
            }
            let total =
                counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed) + n as u64;
            if total > 256 * 1024 {
                if let Some(tx) = flowing_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    // Warm the ping path first (under TCG its first run pays for code translation).
    client.ping().await.expect("ping before the flood");
    let pids = pids_rx.await.expect("the flood's first line");
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(
        pids.iter().all(|&p| !process_gone(p)),
        "{pids:?} should be running"
    );

    flowing_rx.await.expect("the flood starts flowing");
    let before = counted.load(std::sync::atomic::Ordering::Relaxed);
    let mut pings = Vec::new();
    for _ in 0..20 {
        pings.push(client.ping().await.expect("ping during the flood"));
    }
    let flowed = counted.load(std::sync::atomic::Ordering::Relaxed) - before;
    pings.sort();
    let max = pings[pings.len() - 1];
    println!(
        "measured: ping during a flood p50 {:?} max {max:?} ({flowed} bytes flooded meanwhile)",
        pings[pings.len() / 2]
    );
    // The flood kept flowing while the pings were answered (more than a pipe's worth).
    assert!(
        flowed > 64 * 1024,
        "only {flowed} bytes flowed during the pings"
    );
    // The bound holds for 90 % of the pings: with CI running two TCG guests on two host cores,
    // a lone ping can lose its vCPU to the other guest for longer than the bound, flood or not.
    let p90 = pings[pings.len() * 9 / 10 - 1];
    assert!(
        p90 <= bound,
        "pings took up to {max:?} (p90 {p90:?}) during the flood: {pings:?}"
    );

    // The client goes away mid-exec.
    exec.abort();
    let _ = exec.await;
    super::await_gone(
        &pids,
        Duration::from_secs(20),
        &format!("{pids:?} still alive 20 s after the client left"),
    )
    .await;
}
