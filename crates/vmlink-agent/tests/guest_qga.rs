//! Conformance of `vmlink-agent --qga` with the real qemu-ga, by difference, inside a lab guest.
//!
//! Both agents run in the same guest on Unix sockets (qemu-ga with `-m unix-listen`: it is never
//! started on the host, where it would grab the host's own virtio ports). Each gets the same
//! script of raw bytes; the answers are compared field by field after normalising what
//! legitimately differs (pids, handles, times, versions, the wording of JSON syntax errors).
//! Deliberate differences are listed in docs/qga-compat.md.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where the test mounts a real block filesystem (a brd RAM disk, ext4) for guest-get-fsinfo
/// and guest-fsfreeze-*.
const FS_DIR: &str = "/run/qga-fs";

/// Where the test mounts a filesystem on a virtio-blk PCI disk (`/dev/vda`).
const VD_DIR: &str = "/run/qga-vd";

/// The lab config: brd, ext4 and virtio_blk loaded, for [`FS_DIR`] and [`VD_DIR`]; the disk
/// is a sparse image file on the host, in Cargo's scratch directory (one per `test`, recreated
/// each run: QEMU locks it, so two guests at once cannot share one).
fn lab_with_a_block_fs(test: &str) -> vmlink_lab::LabConfig {
    let image = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qga-vd-{test}.img"));
    let f = std::fs::File::create(&image).expect("disk image");
    f.set_len(16 << 20).expect("size the disk image");
    vmlink_lab::LabConfig {
        modules: vec![
            "brd".into(),
            "ext4".into(),
            "virtio_blk".into(),
            "virtio_net".into(),
        ],
        qemu_args: vec![
            // A NIC for guest-network-get-interfaces (slirp, restricted: no traffic leaves).
            "-netdev".into(),
            "user,id=n0,restrict=on".into(),
            "-device".into(),
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56".into(),
            "-drive".into(),
            format!("file={},if=none,id=vd0,format=raw", image.display()),
            "-device".into(),
            "virtio-blk-pci,drive=vd0,serial=vmlinkdisk".into(),
        ],
        timeout: Some(Duration::from_secs(240)),
        ..vmlink_lab::LabConfig::default()
    }
}

/// Makes ext4 filesystems on /dev/ram0 and /dev/vda and mounts them on [`FS_DIR`] and
/// [`VD_DIR`].
fn mount_block_fs() {
    std::fs::create_dir_all(FS_DIR).expect("mount point");
    std::fs::create_dir_all(VD_DIR).expect("mount point");
    for argv in [
        &["mkfs.ext4", "-q", "-F", "/dev/ram0"][..],
        &["mount", "-t", "ext4", "/dev/ram0", FS_DIR][..],
        &["mkfs.ext4", "-q", "-F", "/dev/vda"][..],
        &["mount", "-t", "ext4", "/dev/vda", VD_DIR][..],
        &["ip", "link", "set", "eth0", "up"][..],
        &["ip", "addr", "add", "10.0.2.15/24", "dev", "eth0"][..],
    ] {
        let st = Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert!(st.success(), "{argv:?}: {st}");
    }
    std::fs::write(format!("{FS_DIR}/data"), vec![7u8; 1 << 20]).expect("write to the fs");
}

/// The commands both agents get blocked, to compare `--block-rpcs`.
const BLOCKED: &str = "guest-fsfreeze-status,guest-get-users";

struct Peer {
    name: &'static str,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    marker: i64,
}

