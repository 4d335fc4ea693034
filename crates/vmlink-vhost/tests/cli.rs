//! The `vmlink-vhost` command line: usage errors are one line naming the bad part, status 2;
//! a config file with several VMs starts them all; the stats socket.

mod common;

use std::process::Command;

use vmlink_vhost::counters::Counter;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmlink-vhost"))
        .args(args)
        .output()
        .expect("run vmlink-vhost");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_are_one_line_and_status_2() {
    let cases: [(&[&str], &str); 4] = [
        (&[], "no VM: give --vm SPEC or --config FILE"),
        (
            &["--vm", "guest-cid=2,socket=/tmp/a,uds-path=/tmp/b"],
            "guest-cid 2 is reserved",
        ),
        (
            &["--vm", "guest-cid=3,socket=/tmp/a"],
            "missing uds-path=PATH",
        ),
        (
            &["--config", "/nonexistent/vmlink-vhost.toml"],
            "cannot read",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("vmlink-vhost: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
    let (code, err) = run(&[
        "--vm",
        "guest-cid=3,socket=/tmp/a,uds-path=/tmp/b",
        "--vm",
        "guest-cid=3,socket=/tmp/c,uds-path=/tmp/d",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("guest-cid 3 is used by two VMs"), "{err}");
}

#[test]
fn an_unusable_uds_path_fails_the_start_with_status_1() {
    let (code, err) = run(&[
        "--vm",
        "guest-cid=3,socket=/tmp/a,uds-path=/nonexistent/dir/v",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot listen on uds-path /nonexistent/dir/v"),
        "{err}"
    );
}

#[test]
fn a_config_file_starts_every_vm() {
    let dir = common::test_dir("cli-config");
    let file = dir.join("vms.toml");
    let stats = dir.join("stats.sock");
    let mut text = format!("stats-socket = \"{}\"\n\n", stats.display());
    for cid in [3, 4] {
        text.push_str(&format!(
            "[[vm]]\nguest-cid = {cid}\nsocket = \"{}\"\nuds-path = \"{}\"\ngroups = [\"g\"]\n\n",
            common::vhost_socket(&dir, cid).display(),
            common::uds_path(&dir, cid).display()
        ));
    }
    std::fs::write(&file, text).expect("write config");
    let mut b = common::Backend::start(&["--config".into(), file.display().to_string()], 2);
    assert!(b.alive());
    for cid in [3, 4] {
        assert!(
            common::uds_path(&dir, cid).exists(),
            "uds-path of CID {cid} is bound"
        );
    }
    let doc = common::print_stats(&stats);
    assert_eq!(doc["vms"].as_array().map(Vec::len), Some(2), "{doc}");
}

#[test]
fn a_socket_in_use_is_not_taken_over() {
    let dir = common::test_dir("cli-inuse");
    let uds = common::uds_path(&dir, 3);
    let _other = std::os::unix::net::UnixListener::bind(&uds).expect("another process's socket");
    let spec = common::vm_arg(&dir, 3, "");
    let (code, err) = run(&["--vm", &spec]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{} is in use", uds.display())),
        "{err}"
    );
    // A stale file (nobody listens) is replaced: see guest_restart.rs.
}

#[test]
fn the_stats_socket_serves_every_counter_of_every_vm() {
    use std::io::Read;
    let dir = common::test_dir("cli-stats");
    let stats = dir.join("stats.sock");
    // A stale file (a killed backend's) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&stats).expect("stale socket"));
    let mut b = common::Backend::start(
        &[
            "--vm".into(),
            common::vm_arg(&dir, 3, ""),
            "--vm".into(),
            common::vm_arg(&dir, 4, ",max-connections=8"),
            "--stats-socket".into(),
            stats.display().to_string(),
        ],
        2,
    );
    // A client that connects and never reads does not keep others from being served.
    let _idle = std::os::unix::net::UnixStream::connect(&stats).expect("idle client");
    let doc = common::print_stats(&stats);
    assert_eq!(doc["capture"], serde_json::Value::Null, "no --pcap");
    let vms = doc["vms"].as_array().expect("vms");
    let cids: Vec<u64> = vms.iter().filter_map(|v| v["guest_cid"].as_u64()).collect();
    assert_eq!(cids, [3, 4]);
    assert_eq!(vms[1]["max_connections"], 8);
    for vm in vms {
        assert_eq!(vm["open_connections"], 0, "{vm}");
        let counters = vm["counters"].as_object().expect("counters");
        assert_eq!(counters.len(), Counter::ALL.len(), "{vm}");
        for c in Counter::ALL {
            assert_eq!(
                counters.get(c.name()),
                Some(&0.into()),
                "{} in {vm}",
                c.name()
            );
        }
    }
    // The same document for a plain socket reader (socat, nc -U), then end-of-file.
    let mut s = std::os::unix::net::UnixStream::connect(&stats).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("document and EOF");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).expect("json"),
        doc
    );
    assert!(b.alive());

    // Another backend on the same stats socket: refused, the first one keeps it.
    let other = common::test_dir("cli-stats-other");
    let (code, err) = run(&[
        "--vm",
        &common::vm_arg(&other, 5, ""),
        "--stats-socket",
        &stats.display().to_string(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("stats socket {} is in use", stats.display())),
        "{err}"
    );
    common::print_stats(&stats);
}

#[test]
fn stats_usage_errors() {
    let dir = common::test_dir("cli-stats-usage");
    let vm = common::vm_arg(&dir, 3, "");
    let uds = common::uds_path(&dir, 3);
    let (code, err) = run(&["--vm", &vm, "--stats-socket", &uds.display().to_string()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is a socket path of the VM with guest-cid 3"),
        "{err}"
    );
    let missing = dir.join("no-such.sock");
    let (code, err) = run(&["--print-stats", &missing.display().to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "vmlink-vhost: --print-stats {}: ",
            missing.display()
        )),
        "{err}"
    );
}

#[test]
fn sigterm_stops_cleanly_removing_the_sockets_it_made() {
    let dir = common::test_dir("cli-sigterm");
    let stats = dir.join("stats.sock");
    let pcap = dir.join("all.pcap");
    // A host listener for guest port 5000 belongs to its owner: it stays.
    let owner = common::uds_path(&dir, 3).with_file_name("vsock-3_5000");
    let _listener = std::os::unix::net::UnixListener::bind(&owner).expect("host listener");
    let mut b = common::Backend::start(
        &[
            "--vm".into(),
            common::vm_arg(&dir, 3, ""),
            "--stats-socket".into(),
            stats.display().to_string(),
            "--pcap".into(),
            pcap.display().to_string(),
        ],
        1,
    );
    let ours = [
        common::vhost_socket(&dir, 3),
        common::uds_path(&dir, 3),
        stats.clone(),
    ];
    for p in &ours {
        assert!(p.exists(), "{} while running", p.display());
    }
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(b.child.id() as i32, libc::SIGTERM) };
    b.wait_log("SIGTERM: stopped");
    let status = b.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status}");
    for p in &ours {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(owner.exists(), "the host's listener socket was removed");
    // The capture file is complete: the pcap header with link type 271 (LINKTYPE_VSOCK).
    let bytes = std::fs::read(&pcap).expect("pcap");
    assert!(bytes.len() >= 24, "pcap of {} bytes", bytes.len());
    assert_eq!(
        u32::from_le_bytes(bytes[20..24].try_into().expect("4")),
        271
    );
}
