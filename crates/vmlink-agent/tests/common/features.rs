//! Exec features checked against an agent at any address: a terminal, a timeout, another user,
//! scripts (`Run`), the exec policy, and `Logs`. Used over Unix sockets on the host
//! (`host_exec.rs`); `vmlink`'s `guest_exec_cli.rs` checks the same through the CLI in a guest.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use vmlink_agent::client::{signal_channel, Client, ClientError};
use vmlink_proto::agent::{ErrorKind, Logs, WindowSize};

use super::{cmd, NO_STDIN};

/// Reads `r` until what was read contains `want`, within 20 s; returns everything read.
pub async fn read_until<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    seen: &mut Vec<u8>,
    want: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.read(&mut buf)).await {
            Ok(Ok(0)) => panic!(
                "EOF before {want:?}; got {:?}",
                String::from_utf8_lossy(seen)
            ),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => panic!(
                "no {want:?} within 20 s; got {:?}",
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

/// A tty exec sees its window size and a terminal; a resize reaches it as SIGWINCH; an
/// interactive shell fed over stdin runs what it is typed and exits with its status.
pub async fn tty(client: &Client) {
    let mut req = cmd(&[
        "sh",
        "-c",
        "stty size; tty; test -t 0 && test -t 2 && echo all-tty",
    ]);
    req.tty = true;
    req.window = Some(WindowSize {
        rows: 40,
        cols: 132,
    });
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = client
        .exec(req, NO_STDIN, &mut out, &mut err)
        .await
        .expect("tty exec");
    assert!(status.success(), "{status}");
    let out = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert_eq!(lines.first(), Some(&"40 132"), "{out:?}");
    assert!(
        lines.get(1).is_some_and(|l| l.starts_with("/dev/pts/")),
        "{out:?}"
    );
    assert_eq!(lines.get(2), Some(&"all-tty"), "{out:?}");
    assert!(err.is_empty(), "stderr is the terminal too: {err:?}");

    // A resize arrives as SIGWINCH with the new size.
    let script = "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done";
    let mut req = cmd(&["sh", "-c", script]);
    req.tty = true;
    let (controls, signals) = signal_channel();
    let (out_w, mut out_r) = tokio::io::duplex(64 * 1024);
    let c = client.clone();
    let exec = tokio::spawn(async move {
        c.exec_with_signals(req, NO_STDIN, out_w, tokio::io::sink(), signals)
            .await
    });
    let mut seen = Vec::new();
    read_until(&mut out_r, &mut seen, "ready").await;
    assert!(controls.resize(WindowSize {
        rows: 50,
        cols: 100
    }));
    read_until(&mut out_r, &mut seen, "50 100").await;
    let status = exec.await.expect("join").expect("resize exec");
    assert!(status.success(), "{status}");

    // An interactive shell on the terminal: typed lines run; exit's status comes back.
    let mut req = cmd(&["sh"]);
    req.tty = true;
    let typed: &[u8] = b"echo $((6*7))\nexit 3\n";
    let mut out = Vec::new();
    let status = client
        .exec(req, Some(typed), &mut out, tokio::io::sink())
        .await
        .expect("interactive sh");
    assert_eq!(
        status.code,
        Some(3),
        "{status}: {:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        String::from_utf8_lossy(&out).contains("42\r\n"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );

    // 8 MiB through a raw terminal, twice the stdin window: the terminal takes 4 KiB at a
    // time, so the window is opened again and again by the agent's acknowledgements. Input
    // starts only once the terminal is raw (bytes before that would be edited as lines).
    const LEN: usize = 8 << 20;
    let script = format!("stty raw -echo; echo ready; head -c {LEN} | sha256sum");
    let mut req = cmd(&["sh", "-c", &script]);
    req.tty = true;
    let (mut in_w, in_r) = tokio::io::duplex(64 * 1024);
    let (out_w, mut out_r) = tokio::io::duplex(64 * 1024);
    let (_keep, signals) = signal_channel();
    let c = client.clone();
    let exec = tokio::spawn(async move {
        c.exec_with_signals(req, Some(in_r), out_w, tokio::io::sink(), signals)
            .await
    });
    let mut seen = Vec::new();
    read_until(&mut out_r, &mut seen, "ready\n").await;
    let data = super::payload(9, LEN);
    let want = format!("{}  -", hex(&super::sha(&data)));
    let feed = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        in_w.write_all(&data).await.expect("feed the terminal");
    });
    read_until(&mut out_r, &mut seen, &want).await;
    feed.await.expect("fed");
    let status = exec.await.expect("join").expect("raw tty exec");
    assert!(status.success(), "{status}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A timeout kills the whole process group and says so; a command that ends in time is not
/// marked.
pub async fn timeout(client: &Client) {
    let (_keep, signals) = signal_channel();
    let mut out = Vec::new();
    let start = Instant::now();
    let finished = client
        .exec_full(
            cmd(&["sh", "-c", "sleep 1000 & echo $!; wait"]),
            None,
            NO_STDIN,
            &mut out,
            tokio::io::sink(),
            signals,
            Some(Duration::from_millis(500)),
        )
        .await
        .expect("exec with a timeout");
    let took = start.elapsed();
    assert!(finished.timed_out, "{finished:?}");
    assert_eq!(finished.exit.signal, Some(9), "{finished:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let bg: u32 = String::from_utf8_lossy(&out).trim().parse().expect("a pid");
    super::await_gone(
        &[bg],
        Duration::from_secs(10),
        &format!("background sleep {bg} survived the timeout"),
    )
    .await;
    let (_keep, signals) = signal_channel();
    let finished = client
        .exec_full(
            cmd(&["true"]),
            None,
            NO_STDIN,
            tokio::io::sink(),
            tokio::io::sink(),
            signals,
            Some(Duration::from_secs(60)),
        )
        .await
        .expect("exec true");
    assert!(
        !finished.timed_out && finished.exit.success(),
        "{finished:?}"
    );
}

/// `user`: the command runs as that user with its environment; an unknown user is a clear
/// error. The agent must be root (the tests run as root).
pub async fn user(client: &Client) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let nobody: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == "nobody")
        .expect("a nobody user");
    let mut req = cmd(&[
        "sh",
        "-c",
        "id -u; id -g; echo \"$HOME $USER $LOGNAME $SHELL\"",
    ]);
    req.user = Some("nobody".into());
    let mut out = Vec::new();
    let status = client
        .exec(req, NO_STDIN, &mut out, tokio::io::sink())
        .await
        .expect("exec as nobody");
    assert!(status.success(), "{status}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!(
            "{}\n{}\n{} nobody nobody {}\n",
            nobody[2], nobody[3], nobody[5], nobody[6]
        )
    );
    let mut req = cmd(&["id"]);
    req.user = Some("no-such-user".into());
    let message = super::exec_error(client, req, ErrorKind::SpawnFailed).await;
    assert!(
        message.contains("user \"no-such-user\" does not exist"),
        "{message}"
    );
}

/// Runs a script with the general exec; returns (stdout, status code).
pub async fn run_script(
    client: &Client,
    script: &[u8],
    argv: &[&str],
    stdin: Option<&[u8]>,
) -> (String, Option<i32>) {
    let (_keep, signals) = signal_channel();
    let mut out = Vec::new();
    let f = client
        .exec_full(
            cmd(argv),
            Some(script),
            stdin,
            &mut out,
            tokio::io::sink(),
            signals,
            None,
        )
        .await
        .expect("run a script");
    (String::from_utf8_lossy(&out).into_owned(), f.exit.code)
}

/// Scripts: arguments, stdin and status pass; without a #! line /bin/sh runs it; the script is
/// an anonymous memory file, not a file on disk.
pub async fn scripts(client: &Client) {
    let script = b"#!/bin/sh\necho \"args: $*\"; readlink \"$0\"; cat; exit 3\n";
    let (out, code) = run_script(
        client,
        script,
        &["s.sh", "a", "-b c"],
        Some(b"from stdin\n"),
    )
    .await;
    assert_eq!(code, Some(3), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "args: a -b c");
    assert!(lines[1].starts_with("/memfd:vmlink-run"), "{out}");
    assert_eq!(lines[2], "from stdin");
    let (out, code) = run_script(client, b"echo plain $1\n", &["p.sh", "x"], None).await;
    assert_eq!((out.as_str(), code), ("plain x\n", Some(0)));
    // A large script arrives whole (its last line runs).
    let mut big = b"#!/bin/sh\n".to_vec();
    while big.len() < 3 << 20 {
        big.extend_from_slice(b": padding line of a large script\n");
    }
    big.extend_from_slice(b"echo end\n");
    let (out, code) = run_script(client, &big, &["big.sh"], None).await;
    assert_eq!((out.as_str(), code), ("end\n", Some(0)));
}

/// What an agent with an exec policy refuses, and how it says so.
pub async fn policy_refusals(client: &Client) {
    fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
        match r {
            Err(ClientError::Refused { message, .. }) => message,
            other => panic!("not refused: {other:?}"),
        }
    }
    let (out, _, status) = super::scenarios::run(client, &["echo", "allowed"]).await;
    assert!(status.success());
    assert_eq!(out, b"allowed\n");
    let m = refused(
        client
            .exec(
                cmd(&["sh", "-c", "true"]),
                NO_STDIN,
                tokio::io::sink(),
                tokio::io::sink(),
            )
            .await,
    );
    assert!(
        m.contains("not in the agent's --allow-exec list (echo,true)"),
        "{m}"
    );
    // The allowed name elsewhere is not the allowed program.
    let dir = std::env::temp_dir().join(format!("vmlink-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let other_echo = dir.join("echo");
    std::fs::write(&other_echo, b"#!/bin/sh\necho not the real one\n").expect("write");
    std::fs::set_permissions(
        &other_echo,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let other_echo = other_echo.display().to_string();
    let m = refused(
        client
            .exec(
                cmd(&[&other_echo]),
                NO_STDIN,
                tokio::io::sink(),
                tokio::io::sink(),
            )
            .await,
    );
    assert!(m.contains(&other_echo), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
    let (_keep, signals) = signal_channel();
    let m = refused(
        client
            .exec_full(
                cmd(&["s.sh"]),
                Some(b"echo hi\n".as_slice()),
                NO_STDIN,
                tokio::io::sink(),
                tokio::io::sink(),
                signals,
                None,
            )
            .await,
    );
    assert!(m.contains("--allow-exec"), "{m}");
    let src = std::env::temp_dir().join(format!("vmlink-ro-{}", std::process::id()));
    std::fs::write(&src, b"x").expect("write");
    let dest = std::env::temp_dir().join(format!("vmlink-ro-dest-{}", std::process::id()));
    let r = client
        .put(
            vmlink_agent::client::PutSource::Path(src.clone()),
            &dest.display().to_string(),
            Default::default(),
        )
        .await;
    let m = refused(r);
    assert!(m.contains("--read-only"), "{m}");
    assert!(!dest.exists());
    let _ = std::fs::remove_file(&src);
    // Reading is still allowed.
    client.ping().await.expect("ping");
}

/// `Logs`: the last lines, then (following) appended data, a rotation and a truncation.
pub async fn logs(client: &Client, dir: &std::path::Path) {
    let path = dir.join("app.log");
    let lines: String = (1..=50).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&path, &lines).expect("write log");
    let p = path.display().to_string();
    let mut out = Vec::new();
    client
        .logs(
            Logs {
                path: p.clone(),
                lines: 3,
                follow: false,
            },
            &mut out,
        )
        .await
        .expect("tail");
    assert_eq!(String::from_utf8_lossy(&out), "line 48\nline 49\nline 50\n");
    match client
        .logs(
            Logs {
                path: format!("{p}.missing"),
                lines: 3,
                follow: false,
            },
            tokio::io::sink(),
        )
        .await
    {
        Err(ClientError::Agent {
            kind: ErrorKind::Io,
            message,
            ..
        }) => {
            assert!(
                message.contains(".missing") && message.contains("No such file"),
                "{message}"
            )
        }
        other => panic!("a missing file gave {other:?}"),
    }

    // A FIFO with no writer is refused at once (reading it would hold one of the agent's
    // runtime threads), and the agent still answers.
    let fifo = format!("{p}.fifo");
    let c_fifo = std::ffi::CString::new(fifo.clone()).expect("no NUL");
    // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
    let made = unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) };
    assert_eq!(made, 0, "mkfifo {fifo}");
    let req = Logs {
        path: fifo.clone(),
        lines: 3,
        follow: true,
    };
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.logs(req, tokio::io::sink()),
    )
    .await
    .expect("a FIFO is refused, not read");
    match refused {
        Err(ClientError::Agent {
            kind: ErrorKind::Io,
            message,
            ..
        }) => assert!(message.contains("not a regular file"), "{message}"),
        other => panic!("a FIFO gave {other:?}"),
    }
    client.ping().await.expect("a ping after the FIFO");
    let _ = std::fs::remove_file(&fifo);
    // So is a device (checked before it is opened: opening /dev/watchdog arms it).
    let req = Logs {
        path: "/dev/null".into(),
        lines: 3,
        follow: false,
    };
    match client.logs(req, tokio::io::sink()).await {
        Err(ClientError::Agent { message, .. }) => {
            assert!(message.contains("not a regular file"), "{message}")
        }
        other => panic!("a device gave {other:?}"),
    }

    let (w, mut r) = tokio::io::duplex(64 * 1024);
    let c = client.clone();
    let req = Logs {
        path: p.clone(),
        lines: 1,
        follow: true,
    };
    let follow = tokio::spawn(async move { c.logs(req, w).await });
    let mut seen = Vec::new();
    read_until(&mut r, &mut seen, "line 50\n").await;
    let append = |s: &str| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        std::io::Write::write_all(&mut f, s.as_bytes()).expect("append");
    };
    append("appended 1\n");
    read_until(&mut r, &mut seen, "appended 1\n").await;
    // Rotation: renamed away (one last line written to it), recreated.
    let rotated = dir.join("app.log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&rotated)
            .expect("open old");
        std::io::Write::write_all(&mut f, b"last of old\n").expect("append old");
    }
    std::fs::write(&path, b"first of new\n").expect("recreate");
    read_until(&mut r, &mut seen, "first of new\n").await;
    // Truncation: shorter than what was sent, then written again.
    append("more\nand more\n");
    read_until(&mut r, &mut seen, "and more\n").await;
    std::fs::write(&path, b"t\n").expect("truncate");
    read_until(&mut r, &mut seen, "and more\nt\n").await;
    let text = String::from_utf8_lossy(&seen);
    assert_eq!(
        text, "line 50\nappended 1\nlast of old\nfirst of new\nmore\nand more\nt\n",
        "followed output"
    );
    follow.abort();
    let _ = follow.await;
}

