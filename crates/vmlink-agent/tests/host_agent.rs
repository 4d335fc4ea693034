//! The agent over Unix sockets on the host: the same behaviours as the guest tests, without
//! vsock, so they run in seconds.

mod common;

use std::time::Duration;

use common::scenarios;
use vmlink_agent::client::Client;
use vmlink_agent::Policy;

fn unix_agent() -> common::Agent {
    // The default policy: Unix sockets are not subject to --allow-cid.
    common::start_agent(
        &format!("unix-listen:{}", common::socket_path("host")),
        Policy::default(),
    )
}

#[test]
fn agent_over_unix_answers_ping_info_and_exec() {
    common::runtime().block_on(async {
        let agent = unix_agent();
        let client = Client::connect(&agent.addr).await.expect("connect");
        scenarios::ping_and_info(&client, "unix-listen:").await;
        scenarios::streaming_status_and_signals(&client).await;
    });
}

#[test]
fn agent_over_unix_forwards_stdin_and_carries_large_output() {
    common::runtime().block_on(async {
        let agent = unix_agent();
        let client = Client::connect(&agent.addr).await.expect("connect");
        scenarios::stdin_round_trip(&client, 16 << 20).await;
        // The figure: 1 GiB of output, every byte compared.
        scenarios::large_stdout(&client, 1 << 30).await;
    });
}

#[test]
fn agent_over_unix_answers_pings_during_a_flood_and_kills_abandoned_commands() {
    common::runtime().block_on(async {
        let agent = unix_agent();
        let client = Client::connect(&agent.addr).await.expect("connect");
        scenarios::ping_during_flood_and_disconnect_kills(&client, Duration::from_millis(100))
            .await;
    });
}

#[test]
fn a_client_that_goes_quiet_before_or_after_its_hello_loses_its_session() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vmlink_proto::agent::{Hello, Message, PROTOCOL_VERSION};
    use vmlink_transport::AsyncStream;

    common::runtime().block_on(async {
        let policy = Policy {
            max_sessions: 1,
            request_timeout: Duration::from_millis(300),
            ..Policy::default()
        };
        let path = common::socket_path("quiet");
        let agent = common::start_agent(&format!("unix-listen:{path}"), policy);
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
            features: Vec::new(),
        })
        .encode()
        .expect("encodes");
        for says_hello in [false, true] {
            // The only session: silent from the start, or silent after the Hellos. (Taken
            // again while the agent still counts the last round's ping, it is refused as busy
            // at once: then try again.)
            let busy_until = std::time::Instant::now() + Duration::from_secs(10);
            let (got, waited) = loop {
                let mut quiet = AsyncStream::connect(&agent.addr).await.expect("connect");
                if says_hello {
                    quiet.write_all(&hello).await.expect("send Hello");
                }
                let started = std::time::Instant::now();
                let mut got = Vec::new();
                let closed =
                    tokio::time::timeout(Duration::from_secs(30), quiet.read_to_end(&mut got));
                closed
                    .await
                    .expect("the agent closes a quiet connection")
                    .expect("read");
                let busy = matches!(
                    vmlink_proto::agent::decode(&got),
                    Ok(Some((Message::Error(ref e), _))) if e.kind == vmlink_proto::agent::ErrorKind::Busy
                );
                if !busy {
                    break (got, started.elapsed());
                }
                assert!(std::time::Instant::now() < busy_until, "the agent stayed busy");
                tokio::task::yield_now().await;
            };
            assert!(
                waited >= Duration::from_millis(250),
                "closed after {waited:?}"
            );
            // What came before the close: the agent's Hello, if the client sent one.
            assert_eq!(!got.is_empty(), says_hello, "{} bytes", got.len());
            // The slot is free again (`busy` only while the agent has not yet seen the previous
            // connection, or the client's own Hello-only one, close).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match async { Client::connect(&agent.addr).await?.ping().await }.await {
                    Ok(_) => break,
                    Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
                }
                tokio::task::yield_now().await;
            }
        }
    });
}

#[test]
fn agent_refuses_sessions_over_its_limit_and_garbage_frames() {
    use vmlink_agent::client::ClientError;
    use vmlink_proto::agent::ErrorKind;
    use vmlink_transport::AsyncStream;

    common::runtime().block_on(async {
        let policy = Policy {
            max_sessions: 1,
            ..Policy::default()
        };
        let path = common::socket_path("busy");
        let agent = common::start_agent(&format!("unix-listen:{path}"), policy);
        // A connection that says nothing holds the only session.
        let idle = AsyncStream::connect(&agent.addr).await.expect("connect");
        match Client::connect(&agent.addr).await {
            Err(ClientError::Agent {
                kind: ErrorKind::Busy,
                message,
                ..
            }) => {
                assert!(message.contains("limit of 1 sessions"), "{message}");
            }
            other => panic!("a second session was not refused: {other:?}"),
        }
        drop(idle);
        // The session is free again once the agent has seen each connection close; with a
        // limit of 1 that can lag a client by a moment, so retry on `busy` (each attempt is
        // answered at once).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let ping = || async {
            loop {
                let attempt = async { Client::connect(&agent.addr).await?.ping().await }.await;
                match attempt {
                    Ok(rtt) => return rtt,
                    Err(ClientError::Agent {
                        kind: ErrorKind::Busy,
                        ..
                    }) => {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the session was never released"
                        );
                        tokio::task::yield_now().await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        };
        ping().await;

        // Garbage instead of a Hello: the agent closes without serving. The ping's session
        // may still hold the only slot for a moment (the agent has not yet seen it close), and
        // then the answer is a `busy` refusal: retry on that alone.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let mut s = AsyncStream::connect(&agent.addr).await.expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            if rest.is_empty() {
                break;
            }
            match vmlink_proto::agent::decode(&rest) {
                Ok(Some((vmlink_proto::agent::Message::Error(e), _)))
                    if e.kind == ErrorKind::Busy =>
                {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the ping's session was never released"
                    );
                    tokio::task::yield_now().await;
                }
                other => panic!("garbage was answered: {rest:?} ({other:?})"),
            }
        }
        ping().await;
    });
}
