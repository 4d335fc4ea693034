//! `packaging/vmlink-agent.service` under a real systemd: a lab guest whose PID 1 is the host's
//! systemd (`LabConfig::init`), with the unit installed as its header says (the binary in
//! /usr/local/bin, the unit in /etc/systemd/system) and wanted by the boot target (a small
//! `vmlab.target` rather than the host's multi-user.target, whose services the guest does not
//! need). The host reaches the agent over virtio-serial through `vmlink serial-bridge`, checks
//! what systemd made of the unit, kills the agent's main process and sees systemd start it again
//! (`Restart=always`), then powers the guest off through the agent.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use vmlink_lab::{GuestIo, LabConfig};

use common::{run_vmlink as vmlink, Bridge};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../packaging/vmlink-agent.service"
);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `systemctl show -p PROP --value vmlink-agent` in the guest.
fn show(target: &str, prop: &str) -> Result<String, String> {
    let out = vmlink(&[
        "exec",
        target,
        "--",
        "systemctl",
        "show",
        "-p",
        prop,
        "--value",
        "vmlink-agent",
    ]);
    if out.status.success() {
        Ok(text(&out.stdout).trim().to_owned())
    } else {
        Err(text(&out.stderr))
    }
}

/// Asks until `show(prop)` is `want` (each ask is a whole request, so they pace themselves).
fn until(target: &str, prop: &str, want: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let got = show(target, prop);
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{prop} never became {want} within {within:?}: {got:?}"
        );
    }
}

#[test]
fn systemd_runs_and_restarts_the_agent_from_the_packaged_unit() {
    if vmlink_lab::in_guest() {
        return;
    }
    let work = std::env::temp_dir().join(format!("vmlink-systemd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let (ctl, data) = (work.join("ctl.sock"), work.join("data.sock"));
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    // The guest's / is the host's under a throwaway overlay: empty its fstab (the host's
    // disks are not there), install as the unit's header says, and boot systemd into a target
    // that is the basic system plus what is enabled for it.
    let script = format!(
        ": > /etc/fstab && \
         install -m 0755 {agent} /usr/local/bin/vmlink-agent && \
         install -m 0644 {UNIT} /etc/systemd/system/vmlink-agent.service && \
         printf '[Unit]\\nDescription=vmlink lab\\nRequires=basic.target\\nAfter=basic.target\\n' \
           > /etc/systemd/system/vmlab.target && \
         mkdir -p /etc/systemd/system/vmlab.target.wants && \
         ln -sf ../vmlink-agent.service /etc/systemd/system/vmlab.target.wants/ && \
         exec /lib/systemd/systemd --unit=vmlab.target",
        agent = agent.display()
    );
    let cfg = LabConfig {
        serials: vec![
            ("org.vmlink.ctl".into(), ctl.clone()),
            ("org.vmlink.data".into(), data.clone()),
        ],
        init: true,
        timeout: Some(Duration::from_secs(600)),
        ..LabConfig::default()
    };
    let argv: Vec<std::ffi::OsString> = vec!["sh".into(), "-c".into(), script.into()];
    let mut guest = vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture).expect("boot the guest");

    let sock = work.join("agent.sock");
    let target = format!("unix:{}", sock.display());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _bridge = Bridge::start(&ctl, Some(&data), &sock, false);
        // systemd's boot under TCG reached the agent in 38 s on an idle 2-core host, 123 s in
        // CI beside the other guest tests.
        let t = Instant::now();
        loop {
            let out = vmlink(&["ping", &target]);
            if out.status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(420),
                "the agent never answered: {}",
                text(&out.stderr)
            );
        }
        eprintln!("measured: systemd guest answered after {:?}", t.elapsed());

        // What systemd made of the unit.
        assert_eq!(show(&target, "ActiveState").as_deref(), Ok("active"));
        assert_eq!(show(&target, "Restart").as_deref(), Ok("always"));
        assert_eq!(show(&target, "KillMode").as_deref(), Ok("control-group"));
        assert_eq!(show(&target, "OOMScoreAdjust").as_deref(), Ok("-500"));
        assert_eq!(show(&target, "LimitNOFILE").as_deref(), Ok("65536"));
        assert_eq!(show(&target, "NRestarts").as_deref(), Ok("0"));
        let pid = show(&target, "MainPID").expect("MainPID");
        // The agent's own view: its OOM score adjustment is systemd's.
        let out = vmlink(&[
            "exec",
            &target,
            "--",
            "cat",
            &format!("/proc/{pid}/oom_score_adj"),
        ]);
        assert_eq!(text(&out.stdout).trim(), "-500", "{}", text(&out.stderr));

        // Killed, it comes back: Restart=always, after RestartSec.
        let out = vmlink(&["exec", &target, "--", "kill", "-KILL", &pid]);
        assert!(!out.status.success(), "the session ends with the agent");
        until(&target, "NRestarts", "1", Duration::from_secs(120));
        assert_eq!(show(&target, "ActiveState").as_deref(), Ok("active"));
        assert_ne!(show(&target, "MainPID").expect("MainPID"), pid);

        // systemd powers the guest off; the agent's session may end with it.
        let _ = vmlink(&["exec", &target, "--", "systemctl", "poweroff"]);
    }));
    if result.is_err() {
        // systemd would keep the guest up until the lab's timeout.
        guest.kill();
    }
    let outcome = guest.wait();
    let _ = std::fs::remove_dir_all(&work);
    if let Err(panic) = result {
        if let Ok(o) = &outcome {
            eprintln!(
                "--- guest stdout\n{}\n--- guest stderr\n{}",
                text(&o.stdout),
                text(&o.stderr)
            );
        }
        std::panic::resume_unwind(panic);
    }
    // PID 1 reports no status; the guest ended by powering off, not by the lab's timeout.
    let outcome = outcome.expect("the guest's outcome");
    eprintln!(
        "measured: guest outcome {} after {:?}",
        outcome.code, outcome.elapsed
    );
    assert_ne!(outcome.code, 124, "{}", text(&outcome.stderr));
}
