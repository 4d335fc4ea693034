//! `ping`, `info`, `exec` and `cp` against a guest that runs only a stock qemu-guest-agent:
//! TARGET `qga+ADDR`, typically `qga+unix:PATH` where PATH is QEMU's chardev socket for the
//! guest's `org.qemu.guest_agent.0` port (QEMU serves one client at a time there).
//!
//! Every verb opens one session: the 0xFF + `guest-sync-delimited` handshake (which discards
//! whatever a previous client left unread on the port), then one command at a time, each
//! answered by one line. What the qemu-ga protocol imposes, and how each verb copes:
//!
//! - **exec**: `guest-exec` with `capture-output`, then `guest-exec-status` polled with a
//!   backoff (2 ms doubling to 250 ms). qemu-ga hands the output over only when the command
//!   has ended (at most 16 MiB per stream, then it is truncated: a warning says so), so nothing
//!   streams. stdin (`-i`) is read to EOF first and sent as `input-data` in the request (at
//!   most [`MAX_STDIN`]). `--env` runs the command under `env K=V ...` (qemu-ga's own `env`
//!   would replace the whole environment); `--cwd` runs it under `sh -c 'cd DIR && exec ...'`.
//!   SIGINT/SIGTERM are forwarded with a `guest-exec` of `kill -s SIG PID` (the command's own
//!   process only: qemu-ga does not start it in a process group of its own).
//! - **cp** (single files; directories are refused with a hint): the file moves in
//!   [`CHUNK`]-byte `guest-file-read`/`guest-file-write` calls (base64 in JSON). Host -> guest
//!   writes a temporary file beside the destination, then one `guest-exec` of `sh` checks its
//!   SHA-256 with `sha256sum` (when the guest has it), sets the mode and `mv`s it into place,
//!   so a failed or interrupted copy leaves no partial destination. When guest-exec is
//!   disabled in that qemu-ga, the destination is written in place (not atomic; a warning
//!   says so). Guest -> host writes a local temporary file, checks the SHA-256 against the
//!   guest's `sha256sum` when available, fsyncs and renames.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlink_proto::agent::Exit;
use vmlink_proto::qga::{
    base64_decode, base64_encode, encode_request, parse_response, Response, COMMAND_NOT_FOUND,
    SENTINEL,
};
use vmlink_proto::text::printable;
use vmlink_transport::{Addr, AsyncStream};

/// Bytes per guest-file-read/-write call (qemu-ga allows up to 48 MiB per read).
pub const CHUNK: usize = 4 << 20;
/// Largest stdin `vmlink exec -i` forwards: it travels inside one JSON request.
pub const MAX_STDIN: usize = 32 << 20;
/// Longest answer line accepted: a 48 MiB guest-file-read is 64 MiB of base64.
const MAX_ANSWER: usize = 72 << 20;
/// How long the handshake may take before the guest is declared silent.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one command may take to answer (a 4 MiB chunk under TCG takes well under this).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// qemu-ga answered a command with an error.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {}: {}", printable(.class), printable(.desc))]
pub struct CommandError {
    /// The command.
    pub command: String,
    /// The error class (`GenericError`, `CommandNotFound`).
    pub class: String,
    /// qemu-ga's description.
    pub desc: String,
}

/// One connection to a qemu-guest-agent, synchronised.
pub struct Session {
    stream: AsyncStream,
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
    target: String,
}

impl Session {
    /// Connects to `addr` and runs the resynchronising handshake.
    pub async fn connect(addr: &Addr) -> anyhow::Result<Session> {
        let target = format!("qga+{addr}");
        let stream = AsyncStream::connect(addr)
            .await
            .with_context(|| target.clone())?;
        let mut s = Session {
            stream,
            buf: Vec::new(),
            scanned: 0,
            target,
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, s.sync())
            .await
            .map_err(|_| {
                anyhow!(
                    "{}: no answer to guest-sync-delimited within {} s (is qemu-ga running in the guest?)",
                    s.target,
                    HANDSHAKE_TIMEOUT.as_secs()
                )
            })??;
        Ok(s)
    }

