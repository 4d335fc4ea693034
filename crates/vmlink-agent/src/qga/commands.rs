//! The command handlers. Argument checks follow QEMU's QAPI visitor, in schema order: a missing
//! member, a member of the wrong type, then any member left over, each with QEMU's wording.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use vmlink_proto::qga::{base64_decode, base64_encode, ErrorReply};

use super::{State, MAX_EXECS, MAX_EXEC_OUTPUT, MAX_FILE_HANDLES, MAX_READ_COUNT};

/// One command: its name and whether it answers on success.
#[derive(Debug)]
pub struct CommandSpec {
    /// The QMP name.
    pub name: &'static str,
    /// Whether success is answered (`guest-shutdown` is not: the guest goes away).
    pub success_response: bool,
}

const fn cmd(name: &'static str) -> CommandSpec {
    CommandSpec {
        name,
        success_response: true,
    }
}

/// Every command served, in `guest-info` order.
pub const COMMANDS: &[CommandSpec] = &[
    cmd("guest-sync-delimited"),
    cmd("guest-sync"),
    cmd("guest-ping"),
    cmd("guest-get-time"),
    cmd("guest-info"),
    CommandSpec {
        name: "guest-shutdown",
        success_response: false,
    },
    cmd("guest-file-open"),
    cmd("guest-file-close"),
    cmd("guest-file-read"),
    cmd("guest-file-write"),
    cmd("guest-file-seek"),
    cmd("guest-file-flush"),
    cmd("guest-fsfreeze-status"),
    cmd("guest-get-vcpus"),
    cmd("guest-get-host-name"),
    cmd("guest-get-users"),
    cmd("guest-get-timezone"),
    cmd("guest-get-osinfo"),
    cmd("guest-exec-status"),
    cmd("guest-exec"),
    cmd("guest-fsfreeze-freeze"),
    cmd("guest-fsfreeze-freeze-list"),
    cmd("guest-fsfreeze-thaw"),
    cmd("guest-get-fsinfo"),
    cmd("guest-network-get-interfaces"),
];

/// The commands qemu-ga keeps enabled while filesystems are frozen (every other one answers
/// `Command X has been disabled: the agent is in frozen state`).
pub const FROZEN_ALLOWED: &[&str] = &[
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// The arguments of one request, consumed member by member.
struct Args(Map<String, Value>);

fn missing(name: &str) -> ErrorReply {
    ErrorReply::generic(format!("Parameter '{name}' is missing"))
}

fn wrong_type(name: &str, expected: &str) -> ErrorReply {
    ErrorReply::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl Args {
    fn opt_int(&mut self, name: &str) -> Result<Option<i64>, ErrorReply> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| wrong_type(name, "integer")),
        }
    }
    fn int(&mut self, name: &str) -> Result<i64, ErrorReply> {
        self.opt_int(name)?.ok_or_else(|| missing(name))
    }
    fn opt_str(&mut self, name: &str) -> Result<Option<String>, ErrorReply> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(name, "string")),
        }
    }
    fn str(&mut self, name: &str) -> Result<String, ErrorReply> {
        self.opt_str(name)?.ok_or_else(|| missing(name))
    }
    fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, ErrorReply> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(wrong_type(name, "boolean")),
        }
    }
    fn opt_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, ErrorReply> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(wrong_type("null", "string")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(wrong_type(name, "array")),
        }
    }
    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name)
    }
    /// Every member was used: otherwise the first left over is unexpected.
    fn done(self) -> Result<(), ErrorReply> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(ErrorReply::generic(format!(
                "Parameter '{k}' is unexpected"
            ))),
        }
    }
}

