//! `vmlink lab up|ls|down` and every agent verb through `lab:NAME`, as a user runs them, over
//! both host channels of a lab guest: virtio-serial (the guest's vmlink-agent serves the ports
//! org.vmlink.ctl + org.vmlink.data and the host reaches it through the lab's serial bridge, the
//! stream multiplexer) and hybrid vsock (the agent on vsock, vmlink-vhost in the supervisor).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The longest any one `vmlink` command of these tests may take (the 256 MiB copies of a debug
/// build on a loaded CI machine take under a minute).
const COMMAND_DEADLINE: Duration = Duration::from_secs(240);

fn agent_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent")
}

struct Lab {
    state: PathBuf,
    name: String,
}

impl Lab {
    /// `vmlink lab up NAME --agent <the built agent> EXTRA...` in a state directory of its own
    /// (tagged `tag`); returns the lab and what `lab up` printed.
    fn up(name: &str, tag: &str, extra: &[&str]) -> (Lab, String) {
        let lab = Lab {
            state: std::env::temp_dir().join(format!("vmlink-labup-{tag}{}", std::process::id())),
            name: name.into(),
        };
        let agent = agent_binary();
        let mut args = vec!["lab", "up", name];
        args.extend_from_slice(extra);
        args.extend(["--agent", agent.to_str().expect("utf-8")]);
        let text = ok(&lab.run(&args), &format!("lab up {extra:?}"));
        (lab, text)
    }

    fn cmd(&self) -> Command {
        let mut c = common::vmlink();
        c.env("VMLINK_LAB_STATE", &self.state);
        c
    }