    /// The TARGET as written (`qga+ADDR`), for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// 0xFF and guest-sync-delimited, resent with a new id (1 s, then up to every 8 s) until
    /// one is answered: a request can be lost when it reaches the guest while the agent there
    /// has its port closed (vmlink-agent before this version, or an agent starting up).
    async fn sync(&mut self) -> anyhow::Result<()> {
        // Random ids that stale output cannot contain.
        let base = i64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::from(d.subsec_nanos()) << 16)
                .unwrap_or(0);
        let mut sent: Vec<i64> = Vec::new();
        let mut wait = Duration::from_secs(1);
        loop {
            let nonce = base + sent.len() as i64;
            let mut sync = vec![SENTINEL];
            sync.extend(encode_request(
                "guest-sync-delimited",
                Some(&json!({ "id": nonce })),
                None,
            ));
            self.stream.write_all(&sync).await?;
            sent.push(nonce);
            let answered = tokio::time::timeout(wait, async {
                loop {
                    self.skip_to_sentinel().await?;
                    let line = self.line().await?;
                    if let Some(Response::Return(v)) = parse_response(&line) {
                        if v.as_i64().is_some_and(|id| sent.contains(&id)) {
                            return anyhow::Ok(());
                        }
                    }
                }
            })
            .await;
            match answered {
                Ok(r) => return r,
                Err(_) => wait = (wait * 2).min(Duration::from_secs(8)),
            }
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = vec![0u8; 256 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("{}: the agent closed the connection", self.target);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        if self.buf.len() > MAX_ANSWER {
            bail!(
                "{}: an answer is longer than {MAX_ANSWER} bytes",
                self.target
            );
        }
        Ok(())
    }

    async fn skip_to_sentinel(&mut self) -> anyhow::Result<()> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == SENTINEL) {
                self.buf.drain(..=at);
                self.scanned = 0;
                return Ok(());
            }
            self.buf.clear();
            self.scanned = 0;
            self.fill().await?;
        }
    }

    async fn line(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=self.scanned + at).collect();
                self.scanned = 0;
                return Ok(line);
            }
            self.scanned = self.buf.len();
            self.fill().await?;
        }
    }

    /// Sends a command without waiting for an answer (`guest-shutdown`).
    pub async fn send(&mut self, command: &str, args: Option<&Value>) -> anyhow::Result<()> {
        self.stream
            .write_all(&encode_request(command, args, None))
            .await?;
        Ok(())
    }

    /// Sends a command and returns its answer, success or error.
    pub async fn call_response(
        &mut self,
        command: &str,
        args: Option<&Value>,
    ) -> anyhow::Result<Response> {
        self.send(command, args).await?;
        let line = tokio::time::timeout(CALL_TIMEOUT, async {
            loop {
                let line = self.line().await?;
                // Blank lines between answers are not answers.
                if !line.iter().all(u8::is_ascii_whitespace) {
                    return anyhow::Ok(line);
                }
            }
        })
        .await
        .map_err(|_| {
            anyhow!(
                "{}: no answer to {command} within {} s",
                self.target,
                CALL_TIMEOUT.as_secs()
            )
        })??;
        parse_response(&line).ok_or_else(|| {
            anyhow!(
                "{}: not a qemu-ga answer: {}",
                self.target,
                printable(&String::from_utf8_lossy(&line[..line.len().min(200)]))
            )
        })
    }

    /// Sends a command and returns its `return` value; an error answer is a [`CommandError`].
    pub async fn call(&mut self, command: &str, args: Value) -> anyhow::Result<Value> {
        match self.call_response(command, Some(&args)).await? {
            Response::Return(v) => Ok(v),
            Response::Error(e) => Err(anyhow::Error::new(CommandError {
                command: command.to_string(),
                class: e.class,
                desc: e.desc,
            })
            .context(self.target.clone())),
        }
    }
}

/// Whether `e` is qemu-ga saying the command is unknown or disabled.
fn not_available(e: &anyhow::Error) -> bool {
    e.downcast_ref::<CommandError>()
        .is_some_and(|c| c.class == COMMAND_NOT_FOUND)
}