impl Peer {
    fn connect(name: &'static str, path: &str) -> Peer {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {name} {path}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Peer {
            name,
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
            marker: 7_000_000,
        }
    }

    /// Sends `input`, then a guest-sync marker; returns every answer line before the marker's.
    /// A line that starts with 0xFF comes back as `{"0xff": LINE}`.
    fn exchange(&mut self, input: &[u8]) -> Vec<Value> {
        self.marker += 1;
        self.writer.write_all(input).expect("send");
        let marker = format!(
            "{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{}}}}}",
            self.marker
        );
        self.writer
            .write_all(marker.as_bytes())
            .expect("send marker");
        let mut out = Vec::new();
        loop {
            let mut line = Vec::new();
            self.reader
                .read_until(b'\n', &mut line)
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: no answer to {:?}: {e}",
                        self.name,
                        String::from_utf8_lossy(&input[..input.len().min(200)])
                    )
                });
            assert!(!line.is_empty(), "{} closed the connection", self.name);
            let (delimited, body) = match line.split_first() {
                Some((0xFF, rest)) => (true, rest),
                _ => (false, &line[..]),
            };
            let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
                panic!(
                    "{}: answer is not JSON ({e}): {:?}",
                    self.name,
                    String::from_utf8_lossy(&line)
                )
            });
            if !delimited && v == json!({ "return": self.marker }) {
                return out;
            }
            out.push(if delimited { json!({ "0xff": v }) } else { v });
        }
    }

    fn call(&mut self, execute: &str, arguments: Value) -> Value {
        let req = json!({ "execute": execute, "arguments": arguments }).to_string();
        let mut answers = self.exchange(req.as_bytes());
        assert_eq!(answers.len(), 1, "{}: {execute}: {answers:?}", self.name);
        answers.remove(0)
    }
}