/// While a large copy into the guest (`len` bytes to `dest`, absolute) is in flight, pings on
/// other connections are answered within `bound` (90 % of them: a lone ping can lose its vCPU
/// under a loaded TCG host); at least 10 pings complete while the copy runs.
pub async fn ping_during_copy(client: &Client, dest: &str, len: u64, bound: Duration) {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use vmlink_agent::client::PutSource;

    // Warm the ping path (under TCG its first run pays for code translation).
    client.ping().await.expect("ping before the copy");
    let progress = Arc::new(AtomicU64::new(0));
    let copier = client.clone();
    let source = PutSource::Reader(Box::new(std::io::repeat(0x5a).take(len)));
    let (dest_owned, p) = (dest.to_string(), progress.clone());
    let copy = tokio::spawn(async move { copier.put(source, &dest_owned, p).await });
    // Timed from when the copy is flowing, not from its start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < 1 << 20 {
        assert!(!copy.is_finished(), "the copy ended before 1 MiB flowed");
        assert!(Instant::now() < deadline, "the copy never started flowing");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut pings = Vec::new();
    let before = progress.load(Ordering::Relaxed);
    while !copy.is_finished() && pings.len() < 40 {
        let rtt = client.ping().await.expect("ping during the copy");
        if !copy.is_finished() {
            pings.push(rtt);
        }
    }
    let flowed = progress.load(Ordering::Relaxed) - before;
    let summary = copy.await.expect("join").expect("the copy");
    assert_eq!(summary.bytes, len);
    assert_eq!(std::fs::metadata(dest).expect("copied file").len(), len);
    let _ = std::fs::remove_file(dest);
    assert!(
        pings.len() >= 10,
        "only {} pings completed during the copy of {len} bytes",
        pings.len()
    );
    pings.sort();
    let p90 = pings[pings.len() * 9 / 10 - 1];
    println!(
        "measured: ping during a {len}-byte cp p50 {:?} p90 {p90:?} max {:?} ({} pings, {flowed} bytes copied meanwhile)",
        pings[pings.len() / 2],
        pings[pings.len() - 1],
        pings.len()
    );
    assert!(p90 <= bound, "pings during the copy: {pings:?}");
}

