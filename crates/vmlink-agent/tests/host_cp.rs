//! Copies through the agent over Unix sockets on the host: the behaviours of `vmlink cp` that do
//! not depend on vsock, in seconds (the guest tests repeat the main ones over vsock).

mod common;
mod cp_fixtures;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use cp_fixtures::{describe, eventually, fresh_dir, make_tree, temp_files, Raw};
use sha2::{Digest, Sha256};
use vmlink_agent::client::{Client, ClientError, GetDest, PutSource};
use vmlink_agent::Policy;
use vmlink_proto::agent::{Checksum, Entry, EntryKind, ErrorKind, FileEnd, Message, Put};

fn unix_agent() -> common::Agent {
    common::start_agent(
        &format!("unix-listen:{}", common::socket_path("cp")),
        Policy::default(),
    )
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn file_entry(path: &str, size: Option<u64>) -> Entry {
    Entry {
        kind: EntryKind::File,
        path: path.into(),
        mode: 0o644,
        mtime: 0,
        mtime_nsec: 0,
        size,
        link_target: None,
    }
}

/// Opens a raw `Put` into `dest` and sends a directory entry `dir` in it.
async fn put_with_dir(agent: &vmlink_transport::Addr, dest: &Path, dir: &str) -> Raw {
    let mut raw = Raw::open(agent).await;
    raw.send(&Message::Put(Put {
        path: s(dest),
        exact: false,
        checksum: Checksum::Sha256,
    }))
    .await;
    let entry = Entry {
        kind: EntryKind::Dir,
        mode: 0o755,
        ..file_entry(dir, None)
    };
    raw.send(&Message::Entry(entry)).await;
    raw
}

fn agent_error(m: Option<Message>) -> (ErrorKind, String) {
    match m {
        Some(Message::Error(e)) => (e.kind, e.message),
        other => panic!("expected an Error, got {other:?}"),
    }
}

#[test]
fn a_tree_copies_both_ways_with_modes_mtimes_symlinks_and_empty_dirs() {
    common::runtime().block_on(async {
        let agent = unix_agent();
        let client = Client::connect(&agent.addr).await.expect("connect");
        let src = fresh_dir("src");
        let tree = make_tree(&src, 3 << 20);
        let up = fresh_dir("up");
        let progress = Arc::default();
        let sent = client
            .put(
                PutSource::Path(tree.clone()),
                &s(&up),
                Arc::clone(&progress),
            )
            .await
            .unwrap_or_else(|e| panic!("put: {}", vmlink_transport::error_chain(&e)));
        assert_eq!(sent.bytes, (3 << 20) + 6 + 18);
        assert_eq!(
            progress.load(std::sync::atomic::Ordering::Relaxed),
            sent.bytes
        );
        assert_eq!(describe(&tree), describe(&up.join("tree")));
        assert!(temp_files(&up).is_empty());

        // Back again, to a new name (the destination does not exist: created as it).
        let down = fresh_dir("down");
        client
            .get(
                &s(&up.join("tree")),
                GetDest::Path(down.join("copy")),
                Arc::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("get: {}", vmlink_transport::error_chain(&e)));
        assert_eq!(describe(&tree), describe(&down.join("copy")));

        // A single file over an existing one, and into an existing directory.
        let one = src.join("one.txt");
        fs::write(&one, b"new").expect("write");
        fs::write(up.join("existing"), b"old contents").expect("write");
        client
            .put(
                PutSource::Path(one.clone()),
                &s(&up.join("existing")),
                Arc::default(),
            )
            .await
            .expect("put over a file");
        assert_eq!(fs::read(up.join("existing")).expect("read"), b"new");
        client
            .put(
                PutSource::Path(one),
                &s(&up.join("tree/empty")),
                Arc::default(),
            )
            .await
            .expect("put into a dir");
        assert_eq!(
            fs::read(up.join("tree/empty/one.txt")).expect("read"),
            b"new"
        );

        // `-`: a reader into exactly the named file, and a file to a writer.
        let data = common::payload(3, 200_000);
        client
            .put(
                PutSource::Reader(Box::new(std::io::Cursor::new(data.clone()))),
                &s(&up.join("from-stdin")),
                Arc::default(),
            )
            .await
            .expect("put a stream");
        assert_eq!(fs::read(up.join("from-stdin")).expect("read"), data);
        let out = src.join("stdout.bin");
        let w = fs::File::create(&out).expect("create");
        client
            .get(
                &s(&up.join("from-stdin")),
                GetDest::Writer(Box::new(w)),
                Arc::default(),
            )
            .await
            .expect("get to a writer");
        assert_eq!(fs::read(&out).expect("read"), data);

        // A directory cannot go to a writer; a missing source is named with its errno.
        let e = client
            .get(
                &s(&up.join("tree")),
                GetDest::Writer(Box::new(std::io::sink())),
                Arc::default(),
            )
            .await
            .expect_err("a dir to stdout");
        assert!(matches!(e, ClientError::Copy { .. }), "{e:?}");
        let e = client
            .get(
                &s(&up.join("nope")),
                GetDest::Path(down.clone()),
                Arc::default(),
            )
            .await
            .expect_err("missing");
        let text = vmlink_transport::error_chain(&e);
        assert!(text.contains("ENOENT") && text.contains("nope"), "{text}");
        assert!(!down.join("nope").exists());
    });
}

#[test]
fn a_put_keeps_setuid_and_a_get_drops_it() {
    // The agent trusts the host that pushes into the guest; the host does not trust the guest
    // (`sudo vmlink cp GUEST:/x /usr/local/bin/` must not plant a setuid binary).
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    common::runtime().block_on(async {
        let agent = unix_agent();
        let client = Client::connect(&agent.addr).await.expect("connect");
        let src = fresh_dir("setid-src");
        let tool = src.join("tool");
        fs::write(&tool, b"#!/bin/sh\n").expect("write");
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o4755)).expect("chmod");
        let up = fresh_dir("setid-up");
        client
            .put(PutSource::Path(tool), &s(&up), Arc::default())
            .await
            .expect("put");
        let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o7777;
        assert_eq!(mode(&up.join("tool")), 0o4755);
        let down = fresh_dir("setid-down");
        client
            .get(
                &s(&up.join("tool")),
                GetDest::Path(down.clone()),
                Arc::default(),
            )
            .await
            .expect("get");
        assert_eq!(mode(&down.join("tool")), 0o755);
    });
}

