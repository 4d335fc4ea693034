//! The `vmlink-vhost` command line: usage errors are one line naming the bad part, status 2;
//! a config file with several VMs starts them all.

mod common;

use std::process::Command;

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
    let mut text = String::new();
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