/// Replaces what legitimately differs between the two agents.
fn normalise(v: Value) -> Value {
    match v {
        Value::Object(mut m) => {
            // Traffic counters of a live NIC move between the two calls (IPv6 router
            // solicitations): compare which counters there are, not their values.
            if m.get("name").is_some_and(|n| n != "lo") {
                if let Some(Value::Object(stats)) = m.get_mut("statistics") {
                    for v in stats.values_mut() {
                        if v.is_u64() {
                            *v = json!("N");
                        }
                    }
                }
            }
            if let Some(Value::Object(err)) = m.get_mut("error") {
                if let Some(Value::String(desc)) = err.get_mut("desc") {
                    if desc.starts_with("JSON parse error") && !desc.contains("stray '\u{FFFD}'") {
                        *desc = "JSON parse error".into();
                    }
                }
            }
            Value::Object(m.into_iter().map(|(k, v)| (k, normalise(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(normalise).collect()),
        other => other,
    }
}

fn wait_for_socket(path: &str, child: &mut Child) {
    // qemu-ga prints no readiness line; its socket file appearing is the event.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(path).exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("qemu-ga exited early: {status}");
        }
        assert!(Instant::now() < deadline, "qemu-ga did not create {path}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Agents {
    qemu_ga: Child,
    vmlink: Child,
    qemu_sock: String,
    vmlink_sock: String,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for child in [&mut self.qemu_ga, &mut self.vmlink] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_agents() -> Agents {
    let dir = std::env::temp_dir().join(format!("qga-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("state dir");
    let qemu_sock = dir.join("qemu-ga.sock").display().to_string();
    let vmlink_sock = dir.join("vmlink-qga.sock").display().to_string();
    let mut qemu_ga = Command::new("qemu-ga")
        .args(["-m", "unix-listen", "-p", &qemu_sock])
        .arg("-t")
        .arg(&dir)
        .arg("-f")
        .arg(dir.join("qemu-ga.pid"))
        .args(["-b", BLOCKED])
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-ga (Debian package qemu-guest-agent; scripts/install-deps.sh)");
    wait_for_socket(&qemu_sock, &mut qemu_ga);

    let vmlink = start_vmlink(&dir, &vmlink_sock, &["--block-rpcs", BLOCKED]);
    Agents {
        qemu_ga,
        vmlink,
        qemu_sock,
        vmlink_sock,
    }
}

/// Starts `vmlink-agent --qga unix-listen:QGA_SOCK` (and its own protocol on a socket in
/// `dir`) with `extra` arguments; returns once it serves qga.
fn start_vmlink(dir: &Path, qga_sock: &str, extra: &[&str]) -> Child {
    let mut vmlink = Command::new(env!("CARGO_BIN_EXE_vmlink-agent"))
        .arg("--listen")
        .arg(format!("unix-listen:{}", dir.join("native.sock").display()))
        .arg("--qga")
        .arg(format!("unix-listen:{qga_sock}"))
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink-agent");
    let stderr = vmlink.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .expect("vmlink-agent's readiness line")
            .expect("stderr");
        if line.starts_with("vmlink-agent: qga on ") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    vmlink
}

/// Whether a write and fsync to [`FS_DIR`] complete within 30 s (they block while it is
/// frozen).
fn fs_writable(name: &str) -> bool {
    Command::new("timeout")
        .args(["30", "sh", "-c"])
        .arg(format!("echo x > {FS_DIR}/{name} && sync {FS_DIR}/{name}"))
        .status()
        .expect("run timeout")
        .success()
}

/// The script: raw inputs, each followed by the marker. Good requests, bad arguments, wrong
/// types, unknown and blocked commands, malformed JSON, 0xFF resyncs, big and deep inputs.
fn script() -> Vec<Vec<u8>> {
    let mut s: Vec<Vec<u8>> = [
        r#"{"execute":"guest-ping"}"#,
        r#"{"execute":"guest-ping","id":7}"#,
        r#"{"execute":"guest-ping","id":{"a":[1,"b"]}}"#,
        r#"{"execute":"guest-ping","id":true}"#,
        r#"{"execute":"guest-ping"}   \n\n {"execute":"guest-ping"}"#,
        r#"{"execute":"guest-nope"}"#,
        r#"{"execute":"guest-nope","id":"x"}"#,
        r#"{"execute":"guest-fsfreeze-status"}"#,
        r#"{"execute":"guest-sync","arguments":{"id":123}}"#,
        r#"{"execute":"guest-sync","arguments":{"id":-1}}"#,
        r#"{"execute":"guest-sync","arguments":{"id":"x"}}"#,
        r#"{"execute":"guest-sync","arguments":{"id":1.5}}"#,
        r#"{"execute":"guest-sync","arguments":{"id":99999999999999999999}}"#,
        r#"{"execute":"guest-sync"}"#,
        r#"{"execute":"guest-sync","arguments":{"id":1,"extra":2}}"#,
        r#"{"execute":"guest-sync-delimited","arguments":{"id":5}}"#,
        r#"{"execute":"guest-ping","arguments":{"a":1}}"#,
        r#"{"execute":"guest-ping","arguments":null}"#,
        r#"{"execute":"guest-ping","arguments":[]}"#,
        r#"{"execute":1}"#,
        r#"{"exec":"guest-ping"}"#,
        r#"{"execute":"guest-ping", "foo":1}"#,
        r#"{}"#,
        r#"[1,2]"#,
        r#"42"#,
        r#""str" {"execute":"guest-ping"}"#,
        r#"nul {"execute":"guest-ping"}"#,
        r#"{bad json}"#,
        r#"{"execute":"guest-ping"}}"#,
        r#"}}{"execute":"guest-ping"}"#,
        r#"{'execute':'guest-ping'}"#,
        r#"{"execute":"guest-get-host-name"}"#,
        r#"{"execute":"guest-get-osinfo"}"#,
        r#"{"execute":"guest-get-timezone"}"#,
        r#"{"execute":"guest-get-users"}"#,
        r#"{"execute":"guest-exec"}"#,
        r#"{"execute":"guest-exec","arguments":{}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/nonexistent"}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/cat","input-data":"!!!"}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/echo","arg":"x"}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/true","capture-output":"yes"}}"#,
        r#"{"execute":"guest-exec-status","arguments":{"pid":999999}}"#,
        r#"{"execute":"guest-exec-status","arguments":{"pid":1}}"#,
        r#"{"execute":"guest-file-open","arguments":{"path":"/nonexistent/f"}}"#,
        r#"{"execute":"guest-file-open","arguments":{"path":"/tmp/x","mode":"zz"}}"#,
        r#"{"execute":"guest-file-read","arguments":{"handle":12345}}"#,
        r#"{"execute":"guest-file-read","arguments":{"handle":"x"}}"#,
        r#"{"execute":"guest-file-close","arguments":{"handle":12345}}"#,
        r#"{"execute":"guest-shutdown","arguments":{"mode":"bogus"}}"#,
        r#"{"execute":"guest-network-get-interfaces"}"#,
        r#"{"execute":"guest-network-get-interfaces","arguments":{"x":1}}"#,
        r#"{"execute":"guest-get-fsinfo"}"#,
        r#"{"execute":"guest-fsfreeze-thaw"}"#,
        r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/nonexistent"]}}"#,
        r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":"/x"}}"#,
    ]
    .iter()
    .map(|s| s.replace("\\n", "\n").into_bytes())
    .collect();
    // 0xFF resyncs: alone, between requests, inside a partial request, before a delimited sync.
    s.push(b"\xff".to_vec());
    s.push(b"{\"execute\":\"guest-ping\"}\xff{\"execute\":\"guest-ping\"}".to_vec());
    s.push(
        b"{\"execute\":\"guest-ping\",\"id\":1}\xff{\"execute\":\"gue"
            .iter()
            .chain(b"st-ping\"}")
            .copied()
            .collect(),
    );
    s.push(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":9}}".to_vec());
    // Big and deep: a 1 MiB member, and nesting past the bound of 1024.
    let mut big = br#"{"execute":"guest-ping","x":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    big.extend(br#""}"#);
    s.push(big);
    let mut deep = vec![b'['; 1100];
    deep.extend(vec![b']'; 1100]);
    s.push(deep);
    s
}

/// A guest-exec, then guest-exec-status until it has exited (bounded), then once more.
fn exec_flow(p: &mut Peer, args: Value) -> Vec<Value> {
    let started = p.call("guest-exec", args);
    let Some(pid) = started["return"]["pid"].as_i64() else {
        return vec![started];
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = p.call("guest-exec-status", json!({ "pid": pid }));
        if status["return"]["exited"] != json!(false) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{}: pid {pid} did not exit",
            p.name
        );
        // guest-exec-status is the protocol's only way to learn of the exit: poll it.
        std::thread::sleep(Duration::from_millis(20));
    };
    let again = p.call("guest-exec-status", json!({ "pid": pid }));
    vec![json!({"pid": "PID"}), status, again]
}

fn file_flow(p: &mut Peer, path: &str) -> Vec<Value> {
    let _ = std::fs::remove_file(path);
    let mut t = Vec::new();
    let opened = p.call("guest-file-open", json!({ "path": path, "mode": "w+" }));
    let h = opened["return"].as_i64().expect("a handle");
    t.push(json!("HANDLE"));
    let mut call = |cmd: &str, extra: Value| {
        let mut args = json!({ "handle": h });
        if let (Some(a), Value::Object(e)) = (args.as_object_mut(), extra) {
            a.extend(e);
        }
        p.call(cmd, args)
    };
    t.push(call(
        "guest-file-write",
        json!({"buf-b64": "aGVsbG8gd29ybGQ="}),
    ));
    t.push(call(
        "guest-file-seek",
        json!({"offset": 0, "whence": "set"}),
    ));
    t.push(call("guest-file-seek", json!({"offset": 0, "whence": 0})));
    t.push(call(
        "guest-file-seek",
        json!({"offset": 0, "whence": "bad"}),
    ));
    t.push(call("guest-file-read", json!({"count": 5})));
    t.push(call("guest-file-read", json!({})));
    t.push(call("guest-file-read", json!({"count": -1})));
    t.push(call("guest-file-read", json!({"count": 0})));
    t.push(call("guest-file-read", json!({"count": 100_000_000})));
    t.push(call("guest-file-write", json!({"buf-b64": "!!"})));
    t.push(call(
        "guest-file-write",
        json!({"buf-b64": "aGVsbG8=", "count": 10}),
    ));
    t.push(call(
        "guest-file-seek",
        json!({"offset": -3, "whence": "end"}),
    ));
    t.push(call("guest-file-read", json!({})));
    t.push(call("guest-file-flush", json!({})));
    t.push(call("guest-file-close", json!({})));
    let closed = call("guest-file-close", json!({}));
    t.push(json!(closed["error"]["desc"]
        .as_str()
        .map(|d| d.replace(&h.to_string(), "HANDLE"))));
    t
}

/// Freeze, what is refused while frozen, thaw; with the list form too.
fn freeze_flow(p: &mut Peer) -> Vec<Value> {
    let mut t = Vec::new();
    t.push(p.call("guest-fsfreeze-freeze", json!({})));
    t.push(p.call("guest-fsfreeze-freeze", json!({})));
    t.push(p.call("guest-exec", json!({"path": "/bin/true"})));
    t.push(p.call("guest-fsfreeze-status", json!({})));
    t.push(p.call("guest-ping", json!({})));
    t.push(p.call("guest-sync", json!({"id": 3})));
    let info = p.call("guest-info", json!({}));
    for name in [
        "guest-exec",
        "guest-ping",
        "guest-fsfreeze-thaw",
        "guest-file-open",
    ] {
        let entry = info["return"]["supported_commands"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == name))
            .cloned();
        t.push(json!({ name: entry.map(|e| e["enabled"].clone()) }));
    }
    t.push(p.call("guest-fsfreeze-thaw", json!({})));
    t.push(p.call("guest-fsfreeze-thaw", json!({})));
    t.push(p.call(
        "guest-fsfreeze-freeze-list",
        json!({ "mountpoints": [FS_DIR] }),
    ));
    t.push(p.call("guest-get-host-name", json!({})));
    t.push(p.call("guest-fsfreeze-thaw", json!({})));
    t.push(p.call("guest-get-host-name", json!({})));
    t
}

fn assert_same(what: &str, qemu: Vec<Value>, vmlink: Vec<Value>) {
    let qemu: Vec<Value> = qemu.into_iter().map(normalise).collect();
    let vmlink: Vec<Value> = vmlink.into_iter().map(normalise).collect();
    assert_eq!(
        vmlink, qemu,
        "\n{what}\n  vmlink-agent: {vmlink:?}\n  qemu-ga:      {qemu:?}"
    );
}

vmlink_lab::guest_test! {
    fn qga_answers_match_the_real_qemu_ga_field_by_field() cfg { lab_with_a_block_fs("conformance") } {
        mount_block_fs();
        let agents = start_agents();
        let mut qemu = Peer::connect("qemu-ga", &agents.qemu_sock);
        let mut ours = Peer::connect("vmlink-agent", &agents.vmlink_sock);

        for input in script() {
            let what = String::from_utf8_lossy(&input[..input.len().min(120)]).into_owned();
            assert_same(&what, qemu.exchange(&input), ours.exchange(&input));
        }

        // guest-info: the version differs; every command vmlink serves is listed by qemu-ga with
        // the same enabled and success-response flags.
        let qinfo = qemu.call("guest-info", json!({}));
        let vinfo = ours.call("guest-info", json!({}));
        let qcmds = qinfo["return"]["supported_commands"].as_array().expect("qemu-ga's list");
        let vcmds = vinfo["return"]["supported_commands"].as_array().expect("our list");
        assert!(vinfo["return"]["version"].is_string());
        assert!(vcmds.len() >= 20, "{vcmds:?}");
        for c in vcmds {
            let q = qcmds.iter().find(|q| q["name"] == c["name"]);
            assert_eq!(q, Some(c), "guest-info entry for {}", c["name"]);
        }

        // Values that are equal in one guest, modulo order and clock.
        let sorted = |v: Value| {
            let mut a = v["return"].as_array().cloned().expect("a list");
            a.sort_by_key(|c| c["logical-id"].as_i64());
            a
        };
        assert_eq!(
            sorted(ours.call("guest-get-vcpus", json!({}))),
            sorted(qemu.call("guest-get-vcpus", json!({})))
        );
        let t0 = qemu.call("guest-get-time", json!({}))["return"].as_i64().expect("qemu-ga's time");
        let t1 = ours.call("guest-get-time", json!({}))["return"].as_i64().expect("our time");
        assert!((t1 - t0).abs() < 60_000_000_000, "{t0} vs {t1}");

        // guest-exec and guest-exec-status.
        for args in [
            json!({"path": "/bin/sh", "arg": ["-c", "echo hi; echo err >&2; exit 3"], "capture-output": true}),
            json!({"path": "/bin/sh", "arg": ["-c", "echo hi; exit 0"]}),
            json!({"path": "/bin/cat", "input-data": "aGVsbG8=", "capture-output": true}),
            json!({"path": "/bin/sh", "arg": ["-c", "kill -9 $$"], "capture-output": true}),
            json!({"path": "/bin/sh", "arg": ["-c", "echo $FOO; echo ${PATH:-none}"], "env": ["FOO=bar"], "capture-output": true}),
            json!({"path": "sh", "arg": ["-c", "echo found on PATH"], "capture-output": true}),
        ] {
            assert_same(&args.to_string(), exec_flow(&mut qemu, args.clone()), exec_flow(&mut ours, args));
        }

        // A real block filesystem: listed, frozen (writes would block), thawed.
        let fsinfo = ours.call("guest-get-fsinfo", json!({}));
        let mine = fsinfo["return"].as_array().expect("a list");
        assert!(
            mine.iter().any(|f| f["mountpoint"] == FS_DIR && f["type"] == "ext4" && f["name"] == "ram0"),
            "{fsinfo}"
        );
        let vd = mine.iter().find(|f| f["mountpoint"] == VD_DIR).expect("the virtio disk's fs");
        assert_eq!(vd["disk"][0]["bus-type"], "virtio", "{fsinfo}");
        assert_eq!(vd["disk"][0]["dev"], "/dev/vda", "{fsinfo}");
        let nics = ours.call("guest-network-get-interfaces", json!({}));
        for expected in ["127.0.0.1", "10.0.2.15", "52:54:00:12:34:56"] {
            assert!(nics.to_string().contains(expected), "{expected}: {nics}");
        }
        let qemu_freeze = freeze_flow(&mut qemu);
        // qemu-ga froze both block filesystems (the flow compares what it refused meanwhile).
        assert_eq!(qemu_freeze[0], json!({"return": 2}), "{qemu_freeze:?}");
        assert_same("guest-fsfreeze-*", qemu_freeze, freeze_flow(&mut ours));

        // guest-file-*.
        let path = std::env::temp_dir().join("qga-conformance-file").display().to_string();
        assert_same("guest-file-*", file_flow(&mut qemu, &path), file_flow(&mut ours, &path));
        drop(agents);
    }
}

guest_test! {
    fn a_raw_json_session_like_virsh_qemu_agent_command_gets_one_line_back() {
        let agents = start_agents();
        for path in [&agents.qemu_sock, &agents.vmlink_sock] {
            let mut s = UnixStream::connect(path).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
            s.write_all(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":42}}\n").expect("send");
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.last() != Some(&b'\n') {
                assert_eq!(s.read(&mut byte).expect("read"), 1, "{path}: closed");
                line.push(byte[0]);
            }
            assert_eq!(line, b"{\"return\": 42}\n", "{path}");
        }
        drop(agents);
    }
}

vmlink_lab::guest_test! {
    fn an_agent_stopped_while_frozen_waits_for_the_thaw_then_thaws_itself() cfg { lab_with_a_block_fs("stop") } {
        // `systemctl restart` (SIGTERM) between a backup's freeze and thaw: the agent serves on
        // until the host thaws (its snapshot stays consistent), at most STOP_WHILE_FROZEN, and
        // never exits leaving the guest frozen.
        mount_block_fs();
        let dir = std::env::temp_dir().join(format!("qga-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let term = |child: &Child| {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        };

        // The host thaws within the grace: answered meanwhile, then the agent exits.
        let sock = dir.join("a.sock").display().to_string();
        let mut agent = start_vmlink(&dir, &sock, &[]);
        let mut p = Peer::connect("vmlink-agent", &sock);
        assert_eq!(p.call("guest-fsfreeze-freeze", json!({})), json!({"return": 2}));
        term(&agent);
        assert_eq!(p.call("guest-fsfreeze-status", json!({})), json!({"return": "frozen"}));
        assert!(agent.try_wait().expect("wait").is_none(), "exited while frozen");
        assert_eq!(p.call("guest-fsfreeze-thaw", json!({})), json!({"return": 2}));
        let status = agent.wait().expect("wait");
        assert!(status.success(), "{status}");
        assert!(fs_writable("after-thaw"));

        // No thaw comes: the agent thaws by itself after the grace, then exits.
        let sock = dir.join("b.sock").display().to_string();
        let mut agent = start_vmlink(&dir, &sock, &[]);
        let mut p = Peer::connect("vmlink-agent", &sock);
        assert_eq!(p.call("guest-fsfreeze-freeze", json!({})), json!({"return": 2}));
        let t = Instant::now();
        term(&agent);
        let status = agent.wait().expect("wait");
        let waited = t.elapsed();
        assert!(status.success(), "{status}");
        assert!(
            waited >= vmlink_agent::qga::STOP_WHILE_FROZEN - Duration::from_millis(500),
            "exited after {waited:?}, before the grace"
        );
        assert!(fs_writable("after-stop"));
    }
}
