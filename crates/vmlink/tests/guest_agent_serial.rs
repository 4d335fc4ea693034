//! The agent over virtio-serial survives restarts: the real `vmlink-agent` binary in a lab
//! guest, the real `vmlink serial-bridge` on the host, QEMU's chardev sockets in between. The
//! agent is killed and started again while the bridge keeps running; requests during the gap
//! fail with an error, and the first request after it works.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use vmlink_lab::{GuestIo, LabConfig};

use common::{run_vmlink as vmlink, Bridge};

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
    let (ctl, data) = (dir.join("ctl.sock"), dir.join("data.sock"));
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    // The guest: run the agent; when the host asks (a file appears), kill it and start a
    // new one; when the host says stop, end.
    let script = format!(
        "set -e; A={agent}; echo 1 > /run/generation; \
         $A --listen vport:org.vmlink.ctl & \
         while [ ! -e /run/restart ]; do sleep 0.05; done; \
         kill $!; wait $! || true; echo 2 > /run/generation; \
         $A --listen vport:org.vmlink.ctl & \
         while [ ! -e /run/stop ]; do sleep 0.05; done; \
         kill $!; wait $! || true",
        agent = agent.display()
    );
    let cfg = LabConfig {
        serials: vec![
            ("org.vmlink.ctl".into(), ctl.clone()),
            ("org.vmlink.data".into(), data.clone()),
        ],
        timeout: Some(vmlink_lab::testing::GUEST_TIMEOUT),
        ..LabConfig::default()
    };
    let argv: Vec<std::ffi::OsString> = vec!["sh".into(), "-c".into(), script.into()];
    let guest = vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture).expect("boot the guest");
    let sock = dir.join("agent.sock");
    let bridge = Bridge::start(&ctl, &data, &sock, true);
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
