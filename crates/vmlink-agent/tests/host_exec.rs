//! Exec features over Unix sockets on the host (as root): a terminal, a timeout, another user,
//! scripts, the exec policy and `Logs`. The same features run through the CLI in a guest in
//! `vmlink`'s `guest_exec_cli.rs`.

mod common;

use common::features;
use vmlink_agent::client::Client;
use vmlink_agent::{ExecPolicy, Policy};

fn unix_agent(tag: &str, exec: ExecPolicy) -> common::Agent {
    common::start_agent(
        &format!("unix-listen:{}", common::socket_path(tag)),
        Policy {
            exec,
            ..Policy::default()
        },
    )
}

#[test]
fn exec_runs_on_a_terminal_with_a_timeout_as_another_user_and_runs_scripts() {
    common::runtime().block_on(async {
        let agent = unix_agent("exec", ExecPolicy::default());
        let client = Client::connect(&agent.addr).await.expect("connect");
        features::tty(&client).await;
        features::timeout(&client).await;
        features::user(&client).await;
        features::scripts(&client).await;
    });
}

#[test]
fn stalled_output_or_unread_input_blocks_neither_a_signal_nor_a_timeout_nor_a_hang_up() {
    common::runtime().block_on(async {
        let agent = unix_agent("stalled", ExecPolicy::default());
        let client = Client::connect(&agent.addr).await.expect("connect");
        let dir = std::env::temp_dir().join(format!("vmlink-stalled-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        features::stalled_output(&client, &dir).await;
        features::exit_while_stdin_flows(&client).await;
        features::unread_input(&client).await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn an_exec_policy_refuses_what_it_does_not_allow_naming_the_rule() {
    common::runtime().block_on(async {
        let agent = unix_agent(
            "policy",
            ExecPolicy {
                allow: Some(vec!["echo".into(), "true".into()]),
                read_only: true,
                ..ExecPolicy::default()
            },
        );
        let client = Client::connect(&agent.addr).await.expect("connect");
        features::policy_refusals(&client).await;

        let agent = unix_agent(
            "noexec",
            ExecPolicy {
                no_exec: true,
                ..ExecPolicy::default()
            },
        );
        let client = Client::connect(&agent.addr).await.expect("connect");
        let r = client
            .exec(
                common::cmd(&["true"]),
                common::NO_STDIN,
                tokio::io::sink(),
                tokio::io::sink(),
            )
            .await;
        match r {
            Err(vmlink_agent::client::ClientError::Refused { message, .. }) => {
                assert!(message.contains("--no-exec"), "{message}")
            }
            other => panic!("--no-exec let an exec through: {other:?}"),
        }
    });
}

#[test]
fn logs_tails_and_follows_a_file_across_rotation_and_truncation() {
    common::runtime().block_on(async {
        let agent = unix_agent("logs", ExecPolicy::default());
        let client = Client::connect(&agent.addr).await.expect("connect");
        let dir = std::env::temp_dir().join(format!("vmlink-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        features::logs(&client, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn pings_are_answered_promptly_during_a_large_copy() {
    common::runtime().block_on(async {
        let agent = unix_agent("cpping", ExecPolicy::default());
        let client = Client::connect(&agent.addr).await.expect("connect");
        let dest = std::env::temp_dir().join(format!("vmlink-cpping-{}.bin", std::process::id()));
        features::ping_during_copy(
            &client,
            &dest.display().to_string(),
            // The figures: pings within 100 ms while 256 MiB are copied.
            256 << 20,
            std::time::Duration::from_millis(100),
        )
        .await;
    });
}
