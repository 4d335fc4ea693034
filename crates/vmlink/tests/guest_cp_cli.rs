//! `vmlink cp` as a user runs it, against the real `vmlink-agent` binary over vsock in a lab
//! guest: a 256 MiB file both ways, compared byte for byte (with the raw channel's `vmlink bench`
//! figures beside it), a directory tree with modes, mtimes, a symlink and an empty directory, stdin and stdout, a
//! client killed mid-copy, and a full tmpfs. One guest boot for all of it.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use vmlink_lab::guest_test;

fn agent_binary() -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent")
}

/// Starts a process that prints its listening address as the first stderr line; returns the
/// vsock port it listens on.
fn start_listener(mut cmd: std::process::Command, prefix: &str) -> (Child, u32) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().expect("start");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line = lines.next().expect("printed nothing").expect("read");
    let addr = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected output: {line}"))
        .to_string();
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, common::vsock_port(&addr))
}

fn cp(args: &[&str]) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let out = common::vmlink()
        .arg("cp")
        .args(args)
        .output()
        .expect("vmlink cp");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        start.elapsed(),
    )
}

fn cp_ok(args: &[&str]) -> Duration {
    let (code, err, took) = cp(args);
    assert_eq!(code, Some(0), "vmlink cp {args:?}: {err}");
    took
}

/// `vmlink cp --json ARGS`: the copy's own report (bytes, checksum, seconds, MiB/s).
fn cp_json(args: &[&str]) -> serde_json::Value {
    let out = common::vmlink()
        .args(["cp", "--json"])
        .args(args)
        .output()
        .expect("vmlink cp");
    assert!(
        out.status.success(),
        "vmlink cp --json {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// Writes `len` bytes (a multiple of 1 MiB) to `p`: one pseudo-random MiB, each copy with every
/// 4 KiB page stamped with its offset, so that any piece delivered twice, lost or out of order
/// shows. Generating every byte afresh would take this debug test binary most of a minute under
/// TCG.
fn write_big(p: &Path, seed: u64, len: usize) {
    let mut block = common::payload(seed, 1 << 20);
    let mut f = fs::File::create(p).expect("create");
    for i in 0..len >> 20 {
        for (page, at) in (0..block.len()).step_by(4096).enumerate() {
            let offset = ((i << 20) + page * 4096) as u64;
            block[at..at + 8].copy_from_slice(&offset.to_le_bytes());
        }
        f.write_all(&block).expect("write");
    }
    f.sync_all().expect("fsync");
}

/// Whether two files hold the same bytes (read a MiB at a time: hashing 256 MiB three times
/// would cost this TCG guest ~25 s).
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (
        fs::File::open(a).expect("open"),
        fs::File::open(b).expect("open"),
    );
    if fa.metadata().expect("stat").len() != fb.metadata().expect("stat").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).expect("read");
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

fn set_mtime(p: &Path, secs: u64) {
    fs::File::open(p)
        .expect("open")
        .set_times(fs::FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(secs)))
        .expect("set mtime");
}

