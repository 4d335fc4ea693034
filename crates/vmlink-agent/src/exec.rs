//! Starting a command for an `Exec` or a `Run`: the exec policy, `--user`, a pseudo-terminal,
//! and scripts held in a memfd.
//!
//! Everything that can fail for a reason the client should hear about fails here, before the
//! fork, with one sentence: an unknown user, an agent that is not root, a program the policy
//! refuses. The code that runs between `fork` and `exec` (in `pre_exec`) makes only
//! async-signal-safe system calls on values prepared before the fork.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::process::{Child, Command};
use vmlink_proto::agent::{Exec, WindowSize};

use crate::ExecPolicy;

/// The `PATH` used to find a program named by a bare name under an exec policy, when the agent
/// has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A spawned command and the ends of its standard streams on the agent's side.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    /// stdout (the terminal, with a tty).
    pub(crate) stdout: Box<dyn AsyncRead + Send + Unpin>,
    /// stderr; `None` with a tty (it is the terminal).
    pub(crate) stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// Where `Stdin` frames go: the stdin pipe, or the terminal.
    pub(crate) stdin: Option<StdinSink>,
}

/// Where the client's `Stdin` frames are written.
pub(crate) enum StdinSink {
    /// A pipe: `StdinEof` closes it.
    Pipe(tokio::process::ChildStdin),
    /// The terminal: `StdinEof` types the EOF character (Ctrl-D); `Resize` sets its size.
    Pty(PtyMaster),
}

/// What a script for `Run` becomes: an anonymous memory file, executed through
/// `/proc/self/fd/N`.
pub(crate) struct Script {
    fd: OwnedFd,
    shebang: bool,
}

impl Script {
    /// Copies the script into a new memfd.
    pub(crate) fn new(bytes: &[u8]) -> io::Result<Script> {
        use std::io::Write;
        // SAFETY: memfd_create takes a NUL-terminated name (a literal) and flags; it returns a
        // new descriptor or -1, checked below.
        let raw = unsafe { libc::memfd_create(c"vmlink-run".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just created and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)?;
        Ok(Script {
            fd: file.into(),
            shebang: bytes.starts_with(b"#!"),
        })
    }
}

/// Why a command was not started.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SpawnError {
    /// The exec policy forbids it (sent as `refused`).
    Refused(String),
    /// It could not be started (sent as `spawn_failed`).
    Failed(String),
    /// Its program (or a script's interpreter) does not exist (sent as `not_found`).
    NotFound(String),
}

