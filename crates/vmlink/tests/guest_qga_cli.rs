//! `vmlink qga TARGET COMMAND [JSON-ARGS]` against both the real qemu-ga and
//! `vmlink-agent --qga`, on Unix sockets in a lab guest (qemu-ga never runs on the host).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmlink_lab::guest_test;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_both() -> (Killed, Killed, String, String) {
    let dir = std::env::temp_dir().join(format!("qga-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let qsock = dir.join("qemu-ga.sock").display().to_string();
    let vsock = dir.join("vmlink.sock").display().to_string();
    let mut qemu = Killed(
        Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p", &qsock])
            .arg("-t")
            .arg(&dir)
            .arg("-f")
            .arg(dir.join("pid"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-ga"),
    );
    // qemu-ga prints no readiness line; its socket file appearing is the event.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(&qsock).exists() {
        assert!(qemu.0.try_wait().expect("wait").is_none(), "qemu-ga exited");
        assert!(Instant::now() < deadline, "qemu-ga did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    let mut ours = Killed(
        Command::new(agent)
            .arg("--listen")
            .arg(format!("unix-listen:{}", dir.join("native.sock").display()))
            .arg("--qga")
            .arg(format!("unix-listen:{vsock}"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmlink-agent"),
    );
    let mut lines = BufReader::new(ours.0.stderr.take().expect("stderr")).lines();
    while !lines
        .next()
        .expect("readiness line")
        .expect("stderr")
        .starts_with("vmlink-agent: qga on ")
    {}
    std::thread::spawn(move || lines.for_each(drop));
    (qemu, ours, format!("unix:{qsock}"), format!("unix:{vsock}"))
}

fn qga(args: &[&str]) -> std::process::Output {
    common::vmlink()
        .arg("qga")
        .args(args)
        .output()
        .expect("run vmlink qga")
}

guest_test! {
    fn vmlink_qga_sends_raw_commands_to_qemu_ga_and_to_vmlink_agent_alike() cfg { common::vsock_lab() } {
        let (_qemu, _ours, qemu_target, our_target) = start_both();
        for target in [&qemu_target, &our_target] {
            let out = qga(&[target, "guest-sync", r#"{"id":77}"#]);
            assert!(out.status.success(), "{target}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout), "77\n", "{target}");

            let out = qga(&[target, "guest-ping"]);
            assert!(out.status.success(), "{target}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), "{}\n", "{target}");

            let out = qga(&[target, "guest-exec", r#"{"path":"/bin/true"}"#]);
            assert!(out.status.success(), "{target}");
            assert!(String::from_utf8_lossy(&out.stdout).starts_with("{\"pid\":"), "{target}");

            let out = qga(&[target, "guest-no-such-command"]);
            assert_eq!(out.status.code(), Some(1), "{target}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("CommandNotFound: The command guest-no-such-command has not been found"),
                "{target}: {err}"
            );
        }
        let out = qga(&[&our_target, "guest-ping", "[1]"]);
        assert_eq!(out.status.code(), Some(1));
    }
}
