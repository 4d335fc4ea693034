//! `vmlink exec/cp qga+unix:...` against `vmlink-agent --qga` on a host Unix socket (no guest,
//! no qemu-ga: both run only inside lab guests): the paths the lab test does not reach, the
//! mode kept by cp, and a qemu-ga whose guest-exec is disabled (cp falls back to writing in
//! place, exec says why it cannot run).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};

struct Agent {
    child: Child,
    target: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(dir: &Path, name: &str, extra: &[&str]) -> Agent {
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    let sock = dir.join(format!("{name}.sock"));
    let mut child = std::process::Command::new(agent)
        .arg("--listen")
        .arg(format!(
            "unix-listen:{}",
            dir.join(format!("{name}-native.sock")).display()
        ))
        .arg("--qga")
        .arg(format!("unix-listen:{}", sock.display()))
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink-agent");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    while !lines
        .next()
        .expect("readiness line")
        .expect("stderr")
        .starts_with("vmlink-agent: qga on ")
    {}
    std::thread::spawn(move || lines.for_each(drop));
    Agent {
        child,
        target: format!("qga+unix:{}", sock.display()),
    }
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = common::vmlink()
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmlink");
    if let Some(data) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(data)
            .expect("feed stdin");
    }
    child.wait_with_output().expect("vmlink output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn work_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmlink-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("dst")).expect("work dir");
    d
}

#[test]
fn qga_cp_keeps_the_mode_leaves_no_temporary_file_and_copies_back_exactly() {
    let dir = work_dir("qga-host-cp");
    let agent = start_agent(&dir, "q", &[]);
    let t = &agent.target;
    let src = dir.join("data.bin");
    let data = common::payload(3, (9 << 20) + 123);
    std::fs::write(&src, &data).expect("source");
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).expect("chmod");

    // Into an existing directory: under the source's name, mode kept.
    let dst = dir.join("dst");
    let out = run(
        &[
            "cp",
            src.to_str().expect("utf-8"),
            &format!("{t}:{}", dst.display()),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let copied = dst.join("data.bin");
    assert_eq!(std::fs::read(&copied).expect("copied"), data);
    let mode = std::fs::metadata(&copied)
        .expect("meta")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640);
    let names: Vec<String> = std::fs::read_dir(&dst)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["data.bin"], "a temporary file was left");

    // Back, to a new local name; and to stdout.
    let back = dir.join("back.bin");
    let out = run(
        &[
            "cp",
            "--json",
            &format!("{t}:{}", copied.display()),
            back.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&back).expect("back"), data);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cp --json: one object");
    assert_eq!(v["direction"], "get", "{v}");
    assert_eq!(v["bytes"], data.len() as u64, "{v}");
    assert_eq!(v["checksum"], "sha256", "{v}");
    let out = run(
        &["cp", "--json", &format!("{t}:{}", copied.display()), "-"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "--json with stdout as DST: {out:?}"
    );
    let out = run(&["cp", &format!("{t}:{}", copied.display()), "-"], None);
    assert_eq!(out.stdout, data);

    // A destination whose directory does not exist: an error, nothing created.
    let out = run(
        &[
            "cp",
            src.to_str().expect("utf-8"),
            &format!("{t}:{}/no/such/dir/f", dir.display()),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("No such file"), "{out:?}");

    // exec: env added to (not replacing) the environment, cwd, stdin, status.
    let out = run(
        &[
            "exec",
            t,
            "--env",
            "X=1",
            "--cwd",
            "/",
            "-i",
            "--",
            "sh",
            "-c",
            "read l; echo \"$l $X $(pwd)\"; test -n \"$PATH\"; exit 4",
        ],
        Some(b"in\n"),
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(text(&out.stdout), "in 1 /\n");
    let out = run(&["exec", t, "--cwd", "/no/such/dir", "--", "true"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("/no/such/dir"), "{out:?}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_guest_exec_cp_writes_in_place_with_a_warning_and_exec_says_why() {
    let dir = work_dir("qga-host-noexec");
    let agent = start_agent(&dir, "q", &["--block-rpcs", "guest-exec"]);
    let t = &agent.target;
    let dst = dir.join("dst").join("f");
    let out = run(
        &["cp", "-", &format!("{t}:{}", dst.display())],
        Some(b"hello\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not atomic"), "{out:?}");
    assert_eq!(std::fs::read(&dst).expect("written"), b"hello\n");
    let out = run(&["exec", t, "--", "true"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("Command guest-exec has been disabled"),
        "{out:?}"
    );
    // ping and info need no guest-exec.
    let out = run(&["ping", t], None);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["info", t, "--json"], None);
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(info["agent_version"], env!("CARGO_PKG_VERSION"), "{info}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