fn describe(root: &Path) -> Vec<String> {
    fn walk(root: &Path, p: &Path, out: &mut Vec<String>) {
        let m = fs::symlink_metadata(p).expect("lstat");
        let rel = p.strip_prefix(root).expect("inside").display().to_string();
        if m.file_type().is_symlink() {
            out.push(format!(
                "{rel} -> {}",
                fs::read_link(p).expect("readlink").display()
            ));
        } else if m.is_dir() {
            out.push(format!("{rel}/ {:o} {}", m.mode() & 0o7777, m.mtime()));
            for e in fs::read_dir(p).expect("readdir") {
                walk(root, &e.expect("entry").path(), out);
            }
        } else {
            out.push(format!(
                "{rel} {:o} {}.{} {:x?}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec(),
                common::sha(&fs::read(p).expect("read"))
            ));
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.contains(".vmlink-") && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls (bounded) for a condition the agent brings about on its own.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const BIG: usize = 256 << 20;

guest_test! {
    fn vmlink_cp_copies_files_and_trees_both_ways_atomically_over_vsock() cfg {
        // The guest's files live in its RAM (a tmpfs of half of it): 256 MiB three times over.
        vmlink_lab::LabConfig { mem: "2560M".into(), ..common::vsock_lab() }
    } {
        let mut agent_cmd = std::process::Command::new(agent_binary());
        agent_cmd.args(["--listen", "vsock-listen:any", "--allow-cid", "local"]);
        let (mut agent, port) = start_listener(agent_cmd, "vmlink-agent: listening on ");
        let t = format!("vsock:local:{port}");
        let work = Path::new("/tmp/cp");
        fs::create_dir_all(work.join("up")).expect("mkdir");

        // The raw channel, measured by `vmlink bench` on the same path (vsock loopback).
        let mut bench_cmd = common::vmlink();
        bench_cmd.args(["bench", "serve", "vsock-listen:any", "--once"]);
        let (mut bench, bport) = start_listener(bench_cmd, "vmlink: bench serving on ");
        let out = common::vmlink()
            .args(["bench", "run", &format!("vsock:local:{bport}"), "--bytes", "64M", "--round-trips", "10", "--json"])
            .output()
            .expect("bench run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let raw_up = v["upload_mib_s"].as_f64().expect("upload");
        let raw_down = v["download_mib_s"].as_f64().expect("download");
        let _ = bench.wait();

        // 256 MiB to the agent and back, compared byte for byte with the source.
        let src = work.join("src.bin");
        write_big(&src, 11, BIG);
        let up = cp_json(&[src.to_str().expect("utf8"), &format!("{t}:/tmp/cp/up")]);
        assert!(same_bytes(&src, &work.join("up/src.bin")), "256 MiB put differs");
        let down = cp_json(&[&format!("{t}:/tmp/cp/up/src.bin"), "/tmp/cp/down.bin"]);
        assert!(same_bytes(&src, &work.join("down.bin")), "256 MiB get differs");
        for f in ["src.bin", "down.bin", "up/src.bin"] {
            fs::remove_file(work.join(f)).expect("rm");
        }
        for (r, dir) in [(&up, "put"), (&down, "get")] {
            assert_eq!(r["direction"], dir, "{r}");
            assert_eq!(r["bytes"], BIG as u64, "{r}");
            assert_eq!(r["entries"], 1, "{r}");
            assert_eq!(r["checksum"], "xxh64", "the agent announces xxh64: {r}");
            assert!(r["seconds"].as_f64().expect("seconds") > 0.0, "{r}");
        }
        let (up, down) = (up["mib_s"].as_f64().expect("mib_s"), down["mib_s"].as_f64().expect("mib_s"));
        println!(
            "measured: vsock loopback: raw bench (64 MiB) up {raw_up:.1} MiB/s down {raw_down:.1} MiB/s; \
             vmlink cp 256 MiB put {up:.1} MiB/s ({:.0} %) get {down:.1} MiB/s ({:.0} %) (connect to fsync and rename, as cp --json reports it)",
            100.0 * up / raw_up, 100.0 * down / raw_down
        );

        // A tree: modes, mtimes, a symlink (kept as a link), an empty directory.
        let tree = work.join("tree");
        fs::create_dir_all(tree.join("sub/deeper")).expect("mkdir");
        fs::create_dir_all(tree.join("empty")).expect("mkdir");
        fs::write(tree.join("a.txt"), b"hello\n").expect("write");
        fs::write(tree.join("sub/deeper/data"), common::payload(2, 300_000)).expect("write");
        std::os::unix::fs::symlink("../a.txt", tree.join("sub/link")).expect("symlink");
        fs::set_permissions(tree.join("a.txt"), fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::set_permissions(tree.join("sub/deeper/data"), fs::Permissions::from_mode(0o751)).expect("chmod");
        set_mtime(&tree.join("a.txt"), 1_000_000_000);
        set_mtime(&tree.join("empty"), 1_100_000_000);
        fs::set_permissions(tree.join("sub"), fs::Permissions::from_mode(0o750)).expect("chmod");
        set_mtime(&tree.join("sub"), 1_200_000_000);
        cp_ok(&["/tmp/cp/tree", &format!("{t}:/tmp/cp/up")]);
        assert_eq!(describe(&tree), describe(&work.join("up/tree")));
        cp_ok(&[&format!("{t}:/tmp/cp/up/tree"), "/tmp/cp/tree-back"]);
        assert_eq!(describe(&tree), describe(&work.join("tree-back")));

        // stdin to one file, one file to stdout.
        let mut child = common::vmlink()
            .args(["cp", "-", &format!("{t}:/tmp/cp/up/from-stdin")])
            .stdin(Stdio::piped())
            .spawn()
            .expect("cp -");
        child.stdin.take().expect("stdin").write_all(b"streamed\n").expect("feed");
        assert!(child.wait().expect("wait").success());
        let out = common::vmlink()
            .args(["cp", &format!("{t}:/tmp/cp/up/from-stdin"), "-"])
            .output()
            .expect("cp to -");
        assert!(out.status.success());
        assert_eq!(out.stdout, b"streamed\n");

        // A client killed mid-copy: the agent removes its temp file; no partial file appears.
        fs::create_dir_all(work.join("int")).expect("mkdir");
        let mut child = common::vmlink()
            .args(["cp", "-", &format!("{t}:/tmp/cp/int/partial")])
            .stdin(Stdio::piped())
            .spawn()
            .expect("cp -");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&common::payload(3, 1 << 20)).expect("feed");
        eventually("the agent's temp file appears", || !temp_files(&work.join("int")).is_empty());
        child.kill().expect("kill the client");
        child.wait().expect("reap");
        drop(stdin);
        eventually("the agent removes its temp file", || temp_files(&work.join("int")).is_empty());
        assert_eq!(fs::read_dir(work.join("int")).expect("readdir").count(), 0);

        // A full disk: a clear error naming ENOSPC, and nothing left behind.
        let full = work.join("full");
        fs::create_dir_all(&full).expect("mkdir");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", "/tmp/cp/full"])
            .status()
            .expect("mount");
        assert!(st.success(), "mount a 1 MiB tmpfs");
        fs::write(work.join("four.bin"), common::payload(4, 4 << 20)).expect("write");
        let (code, err, _) = cp(&["/tmp/cp/four.bin", &format!("{t}:/tmp/cp/full")]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("ENOSPC") && err.contains("No space left on device"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(fs::read_dir(&full).expect("readdir").count(), 0, "something was left in the full tmpfs");
        let _ = std::process::Command::new("umount").arg("/tmp/cp/full").status();

        agent.kill().expect("stop the agent");
        agent.wait().expect("reap the agent");
    }
}