/// Runs command `name` (known and enabled).
pub(crate) async fn dispatch(
    name: &str,
    arguments: Map<String, Value>,
    state: &Arc<State>,
) -> Result<Value, ErrorReply> {
    let mut a = Args(arguments);
    match name {
        "guest-sync" | "guest-sync-delimited" => {
            let id = a.int("id")?;
            a.done()?;
            Ok(json!(id))
        }
        "guest-ping" => {
            a.done()?;
            Ok(json!({}))
        }
        "guest-fsfreeze-status" => {
            a.done()?;
            Ok(if state.frozen.load(Ordering::SeqCst) {
                json!("frozen")
            } else {
                json!("thawed")
            })
        }
        "guest-fsfreeze-freeze" | "guest-fsfreeze-freeze-list" => {
            let only = if name == "guest-fsfreeze-freeze-list" {
                a.opt_str_list("mountpoints")?
            } else {
                None
            };
            a.done()?;
            if state.stopping.load(Ordering::SeqCst) {
                // It would be thawed again within seconds, under the backup.
                return Err(ErrorReply::generic(
                    "the agent is stopping; it starts no new freeze".to_string(),
                ));
            }
            // As qemu-ga: frozen from before the first freeze (nothing may write meanwhile);
            // thawed again when nothing was frozen or on failure.
            state.frozen.store(true, Ordering::SeqCst);
            let st = Arc::clone(state);
            let result = blocking(move || {
                let _one = st.fs.lock().unwrap_or_else(|e| e.into_inner());
                super::system::freeze(only.as_deref())
            })
            .await;
            if !matches!(result, Ok(n) if n > 0) {
                state.set_thawed();
            }
            result.map(|n| json!(n))
        }
        "guest-fsfreeze-thaw" => {
            a.done()?;
            let st = Arc::clone(state);
            let n = blocking(move || {
                let _one = st.fs.lock().unwrap_or_else(|e| e.into_inner());
                super::system::thaw()
            })
            .await?;
            state.set_thawed();
            Ok(json!(n))
        }
        "guest-get-fsinfo" => {
            a.done()?;
            blocking(super::system::fsinfo).await
        }
        "guest-network-get-interfaces" => {
            a.done()?;
            blocking(super::system::network_interfaces).await
        }
        "guest-info" => {
            a.done()?;
            let commands: Vec<Value> = super::COMMANDS
                .iter()
                .map(|c| {
                    json!({
                        "enabled": state.enabled(c.name),
                        "name": c.name,
                        "success-response": c.success_response,
                    })
                })
                .collect();
            Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "supported_commands": commands,
            }))
        }
        "guest-get-time" => {
            a.done()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| ErrorReply::generic("the clock is before 1970"))?;
            Ok(json!(now.as_nanos() as i64))
        }
        "guest-get-host-name" => {
            a.done()?;
            let name = read_trimmed("/proc/sys/kernel/hostname")
                .ok_or_else(|| ErrorReply::generic("cannot read the host name"))?;
            Ok(json!({ "host-name": name }))
        }
        "guest-get-osinfo" => {
            a.done()?;
            Ok(osinfo())
        }
        "guest-get-timezone" => {
            a.done()?;
            timezone().await
        }
        "guest-get-vcpus" => {
            a.done()?;
            Ok(vcpus())
        }
        "guest-get-users" => {
            a.done()?;
            Ok(users())
        }
        "guest-shutdown" => {
            let mode = a.opt_str("mode")?;
            a.done()?;
            let flag = match mode.as_deref().unwrap_or("powerdown") {
                "powerdown" => "-P",
                "halt" => "-H",
                "reboot" => "-r",
                _ => {
                    return Err(ErrorReply::generic(
                        "mode is invalid (valid values are: halt|powerdown|reboot",
                    ))
                }
            };
            tokio::process::Command::new("/sbin/shutdown")
                .args([flag, "+0", "hypervisor initiated shutdown"])
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| ErrorReply::generic(format!("cannot run /sbin/shutdown: {e}")))?;
            Ok(Value::Null)
        }
        "guest-exec" => exec(a, state).await,
        "guest-exec-status" => {
            let pid = a.int("pid")?;
            a.done()?;
            exec_status(pid, state)
        }
        _ => files(name, a, state).await,
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