/// `vmlink ping qga+ADDR`: guest-ping, timed.
pub async fn ping(addr: &Addr, count: u32) -> anyhow::Result<ExitCode> {
    let mut s = Session::connect(addr).await?;
    for _ in 0..count.max(1) {
        let t = Instant::now();
        s.call("guest-ping", json!({})).await?;
        println!(
            "pong from {}: {:.2} ms",
            s.target(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmlink info qga+ADDR`: guest-get-osinfo, guest-get-host-name, guest-info, and the uptime
/// from `/proc/uptime` through guest-file-*. A command the agent does not serve leaves its
/// fields empty.
pub async fn info(addr: &Addr, as_json: bool) -> anyhow::Result<ExitCode> {
    let mut s = Session::connect(addr).await?;
    let os = s
        .call("guest-get-osinfo", json!({}))
        .await
        .unwrap_or(Value::Null);
    let host = s
        .call("guest-get-host-name", json!({}))
        .await
        .unwrap_or(Value::Null);
    let agent = s.call("guest-info", json!({})).await?;
    let uptime = read_small_file(&mut s, "/proc/uptime")
        .await
        .ok()
        .and_then(|t| {
            t.split('.')
                .next()
                .and_then(|n| n.trim().parse::<u64>().ok())
        });
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let hostname = text(&host["host-name"]);
    let os_name = match os["pretty-name"].as_str() {
        Some(p) => p.to_string(),
        None => text(&os["name"]),
    };
    let kernel = text(&os["kernel-release"]);
    let version = text(&agent["version"]);
    if as_json {
        let v = json!({
            "hostname": hostname,
            "os": os_name,
            "kernel": kernel,
            "machine": os["machine"],
            "uptime_secs": uptime,
            "agent": "qemu-guest-agent",
            "agent_version": version,
        });
        println!("{v}");
    } else {
        // The guest chose these strings: no escape sequences reach the terminal.
        println!("hostname  {}", printable(&hostname));
        println!("os        {}", printable(&os_name));
        println!("kernel    {}", printable(&kernel));
        match uptime {
            Some(u) => println!("uptime    {u} s"),
            None => println!("uptime    unknown"),
        }
        println!("agent     qemu-guest-agent {}", printable(&version));
    }
    Ok(ExitCode::SUCCESS)
}

async fn read_small_file(s: &mut Session, path: &str) -> anyhow::Result<String> {
    let h = s
        .call("guest-file-open", json!({ "path": path, "mode": "r" }))
        .await?;
    let r = s
        .call("guest-file-read", json!({ "handle": h, "count": 65536 }))
        .await;
    s.call("guest-file-close", json!({ "handle": h })).await?;
    let data = base64_decode(r?["buf-b64"].as_str().unwrap_or(""))?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// What `vmlink exec` asks for, in the terms qemu-ga can honour.
#[derive(Debug, Default)]
pub struct ExecSpec {
    /// The command and its arguments (found on the guest's PATH, as qemu-ga does).
    pub argv: Vec<String>,
    /// Added to the command's environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Forward this process's stdin (read to EOF first).
    pub stdin: bool,
}

/// The error for an exec option qemu-guest-agent cannot honour (for `vmlink exec` flags such
/// as `--user` or `-t` when the target is `qga+`).
#[allow(dead_code)]
pub fn unsupported(option: &str) -> anyhow::Error {
    anyhow!("{option} is not supported over qemu-guest-agent (qga+ TARGET); it needs vmlink-agent")
}

/// The argv qemu-ga runs for `spec`: wrapped in `env` and `sh -c 'cd ..'` as needed.
fn exec_argv(spec: &ExecSpec) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(dir) = &spec.cwd {
        argv.extend(
            [
                "sh",
                "-c",
                "cd \"$1\" || exit 1; shift; exec \"$@\"",
                "vmlink-exec",
                dir.as_str(),
            ]
            .map(String::from),
        );
    }
    if !spec.env.is_empty() {
        argv.push("env".into());
        argv.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    }
    argv.extend(spec.argv.iter().cloned());
    argv
}

/// What a finished guest-exec left: status (shell-style) and its captured output.
struct Finished {
    status: i32,
    out: Vec<u8>,
    err: Vec<u8>,
    truncated: Vec<&'static str>,
}

async fn start(s: &mut Session, argv: &[String], input: Option<&[u8]>) -> anyhow::Result<i64> {
    let (path, args) = argv
        .split_first()
        .ok_or_else(|| anyhow!("exec needs a command after --"))?;
    let mut req = json!({ "path": path, "arg": args, "capture-output": true });
    if let Some(data) = input {
        req["input-data"] = json!(base64_encode(data));
    }
    let started = s.call("guest-exec", req).await?;
    started["pid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{}: guest-exec returned no pid: {started}", s.target()))
}

/// Polls guest-exec-status until `pid` has exited, with a backoff.
async fn wait(s: &mut Session, pid: i64) -> anyhow::Result<Finished> {
    let mut delay = Duration::from_millis(2);
    loop {
        let st = s.call("guest-exec-status", json!({ "pid": pid })).await?;
        if st["exited"] == json!(true) {
            return finished(&st);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

fn finished(st: &Value) -> anyhow::Result<Finished> {
    // qemu-ga's numbers are the guest's word: anything but a real wait status (a code in
    // 0..=255 or a signal in 1..=64, not both) is a failure, never an overflow or a 0.
    let number = |field: &str| {
        st[field]
            .as_i64()
            .map(|n| i32::try_from(n).unwrap_or(i32::MAX))
    };
    let status = Exit {
        code: number("exitcode"),
        signal: number("signal"),
    }
    .shell_status();
    let data = |field: &str| -> anyhow::Result<Vec<u8>> {
        match st[field].as_str() {
            Some(b) => Ok(base64_decode(b)?),
            None => Ok(Vec::new()),
        }
    };
    let mut truncated = Vec::new();
    if st["out-truncated"] == json!(true) {
        truncated.push("stdout");
    }
    if st["err-truncated"] == json!(true) {
        truncated.push("stderr");
    }
    Ok(Finished {
        status,
        out: data("out-data")?,
        err: data("err-data")?,
        truncated,
    })
}

/// Runs `argv` to completion through qemu-ga; `None` when guest-exec is not available there.
async fn run_quiet(s: &mut Session, argv: &[&str]) -> anyhow::Result<Option<Finished>> {
    let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    match start(s, &argv, None).await {
        Ok(pid) => Ok(Some(wait(s, pid).await?)),
        Err(e) if not_available(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `vmlink exec qga+ADDR -- CMD...`: see the module docs. Returns the command's status.
pub async fn exec(addr: &Addr, spec: ExecSpec) -> anyhow::Result<ExitCode> {
    if spec.argv.is_empty() {
        bail!("exec needs a command after --");
    }
    let input = if spec.stdin {
        let mut data = Vec::new();
        tokio::io::stdin()
            .take(MAX_STDIN as u64 + 1)
            .read_to_end(&mut data)
            .await
            .context("reading stdin")?;
        if data.len() > MAX_STDIN {
            bail!(
                "stdin is larger than {} MiB: qemu-guest-agent takes a command's input in one request \
                 (copy it with vmlink cp first, or use vmlink-agent)",
                MAX_STDIN >> 20
            );
        }
        Some(data)
    } else {
        None
    };
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    // A signal before the command has started ends this process as the signal would have.
    let (mut s, pid) = tokio::select! {
        r = async {
            let mut s = Session::connect(addr).await?;
            let pid = start(&mut s, &exec_argv(&spec), input.as_deref()).await?;
            anyhow::Ok((s, pid))
        } => r?,
        _ = int.recv() => return Ok(ExitCode::from(128 + libc::SIGINT as u8)),
        _ = term.recv() => return Ok(ExitCode::from(128 + libc::SIGTERM as u8)),
    };
    tracing::debug!("{}: guest-exec started pid {pid}", s.target());
    let mut delay = Duration::from_millis(2);
    let done = loop {
        let st = s.call("guest-exec-status", json!({ "pid": pid })).await?;
        if st["exited"] == json!(true) {
            break finished(&st)?;
        }
        let sig = tokio::select! {
            () = tokio::time::sleep(delay) => None,
            _ = int.recv() => Some("INT"),
            _ = term.recv() => Some("TERM"),
        };
        delay = (delay * 2).min(Duration::from_millis(250));
        if let Some(sig) = sig {
            let pid = pid.to_string();
            // The kill's own process must be collected too, or qemu-ga keeps it.
            run_quiet(&mut s, &["kill", "-s", sig, &pid]).await?;
            delay = Duration::from_millis(2);
        }
    };
    let mut stdout = tokio::io::stdout();
    stdout.write_all(&done.out).await?;
    stdout.flush().await?;
    let mut stderr = tokio::io::stderr();
    stderr.write_all(&done.err).await?;
    stderr.flush().await?;
    for stream in done.truncated {
        eprintln!("vmlink: warning: qemu-ga kept only the first 16 MiB of the command's {stream}");
    }
    Ok(ExitCode::from(done.status.clamp(0, 255) as u8))
}

fn directory_error(what: &str) -> anyhow::Error {
    anyhow!(
        "{what} is a directory: over qemu-guest-agent (qga+ TARGET) cp copies single files; \
         copy a tar file and unpack it with vmlink exec, or use vmlink-agent"
    )
}

fn temp_name(dir_and_name: &str) -> String {
    let (dir, name) = match dir_and_name.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", dir_and_name),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{dir}/.{name}.vmlink-{}-{nanos:x}.tmp", std::process::id())
}

/// Shell run by qemu-ga after an upload: check the SHA-256 (if sha256sum exists), set the
/// mode, rename into place; the temporary file is removed on any failure.
const FINISH_PUT: &str = r#"trap 'rm -f "$1"' EXIT
if command -v sha256sum >/dev/null 2>&1; then
  got=$(sha256sum < "$1") || exit 1
  got=${got%% *}
  [ "$got" = "$3" ] || { echo "SHA-256 mismatch after upload: $got, expected $3" >&2; exit 1; }
fi
chmod "$4" "$1" && mv -f "$1" "$2""#;

/// `vmlink cp LOCAL qga+ADDR:PATH` (LOCAL `None`: stdin). Returns the bytes copied, or `None`
/// when Ctrl-C interrupted the copy (the guest's temporary file is then removed).
pub async fn put(
    addr: &Addr,
    src: Option<&Path>,
    dst: &str,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<Option<u64>> {
    let (mut reader, mode, name): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, u32, _) = match src
    {
        Some(p) => {
            let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
            if meta.is_dir() {
                return Err(directory_error(&p.display().to_string()));
            }
            let f = tokio::fs::File::open(p)
                .await
                .with_context(|| format!("{}", p.display()))?;
            use std::os::unix::fs::PermissionsExt;
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            (Box::new(f), meta.permissions().mode() & 0o7777, name)
        }
        None => (Box::new(tokio::io::stdin()), 0o644, None),
    };
    let mut s = Session::connect(addr).await?;
    // Like cp: into an existing directory under the source's name.
    let mut dest = dst.trim_end_matches('/').to_string();
    if dest.is_empty() {
        dest = "/".into();
    }
    let is_dir = run_quiet(&mut s, &["test", "-d", &dest]).await?;
    let exec_ok = is_dir.is_some();
    if is_dir.is_some_and(|f| f.status == 0) {
        let Some(name) = name else {
            bail!("{}:{dst} is a directory; give the file's path", s.target());
        };
        dest = format!("{}/{name}", dest.trim_end_matches('/'));
    }
    let write_to = if exec_ok {
        temp_name(&dest)
    } else {
        eprintln!(
            "vmlink: warning: guest-exec is disabled in that qemu-ga: writing {dest} in place (not atomic, not checksummed)"
        );
        dest.clone()
    };
    let result = tokio::select! {
        r = upload(&mut s, &mut reader, &write_to, &counter) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    let (bytes, sha) = match result {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            if exec_ok {
                let _ = run_quiet(&mut s, &["rm", "-f", &write_to]).await;
            }
            return Err(e);
        }
        None => {
            // Interrupted mid-request: a fresh session (QEMU serves one client at a time, so
            // this one goes first) removes the temporary file.
            drop(s);
            if exec_ok {
                let mut s = Session::connect(addr).await?;
                let _ = run_quiet(&mut s, &["rm", "-f", &write_to]).await;
            }
            eprintln!("vmlink: cp interrupted; {dest} was not touched");
            return Ok(None);
        }
    };
    if exec_ok {
        let mode = format!("{mode:o}");
        let done = run_quiet(
            &mut s,
            &[
                "sh",
                "-c",
                FINISH_PUT,
                "vmlink-cp",
                &write_to,
                &dest,
                &sha,
                &mode,
            ],
        )
        .await?
        .ok_or_else(|| anyhow!("{}: guest-exec disappeared", s.target()))?;
        if done.status != 0 {
            bail!(
                "{}:{dest}: finishing the copy failed ({}): {}",
                s.target(),
                done.status,
                printable(String::from_utf8_lossy(&done.err).trim())
            );
        }
    }
    Ok(Some(bytes))
}

async fn upload(
    s: &mut Session,
    reader: &mut (dyn tokio::io::AsyncRead + Unpin + Send),
    path: &str,
    counter: &AtomicU64,
) -> anyhow::Result<(u64, String)> {
    let h = s
        .call("guest-file-open", json!({ "path": path, "mode": "w" }))
        .await?;
    let mut sha = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let copied = async {
        loop {
            let mut n = 0;
            while n < buf.len() {
                let k = reader
                    .read(&mut buf[n..])
                    .await
                    .context("reading the source")?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n == 0 {
                return anyhow::Ok(());
            }
            sha.update(&buf[..n]);
            let w = s
                .call(
                    "guest-file-write",
                    json!({ "handle": h, "buf-b64": base64_encode(&buf[..n]) }),
                )
                .await?;
            if w["count"].as_u64() != Some(n as u64) {
                bail!(
                    "{}: guest-file-write wrote {} of {n} bytes",
                    s.target,
                    w["count"]
                );
            }
            total += n as u64;
            counter.store(total, Ordering::Relaxed);
        }
    }
    .await;
    let closed = s.call("guest-file-close", json!({ "handle": h })).await;
    copied?;
    closed?;
    Ok((total, hex(&sha.finalize())))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `vmlink cp qga+ADDR:PATH LOCAL` (LOCAL `None`: stdout). Returns the bytes copied.
pub async fn get(
    addr: &Addr,
    src: &str,
    dst: Option<&Path>,
    counter: Arc<AtomicU64>,
    total: impl FnOnce(u64),
) -> anyhow::Result<u64> {
    let mut s = Session::connect(addr).await?;
    let target = s.target().to_string();
    let h = s
        .call("guest-file-open", json!({ "path": src, "mode": "r" }))
        .await?;
    let result = download(&mut s, h.clone(), src, dst, &counter, total).await;
    let _ = s.call("guest-file-close", json!({ "handle": h })).await;
    let (bytes, sha, mut temp) = result?;
    // The guest's own digest of the file, when it has sha256sum.
    if let Some(done) = run_quiet(&mut s, &["sha256sum", src]).await? {
        if done.status == 0 {
            let theirs = String::from_utf8_lossy(&done.out);
            let theirs = theirs.split_whitespace().next().unwrap_or("");
            if theirs != sha {
                bail!(
                    "{target}:{src}: SHA-256 mismatch: the guest has {}, {sha} arrived (was the file changing?)",
                    printable(theirs)
                );
            }
        }
    }
    if let Some((tmp, dest)) = temp.as_mut().and_then(|t| t.take()) {
        std::fs::rename(&tmp, &dest).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow!("rename {} -> {}: {e}", tmp.display(), dest.display())
        })?;
    }
    Ok(bytes)
}

/// A local temporary file and its destination; the file is removed on drop unless taken
/// (an error, or Ctrl-C dropping the copy, leaves nothing behind).
struct TempFile(Option<(PathBuf, PathBuf)>);

impl TempFile {
    fn take(&mut self) -> Option<(PathBuf, PathBuf)> {
        self.0.take()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some((tmp, _)) = self.0.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

type Downloaded = (u64, String, Option<TempFile>);

async fn download(
    s: &mut Session,
    h: Value,
    src: &str,
    dst: Option<&Path>,
    counter: &AtomicU64,
    total: impl FnOnce(u64),
) -> anyhow::Result<Downloaded> {
    // The size, for the progress bar: seek to the end and back.
    let end = s
        .call(
            "guest-file-seek",
            json!({ "handle": h, "offset": 0, "whence": "end" }),
        )
        .await?;
    s.call(
        "guest-file-seek",
        json!({ "handle": h, "offset": 0, "whence": "set" }),
    )
    .await?;
    if let Some(size) = end["position"].as_u64() {
        total(size);
    }
    let (mut out, temp): (Box<dyn std::io::Write + Send>, _) = match dst {
        None => (Box::new(std::io::stdout()), None),
        Some(p) => {
            let dest = if p.is_dir() {
                let name = Path::new(src)
                    .file_name()
                    .ok_or_else(|| anyhow!("{src} has no file name"))?;
                p.join(name)
            } else {
                p.to_path_buf()
            };
            let dir = dest
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let tmp = dir.join(format!(
                ".{}.vmlink-{}.tmp",
                dest.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::process::id()
            ));
            let f =
                std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
            (
                Box::new(f) as Box<dyn std::io::Write + Send>,
                Some(TempFile(Some((tmp, dest)))),
            )
        }
    };
    let result = async {
        let mut sha = Sha256::new();
        let mut bytes = 0u64;
        loop {
            let r = match s
                .call("guest-file-read", json!({ "handle": h, "count": CHUNK }))
                .await
            {
                Ok(r) => r,
                Err(e)
                    if e.downcast_ref::<CommandError>()
                        .is_some_and(|c| c.desc.contains("Is a directory")) =>
                {
                    return Err(directory_error(&format!("{}:{src}", s.target)))
                }
                Err(e) => return Err(e),
            };
            let data = base64_decode(r["buf-b64"].as_str().unwrap_or(""))?;
            sha.update(&data);
            out.write_all(&data).context("writing the destination")?;
            bytes += data.len() as u64;
            counter.store(bytes, Ordering::Relaxed);
            if r["eof"] == json!(true) || data.is_empty() {
                break;
            }
        }
        out.flush()?;
        anyhow::Ok((bytes, hex(&sha.finalize())))
    }
    .await;
    drop(out);
    let (bytes, sha) = result?;
    if let Some(TempFile(Some((tmp, _)))) = &temp {
        std::fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("fsync {}", tmp.display()))?;
    }
    Ok((bytes, sha, temp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qemu_ga_error_is_shown_without_control_characters() {
        let e = CommandError {
            command: "guest-info".into(),
            class: "GenericError\u{1b}[2J".into(),
            desc: "\u{1b}]0;pwned\u{7}\u{1b}[2J".into(),
        };
        let shown = e.to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            shown,
            r"guest-info: GenericError\u{1b}[2J: \u{1b}]0;pwned\u{7}\u{1b}[2J"
        );
    }

    #[test]
    fn exec_wraps_env_and_cwd_in_commands_every_guest_has() {
        let spec = ExecSpec {
            argv: vec!["ls".into(), "-l".into()],
            env: vec![("A".into(), "b c".into())],
            cwd: Some("/tmp".into()),
            stdin: false,
        };
        let argv = exec_argv(&spec);
        assert_eq!(argv[0], "sh");
        assert_eq!(argv[4], "/tmp");
        assert_eq!(&argv[5..], ["env", "A=b c", "ls", "-l"]);
        let plain = ExecSpec {
            argv: vec!["true".into()],
            ..ExecSpec::default()
        };
        assert_eq!(exec_argv(&plain), ["true"]);
    }

    #[test]
    fn exit_status_is_the_code_or_128_plus_the_signal() {
        let f = finished(&json!({"exited": true, "exitcode": 3})).expect("parses");
        assert_eq!(f.status, 3);
        let f = finished(
            &json!({"exited": true, "signal": 9, "out-data": "aGk=", "out-truncated": true}),
        )
        .expect("parses");
        assert_eq!(f.status, 137);
        assert_eq!(f.out, b"hi");
        assert_eq!(f.truncated, ["stdout"]);
        // A hostile guest's numbers: no overflow, no success.
        for st in [
            json!({"exited": true, "signal": 2147483647}),
            json!({"exited": true, "signal": -128}),
            json!({"exited": true, "signal": 9_223_372_036_854_775_807_i64}),
            json!({"exited": true, "exitcode": 4_294_967_296_i64}),
            json!({"exited": true, "exitcode": 256}),
            json!({"exited": true, "exitcode": -1}),
            json!({"exited": true, "exitcode": 0, "signal": 9}),
        ] {
            assert_eq!(finished(&st).expect("parses").status, 255, "{st}");
        }
    }

    #[test]
    fn temp_names_stay_in_the_destination_directory() {
        let t = temp_name("/tmp/dir/file.bin");
        assert!(t.starts_with("/tmp/dir/.file.bin.vmlink-"), "{t}");
    }
}