#[test]
fn follow_copies_what_a_symlink_names_under_the_links_own_name() {
    // `vmlink cp -L` (and any copy to stdout): a symlink given as the source is followed; the
    // links below it are not.
    use std::os::unix::fs::symlink;
    common::runtime().block_on(async {
        let agent = unix_agent();
        let client = Client::connect(&agent.addr).await.expect("connect");
        let src = fresh_dir("follow-src");
        fs::write(src.join("real"), b"the contents").expect("write");
        symlink("real", src.join("link")).expect("symlink");
        symlink("nothing-here", src.join("dangling")).expect("symlink");
        fs::create_dir(src.join("dir")).expect("mkdir");
        symlink("../real", src.join("dir/inner")).expect("symlink");
        symlink("dir", src.join("dirlink")).expect("symlink");
        let is_link = |p: &Path| {
            fs::symlink_metadata(p)
                .expect("lstat")
                .file_type()
                .is_symlink()
        };

        // Guest -> host, into a directory: a regular file named after the link.
        let down = fresh_dir("follow-down");
        let got = client
            .get_with(
                &s(&src.join("link")),
                GetDest::Path(down.clone()),
                Arc::default(),
                true,
            )
            .await
            .expect("get -L");
        assert_eq!(got.bytes, 12);
        assert!(!is_link(&down.join("link")));
        assert_eq!(fs::read(down.join("link")).expect("read"), b"the contents");
        // Without it, the link itself.
        client
            .get(
                &s(&src.join("link")),
                GetDest::Path(down.join("plain")),
                Arc::default(),
            )
            .await
            .expect("get");
        assert!(is_link(&down.join("plain")));
        // A directory behind a link: followed at the top only.
        client
            .get_with(
                &s(&src.join("dirlink")),
                GetDest::Path(down.clone()),
                Arc::default(),
                true,
            )
            .await
            .expect("get -L of a directory link");
        assert!(!is_link(&down.join("dirlink")));
        assert!(is_link(&down.join("dirlink/inner")));
        // To a writer: the contents.
        let out = down.join("stdout");
        let w = fs::File::create(&out).expect("create");
        client
            .get_with(
                &s(&src.join("link")),
                GetDest::Writer(Box::new(w)),
                Arc::default(),
                true,
            )
            .await
            .expect("get -L to a writer");
        assert_eq!(fs::read(&out).expect("read"), b"the contents");
        // A dangling link is an error naming it, and leaves nothing behind.
        let before = describe(&down);
        let e = client
            .get_with(
                &s(&src.join("dangling")),
                GetDest::Path(down.clone()),
                Arc::default(),
                true,
            )
            .await
            .expect_err("a dangling link");
        let text = vmlink_transport::error_chain(&e);
        assert!(
            text.contains("dangling") && text.contains("No such file"),
            "{text}"
        );
        assert_eq!(describe(&down), before);

        // Host -> guest: the same for a local link.
        let up = fresh_dir("follow-up");
        client
            .put(
                PutSource::Followed(src.join("link")),
                &s(&up),
                Arc::default(),
            )
            .await
            .expect("put -L");
        assert!(!is_link(&up.join("link")));
        assert_eq!(fs::read(up.join("link")).expect("read"), b"the contents");
        let e = client
            .put(
                PutSource::Followed(src.join("dangling")),
                &s(&up),
                Arc::default(),
            )
            .await
            .expect_err("put -L of a dangling link");
        let text = vmlink_transport::error_chain(&e);
        assert!(
            text.contains("dangling") && text.contains("No such file"),
            "{text}"
        );
        assert!(temp_files(&up).is_empty());
    });
}