fn osinfo() -> Value {
    let mut info = Map::new();
    if let Some(r) = read_trimmed("/proc/sys/kernel/osrelease") {
        info.insert("kernel-release".into(), json!(r));
    }
    if let Some(v) = read_trimmed("/proc/sys/kernel/version") {
        info.insert("kernel-version".into(), json!(v));
    }
    info.insert("machine".into(), json!(std::env::consts::ARCH));
    let release = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    for line in release.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').trim_matches('\'');
        let field = match key.trim() {
            "ID" => "id",
            "NAME" => "name",
            "PRETTY_NAME" => "pretty-name",
            "VERSION" => "version",
            "VERSION_ID" => "version-id",
            "VARIANT" => "variant",
            "VARIANT_ID" => "variant-id",
            _ => continue,
        };
        info.insert(field.into(), json!(value));
    }
    Value::Object(info)
}

async fn timezone() -> Result<Value, ErrorReply> {
    // `date` knows the zone's abbreviation and offset from TZ and /etc/localtime.
    let out = tokio::process::Command::new("date")
        .arg("+%Z %z")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ErrorReply::generic(format!("cannot run date: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let (Some(zone), Some(offset)) = (parts.next(), parts.next()) else {
        return Err(ErrorReply::generic("cannot read the time zone"));
    };
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let digits = offset.trim_start_matches(['+', '-']);
    let hours: i64 = digits.get(..2).and_then(|h| h.parse().ok()).unwrap_or(0);
    let minutes: i64 = digits.get(2..4).and_then(|m| m.parse().ok()).unwrap_or(0);
    Ok(json!({ "zone": zone, "offset": sign * (hours * 3600 + minutes * 60) }))
}

fn vcpus() -> Value {
    let mut ids: Vec<u64> = std::fs::read_dir("/sys/devices/system/cpu")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.strip_prefix("cpu")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    let list: Vec<Value> = ids
        .into_iter()
        .map(|id| {
            let online_file = format!("/sys/devices/system/cpu/cpu{id}/online");
            let (online, can_offline) = match read_trimmed(&online_file) {
                Some(v) => (v == "1", true),
                None => (true, false),
            };
            json!({ "online": online, "can-offline": can_offline, "logical-id": id })
        })
        .collect();
    Value::Array(list)
}

/// Logged-in users from utmp (glibc x86-64/aarch64 layout: 384-byte records).
fn users() -> Value {
    const RECORD: usize = 384;
    const USER_PROCESS: i16 = 7;
    let data = std::fs::read("/var/run/utmp").unwrap_or_default();
    let mut seen: Vec<(String, f64)> = Vec::new();
    for rec in data.chunks_exact(RECORD) {
        if i16::from_ne_bytes([rec[0], rec[1]]) != USER_PROCESS {
            continue;
        }
        let user_bytes = &rec[44..76];
        let end = user_bytes.iter().position(|&b| b == 0).unwrap_or(32);
        let user = String::from_utf8_lossy(&user_bytes[..end]).into_owned();
        let secs = i32::from_ne_bytes([rec[340], rec[341], rec[342], rec[343]]);
        let usecs = i32::from_ne_bytes([rec[344], rec[345], rec[346], rec[347]]);
        let t = f64::from(secs) + f64::from(usecs) / 1e6;
        match seen.iter_mut().find(|(u, _)| *u == user) {
            Some((_, earliest)) => *earliest = earliest.min(t),
            None => seen.push((user, t)),
        }
    }
    Value::Array(
        seen.into_iter()
            .map(|(user, t)| json!({ "user": user, "login-time": t }))
            .collect(),
    )
}

/// One process started by `guest-exec`.
#[derive(Debug)]
pub(crate) struct ExecSlot {
    done: Arc<Mutex<Option<ExecResult>>>,
}

#[derive(Debug)]
struct ExecResult {
    status: std::process::ExitStatus,
    out: Option<(Vec<u8>, bool)>,
    err: Option<(Vec<u8>, bool)>,
}

async fn exec(mut a: Args, state: &Arc<State>) -> Result<Value, ErrorReply> {
    let path = a.str("path")?;
    let arg = a.opt_str_list("arg")?.unwrap_or_default();
    let env = a.opt_str_list("env")?;
    let input = a.opt_str("input-data")?;
    let capture = a.opt_bool("capture-output")?.unwrap_or(false);
    a.done()?;
    let input = input
        .map(|b| base64_decode(&b).map_err(|e| ErrorReply::generic(e.to_string())))
        .transpose()?;
    if state.execs.lock().map(|e| e.len()).unwrap_or(MAX_EXECS) >= MAX_EXECS {
        return Err(ErrorReply::generic(format!(
            "too many processes started by guest-exec and not yet collected (at most {MAX_EXECS})"
        )));
    }
    let mut command = tokio::process::Command::new(&path);
    command.args(&arg);
    if let Some(env) = env {
        command.env_clear();
        for kv in env {
            match kv.split_once('=') {
                Some((k, v)) => command.env(k, v),
                None => command.env(kv, ""),
            };
        }
    }
    let null_or_piped = |piped: bool| if piped { Stdio::piped() } else { Stdio::null() };
    command
        .stdin(null_or_piped(input.is_some()))
        .stdout(null_or_piped(capture))
        .stderr(null_or_piped(capture));
    let mut child = command.spawn().map_err(|e| {
        let reason = e
            .raw_os_error()
            .map(|c| nix::errno::Errno::from_raw(c).desc().to_string())
            .unwrap_or_else(|| e.to_string());
        ErrorReply::generic(format!(
            "Guest agent command failed, error was 'Failed to execute child process \u{201c}{path}\u{201d} ({reason})'"
        ))
    })?;
    let pid = child.id().unwrap_or(0);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let done = Arc::new(Mutex::new(None));
    let slot_done = done.clone();
    tokio::spawn(async move {
        let feed = async {
            if let (Some(mut stdin), Some(data)) = (stdin, input) {
                // A child that exits without reading its input is not an error.
                let _ = stdin.write_all(&data).await;
            }
        };
        let (_, out, err, status) = tokio::join!(
            feed,
            capture_stream(stdout),
            capture_stream(stderr),
            child.wait()
        );
        let Ok(status) = status else { return };
        if let Ok(mut slot) = slot_done.lock() {
            *slot = Some(ExecResult { status, out, err });
        }
    });
    if let Ok(mut execs) = state.execs.lock() {
        execs.insert(pid, ExecSlot { done });
    }
    Ok(json!({ "pid": pid }))
}

/// Reads a stream to EOF, keeping at most [`MAX_EXEC_OUTPUT`] bytes; `(kept, truncated)`.
async fn capture_stream(stream: Option<impl AsyncRead + Unpin>) -> Option<(Vec<u8>, bool)> {
    let mut stream = stream?;
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Some((kept, truncated)),
            Ok(n) => {
                let room = MAX_EXEC_OUTPUT - kept.len();
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn exec_status(pid: i64, state: &Arc<State>) -> Result<Value, ErrorReply> {
    let invalid = || ErrorReply::generic("Invalid parameter 'pid'");
    let key = u32::try_from(pid).map_err(|_| invalid())?;
    let mut execs = state.execs.lock().map_err(|_| invalid())?;
    let slot = execs.get(&key).ok_or_else(invalid)?;
    let finished = slot.done.lock().map_err(|_| invalid())?.take();
    let Some(result) = finished else {
        return Ok(json!({ "exited": false }));
    };
    execs.remove(&key);
    let mut v = Map::new();
    v.insert("exited".into(), json!(true));
    match (result.status.code(), result.status.signal()) {
        (Some(code), _) => v.insert("exitcode".into(), json!(code)),
        (None, Some(sig)) => v.insert("signal".into(), json!(sig)),
        (None, None) => None,
    };
    for (data, field, flag) in [
        (result.out, "out-data", "out-truncated"),
        (result.err, "err-data", "err-truncated"),
    ] {
        // As qemu-ga: the data and its flag only when something was captured.
        if let Some((bytes, truncated)) = data.filter(|(b, _)| !b.is_empty()) {
            v.insert(field.into(), json!(base64_encode(&bytes)));
            v.insert(flag.into(), json!(truncated));
        }
    }
    Ok(Value::Object(v))
}

/// Open `guest-file-open` handles.
#[derive(Debug)]
pub(crate) struct Files {
    next: i64,
    open: HashMap<i64, Arc<Mutex<File>>>,
}

impl Default for Files {
    fn default() -> Files {
        // qemu-ga's first handle is 1000 too.
        Files {
            next: 1000,
            open: HashMap::new(),
        }
    }
}

fn open_options(mode: &str) -> Option<std::fs::OpenOptions> {
    let mut o = std::fs::OpenOptions::new();
    let base = mode.replace('b', "");
    match base.as_str() {
        "r" => o.read(true),
        "r+" => o.read(true).write(true),
        "w" => o.write(true).create(true).truncate(true),
        "w+" => o.read(true).write(true).create(true).truncate(true),
        "a" => o.append(true).create(true),
        "a+" => o.read(true).append(true).create(true),
        _ => return None,
    };
    Some(o)
}

pub(crate) fn errno_text(e: &std::io::Error) -> String {
    e.raw_os_error()
        .map(|c| nix::errno::Errno::from_raw(c).desc().to_string())
        .unwrap_or_else(|| e.to_string())
}

fn handle_file(state: &Arc<State>, handle: i64) -> Result<Arc<Mutex<File>>, ErrorReply> {
    let not_found = || ErrorReply::generic(format!("handle '{handle}' has not been found"));
    let files = state.files.lock().map_err(|_| not_found())?;
    files.open.get(&handle).cloned().ok_or_else(not_found)
}

/// Runs blocking file I/O off the event loop.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ErrorReply> + Send + 'static,
) -> Result<T, ErrorReply> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ErrorReply::generic(format!("file operation failed: {e}")))?
}

