//! The guest command as a busybox `sh` script: environment, working
//! directory and argv, quoted.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::is_shell_name;

/// Environment variable the lab sets to `1` in the guest command's environment.
pub const GUEST_ENV: &str = "VMLINK_LAB_GUEST";

/// Quotes `s` for a POSIX shell: bytes other than NUL survive unchanged.
pub(crate) fn quote(s: &[u8]) -> Vec<u8> {
    let plain = !s.is_empty()
        && s.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'-' | b'.' | b'/' | b':' | b'=' | b'@' | b'%' | b'+' | b','
                )
        });
    if plain {
        return s.to_vec();
    }
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// Variables that describe the caller's session rather than the command's
/// environment; run-guest leaves the same ones out.
pub(crate) fn is_session_var(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "HOSTNAME",
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XDG_RUNTIME_DIR",
        "DBUS_SESSION_BUS_ADDRESS",
        "TMUX",
        "TMUX_PANE",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "SHELLOPTS",
        "BASHOPTS",
        "EUID",
        "UID",
        "PPID",
        "GROUPS",
        GUEST_ENV,
    ];
    const PREFIXES: &[&str] = &["SSH_", "LISTEN_", "BASH_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The guest command's environment: the caller's (less session variables
/// and names a shell cannot export), then `extra`, then `VMLINK_LAB_GUEST=1`.
/// Later entries win; the order of first appearance is kept.
pub(crate) fn guest_env(
    caller: impl IntoIterator<Item = (OsString, OsString)>,
    extra: &[(String, String)],
) -> Vec<(String, OsString)> {
    let mut out: Vec<(String, OsString)> = Vec::new();
    let mut set = |name: String, value: OsString| {
        if let Some(slot) = out.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            out.push((name, value));
        }
    };
    for (name, value) in caller {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if !is_shell_name(&name) || is_session_var(&name) || value.as_bytes().contains(&0) {
            continue;
        }
        set(name, value);
    }
    for (name, value) in extra {
        set(name.clone(), OsString::from(value));
    }
    set(GUEST_ENV.to_owned(), OsString::from("1"));
    out
}

/// What `execvp` would run for `program` with this `PATH`, resolved on the
/// host (whose files the guest sees unchanged at the same paths). `None`
/// when it contains no `/` and is not found: the guest then goes through
/// `/usr/bin/env`, which reports the error the usual way.
pub(crate) fn resolve_program(
    program: &OsStr,
    path: Option<&OsStr>,
    cwd: &Path,
) -> Option<PathBuf> {
    let bytes = program.as_bytes();
    if bytes.contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = path.map_or_else(
        || b"/usr/local/bin:/usr/bin:/bin".to_vec(),
        |p| p.as_bytes().to_vec(),
    );
    for dir in path.split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        // The guest runs as root: any execute bit will do.
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Some(candidate);
            }
        }
    }
    None
}