#[test]
fn an_agent_without_follow_is_refused_it_unless_the_copy_goes_to_a_writer() {
    // An older agent would ignore `follow` and send the link itself: `cp -L` into a directory
    // would then quietly make a symlink. To stdout only a regular file can go anyway.
    common::runtime().block_on(async {
        let listen: vmlink_transport::Addr = format!("unix-listen:{}", common::socket_path("old"))
            .parse()
            .expect("address");
        let listener = vmlink_transport::AsyncListener::bind(&listen).expect("bind");
        let addr = vmlink_agent::connect_addr_for(listener.local_addr()).expect("connect address");
        let agent = tokio::spawn(async move {
            let mut gets = Vec::new();
            loop {
                let mut raw = Raw::accept_without(&listener, &["xxh64", "follow"]).await;
                match raw.recv().await {
                    None => continue,
                    Some(Message::Get(g)) => {
                        gets.push(g);
                        raw.send(&Message::error(ErrorKind::NotFound, "no such file"))
                            .await;
                        return gets;
                    }
                    other => panic!("expected Get, got {other:?}"),
                }
            }
        });
        let client = Client::connect(&addr).await.expect("connect");
        let e = client
            .get_with(
                "/etc/os-release",
                GetDest::Path(fresh_dir("old-follow")),
                Arc::default(),
                true,
            )
            .await
            .expect_err("refused before asking");
        assert!(
            matches!(e, ClientError::Unsupported { what, .. } if what.contains("cp -L")),
            "{e:?}"
        );
        client
            .get_with(
                "/etc/os-release",
                GetDest::Writer(Box::new(std::io::sink())),
                Arc::default(),
                true,
            )
            .await
            .expect_err("the agent's error");
        let gets = agent.await.expect("agent");
        assert_eq!(gets.len(), 1, "{gets:?}");
        assert!(!gets[0].follow, "{gets:?}");
    });
}

#[test]
fn a_get_into_a_directory_refuses_a_root_the_agent_renamed() {
    // A hostile agent asked for /srv/report.txt answers with `.bashrc`: written into an existing
    // directory, the name would be the guest's choice (scp's CVE-2019-6111).
    common::runtime().block_on(async {
        let listen: vmlink_transport::Addr =
            format!("unix-listen:{}", common::socket_path("hostile"))
                .parse()
                .expect("address");
        let listener = vmlink_transport::AsyncListener::bind(&listen).expect("bind");
        let addr = vmlink_agent::connect_addr_for(listener.local_addr()).expect("connect address");
        let dest = fresh_dir("hostile");
        let agent = tokio::spawn(async move {
            // The client's first connection only checks the Hello; the copy has its own.
            let mut raw = loop {
                let mut raw = Raw::accept(&listener).await;
                match raw.recv().await {
                    None => continue,
                    Some(Message::Get(g)) => assert_eq!(g.path, "/srv/report.txt"),
                    other => panic!("expected Get, got {other:?}"),
                }
                break raw;
            };
            // A whole, well-formed copy (SHA-256, as the Get asked), so that only the name is
            // wrong.
            raw.send(&Message::Entry(file_entry(".bashrc", Some(4))))
                .await;
            raw.send(&Message::Data(b"evil".to_vec())).await;
            let digest = Sha256::digest(b"evil");
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            raw.send(&Message::FileEnd(FileEnd::new(Checksum::Sha256, hex)))
                .await;
            raw.send(&Message::Done).await;
            // Held open until the client gives up (it may reset the connection: it stops
            // reading at the wrong name, with our other frames unread).
            raw.until_closed().await;
        });
        let client = Client::connect(&addr).await.expect("connect");
        let got = client
            .get(
                "/srv/report.txt",
                GetDest::Path(dest.clone()),
                Arc::default(),
            )
            .await;
        match got {
            Err(ClientError::Copy { source, .. }) => {
                let m = source.to_string();
                assert!(m.contains(".bashrc") && m.contains("\"report.txt\""), "{m}");
            }
            other => panic!("a renamed root gave {other:?}"),
        }
        drop(client);
        agent.await.expect("the fake agent");
        assert_eq!(
            fs::read_dir(&dest).expect("readdir").count(),
            0,
            "nothing written"
        );
    });
}

