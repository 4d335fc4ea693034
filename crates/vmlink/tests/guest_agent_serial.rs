//! The agent over virtio-serial survives restarts: the real `vmlink-agent` binary in a lab
//! guest, the real `vmlink serial-bridge` on the host, QEMU's chardev sockets in between. The
//! agent is killed and started again while the bridge keeps running; requests during the gap
//! fail with an error, and the first request after it works. The second time it is killed
//! (SIGKILL) in the middle of a copy to the host, which can leave the bridge's data lane inside
//! a frame cut short: uploads must still work afterwards.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use vmlink_lab::{GuestIo, LabConfig};

use common::{run_vmlink as vmlink, Bridge};

/// A lab guest with the ports org.vmlink.ctl and org.vmlink.data, whose host sides are
/// `DIR/ctl.sock` and `DIR/data.sock`.
fn serial_lab(dir: &Path) -> (LabConfig, std::path::PathBuf, std::path::PathBuf) {
    let (ctl, data) = (dir.join("ctl.sock"), dir.join("data.sock"));
    let cfg = LabConfig {
        serials: vec![
            ("org.vmlink.ctl".into(), ctl.clone()),
            ("org.vmlink.data".into(), data.clone()),
        ],
        timeout: Some(vmlink_lab::testing::GUEST_TIMEOUT),
        ..LabConfig::default()
    };
    (cfg, ctl, data)
}