/// The script the guest's stage 2 sources in a subshell whose stdin,
/// stdout and stderr are already redirected.
pub(crate) fn command_script(
    env: &[(String, OsString)],
    cwd: &Path,
    argv: &[OsString],
    program: Option<&Path>,
) -> Vec<u8> {
    let mut s = Vec::new();
    for (name, value) in env {
        s.extend_from_slice(b"export ");
        s.extend_from_slice(name.as_bytes());
        s.push(b'=');
        s.extend_from_slice(&quote(value.as_bytes()));
        s.push(b'\n');
    }
    s.extend_from_slice(b"cd ");
    s.extend_from_slice(&quote(cwd.as_os_str().as_bytes()));
    s.extend_from_slice(b" || exit 125\n");
    match program {
        // A full path bypasses busybox's own applets (which would otherwise
        // win over the host's programs) and saves exec'ing env(1), a
        // dynamically linked program that costs ~85 ms under TCG.
        Some(program) => {
            s.extend_from_slice(b"exec -a ");
            s.extend_from_slice(&quote(argv[0].as_bytes()));
            s.push(b' ');
            s.extend_from_slice(&quote(program.as_os_str().as_bytes()));
        }
        None => {
            s.extend_from_slice(b"exec /usr/bin/env -- ");
            s.extend_from_slice(&quote(argv[0].as_bytes()));
        }
    }
    for a in &argv[1..] {
        s.push(b' ');
        s.extend_from_slice(&quote(a.as_bytes()));
    }
    s.push(b'\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    /// Runs `sh -c 'printf "%s\n" WORD'` to check the quoting round-trips.
    fn sh_echo(word: &[u8]) -> Vec<u8> {
        let mut script = b"printf '%s' ".to_vec();
        script.extend_from_slice(&quote(word));
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(OsStr::from_bytes(&script))
            .output()
            .expect("run /bin/sh");
        assert!(out.status.success());
        out.stdout
    }

    #[test]
    fn quote_leaves_plain_words_alone() {
        assert_eq!(quote(b"abc/d-e_f.g"), b"abc/d-e_f.g");
        assert_eq!(quote(b""), b"''");
        assert_eq!(quote(b"a b"), b"'a b'");
        assert_eq!(quote(b"it's"), b"'it'\\''s'");
    }

    #[test]
    fn quote_round_trips_through_sh() {
        for word in [
            &b"plain"[..],
            b"",
            b"two words",
            b"'",
            b"''a'b'",
            b"$HOME `id` $(id) \\ \" ; & | < > * ? [ ] ~ # !",
            b"new\nline\ttab",
            b"\xff\xfe non-utf8",
            b"-n",
        ] {
            assert_eq!(sh_echo(word), word, "{:?}", String::from_utf8_lossy(word));
        }
    }

    #[test]
    fn guest_env_filters_session_vars_and_applies_extra() {
        let caller = vec![
            (OsString::from("HOME"), OsString::from("/root")),
            (OsString::from("SSH_AUTH_SOCK"), OsString::from("/x")),
            (OsString::from("PWD"), OsString::from("/somewhere")),
            (OsString::from("BASH_FUNC_f%%"), OsString::from("() { :; }")),
            (OsString::from("A"), OsString::from("1")),
            (OsString::from(GUEST_ENV), OsString::from("0")),
        ];
        let env = guest_env(
            caller,
            &[("A".into(), "2".into()), ("B".into(), "3".into())],
        );
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["HOME", "A", "B", GUEST_ENV]);
        assert_eq!(env[1].1, "2");
        assert_eq!(env[3].1, "1");
    }

    #[test]
    fn resolve_program_searches_path_like_execvp() {
        let dir = std::env::temp_dir().join(format!("vmlink-lab-resolve-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        let exe = dir.join("bin/tool");
        let mut f = std::fs::File::create(&exe).expect("create");
        f.write_all(b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let noexec = dir.join("bin/data");
        std::fs::write(&noexec, b"x").expect("write");

        let path = OsString::from("/nonexistent:bin");
        assert_eq!(
            resolve_program(OsStr::new("tool"), Some(&path), &dir),
            Some(dir.join("bin/tool"))
        );
        assert_eq!(resolve_program(OsStr::new("data"), Some(&path), &dir), None);
        assert_eq!(
            resolve_program(OsStr::new("missing"), Some(&path), &dir),
            None
        );
        assert_eq!(
            resolve_program(OsStr::new("./x/y"), Some(&path), &dir),
            Some(PathBuf::from("./x/y"))
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn command_script_runs_in_sh() {
        let env = vec![("X_TEST".to_owned(), OsString::from("a 'b' $c"))];
        let argv = [
            OsString::from("sh"),
            OsString::from("-c"),
            OsString::from("printf '%s|%s|%s' \"$0\" \"$X_TEST\" \"$PWD\""),
        ];
        let script = command_script(&env, Path::new("/"), &argv, Some(Path::new("/bin/sh")));
        // busybox sh, as in the guest (dash has no `exec -a`).
        let out = Command::new("/bin/busybox")
            .args(["sh", "-c"])
            .arg(OsStr::from_bytes(&script))
            .output()
            .expect("run busybox sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "sh|a 'b' $c|/");

        let script = command_script(&env, Path::new("/"), &[OsString::from("true")], None);
        assert!(script.ends_with(b"exec /usr/bin/env -- true\n"));
    }
}
