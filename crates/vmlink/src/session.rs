//! What `vmlink exec` and `vmlink run` share: forwarding signals, a terminal (`-t`: raw mode
//! while the command runs, the window size at start and on SIGWINCH), a timeout, and the exit
//! status (the command's; 128+N for signal N; 124 when the timeout killed it, like timeout(1);
//! 126 when the guest could not start it and 127 when its program does not exist, like a shell).

use std::process::ExitCode;
use std::time::Duration;

use vmlink_agent::client::{signal_channel, Client, ClientError, SignalSender};
use vmlink_agent::ExecRequest;
use vmlink_proto::agent::{ErrorKind, WindowSize};
use vmlink_transport::Addr;

/// The status `exec` and `run` exit with when `--timeout` killed the command (as timeout(1)).
pub const TIMEOUT_STATUS: u8 = 124;
/// The status when the guest could not start the command (as a shell, env(1) and timeout(1)).
pub const CANNOT_RUN_STATUS: u8 = 126;
/// The status when the command's program does not exist in the guest (likewise).
pub const NOT_FOUND_STATUS: u8 = 127;

/// The command never started; `vmlink` prints the agent's reason and exits with `status`.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct NotStarted {
    /// [`CANNOT_RUN_STATUS`] or [`NOT_FOUND_STATUS`].
    pub status: u8,
    /// The agent's answer.
    #[source]
    pub source: ClientError,
}

/// Whether `e` says the command never started, and with which exit status.
fn not_started(e: ClientError) -> anyhow::Error {
    let status = match &e {
        ClientError::Agent {
            kind: ErrorKind::NotFound,
            ..
        } => NOT_FOUND_STATUS,
        ClientError::Agent {
            kind: ErrorKind::SpawnFailed,
            ..
        } => CANNOT_RUN_STATUS,
        _ => return e.into(),
    };
    NotStarted { status, source: e }.into()
}

/// One exec or run, as the CLI was asked for it.
#[derive(Debug)]
pub struct Session {
    /// The agent's address.
    pub addr: Addr,
    /// The command (for `run`: `argv[0]` names the script).
    pub req: ExecRequest,
    /// For `run`: the script.
    pub script: Option<Vec<u8>>,
    /// Forward this process's stdin.
    pub interactive: bool,
    /// `--tty-size`, overriding the local terminal's size.
    pub tty_size: Option<WindowSize>,
    /// Kill the command's process group after this long.
    pub timeout: Option<Duration>,
}

/// Runs the session and returns the exit status for this process.
pub async fn run(mut s: Session) -> anyhow::Result<ExitCode> {
    let c = Client::connect(&s.addr).await?;
    let (tx, signals) = signal_channel();
    // With a terminal, the local one's size and type go along; with -i from a terminal, it is
    // put in raw mode (keys, Ctrl-C included, go to the guest's terminal) until this returns.
    let mut _raw = None;
    if s.req.tty {
        s.req.window = s.tty_size.or_else(local_window_size);
        if let Some(term) = std::env::var_os("TERM").and_then(|t| t.into_string().ok()) {
            if !s.req.env.iter().any(|(k, _)| k == "TERM") {
                s.req.env.insert(0, ("TERM".into(), term));
            }
        }
        if s.interactive {
            _raw = RawMode::enter(libc::STDIN_FILENO);
        }
    }
    forward_signals(tx, s.req.tty && s.tty_size.is_none());
    let stdin = s.interactive.then(tokio::io::stdin);
    let finished = c
        .exec_full(
            s.req,
            s.script.as_deref(),
            stdin,
            tokio::io::stdout(),
            tokio::io::stderr(),
            signals,
            s.timeout,
        )
        .await
        .map_err(not_started)?;
    drop(_raw);
    if finished.timed_out {
        if let Some(t) = s.timeout {
            eprintln!("vmlink: the command timed out after {t:?}; its process group was killed");
        }
        return Ok(ExitCode::from(TIMEOUT_STATUS));
    }
    Ok(ExitCode::from(
        finished.exit.shell_status().clamp(0, 255) as u8
    ))
}

/// Forwards SIGINT and SIGTERM to the guest command instead of dying; with `winch`, sends the
/// local terminal's new size on SIGWINCH.
fn forward_signals(tx: SignalSender, winch: bool) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut win)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::window_change()),
        ) else {
            return;
        };
        loop {
            let sent = tokio::select! {
                _ = int.recv() => tx.send(libc::SIGINT),
                _ = term.recv() => tx.send(libc::SIGTERM),
                _ = win.recv(), if winch => match local_window_size() {
                    Some(size) => tx.resize(size),
                    None => true,
                },
            };
            if !sent {
                return;
            }
        }
    });
}

/// The size of the terminal on stdout (or stdin), if either is one.
fn local_window_size() -> Option<WindowSize> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, valid for the call.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some(WindowSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            });
        }
    }
    None
}

/// The local terminal in raw mode; the saved settings are restored on drop, so on every way
/// out of [`run`] (an error, a panic unwinding) the terminal is given back as it was.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd` in raw mode when it is a terminal.
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: isatty has no preconditions.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value to be overwritten by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios through the pointer, valid for the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw modifies the termios it is given, valid for the call.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads one termios through the pointer, valid for the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads one termios through the pointer, valid for the call.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Parses `--timeout`: a number of seconds (`10`, `1.5`) or with a unit (`500ms`, `30s`, `5m`,
/// `2h`), more than zero and at most 30 days.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => s.split_at(at),
        None => (s, "s"),
    };
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("`{s}`: the unit must be ms, s, m, h or d")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30, 1.5s, 500ms, 5m)"))?;
    let secs = n * scale;
    if !(secs > 0.0 && secs <= 30.0 * 86400.0) {
        return Err(format!(
            "`{s}`: a timeout must be above 0 and at most 30 days"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `--tty-size ROWSxCOLS`.
pub fn parse_window(s: &str) -> Result<WindowSize, String> {
    let bad = || format!("`{s}` is not ROWSxCOLS (e.g. 24x80)");
    let (r, c) = s.split_once('x').ok_or_else(bad)?;
    let rows: u16 = r.parse().map_err(|_| bad())?;
    let cols: u16 = c.parse().map_err(|_| bad())?;
    if rows == 0 || cols == 0 {
        return Err(bad());
    }
    Ok(WindowSize { rows, cols })
}

/// Parses `--env K=V`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not K=V")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_and_sizes_parse_with_clear_errors() {
        assert_eq!(parse_timeout("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        for bad in ["0", "-1", "x", "5y", "31d", ""] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_window("40x132"),
            Ok(WindowSize {
                rows: 40,
                cols: 132
            })
        );
        for bad in ["40", "0x80", "40x", "ax3"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }
}
