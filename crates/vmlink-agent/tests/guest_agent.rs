//! The agent over real vsock, inside lab guests (never on the host: see the README). The agent
//! and the client are in the same guest and meet over `vsock_loopback`, where the client's CID
//! is 1; so these agents run with `--allow-cid 1`, except the one that proves the default
//! policy refuses it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::scenarios;
use vmlink_agent::client::{Client, ClientError};
use vmlink_agent::Policy;

guest_test! {
    fn agent_serves_ping_and_info_over_vsock_and_refuses_cids_its_policy_does_not_allow() {
        common::runtime().block_on(async {
            let agent = common::start_agent("vsock-listen:any", common::loopback_policy());
            let client = Client::connect(&agent.addr).await.expect("connect over vsock");
            scenarios::ping_and_info(&client, "vsock-listen:").await;

            // The default policy allows only the host (CID 2): a loopback client is refused,
            // told why and how to allow it.
            let strict = common::start_agent("vsock-listen:any", Policy::default());
            match Client::connect(&strict.addr).await {
                Err(ClientError::Refused { message, .. }) => {
                    assert!(message.contains("vsock CID 1 is not allowed"), "{message}");
                    assert!(message.contains("--allow-cid 1"), "{message}");
                }
                other => panic!("the default policy let CID 1 in: {other:?}"),
            }
        });

        // The binary: flags, the bound address on stderr, and a ping.
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmlink-agent"))
            .args(["--listen", "vsock-listen:any", "--allow-cid", "local"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmlink-agent");
        let stderr = child.stderr.take().expect("stderr");
        let line = BufReader::new(stderr).lines().next().expect("a line").expect("stderr");
        let listen = line.strip_prefix("vmlink-agent: listening on ").unwrap_or_else(|| panic!("{line}"));
        let addr = vmlink_agent::connect_addr_for(&listen.parse().expect("address")).expect("connect address");
        common::runtime().block_on(async {
            let client = Client::connect(&addr).await.expect("connect to the binary");
            client.ping().await.expect("ping the binary");
        });
        child.kill().expect("stop the agent");
        child.wait().expect("reap the agent");
    }
}

guest_test! {
    fn exec_over_vsock_streams_output_as_produced_and_passes_status_and_signals() {
        common::runtime().block_on(async {
            let agent = common::start_agent("vsock-listen:any", common::loopback_policy());
            let client = Client::connect(&agent.addr).await.expect("connect");
            scenarios::streaming_status_and_signals(&client).await;
        });
    }
}

guest_test! {
    fn exec_over_vsock_forwards_stdin_and_carries_64_mib_of_stdout() {
        common::runtime().block_on(async {
            let agent = common::start_agent("vsock-listen:any", common::loopback_policy());
            let client = Client::connect(&agent.addr).await.expect("connect");
            scenarios::stdin_round_trip(&client, 8 << 20).await;
            scenarios::large_stdout(&client, 64 << 20).await;
        });
    }
}

guest_test! {
    fn ping_over_vsock_is_answered_during_a_flood_and_a_large_cp_and_a_disconnect_kills_the_command() {
        common::runtime().block_on(async {
            let agent = common::start_agent("vsock-listen:any", common::loopback_policy());
            let client = Client::connect(&agent.addr).await.expect("connect");
            // The figure is 100 ms, met alone (p90 33-83 ms, docs/benchmarks.md); here
            // client and agent share the guest's emulated CPUs with the flood or the copy, and
            // CI runs a second TCG guest on the same 2 cores: a fresh-clone CI run measured a
            // p90 of 128 ms. The bound catches what matters, a ping queued behind the bulk
            // stream (seconds), without testing the machine's load.
            let bound = Duration::from_millis(500);
            scenarios::ping_during_flood_and_disconnect_kills(&client, bound).await;
            // /dev/shm: tmpfs in the guest (the lab's /tmp is on 9p).
            common::features::ping_during_copy(&client, "/dev/shm/vmlink-big.bin", 256 << 20, bound).await;
        });
    }
}
