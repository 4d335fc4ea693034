//! `vmlink ping/info/exec/cp qga+unix:SOCK` against a lab guest whose only agent is the stock
//! qemu-ga, serving the real virtio-serial port `org.qemu.guest_agent.0` (SOCK is QEMU's
//! chardev socket for it on the host). The same guest runs `vmlink-agent --qga` alone (no
//! vsock, no org.vmlink.ctl: it serves only qga) on a second port, which gets a raw JSON
//! session like `virsh qemu-agent-command` sends, twice (the port re-opens after the host
//! disconnects), and the same CLI checks, so the two are measured side by side (`measured:`
//! lines; docs/benchmarks.md).

mod common;

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use vmlink_lab::{GuestIo, LabConfig};

const QEMU_GA_PORT: &str = "org.qemu.guest_agent.0";
const VMLINK_PORT: &str = "org.vmlink.qga";

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = common::vmlink();
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run vmlink");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        w.write_all(data).expect("feed stdin");
    }
    child.wait_with_output().expect("vmlink output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits until `vmlink ping TARGET` succeeds: the agent in the guest is up (the handshake is
/// the readiness probe; each attempt waits for its answer).
fn wait_ready(target: &str) {
    let deadline = Instant::now() + Duration::from_secs(200);
    loop {
        let out = run(&["ping", target], None);
        if out.status.success() {
            return;
        }
        // QEMU removes its chardev sockets when it exits: the guest is gone.
        assert!(
            !text(&out.stderr).contains("No such file"),
            "the guest exited: {}",
            text(&out.stderr)
        );
        assert!(
            Instant::now() < deadline,
            "{target} never answered: {}",
            text(&out.stderr)
        );
    }
}

fn sha_hex(b: &[u8]) -> String {
    common::sha(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// A raw session as libvirt sends it: 0xFF + guest-sync-delimited, then commands, one answer
/// line each.
fn raw_session(sock: &Path, id: i64) {
    let mut s = UnixStream::connect(sock).expect("connect to the chardev socket");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut req = vec![0xFF];
    req.extend(
        format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
            .as_bytes(),
    );
    s.write_all(&req).expect("send the sync");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    // Everything before the 0xFF that starts the answer is stale.
    loop {
        assert_eq!(s.read(&mut byte).expect("read"), 1, "closed");
        if byte[0] == 0xFF {
            break;
        }
    }
    let mut line = |s: &mut UnixStream| {
        got.clear();
        while got.last() != Some(&b'\n') {
            assert_eq!(s.read(&mut byte).expect("read"), 1, "closed");
            got.push(byte[0]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    assert_eq!(line(&mut s), format!("{{\"return\": {id}}}\n"));
    s.write_all(b"{\"execute\":\"guest-ping\"}\n")
        .expect("send");
    assert_eq!(line(&mut s), "{\"return\": {}}\n");
    s.write_all(b"{\"execute\":\"guest-get-host-name\",\"id\":\"x1\"}")
        .expect("send");
    assert_eq!(
        line(&mut s),
        "{\"return\": {\"host-name\": \"vmlab\"}, \"id\": \"x1\"}\n"
    );
    s.write_all(b"{\"execute\":\"guest-nope\"}").expect("send");
    assert!(line(&mut s).contains("CommandNotFound"));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Every verb against `target`; returns (exec `true` ms, up MiB/s, down MiB/s).
fn check_verbs(target: &str, work: &Path, agent_name: &str) -> (f64, f64, f64) {
    let out = run(&["ping", "-c", "2", target], None);
    assert!(out.status.success(), "{target}: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).matches("pong from qga+unix:").count(), 2);

    let out = run(&["info", target, "--json"], None);
    assert!(out.status.success(), "{target}: {}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info JSON");
    assert_eq!(info["hostname"], "vmlab", "{info}");
    assert_eq!(info["agent"], "qemu-guest-agent", "{info}");
    assert!(
        info["agent_version"]
            .as_str()
            .is_some_and(|v| v.starts_with(agent_name)),
        "{info}"
    );
    assert!(info["uptime_secs"].as_u64().is_some(), "{info}");
    assert!(!info["kernel"].as_str().unwrap_or("").is_empty(), "{info}");
    let out = run(&["info", target], None);
    assert!(text(&out.stdout).contains("hostname  vmlab"), "{out:?}");

    // Exit status, both streams.
    let out = run(
        &[
            "exec",
            target,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{target}: {out:?}");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    // Death by a signal: 128+N.
    let out = run(&["exec", target, "--", "sh", "-c", "kill -9 $$"], None);
    assert_eq!(out.status.code(), Some(137), "{target}: {out:?}");
    // stdin, EOF included.
    let out = run(
        &["exec", "-i", target, "--", "wc", "-c"],
        Some(&[b'x'; 100_000]),
    );
    assert_eq!(out.status.code(), Some(0), "{target}: {out:?}");
    assert_eq!(text(&out.stdout).trim(), "100000");
    // --env adds to the environment; --cwd.
    let out = run(
        &[
            "exec",
            target,
            "--env",
            "VMLINK_T=a b",
            "--cwd",
            "/proc",
            "--",
            "sh",
            "-c",
            "echo \"$VMLINK_T\"; pwd; test -n \"$PATH\" && echo path",
        ],
        None,
    );
    assert_eq!(text(&out.stdout), "a b\n/proc\npath\n", "{target}: {out:?}");
    // Ctrl-C is forwarded: `kill -s INT` in the guest, so the command dies of SIGINT (130).
    let mut child = common::vmlink()
        .args(["exec", target, "--", "sleep", "120"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink exec");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    // The debug line says the command has started in the guest.
    loop {
        let line = lines
            .next()
            .expect("vmlink exec ended before starting the command")
            .expect("stderr");
        if line.contains("guest-exec started pid") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let t = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = child.wait().expect("vmlink exec ends");
    assert_eq!(status.code(), Some(130), "{target}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "{target}: the kill took {:?}",
        t.elapsed()
    );

    // A command that does not exist: a runtime error naming it.
    let out = run(&["exec", target, "--", "/no/such/cmd"], None);
    assert_eq!(out.status.code(), Some(1), "{target}: {out:?}");
    assert!(text(&out.stderr).contains("/no/such/cmd"), "{out:?}");

    // cp, both ways, multi-MiB, compared by SHA-256 (and the guest's own sha256sum).
    let data = common::payload(7, 6 << 20);
    let local = work.join(format!("up-{agent_name}.bin"));
    std::fs::write(&local, &data).expect("write the payload");
    let t = Instant::now();
    let out = run(
        &[
            "cp",
            local.to_str().expect("utf-8"),
            &format!("{target}:/run/"),
        ],
        None,
    );
    let up = data.len() as f64 / 1048576.0 / t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{target}: {}", text(&out.stderr));
    let remote = format!("/run/up-{agent_name}.bin");
    let out = run(
        &[
            "exec",
            target,
            "--",
            "sh",
            "-c",
            &format!("sha256sum {remote}; ls -a /run"),
        ],
        None,
    );
    let listing = text(&out.stdout);
    assert!(listing.starts_with(&sha_hex(&data)), "{listing}");
    assert!(
        !listing.contains(".vmlink-"),
        "a temporary file was left: {listing}"
    );
    let back = work.join(format!("down-{agent_name}.bin"));
    let t = Instant::now();
    let out = run(
        &[
            "cp",
            &format!("{target}:{remote}"),
            back.to_str().expect("utf-8"),
        ],
        None,
    );
    let down = data.len() as f64 / 1048576.0 / t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{target}: {}", text(&out.stderr));
    assert_eq!(
        common::sha(&std::fs::read(&back).expect("copied back")),
        common::sha(&data)
    );
    // stdin -> guest file -> stdout.
    let out = run(
        &["cp", "-", &format!("{target}:/run/piped")],
        Some(b"piped\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&["cp", &format!("{target}:/run/piped"), "-"], None);
    assert_eq!(text(&out.stdout), "piped\n", "{out:?}");
    // Directories: a clear error either way.
    let out = run(
        &[
            "cp",
            &format!("{target}:/proc/self"),
            work.to_str().expect("utf-8"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("is a directory"), "{out:?}");
    let out = run(
        &[
            "cp",
            work.to_str().expect("utf-8"),
            &format!("{target}:/run/x"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("is a directory"), "{out:?}");
    // A missing guest file: qemu-ga's reason.
    let out = run(&["cp", &format!("{target}:/no/such/file"), "-"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("No such file"), "{out:?}");

    // Round trip of `vmlink exec TARGET -- true`, the whole CLI run (connect, sync, exec, poll).
    let rtts: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let out = run(&["exec", target, "--", "true"], None);
            assert!(out.status.success(), "{out:?}");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    (median(rtts), up, down)
}

#[test]
fn vmlink_verbs_work_against_stock_qemu_ga_on_its_virtio_serial_port() {
    if vmlink_lab::in_guest() {
        return;
    }
    let work: PathBuf =
        std::env::temp_dir().join(format!("vmlink-qga-target-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let qemu_sock = work.join("qemu-ga.sock");
    let vmlink_sock = work.join("vmlink-qga.sock");
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    let cfg = LabConfig {
        serials: vec![
            (QEMU_GA_PORT.into(), qemu_sock.clone()),
            (VMLINK_PORT.into(), vmlink_sock.clone()),
        ],
        timeout: Some(Duration::from_secs(600)),
        ..LabConfig::default()
    };
    // The guest has no vsock (its module may not load) and no org.vmlink.ctl, as a guest
    // wired for qemu-ga alone is (Proxmox's default): `vmlink-agent --qga` serves qga only.
    let script = format!(
        "mkdir -p /run/qga /run/modprobe.d; echo 'install vsock /bin/false' >/run/modprobe.d/no-vsock.conf; \
         {agent} --qga vport:{VMLINK_PORT} & \
         exec qemu-ga -m virtio-serial -p /dev/virtio-ports/{QEMU_GA_PORT} -t /run/qga -f /run/qga/pid",
        agent = agent.display()
    );
    let argv: Vec<std::ffi::OsString> = vec!["sh".into(), "-c".into(), script.into()];
    let mut guest = vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture).expect("boot the guest");

    let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        checks(&work, &qemu_sock, &vmlink_sock);
    }));
    guest.kill();
    let outcome = guest.wait();
    let _ = std::fs::remove_dir_all(&work);
    if let Err(panic) = checks {
        match outcome {
            Ok(o) => eprintln!(
                "--- guest stdout\n{}\n--- guest stderr\n{}",
                text(&o.stdout),
                text(&o.stderr)
            ),
            Err(e) => eprintln!("--- the guest: {e}"),
        }
        std::panic::resume_unwind(panic);
    }
    // The agent ran as the qga-only agent the test means it to be (vsock did not load).
    let out = outcome.expect("the guest's output");
    assert!(
        text(&out.stderr).contains("vmlink-agent: serving only qemu-guest-agent's protocol"),
        "--- guest stderr\n{}",
        text(&out.stderr)
    );
}

/// The host side, while the guest serves both agents.
fn checks(work: &Path, qemu_sock: &Path, vmlink_sock: &Path) {
    // The raw session against vmlink-agent --qga on the real port, twice: the agent re-opens
    // the port after the host disconnects.
    let vmlink_target = format!("qga+unix:{}", vmlink_sock.display());
    wait_ready(&vmlink_target);
    raw_session(vmlink_sock, 4242);
    raw_session(vmlink_sock, 4243);

    let qemu_target = format!("qga+unix:{}", qemu_sock.display());
    wait_ready(&qemu_target);
    let (q_rtt, q_up, q_down) = check_verbs(&qemu_target, work, "7.");
    let (v_rtt, v_up, v_down) = check_verbs(&vmlink_target, work, env!("CARGO_PKG_VERSION"));
    println!(
        "measured: qga+ over virtio-serial, 6 MiB cp: qemu-ga 7.2: exec true {q_rtt:.0} ms, cp up {q_up:.1} MiB/s, down {q_down:.1} MiB/s; \
         vmlink-agent --qga: exec true {v_rtt:.0} ms, cp up {v_up:.1} MiB/s, down {v_down:.1} MiB/s"
    );

    // An address with nothing behind it: a runtime error, exit 1.
    let missing = format!("qga+unix:{}", work.join("nothing.sock").display());
    let out = run(&["ping", &missing], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("nothing.sock"), "{out:?}");
}
