//! `vmlink exec -t/--user/--timeout`, `vmlink run`, `vmlink logs`, the agent's exec rules and
//! an agent restart, as a user runs them, against the real `vmlink-agent` binary over vsock in
//! one lab guest.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Output, Stdio};

use vmlink_lab::guest_test;

/// Starts the agent binary on vsock (loopback clients allowed) with `extra` flags and waits for
/// its "listening on" line; returns it and its TARGET.
fn start_agent(listen: &str, extra: &[&str]) -> (Child, String) {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    let mut child = std::process::Command::new(bin)
        .args(["--listen", listen, "--allow-cid", "local"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink-agent (cargo build --workspace builds it)");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line = lines.next().expect("agent printed nothing").expect("read");
    let addr = line
        .strip_prefix("vmlink-agent: listening on ")
        .unwrap_or_else(|| panic!("unexpected agent output: {line}"))
        .to_string();
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, format!("vsock:local:{}", common::vsock_port(&addr)))
}

fn vmlink(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = common::vmlink()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmlink");
    let mut w = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let out = child.wait_with_output().expect("vmlink output");
    feeder.join().expect("feeder");
    out
}

/// Runs `vmlink ARGS` on a new pseudo-terminal of 24x80 as its controlling terminal (stdin,
/// stdout and stderr), as in a terminal emulator. Returns the child and the master side.
fn vmlink_on_pty(args: &[&str]) -> (Child, std::fs::File) {
    use std::os::unix::process::CommandExt;
    let (master, slave) = common::openpty(24, 80);
    let (master, slave) = (std::fs::File::from(master), std::fs::File::from(slave));
    let mut cmd = common::vmlink();
    cmd.args(args)
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave);
    // SAFETY: only async-signal-safe calls between fork and exec: a new session whose
    // controlling terminal is the pty on stdin.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    (cmd.spawn().expect("run vmlink on a pty"), master)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

guest_test! {
    fn vmlink_exec_tty_user_timeout_run_logs_exec_rules_and_agent_restart_in_a_guest() cfg { common::vsock_lab() } {
        let (mut agent, t) = start_agent("vsock-listen:any", &["--deny-exec", "rm"]);

        // -t: a terminal of the given size; stdout and stderr both on it.
        let out = vmlink(&["exec", "-t", "--tty-size", "40x132", &t, "--", "sh", "-c", "stty size; tty; echo e >&2"], b"");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let o = text(&out.stdout);
        let lines: Vec<&str> = o.lines().map(|l| l.trim_end_matches('\r')).collect();
        assert_eq!(lines.first(), Some(&"40 132"), "{o:?}");
        assert!(lines.get(1).is_some_and(|l| l.starts_with("/dev/pts/")), "{o:?}");
        assert_eq!(lines.get(2), Some(&"e"), "{o:?}");

        // -t in a real terminal: the guest's pty starts at the terminal's size, and resizing the
        // terminal (SIGWINCH to vmlink) resizes the guest's pty, whose shell gets SIGWINCH too.
        let (mut child, master) = vmlink_on_pty(&["exec", "-t", &t, "--", "sh", "-c",
            "stty size; trap 'echo resized to; stty size; exit 5' WINCH; echo ready; while :; do sleep 0.1; done"]);
        let master_fd = std::os::fd::AsRawFd::as_raw_fd(&master);
        let within = std::time::Duration::from_secs(60);
        let mut seen = Vec::new();
        common::read_master_until(master_fd, &mut seen, within, "ready");
        assert!(text(&seen).contains("24 80"), "the guest pty did not start at 24x80: {:?}", text(&seen));
        let ws = libc::winsize { ws_row: 33, ws_col: 111, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one `winsize` through a valid pointer; the kernel then sends
        // SIGWINCH to the terminal's foreground process group (vmlink).
        assert_eq!(unsafe { libc::ioctl(master_fd, libc::TIOCSWINSZ, &ws) }, 0);
        common::read_master_until(master_fd, &mut seen, within, "resized to");
        common::read_master_until(master_fd, &mut seen, within, "33 111");
        assert_eq!(child.wait().expect("wait").code(), Some(5), "{:?}", text(&seen));
        drop(master);

        // -ti: an interactive shell fed over stdin; its exit status comes back.
        let out = vmlink(&["exec", "-ti", &t, "--", "sh"], b"echo $((6*7))\nexit 3\n");
        assert_eq!(out.status.code(), Some(3), "{} / {}", text(&out.stdout), text(&out.stderr));
        assert!(text(&out.stdout).contains("42\r\n"), "{:?}", text(&out.stdout));

        // --user: runs as that user with its environment; an unknown user is one clear line.
        let out = vmlink(&["exec", "--user", "nobody", &t, "--", "sh", "-c", "id -un; echo $HOME"], b"");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with("nobody\n"), "{}", text(&out.stdout));
        // A command that cannot start exits 126, a missing program 127 (as a shell does).
        let out = vmlink(&["exec", "--user", "no-such-user", &t, "--", "id"], b"");
        assert_eq!(out.status.code(), Some(126));
        let e = text(&out.stderr);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("user \"no-such-user\" does not exist"), "{e}");
        let out = vmlink(&["exec", &t, "--", "/no/such/program"], b"");
        assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("/no/such/program"), "{}", text(&out.stderr));
        let out = vmlink(&["exec", "--cwd", "/no/such/dir", &t, "--", "true"], b"");
        assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));

        // Ctrl-C: SIGINT to vmlink goes to the guest's process group; the status is 130.
        let mut child = common::vmlink()
            .args(["exec", &t, "--", "sh", "-c", "echo ready; exec sleep 100"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run vmlink exec");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("read ready");
        assert_eq!(ready, "ready\n");
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        assert_eq!(child.wait().expect("wait").code(), Some(130));

        // Ctrl-C behind 4 MiB of stdin the command never reads (the stdin window keeps the
        // agent reading the connection, so the signal is not stuck behind the input).
        let mut child = common::vmlink()
            .args(["exec", "-i", &t, "--", "sh", "-c", "echo ready; exec sleep 100"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run vmlink exec -i");
        let mut stdin = child.stdin.take().expect("stdin");
        let (fed_tx, fed) = std::sync::mpsc::channel();
        let feeder = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 << 10];
            let mut total = 0usize;
            while stdin.write_all(&chunk).is_ok() {
                total += chunk.len();
                if total == 4 << 20 {
                    let _ = fed_tx.send(());
                }
            }
        });
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("read ready");
        assert_eq!(ready, "ready\n");
        fed.recv_timeout(std::time::Duration::from_secs(120))
            .expect("vmlink took 4 MiB of stdin (its window) for a command that reads none");
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(std::time::Instant::now() < deadline, "Ctrl-C behind unread stdin did nothing");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(130));
        feeder.join().expect("feeder");

        // --timeout: the group is killed and the status is 124, like timeout(1).
        let start = std::time::Instant::now();
        // (5 s: under TCG on a loaded host, starting `sh` has taken over 1 s.)
        let out = vmlink(&["exec", "--timeout", "5s", &t, "--", "sh", "-c", "echo started; sleep 100"], b"");
        assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "started\n");
        assert!(text(&out.stderr).contains("timed out after 5s"), "{}", text(&out.stderr));
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "{:?}", start.elapsed());

        // run: a local script with arguments, held in a memfd in the guest; its status passes.
        let dir = std::env::temp_dir().join(format!("vmlink-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let script = dir.join("check.sh");
        std::fs::write(&script, "#!/bin/sh\necho \"args: $*\"; readlink \"$0\"; exit 7\n").expect("script");
        let s = script.display().to_string();
        let out = vmlink(&["run", &t, &s, "one", "-two"], b"");
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
        let o = text(&out.stdout);
        assert!(o.starts_with("args: one -two\n/memfd:vmlink-run"), "{o}");

        // logs: the last lines of a file.
        let log = dir.join("app.log");
        std::fs::write(&log, "a\nb\nc\nd\n").expect("log");
        let out = vmlink(&["logs", "-n", "2", &t, &log.display().to_string()], b"");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "c\nd\n");

        // The agent's rules: a denied program is refused, naming the rule.
        let out = vmlink(&["exec", &t, "--", "rm", "-f", "/tmp/nothing"], b"");
        assert_eq!(out.status.code(), Some(1));
        let e = text(&out.stderr);
        assert!(e.contains("refused") && e.contains("--deny-exec rm"), "{e}");

        // The agent dies and is restarted: during the gap a client gets one clear line and
        // status 1; afterwards the same target works again.
        agent.kill().expect("kill the agent");
        agent.wait().expect("reap the agent");
        let out = vmlink(&["ping", &t], b"");
        assert_eq!(out.status.code(), Some(1));
        let e = text(&out.stderr);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("cannot reach the agent: ") && e.contains(" vsock:"), "{e}");
        let out = vmlink(&["exec", &t, "--", "true"], b"");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let port = t.rsplit(':').next().expect("port");
        let (mut agent, again) = start_agent(&format!("vsock-listen:any:{port}"), &[]);
        assert_eq!(again, t);
        let out = vmlink(&["ping", &t], b"");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let out = vmlink(&["exec", &t, "--", "echo", "back"], b"");
        assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "back\n"));

        let _ = agent.kill();
        let _ = agent.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
