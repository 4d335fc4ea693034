//! The systemd unit in `packaging/`, and the two drop-ins its comments offer users, read by
//! systemd's own parser (`systemd-analyze verify`, which needs no running systemd). ExecStart is
//! pointed at the agent under test, since verify checks that the program exists. A directive
//! systemd does not know, or a value it cannot parse, is a warning on stderr that makes the
//! setting silently ignored in a user's guest: each check wants stderr empty.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../packaging/vmlink-agent.service"
);
const INSTALLED_AT: &str = "/usr/local/bin/vmlink-agent";

fn unit() -> String {
    let text = std::fs::read_to_string(UNIT).expect("read packaging/vmlink-agent.service");
    assert!(
        text.contains(&format!("ExecStart={INSTALLED_AT}\n")),
        "{text}"
    );
    text.replace(INSTALLED_AT, env!("CARGO_BIN_EXE_vmlink-agent"))
}

/// The first block of commented-out lines (`#   X`) after the comment line containing `marker`
/// (the prose in between skipped), as a drop-in file (with a `[Service]` header when the block
/// has none).
fn commented_drop_in(unit: &str, marker: &str) -> String {
    let mut lines = unit.lines().skip_while(|l| !l.contains(marker));
    assert!(lines.next().is_some(), "no comment line with {marker:?}");
    let body: Vec<&str> = lines
        .skip_while(|l| l.starts_with('#') && !l.starts_with("#   "))
        .map_while(|l| l.strip_prefix("#   "))
        .collect();
    assert!(!body.is_empty(), "no drop-in after {marker:?}");
    let mut out = String::new();
    if body[0].trim() != "[Service]" {
        out.push_str("[Service]\n");
    }
    for l in body {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Runs `systemd-analyze verify` on the unit, with `drop_in` beside it when given; returns
/// what systemd printed.
fn verify(dir: &Path, unit: &str, drop_in: Option<&str>) -> String {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("temp dir");
    let path = dir.join("vmlink-agent.service");
    std::fs::write(&path, unit).expect("write the unit");
    if let Some(d) = drop_in {
        let dd = dir.join("vmlink-agent.service.d");
        std::fs::create_dir_all(&dd).expect("drop-in dir");
        std::fs::write(dd.join("user.conf"), d).expect("write the drop-in");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze is not installed: run scripts/install-deps.sh (systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    said
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmlink-unit-{}-{name}", std::process::id()))
}

#[test]
fn the_systemd_unit_and_its_suggested_drop_ins_parse_cleanly() {
    let unit = unit();

    let dir = scratch("plain");
    let said = verify(&dir, &unit, None);
    assert_eq!(said.trim(), "", "the unit as shipped");

    // "Narrow what a connected host may do with a drop-in (systemctl edit vmlink-agent)".
    let narrow = commented_drop_in(&unit, "systemctl edit vmlink-agent");
    assert!(narrow.contains("ExecStart=\n"), "{narrow}");
    assert!(narrow.contains("--read-only"), "{narrow}");
    let said = verify(&dir, &unit, Some(&narrow));
    assert_eq!(said.trim(), "", "the narrowing drop-in:\n{narrow}");

    // "a drop-in can confine it fully".
    let confined = commented_drop_in(&unit, "can confine it fully");
    assert!(confined.contains("ProtectSystem=strict\n"), "{confined}");
    assert!(confined.contains("PrivateDevices=no\n"), "{confined}");
    let said = verify(&dir, &unit, Some(&confined));
    assert_eq!(said.trim(), "", "the confining drop-in:\n{confined}");

    // The check itself: a value systemd cannot parse is reported.
    let said = verify(
        &dir,
        &unit,
        Some("[Service]\nPrivateDevices=no # a comment\n"),
    );
    assert!(said.contains("Failed to parse boolean value"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}