#[test]
fn entries_that_would_escape_the_destination_are_refused_naming_the_entry() {
    common::runtime().block_on(async {
        let agent = unix_agent();
        let dest = fresh_dir("escape");
        let outside = fresh_dir("outside");

        // `..` never gets past the decoder.
        let mut raw = Raw::open(&agent.addr).await;
        raw.send(&Message::Put(Put {
            path: s(&dest),
            exact: false,
            checksum: Checksum::Sha256,
        }))
        .await;
        let mut frame = Message::Entry(file_entry("xx/evil", None))
            .encode()
            .expect("encodes");
        let at = frame.windows(2).position(|w| w == b"xx").expect("the path");
        frame[at..at + 2].copy_from_slice(b"..");
        raw.send_bytes(&frame).await;
        let (kind, message) = agent_error(raw.recv().await);
        assert_eq!(kind, ErrorKind::BadRequest, "{message}");
        assert!(message.contains("../evil"), "{message}");

        // A symlink sent in the copy, then an entry through it.
        let mut raw = put_with_dir(&agent.addr, &dest, "d").await;
        let link = Entry {
            kind: EntryKind::Symlink,
            link_target: Some(s(&outside)),
            ..file_entry("d/l", None)
        };
        raw.send(&Message::Entry(link)).await;
        raw.send(&Message::Entry(file_entry("d/l/planted", Some(1))))
            .await;
        let (kind, message) = agent_error(raw.recv().await);
        assert_eq!(kind, ErrorKind::UnsafePath, "{message}");
        assert!(
            message.contains("d/l/planted") && message.contains("symlink"),
            "{message}"
        );
        assert!(!outside.join("planted").exists());

        // A symlink already in the destination is not followed either.
        std::os::unix::fs::symlink(&outside, dest.join("pre")).expect("symlink");
        let mut raw = put_with_dir(&agent.addr, &dest, "pre").await;
        let (kind, message) = agent_error(raw.recv().await);
        assert_eq!(kind, ErrorKind::UnsafePath, "{message}");
        assert!(message.contains("\"pre\""), "{message}");

        // Entries outside the copy's root are refused.
        let mut raw = put_with_dir(&agent.addr, &dest, "r").await;
        raw.send(&Message::Entry(file_entry("other/x", Some(0))))
            .await;
        let (kind, message) = agent_error(raw.recv().await);
        assert_eq!(kind, ErrorKind::UnsafePath, "{message}");
        assert!(message.contains("other/x"), "{message}");
        assert_eq!(fs::read_dir(&outside).expect("readdir").count(), 0);
    });
}

