//! Copies through the agent over real vsock, inside a lab guest (never on the host): a tree both
//! ways through the client library, a `..` and a symlink escape refused, and pings answered
//! while a copy runs on its own connection.

mod common;
mod cp_fixtures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cp_fixtures::{describe, fresh_dir, make_tree, Raw};
use vmlink_agent::client::{Client, GetDest, PutSource};
use vmlink_proto::agent::{Checksum, Entry, EntryKind, ErrorKind, Message, Put};

guest_test! {
    fn copies_over_vsock_keep_trees_refuse_escapes_and_never_block_a_ping() {
        common::runtime().block_on(async {
            let agent = common::start_agent("vsock-listen:any", common::loopback_policy());
            let client = Client::connect(&agent.addr).await.expect("connect over vsock");

            let src = fresh_dir("src");
            let tree = make_tree(&src, 32 << 20);
            let up = fresh_dir("up");
            let path = |p: &std::path::Path| p.display().to_string();

            // Pings on their own connections while the copy runs.
            let pinger = {
                let client = client.clone();
                tokio::spawn(async move {
                    let mut worst = Duration::ZERO;
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_secs(3) {
                        worst = worst.max(client.ping().await.expect("ping during a copy"));
                    }
                    worst
                })
            };
            client
                .put(PutSource::Path(tree.clone()), &path(&up), Arc::default())
                .await
                .unwrap_or_else(|e| panic!("put: {}", vmlink_transport::error_chain(&e)));
            let worst = pinger.await.expect("pinger");
            println!("measured: worst ping over vsock during a 32 MiB copy: {:.1} ms", worst.as_secs_f64() * 1e3);
            assert!(worst < Duration::from_millis(500), "a ping took {worst:?} during a copy");
            assert_eq!(describe(&tree), describe(&up.join("tree")));

            let down = fresh_dir("down");
            client
                .get(&path(&up.join("tree")), GetDest::Path(down.clone()), Arc::default())
                .await
                .unwrap_or_else(|e| panic!("get: {}", vmlink_transport::error_chain(&e)));
            assert_eq!(describe(&tree), describe(&down.join("tree")));

            // `..` is refused by the decoder; a symlink sent first cannot be written through.
            let outside = fresh_dir("outside");
            let entry = |kind, p: &str, link: Option<String>| Entry {
                kind, path: p.into(), mode: 0o755, mtime: 0, mtime_nsec: 0,
                size: None, link_target: link,
            };
            let mut raw = Raw::open(&agent.addr).await;
            raw.send(&Message::Put(Put { path: path(&up), exact: false, checksum: Checksum::Sha256 })).await;
            let mut frame = Message::Entry(entry(EntryKind::File, "xx", None)).encode().expect("encodes");
            let at = frame.windows(2).position(|w| w == b"xx").expect("path");
            frame[at..at + 2].copy_from_slice(b"..");
            raw.send_bytes(&frame).await;
            match raw.recv().await {
                Some(Message::Error(e)) => assert_eq!(e.kind, ErrorKind::BadRequest, "{}", e.message),
                other => panic!("`..` was not refused: {other:?}"),
            }
            let mut raw = Raw::open(&agent.addr).await;
            raw.send(&Message::Put(Put { path: path(&up), exact: false, checksum: Checksum::Sha256 })).await;
            raw.send(&Message::Entry(entry(EntryKind::Dir, "d", None))).await;
            raw.send(&Message::Entry(entry(EntryKind::Symlink, "d/l", Some(path(&outside))))).await;
            raw.send(&Message::Entry(entry(EntryKind::Dir, "d/l/planted", None))).await;
            match raw.recv().await {
                Some(Message::Error(e)) => {
                    assert_eq!(e.kind, ErrorKind::UnsafePath, "{}", e.message);
                    assert!(e.message.contains("d/l/planted"), "{}", e.message);
                }
                other => panic!("the symlink escape was not refused: {other:?}"),
            }
            assert!(!outside.join("planted").exists());
        });
    }
}
