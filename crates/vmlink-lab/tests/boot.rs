//! Real guests: each test boots one (a few seconds under TCG).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use vmlink_lab::{GuestIo, LabConfig, Outcome};

fn argv(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

fn run(cfg: &LabConfig, words: &[&str]) -> Outcome {
    vmlink_lab::run(cfg, &argv(words), GuestIo::Capture).expect("boot the guest")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh directory under cargo's per-target scratch space.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vmlink-lab-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

#[test]
fn exit_status_of_the_command_is_the_outcome_code() {
    let out = run(&LabConfig::default(), &["sh", "-c", "exit 7"]);
    assert_eq!(out.code, 7, "stderr: {}", text(&out.stderr));
}

#[test]
fn stdout_and_stderr_arrive_separately_with_the_callers_environment() {
    let cfg = LabConfig {
        env: vec![("LAB_TEST_VALUE".into(), "it's $here".into())],
        ..LabConfig::default()
    };
    let out = run(
        &cfg,
        &[
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; echo \"$LAB_TEST_VALUE|$VMLINK_LAB_GUEST|$(hostname)|$0\"",
        ],
    );
    assert_eq!(out.code, 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-stdout\nit's $here|1|vmlab|sh\n");
    assert_eq!(text(&out.stderr), "to-stderr\n");
}

#[test]
fn timeout_stops_a_hung_guest_with_code_124() {
    let cfg = LabConfig {
        timeout: Some(Duration::from_secs(2)),
        ..LabConfig::default()
    };
    let out = run(&cfg, &["sleep", "600"]);
    assert_eq!(out.code, 124, "stderr: {}", text(&out.stderr));
    assert!(out.elapsed >= Duration::from_secs(2), "{:?}", out.elapsed);
    assert!(out.elapsed < Duration::from_secs(60), "{:?}", out.elapsed);
    assert!(
        text(&out.stderr).contains("timed out"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn cwd_is_shared_read_write_and_the_rest_is_a_throwaway_overlay() {
    let cwd = std::env::current_dir().expect("cwd");
    let name = format!(".vmlink-lab-boot-test-{}", std::process::id());
    let outside = format!("/etc/vmlink-lab-boot-test-{}", std::process::id());
    let script = format!("pwd; echo from-guest > {name}; echo x > {outside} && cat {outside}");
    let out = run(&LabConfig::default(), &["sh", "-c", &script]);
    let written = std::fs::read_to_string(cwd.join(&name));
    let _ = std::fs::remove_file(cwd.join(&name));
    assert_eq!(out.code, 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\nx\n", cwd.display()));
    assert_eq!(
        written.expect("file written in the guest's cwd"),
        "from-guest\n"
    );
    assert!(
        !std::path::Path::new(&outside).exists(),
        "a write to /etc reached the host"
    );
}

#[test]
fn serial_port_carries_data_both_ways() {
    let dir = scratch("serial");
    let sock = dir.join("t.sock");
    let cfg = LabConfig {
        serials: vec![("t.port".into(), sock.clone())],
        ..LabConfig::default()
    };
    // The guest reads one line, then answers on the same port. A read
    // before the host has connected would see EOF at once (gotcha 9), but
    // spawn returns with the socket in place and the host connects now,
    // seconds before the guest's command starts.
    let guest = vmlink_lab::spawn(
        &cfg,
        &argv(&[
            "sh",
            "-c",
            "read l < /dev/virtio-ports/t.port; echo \"got $l\" > /dev/virtio-ports/t.port",
        ]),
        GuestIo::Capture,
    )
    .expect("spawn");
    let mut stream = UnixStream::connect(&sock).expect("connect to the serial socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    stream.write_all(b"hello\n").expect("write");
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .expect("read the answer");
    let out = guest.wait().expect("wait");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(line, "got hello\n");
    assert_eq!(out.code, 0, "stderr: {}", text(&out.stderr));
}

/// Under TCG the guest must not copy with `rep movs` (one emulated turn per
/// element): QEMU drops ERMS and FSRM, and the kernel its REP_GOOD flag. Under KVM
/// both stay. Either way the guest says which flags it has.
#[test]
fn guest_cpu_string_op_flags_suit_the_accelerator() {
    let cfg = LabConfig::default();
    let accel = vmlink_lab::prepare(&cfg).expect("prepare").accel();
    let out = run(&cfg, &["sh", "-c", "grep -m1 '^flags' /proc/cpuinfo"]);
    assert_eq!(out.code, 0, "stderr: {}", text(&out.stderr));
    let flags = text(&out.stdout);
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    assert!(has("sse2"), "no flags line read: {flags}");
    if accel == vmlink_lab::Accel::Kvm {
        eprintln!("KVM guest: string-op flags left as the host has them");
    } else {
        assert!(!has("erms"), "TCG guest still has erms: {flags}");
        assert!(!has("fsrm"), "TCG guest has fsrm: {flags}");
        assert!(!has("rep_good"), "TCG guest still has rep_good: {flags}");
    }
}

#[test]
fn vsock_loopback_module_loads_and_dev_vsock_exists() {
    let cfg = LabConfig {
        vsock_loopback: true,
        ..LabConfig::default()
    };
    let out = run(
        &cfg,
        &[
            "sh",
            "-c",
            "test -d /sys/module/vsock_loopback && test -c /dev/vsock && echo ok",
        ],
    );
    assert_eq!(out.code, 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ok\n");
}

#[test]
fn in_guest_is_true_only_inside_a_guest() {
    if vmlink_lab::in_guest() {
        // This is the copy of the test binary started below, in the guest.
        assert_eq!(std::env::var("VMLINK_LAB_GUEST").as_deref(), Ok("1"));
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let exe = exe.to_str().expect("utf-8 path");
    let out = run(
        &LabConfig::default(),
        &[
            exe,
            "--exact",
            "in_guest_is_true_only_inside_a_guest",
            "--test-threads=1",
        ],
    );
    assert_eq!(
        out.code,
        0,
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("1 passed"),
        "stdout: {}",
        text(&out.stdout)
    );
}

#[test]
fn dropping_a_guest_kills_qemu() {
    let guest = vmlink_lab::spawn(
        &LabConfig::default(),
        &argv(&["sleep", "600"]),
        GuestIo::Capture,
    )
    .expect("spawn");
    let proc_dir = PathBuf::from(format!("/proc/{}", guest.pid()));
    assert!(proc_dir.exists(), "QEMU is not running");
    drop(guest);
    assert!(!proc_dir.exists(), "QEMU still exists after drop");
}

#[test]
fn bad_options_are_rejected_before_booting() {
    let cfg = LabConfig {
        modules: vec!["no such module".into()],
        ..LabConfig::default()
    };
    let err =
        vmlink_lab::run(&cfg, &argv(&["true"]), GuestIo::Capture).expect_err("bad module name");
    assert!(
        matches!(err, vmlink_lab::LabError::BadOption { ref option, .. } if option == "modules[0]"),
        "{err}"
    );
    let cfg = LabConfig {
        modules: vec!["nosuchmodule_vmlink".into()],
        ..LabConfig::default()
    };
    let err =
        vmlink_lab::run(&cfg, &argv(&["true"]), GuestIo::Capture).expect_err("unknown module");
    assert!(
        matches!(err, vmlink_lab::LabError::NoModule { .. }),
        "{err}"
    );
}
