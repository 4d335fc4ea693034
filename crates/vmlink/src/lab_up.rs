//! `vmlink lab up|down|ls`: persistent lab guests in the background, reachable as `lab:NAME`.
//!
//! Each guest has a state directory `STATE/NAME/` (STATE is `$VMLINK_LAB_STATE`, else
//! `$XDG_RUNTIME_DIR/vmlink/lab`, else `/tmp/vmlink-lab-$UID`) holding its sockets and a
//! `target` file: one line, the TARGET through which its agent is reached.

use std::path::PathBuf;

use anyhow::Context;

use crate::target::{valid_lab_name, Target};

/// The directory that holds every lab guest's state directory.
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("VMLINK_LAB_STATE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("vmlink/lab");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/vmlink-lab-{uid}"))
}

/// The TARGET recorded for lab guest `name`.
pub fn lookup(name: &str) -> anyhow::Result<Target> {
    anyhow::ensure!(valid_lab_name(name), "invalid lab guest name {name:?}");
    let file = state_root().join(name).join("target");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no lab guest named {name} (no {}); start one with `vmlink lab up {name}`, \
             list them with `vmlink lab ls`",
            file.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    text.trim()
        .parse::<Target>()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{} is corrupt", file.display()))
}
