//! Fixtures for the copy tests (`host_cp.rs` over Unix sockets, `guest_cp.rs` over vsock): a
//! tree with every kind of entry, a comparison of two trees, and a raw protocol session for
//! sending what a well-behaved client never would.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlink_proto::agent::{Decoder, Hello, Message, PROTOCOL_VERSION};
use vmlink_transport::{Addr, AsyncListener, AsyncStream};

/// A fresh empty directory under the temp directory.
pub fn fresh_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("vmlink-cp-{tag}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create a test directory");
    d
}

fn set_mtime(p: &Path, secs: u64) {
    let f = fs::File::open(p).expect("open to set mtime");
    f.set_times(fs::FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(secs)))
        .expect("set mtime");
}

/// Builds `root/tree`: files with odd modes and old mtimes, a nested directory, an empty
/// directory, a symlink pointing outside, and a file of `big` bytes. Returns the tree's path.
pub fn make_tree(root: &Path, big: usize) -> PathBuf {
    let t = root.join("tree");
    fs::create_dir_all(t.join("sub/deeper")).expect("dirs");
    fs::create_dir_all(t.join("empty")).expect("empty dir");
    fs::write(t.join("a.txt"), b"hello\n").expect("a");
    fs::write(t.join("sub/run.sh"), b"#!/bin/sh\necho hi\n").expect("run.sh");
    fs::write(
        t.join("sub/deeper/big.bin"),
        vmlink_lab::testing::payload(7, big),
    )
    .expect("big");
    fs::write(t.join("empty-file"), b"").expect("empty file");
    std::os::unix::fs::symlink("../outside/target", t.join("sub/link")).expect("symlink");
    fs::set_permissions(t.join("a.txt"), fs::Permissions::from_mode(0o640)).expect("mode");
    fs::set_permissions(t.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).expect("mode");
    set_mtime(&t.join("a.txt"), 1_000_000_000);
    set_mtime(&t.join("sub/deeper/big.bin"), 1_234_567_890);
    fs::set_permissions(t.join("sub/deeper"), fs::Permissions::from_mode(0o750)).expect("mode");
    set_mtime(&t.join("sub/deeper"), 1_111_111_111);
    set_mtime(&t.join("empty"), 1_222_222_222);
    t
}

/// One line per entry: relative path, kind, mode, mtime (dirs and files), size and sha256 or
/// link target. Two trees copied faithfully describe the same.
pub fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, p: &Path, out: &mut Vec<String>) {
    let m = fs::symlink_metadata(p).expect("lstat");
    let rel = p.strip_prefix(root).expect("inside").display().to_string();
    let ft = m.file_type();
    if ft.is_symlink() {
        let t = fs::read_link(p).expect("readlink");
        out.push(format!("{rel} symlink -> {}", t.display()));
    } else if ft.is_dir() {
        out.push(format!("{rel} dir {:o} {}", m.mode() & 0o7777, m.mtime()));
        for e in fs::read_dir(p).expect("readdir") {
            walk(root, &e.expect("entry").path(), out);
        }
    } else {
        let sha: String = Sha256::digest(fs::read(p).expect("read"))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push(format!(
            "{rel} file {:o} {}.{} {} {sha}",
            m.mode() & 0o7777,
            m.mtime(),
            m.mtime_nsec(),
            m.len()
        ));
    }
}

/// Names in `dir` that look like the receiver's temporary files.
pub fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return found;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.contains(".vmlink-") && name.ends_with(".tmp") {
            found.push(name);
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.extend(temp_files(&e.path()));
        }
    }
    found
}

/// Waits (polling, bounded) until `cond` holds; the agent cleans up on its own task.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection that speaks frames directly.
pub struct Raw {
    stream: AsyncStream,
    decoder: Decoder,
}

impl Raw {
    /// Connects and exchanges `Hello`s.
    pub async fn open(addr: &Addr) -> Raw {
        let stream = AsyncStream::connect(addr).await.expect("connect");
        let mut raw = Raw {
            stream,
            decoder: Decoder::new(),
        };
        raw.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
            features: Vec::new(),
        }))
        .await;
        match raw.recv().await {
            Some(Message::Hello(_)) => raw,
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    /// Plays the agent: accepts one client on `listener` and exchanges `Hello`s (announcing
    /// every feature but `xxh64`, so copies use SHA-256), for sending a client what a
    /// well-behaved agent never would.
    pub async fn accept(listener: &AsyncListener) -> Raw {
        Raw::accept_without(listener, &["xxh64"]).await
    }

    /// [`Raw::accept`], announcing every feature but `missing` (an older agent).
    pub async fn accept_without(listener: &AsyncListener, missing: &[&str]) -> Raw {
        let stream = listener.accept().await.expect("accept");
        let mut raw = Raw {
            stream,
            decoder: Decoder::new(),
        };
        match raw.recv().await {
            Some(Message::Hello(_)) => {}
            other => panic!("expected Hello, got {other:?}"),
        }
        raw.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "hostile-agent".into(),
            features: vmlink_proto::agent::FEATURES
                .iter()
                .filter(|f| !missing.contains(f))
                .map(|f| f.to_string())
                .collect(),
        }))
        .await;
        raw
    }

    pub async fn send(&mut self, m: &Message) {
        self.send_bytes(&m.encode().expect("encodes")).await;
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("write");
    }

    /// Waits until the client has closed the connection: end of file, or a reset (a client
    /// that closes with our frames unread resets the connection).
    pub async fn until_closed(&mut self) {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = self.stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }

    /// The next message, `None` at EOF.
    pub async fn recv(&mut self) -> Option<Message> {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(m) = self.decoder.next_message().expect("valid frames") {
                return Some(m);
            }
            let n = self.stream.read(&mut buf).await.expect("read");
            if n == 0 {
                return None;
            }
            self.decoder.extend(&buf[..n]);
        }
    }
}