#[test]
fn a_bad_checksum_or_a_dropped_connection_leaves_no_file_and_no_temp_file() {
    common::runtime().block_on(async {
        let agent = unix_agent();
        let dest = fresh_dir("atomic");

        let mut raw = Raw::open(&agent.addr).await;
        raw.send(&Message::Put(Put {
            path: s(&dest),
            exact: false,
            checksum: Checksum::Sha256,
        }))
        .await;
        raw.send(&Message::Entry(file_entry("f", Some(3)))).await;
        raw.send(&Message::Data(b"abc".to_vec())).await;
        raw.send(&Message::FileEnd(FileEnd::new(Checksum::Sha256, "00".repeat(32))))
        .await;
        let (kind, message) = agent_error(raw.recv().await);
        assert_eq!(kind, ErrorKind::ChecksumMismatch, "{message}");
        assert!(message.contains("checksum mismatch for \"f\""), "{message}");
        assert!(!dest.join("f").exists());
        eventually("the temp file is removed after a mismatch", || {
            temp_files(&dest).is_empty()
        });

        // The same with XXH64, and a FileEnd that carries another checksum than the Put named.
        for (end, expect) in [
            (
                FileEnd::new(Checksum::Xxh64, "0123456789abcdef".into()),
                "checksum mismatch for \"f\": sent xxh64 0123456789abcdef, received data hashes to xxh64 ",
            ),
            (
                FileEnd::new(Checksum::Sha256, "00".repeat(32)),
                "checksummed \"f\" with sha256, not with the agreed xxh64",
            ),
        ] {
            let mut raw = Raw::open(&agent.addr).await;
            raw.send(&Message::Put(Put {
                path: s(&dest),
                exact: false,
                checksum: Checksum::Xxh64,
            }))
            .await;
            raw.send(&Message::Entry(file_entry("f", Some(3)))).await;
            raw.send(&Message::Data(b"abc".to_vec())).await;
            raw.send(&Message::FileEnd(end)).await;
            let (kind, message) = agent_error(raw.recv().await);
            assert_eq!(kind, ErrorKind::ChecksumMismatch, "{message}");
            assert!(message.contains(expect), "{message}");
            assert!(!dest.join("f").exists());
        }

        // The client goes away mid-file: the temp file appears, then is removed.
        let mut raw = Raw::open(&agent.addr).await;
        raw.send(&Message::Put(Put {
            path: s(&dest),
            exact: false,
            checksum: Checksum::Sha256,
        }))
        .await;
        raw.send(&Message::Entry(file_entry("g", Some(1 << 20))))
            .await;
        raw.send(&Message::Data(vec![1; 4096])).await;
        eventually("the temp file exists", || !temp_files(&dest).is_empty());
        drop(raw);
        eventually("the temp file is removed after a disconnect", || {
            temp_files(&dest).is_empty()
        });
        assert!(!dest.join("g").exists());

        // A file shorter than announced is refused too.
        let client = Client::connect(&agent.addr).await.expect("connect");
        let mut raw = Raw::open(&agent.addr).await;
        raw.send(&Message::Put(Put {
            path: s(&dest),
            exact: false,
            checksum: Checksum::Sha256,
        }))
        .await;
        raw.send(&Message::Entry(file_entry("h", Some(10)))).await;
        raw.send(&Message::Data(b"abc".to_vec())).await;
        raw.send(&Message::FileEnd(FileEnd::new(Checksum::Sha256, "00".repeat(32))))
        .await;
        let (kind, message) = agent_error(raw.recv().await);
        assert_eq!(kind, ErrorKind::ChecksumMismatch, "{message}");
        assert!(
            message.contains("announced as 10 bytes but 3 arrived"),
            "{message}"
        );
        client.ping().await.expect("the agent still answers");
        assert_eq!(fs::read_dir(&dest).expect("readdir").count(), 0);
    });
}

#[test]
fn a_get_that_names_no_checksum_is_answered_with_sha256_as_version_1_peers_expect() {
    common::runtime().block_on(async {
        let agent = unix_agent();
        let src = fresh_dir("get-sha");
        fs::write(src.join("f"), b"hello, version 1").expect("write");
        for (checksum, expect) in [
            (
                Checksum::Sha256,
                FileEnd::new(Checksum::Sha256, hex(&common::sha(b"hello, version 1"))),
            ),
            (
                Checksum::Xxh64,
                FileEnd::new(
                    Checksum::Xxh64,
                    format!("{:016x}", xxhash_rust::xxh64::xxh64(b"hello, version 1", 0)),
                ),
            ),
        ] {
            let mut raw = Raw::open(&agent.addr).await;
            raw.send(&Message::Get(vmlink_proto::agent::Get {
                path: s(&src.join("f")),
                checksum,
                follow: false,
            }))
            .await;
            let mut end = None;
            while let Some(m) = raw.recv().await {
                match m {
                    Message::FileEnd(e) => end = Some(e),
                    Message::Done => break,
                    _ => {}
                }
            }
            assert_eq!(end, Some(expect), "{checksum:?}");
        }
    });
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