    /// Runs `vmlink ARGS` to the end. A command still running after [`COMMAND_DEADLINE`] is
    /// killed and the test fails with the end of the guest's log: a lab guest whose kernel
    /// stalled for good (a TCG timer problem seen in CI, see README.md, "Tests") would otherwise hold the
    /// test, and CI, until nextest's own time-out, and that kill would skip `Drop` and leave the
    /// guest running. Failing here lets `Drop` stop the guest before nextest runs the test again.
    fn run(&self, args: &[&str]) -> Output {
        let child = self
            .cmd()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run vmlink");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        match rx.recv_timeout(COMMAND_DEADLINE) {
            Ok(out) => out.expect("wait for vmlink"),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                let log = std::fs::read_to_string(self.state.join(&self.name).join("log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "`vmlink {}` did not finish within {COMMAND_DEADLINE:?}; the end of the lab \
                     guest's log:\n{}",
                    args.join(" "),
                    tail.join("\n")
                );
            }
        }
    }

    fn target(&self) -> String {
        format!("lab:{}", self.name)
    }

    /// Runs `script` in the guest until its output is `want`; fails with `what` after `within`.
    fn wait_for(&self, script: &str, want: &str, within: Duration, what: &str) {
        let start = Instant::now();
        loop {
            let out = self.run(&["exec", &self.target(), "--", "sh", "-c", script]);
            if String::from_utf8_lossy(&out.stdout).trim() == want {
                return;
            }
            assert!(start.elapsed() < within, "{what}");
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Not `run`: a second panic while unwinding would abort.
        let _ = self.cmd().args(["lab", "down", &self.name]).output();
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_dir_all(self.state.with_extension("files"));
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every agent verb through `lab:NAME`, as the issue lists them: exit codes and signals,
/// streaming, stdin with EOF, a PTY, a client that goes away, cp of a file and a tree both ways
/// (the tree compared entry by entry, by SHA-256), a full disk, an interrupted copy, and a
/// 256 MiB copy with pings and an exec beside it.
fn every_verb(lab: &Lab, channel: &str) {
    let t = lab.target();
    // exec: exit status and signal death pass through.
    let st = lab.run(&["exec", &t, "--", "sh", "-c", "exit 7"]).status;
    assert_eq!(st.code(), Some(7));
    let st = lab
        .run(&["exec", &t, "--", "sh", "-c", "kill -9 $$"])
        .status;
    assert_eq!(st.code(), Some(137));

    // exec streams: the first line arrives well before the command prints the second.
    let mut child = lab
        .cmd()
        .args([
            "exec",
            &t,
            "--",
            "sh",
            "-c",
            "echo first; sleep 3; echo second",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    let at_first = Instant::now();
    let second = lines.next().expect("a second line").expect("read");
    let gap = at_first.elapsed();
    assert_eq!((first.as_str(), second.as_str()), ("first", "second"));
    assert!(
        gap > Duration::from_secs(2),
        "the first line arrived only {gap:?} before the second: output was buffered"
    );
    assert!(child.wait().expect("exec ends").success());

    // stdin with -i, EOF included.
    let mut child = lab
        .cmd()
        .args(["exec", "-i", &t, "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec -i");
    let input = common::payload(5, 3 << 20);
    let mut stdin = child.stdin.take().expect("stdin");
    let feed = {
        let input = input.clone();
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input))
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    feed.join().expect("feeder").expect("write stdin");
    assert!(child.wait().expect("exec ends").success());
    let want: String = common::sha(&input)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(out.starts_with(&want), "{out} vs {want}");

    // -t: a terminal of the size asked for.
    let out = lab.run(&[
        "exec",
        "-t",
        "--tty-size",
        "31x101",
        &t,
        "--",
        "stty",
        "size",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "31 101");

    // A host that goes away mid-exec: the command's process group dies.
    let mut child = lab
        .cmd()
        .args([
            "exec",
            &t,
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 1234",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert_eq!(first, "started\n");
    child.kill().expect("kill the client");
    let _ = child.wait();
    lab.wait_for(
        "ps -o args | grep -c '^sleep 1234' || true",
        "0",
        Duration::from_secs(30),
        "the guest command outlived its client",
    );

    // cp both ways, a file and a tree, compared by content.
    let dir = lab.state.with_extension("files");
    std::fs::create_dir_all(dir.join("tree/sub")).expect("mkdir");
    let big = common::payload(9, 24 << 20);
    std::fs::write(dir.join("big"), &big).expect("write");
    std::fs::write(dir.join("tree/a"), b"alpha").expect("write");
    std::fs::write(dir.join("tree/sub/b"), b"beta").expect("write");
    std::os::unix::fs::symlink("a", dir.join("tree/link")).expect("symlink");
    let p = |name: &str| dir.join(name).to_str().expect("utf-8").to_string();
    ok(
        &lab.run(&["cp", "-q", &p("big"), &format!("{t}:/dev/shm/big")]),
        "cp up",
    );
    ok(
        &lab.run(&["cp", "-q", &p("tree"), &format!("{t}:/dev/shm/")]),
        "cp tree up",
    );
    ok(
        &lab.run(&["cp", "-q", &format!("{t}:/dev/shm/big"), &p("big.back")]),
        "cp down",
    );
    ok(
        &lab.run(&["cp", "-q", &format!("{t}:/dev/shm/tree"), &p("tree.back")]),
        "cp tree down",
    );
    assert!(
        std::fs::read(dir.join("big.back")).expect("read") == big,
        "24 MiB differs"
    );
    assert_eq!(
        tree_digest(&dir.join("tree.back")),
        tree_digest(&dir.join("tree"))
    );
    assert_eq!(
        std::fs::read_link(dir.join("tree.back/link")).expect("a symlink"),
        Path::new("a")
    );

    // A full disk in the guest: one clear line naming ENOSPC, status 1, no file left behind.
    ok(
        &lab.run(&[
            "exec",
            &t,
            "--",
            "sh",
            "-c",
            "mkdir -p /mnt/small && mount -t tmpfs -o size=4m tmpfs /mnt/small",
        ]),
        "mount a small tmpfs",
    );
    let out = lab.run(&["cp", "-q", &p("big"), &format!("{t}:/mnt/small/")]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("No space left on device (ENOSPC)"), "{e}");
    let left = ok(
        &lab.run(&["exec", &t, "--", "ls", "-A", "/mnt/small"]),
        "ls",
    );
    assert_eq!(left, "", "a failed copy left files");

    // An interrupted copy (its client killed while the data flows) leaves neither the file
    // nor its temporary file.
    let huge = common::payload(11, 256 << 20);
    std::fs::write(dir.join("huge"), &huge).expect("write");
    let mut copy = lab
        .cmd()
        .args(["cp", "-q", &p("huge"), &format!("{t}:/dev/shm/cut")])
        .spawn()
        .expect("cp 256 MiB");
    lab.wait_for(
        "cat /dev/shm/.cut* 2>/dev/null | head -c 1048576 | wc -c",
        "1048576",
        Duration::from_secs(60),
        "the copy to be cut never started",
    );
    copy.kill().expect("kill the copy");
    let _ = copy.wait();
    lab.wait_for(
        "ls -A /dev/shm | grep -c cut || true",
        "0",
        Duration::from_secs(30),
        "an interrupted copy left a file in /dev/shm",
    );

    // 256 MiB up while pings and an exec run: the pings stay fast (the copy has its own
    // stream with its own credit), the exec's output is complete; then back down, equal.
    let mut copy = lab
        .cmd()
        .args(["cp", "-q", &p("huge"), &format!("{t}:/dev/shm/huge")])
        .spawn()
        .expect("cp 256 MiB");
    // Wait until the copy is flowing: the temp file in the guest grows.
    lab.wait_for(
        "cat /dev/shm/.huge* 2>/dev/null | head -c 1048576 | wc -c",
        "1048576",
        Duration::from_secs(60),
        "the copy never started",
    );
    let mut exec = lab
        .cmd()
        .args([
            "exec",
            &t,
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo line$i; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec during the copy");
    let out = ok(&lab.run(&["ping", &t, "-c", "10"]), "ping during the copy");
    let mut rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    assert_eq!(rtts.len(), 10, "{out}");
    println!("measured: ping during a 256 MiB cp over {channel}, ms: {rtts:?}");
    let mut lines = String::new();
    exec.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut lines)
        .expect("read");
    assert!(exec.wait().expect("exec").success());
    assert_eq!(lines, "line1\nline2\nline3\nline4\nline5\n");
    assert!(
        copy.wait().expect("cp").success(),
        "the 256 MiB copy failed"
    );
    // The goal is 100 ms, and release builds on an idle host measure 3-47 ms
    // (docs/benchmarks.md). This debug build under TCG shares 2 cores with other guests in
    // CI, where runs measured a median of 82 ms alone and 233-668 ms next to two busy
    // guests: a latency bound here would test the machine's load. What it does test is
    // that a ping never waits behind the copy: that would take the copy's whole 15-60 s.
    assert!(
        rtts[9] < 5000.0,
        "slowest ping {} ms during the copy",
        rtts[9]
    );
    ok(
        &lab.run(&["cp", "-q", &format!("{t}:/dev/shm/huge"), &p("huge.back")]),
        "cp 256 MiB down",
    );
    assert!(
        std::fs::read(dir.join("huge.back")).expect("read") == huge,
        "256 MiB differs"
    );
}

/// Every entry under `root`, sorted: its path, kind, mode, and its content's SHA-256 or its
/// symlink's target.
fn tree_digest(root: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("readdir") {
            let path = e.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("inside")
                .display()
                .to_string();
            let m = std::fs::symlink_metadata(&path).expect("lstat");
            let mode = m.permissions().mode() & 0o7777;
            let what = if m.file_type().is_symlink() {
                format!(
                    "-> {}",
                    std::fs::read_link(&path).expect("readlink").display()
                )
            } else if m.is_dir() {
                todo.push(path.clone());
                format!("dir {mode:o}")
            } else {
                let sum = common::sha(&std::fs::read(&path).expect("read"));
                let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
                format!("file {mode:o} {hex}")
            };
            out.push(format!("{rel} {what}"));
        }
    }
    out.sort();
    out
}

#[test]
fn lab_up_serves_every_verb_over_virtio_serial_and_lab_down_stops_it() {
    let (lab, text) = Lab::up("ci", "", &[]);
    assert!(text.contains("is up"), "{text}");
    let t = lab.target();

    // ls: one guest, up, with its target.
    let ls = ok(&lab.run(&["lab", "ls", "--json"]), "lab ls");
    let v: serde_json::Value = serde_json::from_str(ls.trim()).expect("one JSON line");
    assert_eq!(v["name"], "ci");
    assert_eq!(v["state"], "up");
    assert!(v["target"].as_str().expect("target").starts_with("unix:"));

    // info lists both serial ports.
    let info = ok(&lab.run(&["info", &t, "--json"]), "info");
    let info: serde_json::Value = serde_json::from_str(info.trim()).expect("info JSON");
    let channels = info["channels"].to_string();
    assert!(
        channels.contains("org.vmlink.ctl") && channels.contains("org.vmlink.data"),
        "{channels}"
    );

    every_verb(&lab, "virtio-serial");

    // down: gone, and the name no longer resolves.
    ok(&lab.run(&["lab", "down", &lab.name]), "lab down");
    let ls = ok(&lab.run(&["lab", "ls", "--json"]), "lab ls");
    assert!(ls.trim().is_empty(), "{ls}");
    let out = lab.run(&["ping", &t]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no lab guest named ci"), "{err}");
}

#[test]
fn lab_targets_with_bad_names_are_usage_errors() {
    let out = common::vmlink()
        .args(["ping", "lab:no/such"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lab guest name"));
}

#[test]
fn lab_up_hvsock_serves_every_verb_through_vmlink_vhost() {
    let (lab, _) = Lab::up("hv", "hv-", &["--channel", "hvsock"]);
    let t = lab.target();
    let ls = ok(&lab.run(&["lab", "ls", "--json"]), "lab ls");
    assert!(ls.contains("\"target\":\"hvsock:"), "{ls}");
    let info = ok(&lab.run(&["info", &t, "--json"]), "info");
    assert!(info.contains("vsock-listen:"), "{info}");
    every_verb(&lab, "hybrid vsock");
    ok(&lab.run(&["lab", "down", &lab.name]), "lab down");
}

#[test]
fn lab_up_that_times_out_stops_its_guest_and_shows_the_log() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab {
        state: std::env::temp_dir().join(format!("vmlink-labup-slow-{}", std::process::id())),
        name: "slow".into(),
    };
    // An "agent" that never answers (the guest sees the host's files): the wait runs out
    // whatever the accelerator, after QEMU has surely started. (Whether the guest has got as
    // far as printing its line by then depends on the machine's load: not asserted.)
    std::fs::create_dir_all(&lab.state).expect("state dir");
    let agent = lab.state.join("never-answers.sh");
    std::fs::write(
        &agent,
        "#!/bin/sh\necho never-answers is running\nexec sleep 1000\n",
    )
    .expect("script");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = lab.run(&[
        "lab",
        "up",
        "slow",
        "--wait",
        "8s",
        "--agent",
        agent.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not answer within 8s"), "{err}");
    // The log's end is in the message: the supervisor's line with QEMU's pid...
    let qemu: u32 = err
        .split("QEMU pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no QEMU pid in the message: {err}"));
    // ...and that QEMU is gone (the supervisor stopped and reaped it before exiting).
    assert!(
        !Path::new(&format!("/proc/{qemu}")).exists(),
        "QEMU {qemu} outlived its timed-out lab guest"
    );
    let ls = ok(&lab.run(&["lab", "ls", "--json"]), "lab ls");
    let v: serde_json::Value = serde_json::from_str(ls.trim()).expect("one JSON line");
    assert_eq!(v["state"], "dead", "{ls}");
}