/// A local stdout that never takes a byte (a consumer that stopped reading); it tells when a
/// write first waits on it.
struct Stalled(std::sync::Arc<tokio::sync::Notify>);

impl tokio::io::AsyncWrite for Stalled {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.notify_one();
        std::task::Poll::Pending
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

/// Output nobody reads does not hold up the rest: with the local stdout stalled (and so the
/// agent's writes, and the command's), a signal still reaches the command and `--timeout`
/// still ends the exec. `dir` is a scratch directory.
pub async fn stalled_output(client: &Client, dir: &std::path::Path) {
    // A signal: the command's trap leaves a mark.
    let mark = dir.join("interrupted");
    let _ = std::fs::remove_file(&mark);
    let script = format!("trap 'touch {}; exit 0' INT; yes", mark.display());
    let (signals_tx, signals) = signal_channel();
    let c = client.clone();
    let stalled = std::sync::Arc::new(tokio::sync::Notify::new());
    let stdout = Stalled(stalled.clone());
    let exec = tokio::spawn(async move {
        c.exec_full(
            cmd(&["sh", "-c", &script]),
            None,
            NO_STDIN,
            stdout,
            tokio::io::sink(),
            signals,
            None,
        )
        .await
    });
    // Output has reached the client and waits there; behind it the socket, the agent and the
    // command's pipe fill up (`yes` writes far faster than a signal travels).
    stalled.notified().await;
    assert!(signals_tx.send(libc::SIGINT));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mark.exists() {
        assert!(
            Instant::now() < deadline,
            "SIGINT never reached the command"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exec.abort();
    let _ = exec.await;

    // A timeout.
    let (_keep, signals) = signal_channel();
    let started = Instant::now();
    let finished = tokio::time::timeout(
        Duration::from_secs(30),
        client.exec_full(
            cmd(&["yes"]),
            None,
            NO_STDIN,
            Stalled(std::sync::Arc::default()),
            tokio::io::sink(),
            signals,
            Some(Duration::from_secs(1)),
        ),
    )
    .await
    .expect("the timeout ends an exec whose output is not read")
    .expect("exec");
    assert!(finished.timed_out, "{finished:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// A command that exits while stdin still flows (`head -c 1` fed without end): its status
/// comes back, not the broken pipe the client then meets sending more stdin.
pub async fn exit_while_stdin_flows(client: &Client) {
    for _ in 0..10 {
        let mut out = Vec::new();
        let exit = client
            .exec(
                cmd(&["head", "-c", "1"]),
                Some(tokio::io::repeat(b'x')),
                &mut out,
                tokio::io::sink(),
            )
            .await
            .expect("the exit status, not an error");
        assert!(exit.success(), "{exit}");
        assert_eq!(out, b"x");
    }
}

/// Endless stdin (`x`s) that counts what was read and says when `at` bytes have been.
struct CountedInput {
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    at: u64,
    reached: std::sync::Arc<tokio::sync::Notify>,
}

impl tokio::io::AsyncRead for CountedInput {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = buf.remaining();
        buf.put_slice(&vec![b'x'; n]);
        let before = self
            .read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if before < self.at && before + n as u64 >= self.at {
            self.reached.notify_one();
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Input nobody reads does not hold up the rest: a command that never reads its stdin, fed
/// without end, still gets a signal at once, and still dies at once with its connection (the
/// stdin window: without it, the agent stops reading the connection once 4 MiB wait).
pub async fn unread_input(client: &Client) {
    const AT: u64 = 1 << 20;
    let input = |read: &std::sync::Arc<std::sync::atomic::AtomicU64>| {
        let reached = std::sync::Arc::new(tokio::sync::Notify::new());
        let input = CountedInput {
            read: read.clone(),
            at: AT,
            reached: reached.clone(),
        };
        (input, reached)
    };

    // A signal behind 1 MiB of unread input.
    let read = std::sync::Arc::default();
    let (stdin, reached) = input(&read);
    let (signals_tx, signals) = signal_channel();
    let c = client.clone();
    let exec = tokio::spawn(async move {
        c.exec_full(
            cmd(&["sleep", "1000"]),
            None,
            Some(stdin),
            tokio::io::sink(),
            tokio::io::sink(),
            signals,
            None,
        )
        .await
    });
    reached.notified().await;
    let signalled = Instant::now();
    assert!(signals_tx.send(libc::SIGTERM));
    let finished = tokio::time::timeout(Duration::from_secs(20), exec)
        .await
        .expect("SIGTERM behind unread input never reached the command")
        .expect("join")
        .expect("exec");
    assert_eq!(finished.exit.signal, Some(libc::SIGTERM), "{finished:?}");
    println!(
        "measured: SIGTERM behind unread stdin acted in {:?}",
        signalled.elapsed()
    );

    // A hang-up behind unread input: the command dies with the connection.
    let read = std::sync::Arc::default();
    let (stdin, reached) = input(&read);
    let (_keep, signals) = signal_channel();
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let c = client.clone();
    let exec = tokio::spawn(async move {
        let mut out = PidLine(Some(pid_tx), Vec::new());
        c.exec_full(
            cmd(&["sh", "-c", "echo $$; exec sleep 1000"]),
            None,
            Some(stdin),
            &mut out,
            tokio::io::sink(),
            signals,
            None,
        )
        .await
    });
    let pid: u32 = tokio::time::timeout(Duration::from_secs(20), pid_rx)
        .await
        .expect("the command's pid within 20 s")
        .expect("pid");
    reached.notified().await;
    exec.abort();
    let _ = exec.await;
    super::await_gone(
        &[pid],
        Duration::from_secs(10),
        "the command outlived its connection behind unread input",
    )
    .await;
}

/// Takes the first line of stdout as a pid.
struct PidLine(Option<tokio::sync::oneshot::Sender<u32>>, Vec<u8>);

impl tokio::io::AsyncWrite for PidLine {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.1.extend_from_slice(buf);
        if let Some(end) = self.1.iter().position(|&b| b == b'\n') {
            let pid = String::from_utf8_lossy(&self.1[..end]).trim().parse();
            if let (Some(tx), Ok(pid)) = (self.0.take(), pid) {
                let _ = tx.send(pid);
            }
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