/// Starts `exec` (with `script`, for a `Run`) as the policy allows.
pub(crate) fn spawn(
    exec: &Exec,
    script: Option<&Script>,
    policy: &ExecPolicy,
) -> Result<Spawned, SpawnError> {
    let name = &exec.argv[0];
    let program: OsString = match script {
        Some(_) => {
            policy.check_run(name).map_err(SpawnError::Refused)?;
            OsString::new()
        }
        None => match policy.check_exec(name)? {
            Some(path) => path.into_os_string(),
            None => name.into(),
        },
    };
    let user = match &exec.user {
        Some(u) => Some(lookup_user(u).map_err(SpawnError::Failed)?),
        None => None,
    };

    let (mut cmd, script_fd) = match script {
        None => {
            let mut cmd = Command::new(&program);
            cmd.arg0(name).args(&exec.argv[1..]);
            (cmd, None)
        }
        Some(s) => {
            let fd = s.fd.as_raw_fd();
            let path = format!("/proc/self/fd/{fd}");
            let mut cmd = if s.shebang {
                let mut c = Command::new(&path);
                c.arg0(name);
                c
            } else {
                let mut c = Command::new("/bin/sh");
                c.arg(&path);
                c
            };
            cmd.args(&exec.argv[1..]);
            (cmd, Some(fd))
        }
    };
    if let Some(u) = &user {
        cmd.env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name)
            .env("SHELL", &u.shell);
    }
    cmd.envs(exec.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &exec.cwd {
        // Looked at first, so that a missing program is the only "not found" the spawn reports.
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SpawnError::Failed(format!(
                    "the working directory {cwd:?} is not a directory"
                )))
            }
            Err(e) => {
                return Err(SpawnError::Failed(format!(
                    "cannot use the working directory {cwd:?}: {e}"
                )))
            }
        }
        cmd.current_dir(cwd);
    }

    let mut pty = None;
    if exec.tty {
        let size = exec.window.unwrap_or(WindowSize { rows: 24, cols: 80 });
        let (master, slave) = open_pty(size)
            .map_err(|e| SpawnError::Failed(format!("cannot allocate a pseudo-terminal: {e}")))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map(Stdio::from)
                .map_err(|e| SpawnError::Failed(format!("cannot duplicate the terminal: {e}")))
        };
        cmd.stdin(dup(&slave)?)
            .stdout(dup(&slave)?)
            .stderr(dup(&slave)?);
        pty = Some(master);
        // The `Command` holds duplicates; once it is dropped after the spawn, the child's
        // copies are the only ones, so the master reads EIO (EOF) when they are all closed.
        drop(slave);
    } else {
        cmd.stdin(if exec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    }

    let tty = exec.tty;
    // An agent that already is the user (not root) only sets the environment.
    let ids = user
        .as_ref()
        .filter(|u| u.switch)
        .map(|u| (u.uid, u.gid, u.groups.clone()));
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // async-signal-safe system calls (setsid, ioctl, fcntl, setgroups, setgid, setuid) on values
    // computed before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if tty {
                // A new session whose controlling terminal is the pty (stdin, fd 0).
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = script_fd {
                // The script stays open across exec so that /proc/self/fd/N names it.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let mut child = cmd.spawn().map_err(|e| {
        let what = match script {
            Some(_) => format!("script {name:?}"),
            None => format!("{name:?}"),
        };
        let mut m = match &exec.cwd {
            Some(cwd) => format!("cannot run {what} in {cwd:?}: {e}"),
            None => format!("cannot run {what}: {e}"),
        };
        if let Some(u) = &exec.user {
            m.push_str(&format!(" (as user {u})"));
        }
        if e.kind() == io::ErrorKind::NotFound {
            SpawnError::NotFound(m)
        } else {
            SpawnError::Failed(m)
        }
    })?;
    drop(cmd);
    match pty {
        Some(master) => {
            let master = PtyMaster::new(master)
                .map_err(|e| SpawnError::Failed(format!("cannot use the pseudo-terminal: {e}")))?;
            Ok(Spawned {
                child,
                stdout: Box::new(master.clone()),
                stderr: None,
                stdin: Some(StdinSink::Pty(master)),
            })
        }
        None => {
            let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
                return Err(SpawnError::Failed(
                    "the command's output pipes are missing".into(),
                ));
            };
            Ok(Spawned {
                stdin: child.stdin.take().map(StdinSink::Pipe),
                child,
                stdout: Box::new(stdout),
                stderr: Some(Box::new(stderr)),
            })
        }
    }
}

/// Opens a pseudo-terminal of `size`; returns (master, slave), both close-on-exec.
fn open_pty(size: WindowSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let ws = nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).map_err(io::Error::from)?;
    for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
        // SAFETY: fcntl on a descriptor we own; the return value is checked.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((pty.master, pty.slave))
}

/// The agent's end of a pseudo-terminal: read for the command's output, write for its input.
#[derive(Clone)]
pub(crate) struct PtyMaster(Arc<AsyncFd<OwnedFd>>);

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<PtyMaster> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; return values are checked.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: an `OwnedFd` is a valid open descriptor, owned by the `AsyncFd` until it is
        // dropped, and its `as_raw_fd` always returns that descriptor.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(PtyMaster(Arc::new(fd)))
    }

    /// Sets the terminal's size; the kernel sends SIGWINCH to its foreground process group.
    pub(crate) fn resize(&self, size: WindowSize) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
        if unsafe { libc::ioctl(self.fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }
}