async fn files(name: &str, mut a: Args, state: &Arc<State>) -> Result<Value, ErrorReply> {
    match name {
        "guest-file-open" => {
            let path = a.str("path")?;
            let mode = a.opt_str("mode")?.unwrap_or_else(|| "r".into());
            a.done()?;
            let options = open_options(&mode)
                .ok_or_else(|| ErrorReply::generic(format!("invalid file open mode '{mode}'")))?;
            let file = blocking(move || {
                options.open(&path).map_err(|e| {
                    ErrorReply::generic(format!(
                        "failed to open file '{path}' (mode: '{mode}'): {}",
                        errno_text(&e)
                    ))
                })
            })
            .await?;
            let mut files = state
                .files
                .lock()
                .map_err(|_| ErrorReply::generic("file table unavailable"))?;
            if files.open.len() >= MAX_FILE_HANDLES {
                return Err(ErrorReply::generic(format!(
                    "too many open files (at most {MAX_FILE_HANDLES})"
                )));
            }
            let handle = files.next;
            files.next += 1;
            files.open.insert(handle, Arc::new(Mutex::new(file)));
            Ok(json!(handle))
        }
        "guest-file-close" => {
            let handle = a.int("handle")?;
            a.done()?;
            let mut files = state
                .files
                .lock()
                .map_err(|_| ErrorReply::generic("file table unavailable"))?;
            files
                .open
                .remove(&handle)
                .map(|_| json!({}))
                .ok_or_else(|| ErrorReply::generic(format!("handle '{handle}' has not been found")))
        }
        "guest-file-read" => {
            let handle = a.int("handle")?;
            let count = a.opt_int("count")?;
            a.done()?;
            let file = handle_file(state, handle)?;
            let count = count.unwrap_or(4096);
            if !(0..=MAX_READ_COUNT).contains(&count) {
                return Err(ErrorReply::generic(format!(
                    "value '{count}' is invalid for argument count"
                )));
            }
            blocking(move || {
                let mut f = file
                    .lock()
                    .map_err(|_| ErrorReply::generic("file unavailable"))?;
                let mut buf = vec![0u8; count as usize];
                let mut n = 0;
                while n < buf.len() {
                    match f.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(ErrorReply::generic(format!(
                                "failed to read file: {}",
                                errno_text(&e)
                            )))
                        }
                    }
                }
                buf.truncate(n);
                Ok(json!({
                    "count": n,
                    "buf-b64": base64_encode(&buf),
                    "eof": count > 0 && (n as i64) < count,
                }))
            })
            .await
        }
        "guest-file-write" => {
            let handle = a.int("handle")?;
            let b64 = a.str("buf-b64")?;
            let count = a.opt_int("count")?;
            a.done()?;
            let file = handle_file(state, handle)?;
            let data = base64_decode(&b64).map_err(|e| ErrorReply::generic(e.to_string()))?;
            let count = count.unwrap_or(data.len() as i64);
            if count < 0 || count > data.len() as i64 {
                return Err(ErrorReply::generic(format!(
                    "value '{count}' is invalid for argument count"
                )));
            }
            blocking(move || {
                let mut f = file
                    .lock()
                    .map_err(|_| ErrorReply::generic("file unavailable"))?;
                f.write_all(&data[..count as usize]).map_err(|e| {
                    ErrorReply::generic(format!("failed to write to file: {}", errno_text(&e)))
                })?;
                Ok(json!({ "count": count, "eof": false }))
            })
            .await
        }
        "guest-file-seek" => {
            let handle = a.int("handle")?;
            let offset = a.int("offset")?;
            let whence = match a.take("whence") {
                None => return Err(missing("whence")),
                Some(Value::String(s)) => match s.as_str() {
                    "set" => 0,
                    "cur" => 1,
                    "end" => 2,
                    _ => {
                        return Err(ErrorReply::generic(format!(
                            "Parameter 'whence' does not accept value '{s}'"
                        )))
                    }
                },
                Some(v) => v
                    .as_i64()
                    .ok_or_else(|| wrong_type("whence", "GuestFileWhence"))?,
            };
            a.done()?;
            let file = handle_file(state, handle)?;
            let pos = match whence {
                0 => {
                    SeekFrom::Start(u64::try_from(offset).map_err(|_| {
                        ErrorReply::generic("failed to seek file: Invalid argument")
                    })?)
                }
                1 => SeekFrom::Current(offset),
                2 => SeekFrom::End(offset),
                other => return Err(ErrorReply::generic(format!("invalid whence code {other}"))),
            };
            blocking(move || {
                let mut f = file
                    .lock()
                    .map_err(|_| ErrorReply::generic("file unavailable"))?;
                let position = f.seek(pos).map_err(|e| {
                    ErrorReply::generic(format!("failed to seek file: {}", errno_text(&e)))
                })?;
                Ok(json!({ "position": position, "eof": false }))
            })
            .await
        }
        "guest-file-flush" => {
            let handle = a.int("handle")?;
            a.done()?;
            let file = handle_file(state, handle)?;
            blocking(move || {
                let mut f = file
                    .lock()
                    .map_err(|_| ErrorReply::generic("file unavailable"))?;
                f.flush().map_err(|e| {
                    ErrorReply::generic(format!("failed to flush file: {}", errno_text(&e)))
                })?;
                Ok(json!({}))
            })
            .await
        }
        other => Err(ErrorReply {
            class: vmlink_proto::qga::COMMAND_NOT_FOUND.into(),
            desc: format!("The command {other} has not been found"),
        }),
    }
}
