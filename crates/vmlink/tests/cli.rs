//! The CLI as a user meets it on the host: bad addresses, dead peers,
//! timeouts, clean shutdown, and bench over channels that need no guest.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = common::vmlink()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmlink");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `vmlink-agent` binary next to `vmlink`.
fn agent_bin() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent")
}

/// A child process killed on drop, so that a failed assertion does not leave it running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` (vmlink-agent, maybe under setpriv) listening on `DIR/agent.sock` (never vsock:
/// this is the host); returns once it says it listens, with its target address.
fn start_host_agent(mut cmd: std::process::Command, dir: &std::path::Path) -> (KillOnDrop, String) {
    use std::io::{BufRead, BufReader};
    let sock = dir.join("agent.sock");
    let mut child = cmd
        .args(["--listen", &format!("unix-listen:{}", sock.display())])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink-agent");
    let stderr = child.stderr.take().expect("stderr");
    let agent = KillOnDrop(child);
    let mut lines = BufReader::new(stderr).lines();
    let line = lines.next().expect("agent printed nothing").expect("read");
    assert!(line.starts_with("vmlink-agent: listening on "), "{line}");
    // Its later messages are read too (a closed pipe would fail its writes).
    std::thread::spawn(move || lines.for_each(drop));
    (agent, format!("unix:{}", sock.display()))
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmlink-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn bad_address_is_a_usage_error_naming_the_part_and_the_form() {
    let (code, _, err) = run(&["relay", "vsock:x:5", "stdio"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("CID `x`") && err.contains("expected vsock:CID:PORT"),
        "{err}"
    );
    let (code, _, err) = run(&["bench", "run", "hvsock:/tmp/only-a-path"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected hvsock:UDS_PATH:PORT"), "{err}");
    let (code, _, err) = run(&["relay", "tcp-listen:1", "tcp-listen:2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("at most one address may listen"), "{err}");
}

#[test]
fn dead_peer_is_a_one_line_error_and_status_1() {
    let d = tmp("dead");
    let p = d.join("none.sock");
    let (code, _, err) = run(&["bench", "run", &format!("unix:{}", p.display())]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("vmlink: error: cannot connect to unix:"),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn hvsock_handshake_timeout_is_reported_and_bounded() {
    let d = tmp("hvto");
    let uds = d.join("vmm.sock");
    let _l = UnixListener::bind(&uds).expect("silent VMM");
    let t = Instant::now();
    let (code, _, err) = run(&[
        "bench",
        "run",
        &format!("hvsock:{}:52,connect-timeout=500ms", uds.display()),
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("hybrid vsock handshake with hvsock:") && err.contains("500ms"),
        "{err}"
    );
}

/// Each subcommand that documents examples shows them in its --help (a one-line doc on the
/// subcommand's enum variant used to replace the whole text, examples and all), and the
/// command list keeps one line per subcommand.
#[test]
fn help_shows_each_subcommands_examples() {
    for cmd in [
        &["relay"][..],
        &["cp"],
        &["qga"],
        &["capture"],
        &["serial-bridge"],
        &["exec"],
        &["run"],
        &["logs"],
        &["lab", "up"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let (code, out, err) = run(&args);
        assert_eq!(code, Some(0), "{cmd:?}: {err}");
        assert!(
            out.contains("Examples:"),
            "{cmd:?} --help shows no examples:\n{out}"
        );
    }
    let (_, out, _) = run(&["--help"]);
    for sub in ["relay", "cp", "capture", "serial-bridge"] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{sub} ")))
            .unwrap_or_else(|| panic!("no {sub} in the command list:\n{out}"));
        assert!(
            line.len() > sub.len() + 10,
            "{sub} has no summary: {line:?}"
        );
    }
}

/// `vmlink bench serve unix-listen:SOCK --once`, once it listens.
fn bench_serve_once(sock: &std::path::Path) -> std::process::Child {
    bench_serve(sock, &["--once"])
}

/// `vmlink bench serve unix-listen:SOCK ARGS...`, once it listens.
fn bench_serve(sock: &std::path::Path, args: &[&str]) -> std::process::Child {
    let mut server = common::vmlink()
        .args(["bench", "serve", &format!("unix-listen:{}", sock.display())])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("bench serve");
    // The server prints its address once it listens.
    let mut line = [0u8; 1];
    let mut stderr = server.stderr.take().expect("stderr");
    stderr.read_exact(&mut line).expect("server is listening");
    // Kept open: a server writing to a closed pipe would fail.
    server.stderr = Some(stderr);
    server
}

/// `bench serve --max-connections 1`: a second client waits in the listen queue, unanswered,
/// until the first session ends, and is served then.
#[test]
fn bench_serve_serves_at_most_max_connections_sessions_at_a_time() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vmlink_proto::bench::Request;
    let d = tmp("bench-max");
    let sock = d.join("b.sock");
    // Killed on drop.
    let _server = common::Relay {
        child: bench_serve(&sock, &["--max-connections", "1"]),
        listen: String::new(),
    };
    let download = |s: &mut UnixStream| s.write_all(&Request::Download(3).encode());
    let mut b = [0u8; 3];
    let mut c1 = UnixStream::connect(&sock).expect("c1");
    download(&mut c1).expect("request");
    c1.read_exact(&mut b).expect("the first is served");
    let mut c2 = UnixStream::connect(&sock).expect("c2 reaches the listen queue");
    download(&mut c2).expect("request");
    assert_unanswered(&mut c2, "no session for the second yet");
    drop(c1);
    c2.read_exact(&mut b).expect("served once the first ended");
}

/// `s` gets no answer for 300 ms (it waits in a listen queue); its reads then wait up to 10 s.
fn assert_unanswered(s: &mut std::os::unix::net::UnixStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let e = s.read(&mut [0u8; 1]).expect_err(what);
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{what}: {e}"
    );
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
}

#[test]
fn bench_over_unix_reports_both_directions_and_latency_as_json() {
    let d = tmp("bench");
    let sock = d.join("b.sock");
    let mut server = bench_serve_once(&sock);
    let (code, out, err) = run(&[
        "bench",
        "run",
        &format!("unix:{}", sock.display()),
        "--bytes",
        "8M",
        "--round-trips",
        "200",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["bytes"], 8 << 20);
    assert!(v["upload_mib_s"].as_f64().expect("upload") > 0.0);
    assert!(v["download_mib_s"].as_f64().expect("download") > 0.0);
    let lat = &v["latency_us"];
    assert_eq!(lat["round_trips"], 200);
    assert!(lat["median"].as_f64().expect("median") <= lat["p99"].as_f64().expect("p99"));
    assert!(server
        .wait()
        .expect("server exits after one session")
        .success());
}

/// `bench run --conns N` moves every connection's bytes at once. The fake server here takes
/// each phase's requests on all connections before it answers any: a client that moved one
/// connection after another would never send the second request, and the server's read
/// time-out would end the test.
#[test]
fn bench_conns_moves_every_connection_at_once_and_reports_the_aggregate() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vmlink_proto::bench::{Request, REQUEST_LEN};
    const N: usize = 4;
    const BYTES: u64 = 1 << 20;
    let d = tmp("conns");
    let sock = d.join("b.sock");
    let l = UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        let request = |s: &mut UnixStream| {
            let mut b = [0u8; REQUEST_LEN];
            s.read_exact(&mut b).expect("a request, in time");
            Request::parse(&b).expect("valid").expect("whole")
        };
        let mut conns: Vec<UnixStream> = (0..N)
            .map(|_| {
                let (s, _) = l.accept().expect("accept");
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                s
            })
            .collect();
        for s in &mut conns {
            assert_eq!(request(s), Request::Latency(1));
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("first echo");
            s.write_all(&b).expect("echo");
        }
        for s in &mut conns {
            assert_eq!(request(s), Request::Upload(BYTES));
            let mut data = vec![0u8; BYTES as usize];
            s.read_exact(&mut data).expect("upload bytes");
        }
        for s in &mut conns {
            s.write_all(&BYTES.to_le_bytes()).expect("upload count");
        }
        for s in &mut conns {
            assert_eq!(request(s), Request::Download(BYTES));
        }
        for s in &mut conns {
            s.write_all(&vec![7u8; BYTES as usize])
                .expect("download bytes");
        }
        for s in &mut conns {
            assert_eq!(request(s), Request::Quit);
        }
    });
    let (code, out, err) = run(&[
        "bench",
        "run",
        &format!("unix:{}", sock.display()),
        "--conns",
        &N.to_string(),
        "--bytes",
        "1M",
        "--throughput",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    server
        .join()
        .expect("the server saw every phase on every connection at once");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["conns"], N);
    assert_eq!(v["bytes"], BYTES);
    assert!(v["upload_mib_s"].as_f64().expect("upload") > 0.0);
    assert!(v["download_mib_s"].as_f64().expect("download") > 0.0);
    assert!(v.get("latency_us").is_none(), "--throughput: {v}");

    // One stream only: refused before anything is opened.
    let (code, _, err) = run(&["bench", "run", "vport:org.example.nothing", "--conns", "2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("carries one stream"), "{err}");
}

/// A VMM whose listen queue is full never accepts: `connect-timeout` bounds the connect too,
/// not only the handshake after it.
#[test]
fn hvsock_connect_timeout_covers_a_vmm_whose_listen_queue_is_full() {
    use std::os::fd::AsRawFd;
    let d = tmp("hvfull");
    let uds = d.join("vmm.sock");
    let l = UnixListener::bind(&uds).expect("a VMM that never accepts");
    // SAFETY: a valid listening socket; a backlog of 0 leaves room for one pending connect.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let mut queued = Vec::new();
    // Fill the queue: a non-blocking connect says EAGAIN once it is full.
    loop {
        let s = std::os::unix::net::UnixStream::connect(&uds);
        match s {
            Ok(s) if queued.len() < 8 => {
                s.set_nonblocking(true).expect("nonblocking");
                queued.push(s);
                let probe = probe_full(&uds);
                if probe {
                    break;
                }
            }
            other => panic!("could not fill the listen queue: {other:?}"),
        }
    }
    let t = Instant::now();
    let (code, _, err) = run(&[
        "bench",
        "run",
        &format!("hvsock:{}:52,connect-timeout=500ms", uds.display()),
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("listen queue stayed full"), "{err}");
    drop(l);
}

/// Whether a non-blocking connect to `path` finds the listen queue full (EAGAIN).
fn probe_full(path: &std::path::Path) -> bool {
    // SAFETY: plain socket calls on a fresh descriptor that is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0);
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, b) in sa
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *b as libc::c_char;
        }
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        let full = r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
        libc::close(fd);
        full
    }
}

/// `bench serve` reads no further than an upload's length: the client's next request may
/// come in the same write.
#[test]
fn bench_serve_stops_reading_an_upload_at_its_length() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vmlink_proto::bench::Request;
    let d = tmp("upload-len");
    let sock = d.join("b.sock");
    let mut server = bench_serve_once(&sock);
    let mut c = UnixStream::connect(&sock).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut one = Vec::new();
    one.extend_from_slice(&Request::Upload(10).encode());
    one.extend_from_slice(&[1u8; 10]);
    one.extend_from_slice(&Request::Latency(1).encode());
    one.push(7);
    c.write_all(&one).expect("one write");
    let mut ack = [0u8; 8];
    c.read_exact(&mut ack).expect("upload count");
    assert_eq!(u64::from_le_bytes(ack), 10);
    let mut echo = [0u8; 1];
    c.read_exact(&mut echo)
        .expect("the latency request was not swallowed");
    assert_eq!(echo, [7]);
    c.write_all(&Request::Quit.encode()).expect("quit");
    assert!(server.wait().expect("server exits").success());
}

#[test]
fn relay_shuts_down_cleanly_on_sigterm_and_removes_its_socket() {
    let d = tmp("term");
    let front = d.join("front.sock");
    let relay = common::start_relay(&[
        &format!("unix-listen:{}", front.display()),
        "tcp:127.0.0.1:9",
    ]);
    assert!(front.exists());
    let mut relay = relay;
    let st = std::process::Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let status = relay.child.wait().expect("relay exits");
    assert_eq!(status.code(), Some(0));
    assert!(!front.exists(), "socket file left behind");
}

#[test]
fn completions_are_generated_for_bash() {
    let (code, out, _) = run(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("vmlink") && out.contains("relay"));
}

#[test]
fn lab_run_passes_stdout_stderr_and_status_through_separately() {
    let out = common::vmlink()
        .args([
            "lab",
            "run",
            "--timeout",
            "120s",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 3",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run vmlink lab run");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-err\n"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("to-err"));
}

#[test]
fn lab_run_reports_a_timeout_as_124() {
    let out = common::vmlink()
        .args(["lab", "run", "--timeout", "1s", "--", "sleep", "600"])
        .stdin(Stdio::null())
        .output()
        .expect("run vmlink lab run");
    assert_eq!(out.status.code(), Some(124));
}

/// A TCP peer's urgent byte (`MSG_OOB`) does not stop a splicing relay: what follows it gets
/// through, before and after the peer's FIN (the urgent byte itself is skipped, as a plain read
/// skips it; `--no-splice` does the same).
#[test]
fn relay_splicing_out_of_tcp_steps_over_an_urgent_byte() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    for splice in [true, false] {
        let d = tmp(if splice { "urg-splice" } else { "urg-copy" });
        let sink_path = d.join("sink.sock");
        let sink = UnixListener::bind(&sink_path).expect("sink");
        let got = std::thread::spawn(move || {
            let (mut s, _) = sink.accept().expect("the relay connects");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut all = Vec::new();
            s.read_to_end(&mut all)
                .expect("read to the relay's half-close");
            all
        });
        let mut args = vec![
            "tcp-listen:127.0.0.1:0".to_string(),
            format!("unix:{}", sink_path.display()),
        ];
        if !splice {
            args.insert(0, "--no-splice".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let relay = common::start_relay(&args);
        let port = relay.listen.rsplit(':').next().expect("port").to_string();
        let mut c = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
        c.write_all(b"abc").expect("write");
        // SAFETY: a valid socket and a 1-byte buffer.
        let sent = unsafe { libc::send(c.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
        assert_eq!(sent, 1, "{}", std::io::Error::last_os_error());
        c.write_all(b"def").expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("FIN");
        let all = got.join().expect("sink");
        assert_eq!(all, b"abcdef", "splice: {splice}");
    }
}

#[test]
fn relay_bounds_concurrent_connections_and_serves_the_next_when_one_ends() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let d = tmp("bound");
    let backend = d.join("echo.sock");
    let l = UnixListener::bind(&backend).expect("backend");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut b = [0u8; 1024];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let front = d.join("front.sock");
    let _relay = common::start_relay(&[
        "--max-connections",
        "2",
        &format!("unix-listen:{}", front.display()),
        &format!("unix:{}", backend.display()),
    ]);
    let echo = |s: &mut UnixStream, msg: &[u8]| {
        s.write_all(msg).expect("write");
        let mut b = vec![0u8; msg.len()];
        s.read_exact(&mut b).expect("echo");
        assert_eq!(b, msg);
    };
    let mut c1 = UnixStream::connect(&front).expect("c1");
    let mut c2 = UnixStream::connect(&front).expect("c2");
    echo(&mut c1, b"one");
    echo(&mut c2, b"two");
    // The third waits in the backlog: nothing comes back while two are open.
    let mut c3 = UnixStream::connect(&front).expect("c3 reaches the backlog");
    c3.write_all(b"three").expect("write");
    assert_unanswered(&mut c3, "no relay for the third yet");
    // One ends: the third is served, with what it sent while waiting.
    drop(c1);
    let mut b = [0u8; 5];
    c3.read_exact(&mut b).expect("served after a slot frees");
    assert_eq!(&b, b"three");
    echo(&mut c2, b"still");
}

#[test]
fn exec_user_needs_a_root_agent_and_says_so_and_usage_errors_are_status_2() {
    use std::os::unix::fs::PermissionsExt;
    // The agent runs as nobody (these tests run as root, as scripts/test.sh does).
    let d = tmp("nonroot");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut setpriv = std::process::Command::new("setpriv");
    setpriv
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(agent_bin());
    let (agent, target) = start_host_agent(setpriv, &d);
    // The command cannot start: 126, as a shell says it.
    let (code, out, err) = run(&["exec", "--user", "root", &target, "--", "id", "-u"]);
    assert_eq!(code, Some(126), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not root, so it cannot run commands as user \"root\""),
        "{err}"
    );
    // Its own user is fine.
    let (code, out, err) = run(&["exec", "--user", "nobody", &target, "--", "id", "-un"]);
    assert_eq!((code, out.as_str()), (Some(0), "nobody\n"), "{err}");
    drop(agent);

    // Malformed flags of the new verbs are usage errors naming the value.
    let (code, _, err) = run(&["exec", "--timeout", "5y", &target, "--", "true"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("the unit must be ms, s, m, h or d"), "{err}");
    let (code, _, err) = run(&["exec", "-t", "--tty-size", "0x80", &target, "--", "true"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is not ROWSxCOLS"), "{err}");
    let (code, _, err) = run(&["logs", "-n", "100001", &target, "/var/log/x"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("100001"), "{err}");
    let (code, _, err) = run(&["run", &target, "/nonexistent/script.sh"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot read the script /nonexistent/script.sh"),
        "{err}"
    );
}

/// The `termios` of `fd`.
fn termios(fd: i32) -> libc::termios {
    // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios through the pointer, valid for the call.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0, "tcgetattr");
    t
}

#[test]
fn exec_ti_puts_the_local_terminal_in_raw_mode_and_restores_it_on_exit_and_on_timeout() {
    use std::os::fd::AsRawFd;
    let d = tmp("raw");
    let (_agent, target) = start_host_agent(std::process::Command::new(agent_bin()), &d);

    // A local terminal for vmlink: its stdin, stdout and stderr.
    let (master_fd, slave_fd) = common::openpty(24, 80);
    let (master, slave) = (master_fd.as_raw_fd(), slave_fd.as_raw_fd());
    let cooked = termios(slave);
    assert_ne!(cooked.c_lflag & libc::ICANON, 0, "a new terminal is cooked");
    let on_terminal = |args: &[&str]| {
        let io = || Stdio::from(slave_fd.try_clone().expect("dup"));
        common::vmlink()
            .args(args)
            .stdin(io())
            .stdout(io())
            .stderr(io())
            .spawn()
            .expect("vmlink on the terminal")
    };
    let same = |a: &libc::termios, b: &libc::termios| {
        (a.c_iflag, a.c_oflag, a.c_lflag, a.c_cflag) == (b.c_iflag, b.c_oflag, b.c_lflag, b.c_cflag)
    };

    // Raw while the command runs; a key typed locally reaches it; cooked again after.
    let mut vm = KillOnDrop(on_terminal(&[
        "exec",
        "-ti",
        &target,
        "--",
        "sh",
        "-c",
        "echo ready; read x; echo got-$x",
    ]));
    let mut seen = Vec::new();
    common::read_master_until(master, &mut seen, Duration::from_secs(20), "ready");
    assert_eq!(
        termios(slave).c_lflag & (libc::ICANON | libc::ECHO),
        0,
        "raw while running"
    );
    // SAFETY: write reads 3 bytes from the literal.
    let typed = unsafe { libc::write(master, b"go\r".as_ptr().cast(), 3) };
    assert_eq!(typed, 3);
    common::read_master_until(master, &mut seen, Duration::from_secs(20), "got-go");
    let status =
        vm.0.wait()
            .expect("vmlink exits once the command has (no key needed)");
    assert_eq!(status.code(), Some(0));
    assert!(
        same(&termios(slave), &cooked),
        "the terminal was not restored"
    );

    // The same after a timeout (status 124).
    let mut vm = KillOnDrop(on_terminal(&[
        "exec",
        "-ti",
        "--timeout",
        "1s",
        &target,
        "--",
        "sh",
        "-c",
        "echo sleeping; sleep 30",
    ]));
    common::read_master_until(master, &mut seen, Duration::from_secs(20), "sleeping");
    assert_eq!(
        termios(slave).c_lflag & libc::ICANON,
        0,
        "raw while running"
    );
    let status = vm.0.wait().expect("vmlink exits after the timeout");
    assert_eq!(status.code(), Some(124));
    assert!(
        same(&termios(slave), &cooked),
        "the terminal was not restored after a timeout"
    );
    drop((master_fd, slave_fd));
}

#[test]
fn cp_follows_a_symlink_given_as_src_with_l_and_always_to_stdout() {
    use std::os::unix::fs::symlink;
    let d = tmp("cp-follow");
    let (_agent, target) = start_host_agent(std::process::Command::new(agent_bin()), &d);
    std::fs::write(d.join("real"), b"os release\n").expect("write");
    symlink("real", d.join("link")).expect("symlink");
    let remote = |p: &str| format!("{target}:{}", d.join(p).display());
    let is_link = |p: &std::path::Path| {
        std::fs::symlink_metadata(p)
            .expect("lstat")
            .file_type()
            .is_symlink()
    };

    // To stdout, a link is read through (as cp's own example, GUEST:/etc/os-release -).
    let (code, out, err) = run(&["cp", &remote("link"), "-"]);
    assert_eq!((code, out.as_str()), (Some(0), "os release\n"), "{err}");
    // Guest -> host: -L gives the file under the link's name, without it the link.
    let down = d.join("down");
    std::fs::create_dir(&down).expect("mkdir");
    let (code, _, err) = run(&[
        "cp",
        "-q",
        "-L",
        &remote("link"),
        &down.display().to_string(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!is_link(&down.join("link")));
    assert_eq!(
        std::fs::read(down.join("link")).expect("read"),
        b"os release\n"
    );
    let plain = down.join("plain");
    let (code, _, err) = run(&["cp", "-q", &remote("link"), &plain.display().to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(is_link(&plain));
    // Host -> guest: the same with a local link.
    let up = d.join("up");
    std::fs::create_dir(&up).expect("mkdir");
    let (code, _, err) = run(&[
        "cp",
        "-q",
        "--follow-link",
        &d.join("link").display().to_string(),
        &remote("up"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!is_link(&up.join("link")));
    assert_eq!(
        std::fs::read(up.join("link")).expect("read"),
        b"os release\n"
    );
    // A relative guest path is named as such; two remote sides are not mistaken for one.
    let (code, _, err) = run(&["cp", "-q", &format!("{target}:tmp/x"), "/tmp/"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("must be absolute"), "{err}");
    let (code, _, err) = run(&["cp", &remote("link"), &remote("up")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("exactly one of SRC and DST"), "{err}");
}

#[test]
fn serial_bridge_says_when_it_cannot_reach_qemu_and_refuses_a_path_in_use() {
    use std::io::{BufRead, BufReader};
    let d = tmp("bridge");
    let ctl = d.join("no-qemu-here.sock");
    let listen = d.join("agent.sock");
    let mut first = common::vmlink()
        .arg("serial-bridge")
        .arg(&ctl)
        .arg("--listen")
        .arg(&listen)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the bridge");
    let mut lines = BufReader::new(first.stderr.take().expect("stderr")).lines();
    let _first = KillOnDrop(first);
    let serving = lines.next().expect("a line").expect("read");
    assert!(serving.contains("serving unix:"), "{serving}");
    // A wrong CTL path is said at once, not only under RUST_LOG=debug.
    let warned = lines.next().expect("a line").expect("read");
    assert!(
        warned.contains("cannot connect to") && warned.contains("no-qemu-here.sock"),
        "{warned}"
    );
    // A second bridge on the same path would steal it from the first.
    let (code, _, err) = run(&[
        "serial-bridge",
        &ctl.display().to_string(),
        "--listen",
        &listen.display().to_string(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is in use"), "{err}");
}