impl AsyncRead for PtyMaster {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = match self.0.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            // SAFETY: reads at most `unfilled.len()` bytes into memory we borrow mutably.
            let n = unsafe { libc::read(self.fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
            if n >= 0 {
                buf.advance(n as usize);
                return Poll::Ready(Ok(()));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => guard.clear_ready(),
                Some(libc::EINTR) => {}
                // Every slave descriptor is closed: the terminal's end of file.
                Some(libc::EIO) => return Poll::Ready(Ok(())),
                _ => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = match self.0.poll_write_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => return Poll::Pending,
            };
            // SAFETY: writes at most `data.len()` bytes from memory we borrow.
            let n = unsafe { libc::write(self.fd(), data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                return Poll::Ready(Ok(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => guard.clear_ready(),
                Some(libc::EINTR) => {}
                _ => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A user to run as, from `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
    /// Supplementary groups: the primary group and every group that lists the user.
    pub(crate) groups: Vec<libc::gid_t>,
    pub(crate) home: String,
    pub(crate) shell: String,
    /// Whether the child must switch to it (false when the agent already runs as it).
    pub(crate) switch: bool,
}

/// Looks `name` up and checks that the agent may become it.
///
/// The files are read directly rather than through NSS, so that a statically linked agent
/// behaves the same (network user databases are not consulted).
pub(crate) fn lookup_user(name: &str) -> Result<User, String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd to look user {name:?} up: {e}"))?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let mut user = parse_user(name, &passwd, &group)
        .ok_or_else(|| format!("user {name:?} does not exist in the guest (/etc/passwd)"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 && euid != user.uid {
        return Err(format!(
            "the agent runs as uid {euid}, not root, so it cannot run commands as user {name:?}"
        ));
    }
    user.switch = euid == 0;
    Ok(user)
}

fn parse_user(name: &str, passwd: &str, group: &str) -> Option<User> {
    let fields: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == name)?;
    let uid = fields[2].parse().ok()?;
    let gid: libc::gid_t = fields[3].parse().ok()?;
    let mut groups = vec![gid];
    for l in group.lines() {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
            if let Ok(g) = f[2].parse() {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
    }
    let shell = match fields[6] {
        "" => "/bin/sh",
        s => s,
    };
    Some(User {
        name: name.to_string(),
        uid,
        gid,
        groups,
        home: fields[5].to_string(),
        shell: shell.to_string(),
        switch: true,
    })
}

impl ExecPolicy {
    /// Whether `argv0` may run; with allow or deny rules, the path to run (so that what was
    /// checked is what runs, whatever `PATH` the request sets).
    pub(crate) fn check_exec(&self, argv0: &str) -> Result<Option<PathBuf>, SpawnError> {
        if self.no_exec {
            return Err(SpawnError::Refused(
                "exec is disabled on this agent (--no-exec)".into(),
            ));
        }
        if self.allow.is_none() && self.deny.is_empty() {
            return Ok(None);
        }
        let Some(path) = resolve_program(argv0) else {
            // A relative path is refused by the rules; a name or absolute path is just missing.
            return Err(if argv0.contains('/') && !argv0.starts_with('/') {
                SpawnError::Refused(format!(
                    "program {argv0:?} is a relative path, which the agent's exec rules cannot \
                     check (give a bare name or an absolute path)"
                ))
            } else if program_exists(argv0) {
                // There, but not an executable file (no x bit, a directory): as EACCES is.
                SpawnError::Failed(format!(
                    "cannot run {argv0:?}: it is not an executable file (the agent's exec \
                     rules look for it in the agent's PATH)"
                ))
            } else {
                SpawnError::NotFound(format!(
                    "cannot run {argv0:?}: no file of that name (the agent's exec rules look \
                     for it in the agent's PATH)"
                ))
            });
        };
        if let Some(rule) = self.deny.iter().find(|r| rule_matches(r, &path)) {
            return Err(SpawnError::Refused(format!(
                "running {} is refused by the agent's rule --deny-exec {rule}",
                path.display()
            )));
        }
        if let Some(allow) = &self.allow {
            if !allow.iter().any(|r| rule_matches(r, &path)) {
                return Err(SpawnError::Refused(format!(
                    "running {} is refused: it is not in the agent's --allow-exec list ({})",
                    path.display(),
                    allow.join(",")
                )));
            }
        }
        Ok(Some(path))
    }

    /// Whether a script may run (`Run`): a script can run anything, so only when no allow list
    /// is set.
    pub(crate) fn check_run(&self, name: &str) -> Result<(), String> {
        if self.no_exec {
            return Err("running scripts is disabled on this agent (--no-exec)".into());
        }
        if let Some(allow) = &self.allow {
            return Err(format!(
                "running script {name:?} is refused: the agent allows only the programs in its \
                 --allow-exec list ({}), and a script could run anything",
                allow.join(",")
            ));
        }
        Ok(())
    }

    /// Whether files may be written (`Put`).
    pub(crate) fn check_put(&self, path: &str) -> Result<(), String> {
        if self.read_only {
            return Err(format!(
                "copying into the guest ({path}) is refused: the agent runs with --read-only"
            ));
        }
        Ok(())
    }
}

fn rule_matches(rule: &str, path: &Path) -> bool {
    resolve_program(rule).is_some_and(|r| r == path)
}

/// `name` as the file that would run: a bare name is looked up in the agent's `PATH`; an
/// absolute path is taken as it is. Its directory is canonicalized (so `/bin/ls` and
/// `/usr/bin/ls` are one program on a merged-`/usr` system) but not the file itself (so busybox
/// applets, symlinks to one binary, stay apart).
pub(crate) fn resolve_program(name: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = if name.starts_with('/') {
        vec![PathBuf::from(name)]
    } else if name.contains('/') || name.is_empty() {
        return None;
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
        std::env::split_paths(&path)
            .filter(|d| d.is_absolute())
            .map(|d| d.join(name))
            .collect()
    };
    candidates.into_iter().find_map(|p| {
        let meta = std::fs::metadata(&p).ok()?;
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return None;
        }
        let dir = std::fs::canonicalize(p.parent()?).ok()?;
        let file = p.file_name()?;
        Some(dir.join(file))
    })
}

/// Whether `name` (absolute, or a bare name looked up in `PATH`) names any file at all.
fn program_exists(name: &str) -> bool {
    if name.starts_with('/') {
        return std::fs::metadata(name).is_ok();
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .any(|d| std::fs::metadata(d.join(name)).is_ok())
}

/// Parses a comma-separated program list (`--allow-exec ls,cat`).
pub fn parse_program_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_come_from_passwd_with_their_groups() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:\n";
        let group = "root:x:0:\nalice:x:1000:\nwheel:x:10:bob,alice\naudio:x:29:bob\n";
        let u = parse_user("alice", passwd, group).expect("alice");
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![1000, 10]);
        assert_eq!(u.home, "/home/alice");
        assert_eq!(u.shell, "/bin/sh");
        assert_eq!(parse_user("bob", passwd, group), None);
        assert_eq!(parse_user("alic", passwd, group), None);
    }

    #[test]
    fn exec_rules_match_the_resolved_program_not_its_name() {
        let policy = ExecPolicy {
            allow: Some(vec!["true".into(), "/bin/echo".into()]),
            deny: vec!["echo".into()],
            ..ExecPolicy::default()
        };
        assert!(policy.check_exec("true").expect("allowed").is_some());
        let refused = |r: Result<Option<PathBuf>, SpawnError>| match r {
            Err(SpawnError::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let e = refused(policy.check_exec("echo"));
        assert!(e.contains("--deny-exec echo"), "{e}");
        let e = refused(policy.check_exec("false"));
        assert!(e.contains("not in the agent's --allow-exec list"), "{e}");
        // A relative path is not the allowed program; a missing one is not found (status 127).
        assert!(refused(policy.check_exec("./true")).contains("relative path"));
        assert!(matches!(
            policy.check_exec("/nonexistent/true"),
            Err(SpawnError::NotFound(m)) if m.contains("/nonexistent/true")
        ));
        // There but not executable: cannot run (126), not missing (127).
        assert!(matches!(
            policy.check_exec("/etc/passwd"),
            Err(SpawnError::Failed(m)) if m.contains("not an executable file")
        ));
        assert!(policy.check_run("x.sh").is_err());
        let open = ExecPolicy::default();
        assert_eq!(open.check_exec("anything"), Ok(None));
        assert!(open.check_run("x.sh").is_ok());
        let none = ExecPolicy {
            no_exec: true,
            ..ExecPolicy::default()
        };
        assert!(refused(none.check_exec("true")).contains("--no-exec"));
        assert!(none.check_run("x").is_err());
        let ro = ExecPolicy {
            read_only: true,
            ..ExecPolicy::default()
        };
        assert!(ro
            .check_put("/tmp/x")
            .expect_err("ro")
            .contains("--read-only"));
    }
}
