//! `vmlink ping`, `info` and `exec` against the real `vmlink-agent` binary,
//! as a user runs them, over vsock in a lab guest.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};

use vmlink_lab::guest_test;

/// The `vmlink-agent` binary, built beside `vmlink`.
fn agent_binary() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent")
}

/// Starts the agent on vsock (loopback clients allowed) and waits for its
/// "listening on" line.
fn start_agent() -> (Child, String) {
    let mut child = std::process::Command::new(agent_binary())
        .args(["--listen", "vsock-listen:any", "--allow-cid", "local"])
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
    let port = common::vsock_port(&addr);
    (child, format!("vsock:local:{port}"))
}

guest_test! {
    fn vmlink_cli_pings_describes_and_execs_through_the_agent() cfg { common::vsock_lab() } {
        let (mut agent, target) = start_agent();

        let out = common::vmlink().args(["ping", &target]).output().expect("ping");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("pong from "));

        let out = common::vmlink().args(["info", &target, "--json"]).output().expect("info");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(v["hostname"], "vmlab");
        assert_eq!(v["kernel"].as_str().map(str::is_empty), Some(false));

        // Output streams back, stdout and stderr apart, and the status passes through.
        let out = common::vmlink()
            .args(["exec", &target, "--env", "GREETING=hi", "--", "sh", "-c", "echo $GREETING; echo oops >&2; exit 5"])
            .output()
            .expect("exec");
        assert_eq!(out.status.code(), Some(5));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

        // Death by a signal is 128+N.
        let out = common::vmlink().args(["exec", &target, "--", "sh", "-c", "kill -KILL $$"]).output().expect("exec");
        assert_eq!(out.status.code(), Some(128 + 9));

        // -i forwards stdin, EOF included.
        let data = common::payload(5, 256 * 1024);
        let mut child = common::vmlink()
            .args(["exec", "-i", &target, "--", "sha256sum"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("exec -i");
        let mut stdin = child.stdin.take().expect("stdin");
        let d = data.clone();
        let w = std::thread::spawn(move || stdin.write_all(&d).expect("feed"));
        let out = child.wait_with_output().expect("exec -i output");
        w.join().expect("writer");
        assert!(out.status.success());
        let hex: String = common::sha(&data).iter().map(|b| format!("{b:02x}")).collect();
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&hex));

        // A wrong target is a one-line error and status 1.
        let out = common::vmlink().args(["ping", "vsock:local:9"]).output().expect("ping");
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

        let _ = agent.kill();
        let _ = agent.wait();
    }
}