/// Asks which agent generation answers until `want` does; returns how long that took.
fn until_generation(target: &str, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let out = vmlink(&["exec", target, "--", "cat", "/run/generation"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "agent generation {want} did not answer within {within:?}; last error: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Each attempt is a process and a full request; they pace themselves.
    }
}

#[test]
fn the_agent_restarts_behind_a_running_serial_bridge() {
    let dir = std::env::temp_dir().join(format!("vmlink-agent-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cfg, ctl, data) = serial_lab(&dir);
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    // The guest: run the agent; when the host asks (a file appears), kill it and start a
    // new one, twice (the second time with SIGKILL); when the host says stop, end.
    let script = format!(
        "set -e; A={agent}; echo 1 > /run/generation; \
         head -c 256M /dev/zero > /dev/shm/big; \
         $A --listen vport:org.vmlink.ctl & \
         while [ ! -e /run/restart ]; do sleep 0.05; done; \
         kill $!; wait $! || true; echo 2 > /run/generation; \
         $A --listen vport:org.vmlink.ctl & \
         while [ ! -e /run/kill ]; do sleep 0.05; done; \
         kill -9 $!; wait $! || true; echo 3 > /run/generation; \
         $A --listen vport:org.vmlink.ctl & \
         while [ ! -e /run/stop ]; do sleep 0.05; done; \
         kill $!; wait $! || true",
        agent = agent.display()
    );
    let argv: Vec<std::ffi::OsString> = vec!["sh".into(), "-c".into(), script.into()];
    let guest = vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture).expect("boot the guest");
    let sock = dir.join("agent.sock");
    let bridge = Bridge::start(&ctl, Some(&data), &sock, true);
    let target = format!("unix:{}", sock.display());

    let first = until_generation(&target, "1", Duration::from_secs(60));
    println!("measured: first answer {first:?} after boot");
    // The agent is killed as soon as the file exists, maybe before the exec's Exit frame
    // leaves, so this exec's own status is not asserted; the restart below proves it ran.
    let _ = vmlink(&["exec", &target, "--", "touch", "/run/restart"]);
    // The old agent is killed, a new one starts; the bridge was never restarted.
    let back = until_generation(&target, "2", Duration::from_secs(60));
    println!("measured: the new agent answered {back:?} after the restart request");
    let out = vmlink(&["ping", &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vmlink(&["exec", &target, "--", "sh", "-c", "echo again; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "again\n");

    // SIGKILL while the agent sends a copy to the host: its last DATA frame on the data lane
    // may be cut short, and the new agent's HELLO swallowed into it on the bridge's side.
    let down = dir.join("down");
    std::fs::create_dir_all(&down).expect("dir");
    let mut get = common::vmlink()
        .args(["cp", "-q", &format!("{target}:/dev/shm/big")])
        .arg(&down)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the get");
    // Mid-copy: the client's temporary file has data.
    let started = Instant::now();
    while !std::fs::read_dir(&down)
        .expect("list")
        .flatten()
        .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
    {
        assert!(
            get.try_wait().expect("wait").is_none(),
            "the get ended early"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the get never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = vmlink(&["exec", &target, "--", "touch", "/run/kill"]);
    let got = get.wait_with_output().expect("the get ends");
    assert!(
        !got.status.success(),
        "the get succeeded although its agent was killed"
    );
    assert!(
        std::fs::read_dir(&down).expect("list").next().is_none(),
        "the failed get left a file behind"
    );
    let back = until_generation(&target, "3", Duration::from_secs(120));
    println!("measured: the agent killed mid-copy answered again after {back:?}");
    // An upload takes the data lane: it must be in step again on both sides.
    round_trip(&target, &dir, 11, "after the agent was killed mid-copy");
    let _ = vmlink(&["exec", &target, "--", "touch", "/run/stop"]);
    let done = guest.wait().expect("guest ends");
    drop(bridge);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        done.code,
        0,
        "guest script failed:\n{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

#[test]
fn a_bridge_given_only_the_control_port_reaches_an_agent_that_has_a_data_port() {
    // The agent waits a few seconds for the data port's host side, then serves on the control
    // port alone (before, it waited for ever and every client failed).
    let dir = std::env::temp_dir().join(format!("vmlink-ctl-only-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cfg, ctl, _data) = serial_lab(&dir);
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    let script = format!(
        "{} --listen vport:org.vmlink.ctl & while [ ! -e /run/stop ]; do sleep 0.05; done",
        agent.display()
    );
    let argv: Vec<std::ffi::OsString> = vec!["sh".into(), "-c".into(), script.into()];
    let guest = vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture).expect("boot the guest");
    let sock = dir.join("agent.sock");
    // QEMU's sockets exist once it listens; the bridge retries until then.
    let bridge = Bridge::start(&ctl, None, &sock, true);
    let target = format!("unix:{}", sock.display());
    let first = until_answers(&target, Duration::from_secs(120));
    println!("measured: first answer {first:?} after boot, control port only");
    round_trip(&target, &dir, 5, "on the control port alone");
    let _ = vmlink(&["exec", &target, "--", "touch", "/run/stop"]);
    let done = guest.wait().expect("guest ends");
    drop(bridge);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("using the control port only"),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// Copies 4 MiB of `common::payload(seed, ..)` to the guest's /dev/shm (a put that hangs is
/// killed after 120 s) and back to stdout, and checks they are the same bytes; `when` names
/// the situation in failures.
fn round_trip(target: &str, dir: &Path, seed: u64, when: &str) {
    let up = dir.join("up.bin");
    let data = common::payload(seed, 4 << 20);
    std::fs::write(&up, &data).expect("write");
    let out = std::process::Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "120",
            env!("CARGO_BIN_EXE_vmlink"),
            "cp",
            "-q",
        ])
        .arg(&up)
        .arg(format!("{target}:/dev/shm/up.bin"))
        .output()
        .expect("run vmlink cp");
    assert!(
        out.status.success(),
        "a put {when} ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vmlink(&["cp", "-q", &format!("{target}:/dev/shm/up.bin"), "-"]);
    assert!(
        out.status.success(),
        "a get {when}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == data,
        "the put's bytes came back different {when}"
    );
}

/// Runs `vmlink exec TARGET -- true` until it succeeds; returns how long that took.
fn until_answers(target: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let out = vmlink(&["exec", target, "--", "true"]);
        if out.status.success() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "the agent did not answer within {within:?}; last error: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
