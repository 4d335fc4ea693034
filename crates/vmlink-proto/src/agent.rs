//! The guest agent's control protocol: length-framed messages, sans-IO.
//!
//! The normative description is `docs/agent-protocol.md`; this is its one implementation.
//!
//! # Frames
//!
//! Every message travels in one frame: a fixed [`HEADER_LEN`]-byte header, then `len` bytes of
//! payload.
//!
//! ```text
//! offset size field
//!      0    4 magic    "VMLA"
//!      4    1 version  FRAME_VERSION (1): the layout of this header
//!      5    1 type     MessageType (1..=22)
//!      6    2 flags    u16 LE, must be 0 (reserved)
//!      8    4 len      u32 LE, payload length, at most MAX_FRAME_LEN
//! ```
//!
//! Payloads are empty (`Ping`, `Pong`, `InfoRequest`, `StdinEof`, `Done`), raw bytes (`Stdin`,
//! `Stdout`, `Stderr`, `Data`: bulk data is never re-encoded), or one JSON object (the other
//! control messages).
//!
//! # Parsing: check, then parse
//!
//! Like mini-redis's frames, [`check`] looks at the header first. It judges the header as soon as
//! its 12 bytes are there (bad magic, unknown version or type, reserved flags, a length over
//! [`MAX_FRAME_LEN`]), so a peer that announces a 4 GiB frame is refused after 12 bytes, not after
//! buffering them. Then it returns `Ok(None)` until the whole payload has arrived, and the frame's
//! total length once it has. [`decode`] parses the payload of a checked frame. A frame is judged
//! only from its own bytes, so the outcome never depends on how they were split into reads; the
//! fuzz target (`fuzz/fuzz_targets/agent_frames.rs`) and the tests check that for every split.
//! [`Decoder`] accumulates reads and hands out whole messages.
//!
//! # Bounds
//!
//! - a frame's payload: at most [`MAX_FRAME_LEN`] (1 MiB);
//! - `Exec`: at most [`MAX_ARGS`] arguments and [`MAX_ENV`] variables, no NUL byte in any string,
//!   `argv` not empty (their total size is bounded by the frame);
//! - copies (`Put`, `Get`, `Entry`): paths at most [`MAX_PATH_LEN`] bytes, components at most
//!   [`MAX_NAME_LEN`], entry paths relative with no `.`/`..`/empty component (checked here, once);
//!   at most [`MAX_ENTRIES`] entries per copy (counted by the receiver);
//! - error messages this module produces are one line of at most a few hundred bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"VMLA";
/// The header layout version this module reads and writes.
pub const FRAME_VERSION: u8 = 1;
/// The protocol version (message set and semantics) exchanged in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Length of a frame header.
pub const HEADER_LEN: usize = 12;
/// The largest payload a frame may carry (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// The largest payload a sender puts in one data frame (`Stdin`, `Stdout`, `Stderr`).
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// The most arguments an `Exec` may carry.
pub const MAX_ARGS: usize = 4096;
/// The most environment variables an `Exec` may carry.
pub const MAX_ENV: usize = 4096;
/// The largest script a `Run` may carry (16 MiB).
pub const MAX_SCRIPT_LEN: u64 = 16 << 20;
/// The most lines a `Logs` request may ask for from the end of a file.
pub const MAX_LOG_LINES: u32 = 100_000;
/// The most bytes the agent sends for the initial tail of a `Logs` request (16 MiB): longer
/// lines are cut from the start of the tail.
pub const MAX_LOG_TAIL_BYTES: u64 = 16 << 20;
/// The longest user name an `Exec` may carry (`LOGIN_NAME_MAX`).
pub const MAX_USER_LEN: usize = 256;
/// How much of a bad JSON payload an error message quotes.
const QUOTE_LEN: usize = 48;

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Ping`].
    Ping = 2,
    /// [`Message::Pong`].
    Pong = 3,
    /// [`Message::InfoRequest`].
    InfoRequest = 4,
    /// [`Message::Info`].
    Info = 5,
    /// [`Message::Exec`].
    Exec = 6,
    /// [`Message::Stdin`].
    Stdin = 7,
    /// [`Message::StdinEof`].
    StdinEof = 8,
    /// [`Message::Stdout`].
    Stdout = 9,
    /// [`Message::Stderr`].
    Stderr = 10,
    /// [`Message::Exit`].
    Exit = 11,
    /// [`Message::Signal`].
    Signal = 12,
    /// [`Message::Error`].
    Error = 13,
    /// [`Message::Put`].
    Put = 14,
    /// [`Message::Get`].
    Get = 15,
    /// [`Message::Entry`].
    Entry = 16,
    /// [`Message::Data`].
    Data = 17,
    /// [`Message::FileEnd`].
    FileEnd = 18,
    /// [`Message::Done`].
    Done = 19,
    /// [`Message::Resize`].
    Resize = 20,
    /// [`Message::Run`].
    Run = 21,
    /// [`Message::Logs`].
    Logs = 22,
    /// [`Message::StdinAck`].
    StdinAck = 23,
}

impl MessageType {
    /// The type for a type byte, if it names one.
    pub fn from_u8(b: u8) -> Option<MessageType> {
        use MessageType::*;
        Some(match b {
            1 => Hello,
            2 => Ping,
            3 => Pong,
            4 => InfoRequest,
            5 => Info,
            6 => Exec,
            7 => Stdin,
            8 => StdinEof,
            9 => Stdout,
            10 => Stderr,
            11 => Exit,
            12 => Signal,
            13 => Error,
            14 => Put,
            15 => Get,
            16 => Entry,
            17 => Data,
            18 => FileEnd,
            19 => Done,
            20 => Resize,
            21 => Run,
            22 => Logs,
            23 => StdinAck,
            _ => return None,
        })
    }

    fn payload(self) -> PayloadKind {
        use MessageType::*;
        match self {
            Ping | Pong | InfoRequest | StdinEof | Done => PayloadKind::Empty,
            Stdin | Stdout | Stderr | Data => PayloadKind::Bytes,
            Hello | Info | Exec | Exit | Signal | Error | Put | Get | Entry | FileEnd | Resize
            | Run | Logs | StdinAck => PayloadKind::Json,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadKind {
    Empty,
    Bytes,
    Json,
}

/// The first message each side sends on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's protocol version ([`PROTOCOL_VERSION`]).
    pub version: u32,
    /// Who is talking, for logs: `vmlink/0.1.0`, `vmlink-agent/0.1.0`.
    #[serde(default)]
    pub software: String,
    /// What an agent supports beyond the first slice of version 1 ([`FEATURES`]): a client
    /// checks before it sends a request or field an older agent would refuse or, worse, ignore
    /// (`user`). At most [`MAX_FEATURES`] names of at most 64 bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Feature names an agent announces in its [`Hello`]: `Exec.tty` with `Resize`; `Exec.user`;
/// the `Run` request; the `Logs` request; [`Checksum::Xxh64`] in copies; `Exec.stdin_window`
/// with [`StdinAck`]; `Get.follow`.
pub const FEATURES: [&str; 7] = [
    "tty",
    "user",
    "run",
    "logs",
    "xxh64",
    "stdin_window",
    "follow",
];

/// The most feature names a `Hello` may carry.
pub const MAX_FEATURES: usize = 64;

/// The stdin window of an exec with `stdin_window` (4 MiB): a client keeps at most this many
/// `Stdin` bytes sent and not yet acknowledged by a [`StdinAck`]. The agent's own queue holds as
/// much, so it never has to stop reading the client's frames, and a `Signal` or a closed
/// connection behind unread input acts at once.
pub const STDIN_WINDOW: u64 = 4 << 20;

/// What the agent knows about its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The guest's host name.
    pub hostname: String,
    /// The OS, from `/etc/os-release` (`PRETTY_NAME`), or `Linux`.
    pub os: String,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// Seconds since the guest booted.
    pub uptime_secs: u64,
    /// The agent's version.
    pub agent_version: String,
    /// The addresses the agent listens on.
    pub channels: Vec<String>,
}

/// Run a command.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Exec {
    /// The program and its arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing in) the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory; the agent's own when `None`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether the client will send `Stdin` frames; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Allocate a pseudo-terminal: the command's stdin, stdout and stderr are its terminal, and
    /// everything it writes arrives as `Stdout`. Agents before 0.1 with tty support refuse it.
    #[serde(default)]
    pub tty: bool,
    /// With `tty`: the terminal's initial size (otherwise 24x80).
    #[serde(default)]
    pub window: Option<WindowSize>,
    /// Run as this user (a name from the guest's `/etc/passwd`) instead of the agent's own;
    /// the agent must be root.
    #[serde(default)]
    pub user: Option<String>,
    /// The client keeps to the stdin window ([`STDIN_WINDOW`]) and reads [`StdinAck`]s: only
    /// to an agent that announces the feature `stdin_window` (an older agent ignores the field
    /// and sends no acknowledgements).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin_window: bool,
}

/// Agent, during an exec with `stdin_window`: `bytes` more of the client's `Stdin` left the
/// agent's queue (written to the command, or dropped after it closed its stdin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StdinAck {
    /// Bytes acknowledged by this message (not a running total).
    pub bytes: u64,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows (1..=65535).
    pub rows: u16,
    /// Columns (1..=65535).
    pub cols: u16,
}

/// Client: run a script it sends, as an exec.
///
/// `exec.argv[0]` is the script's name (for messages and `$0` shown by the agent's logs) and
/// `exec.argv[1..]` its arguments; exactly `size` bytes of the script follow in `Data` frames,
/// then the exchange continues as an `Exec`'s. The agent keeps the script in an anonymous
/// memory file (`memfd`), never on a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Run {
    /// The command as for `Exec`; `argv[0]` names the script.
    pub exec: Exec,
    /// The script's length in bytes, at most [`MAX_SCRIPT_LEN`].
    pub size: u64,
}

/// Client: send the end of a file, and with `follow`, what is appended to it (like `tail -F`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    /// The file, absolute.
    pub path: String,
    /// How many lines from its end to send first (at most [`MAX_LOG_LINES`]).
    pub lines: u32,
    /// Keep sending what is appended, across rotation (rename and recreate) and truncation.
    #[serde(default)]
    pub follow: bool,
}

/// How a process ended: exactly one of the two fields is set.
///
/// The decoder accepts any pair (an `Exit` is the agent's word, and an agent can claim any code
/// anyway); one that is not a real wait status (both or neither set, a code outside 0..=255, a
/// signal outside 1..=[`MAX_SIGNAL`]) is a failure, [`Exit::MALFORMED_STATUS`], never a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, when the process exited.
    pub code: Option<i32>,
    /// The signal number, when a signal killed it.
    pub signal: Option<i32>,
}

/// The highest signal number (Linux's `SIGRTMAX`).
pub const MAX_SIGNAL: i32 = 64;

impl Exit {
    /// What [`Exit::shell_status`] gives for an `Exit` that is not a real wait status.
    pub const MALFORMED_STATUS: i32 = 255;

    /// The status a shell would report, always in 0..=255: the code, or 128 + the signal
    /// number; [`Exit::MALFORMED_STATUS`] when the `Exit` is not a real wait status.
    pub fn shell_status(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code @ 0..=255), None) => code,
            (None, Some(signal @ 1..=MAX_SIGNAL)) => 128 + signal,
            _ => Self::MALFORMED_STATUS,
        }
    }

    /// Whether the process exited with code 0 (and nothing else is claimed).
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), None) => write!(f, "exit status {code}"),
            (None, Some(signal)) => write!(f, "killed by signal {signal}"),
            (Some(code), Some(signal)) => {
                write!(f, "malformed exit status (code {code} and signal {signal})")
            }
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// Send a signal to the running command's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signal {
    /// The signal number (e.g. 2 for SIGINT).
    pub signo: i32,
}

/// What went wrong, in an [`ErrorMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The peer is not allowed to use this agent (e.g. a vsock CID not in `--allow-cid`).
    Refused,
    /// No common protocol version.
    UnsupportedVersion,
    /// A frame or message the receiver cannot accept here.
    BadRequest,
    /// The command could not be started.
    SpawnFailed,
    /// The command's program does not exist (a client exits 127 for it, like a shell).
    NotFound,
    /// Too many sessions at once.
    Busy,
    /// Anything else on the sender's side.
    Internal,
    /// A file operation failed (the message names the path and the cause, e.g. ENOSPC).
    Io,
    /// A copied entry's path would leave the destination, or is malformed.
    UnsafePath,
    /// A file's data does not match its checksum.
    ChecksumMismatch,
    /// A kind this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Refused => "refused",
            ErrorKind::UnsupportedVersion => "unsupported version",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::SpawnFailed => "spawn failed",
            ErrorKind::NotFound => "no such program",
            ErrorKind::Busy => "busy",
            ErrorKind::Internal => "internal error",
            ErrorKind::Io => "an I/O error",
            ErrorKind::UnsafePath => "an unsafe path",
            ErrorKind::ChecksumMismatch => "a checksum mismatch",
            ErrorKind::Unknown => "unknown error",
        })
    }
}

/// The request failed; the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// The category, for programs.
    pub kind: ErrorKind,
    /// One sentence, for people.
    pub message: String,
}

/// The longest path a copy accepts, in bytes (`PATH_MAX`): a `Put`/`Get` path, an entry's
/// relative path, a symlink's target.
pub const MAX_PATH_LEN: usize = 4096;
/// The longest name of one path component, in bytes (`NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// The most entries (files, directories, symlinks) one copy may carry.
pub const MAX_ENTRIES: u64 = 1_000_000;

/// Client: the agent receives a copy at `path`.
///
/// When `exact` is false and `path` is an existing directory, the copy's root entry is created
/// inside it under its own name (`cp file dir/`); otherwise the root entry is created as `path`
/// itself, whose parent must exist (`cp file dir/newname`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Put {
    /// The destination, absolute.
    pub path: String,
    /// Create the root entry as `path` even when `path` is a directory.
    #[serde(default)]
    pub exact: bool,
    /// The checksum the client's `FileEnd`s carry; absent means SHA-256. A client sends
    /// anything else only to an agent that announces it (feature `xxh64`).
    #[serde(default, skip_serializing_if = "Checksum::is_sha256")]
    pub checksum: Checksum,
}

/// Client: the agent sends a copy of `path` (symlinks are sent as symlinks, never followed,
/// unless `follow` is set for `path` itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Get {
    /// The source, absolute.
    pub path: String,
    /// The checksum the agent's `FileEnd`s should carry; absent means SHA-256. (An agent
    /// without the feature `xxh64` ignores the field and sends SHA-256.)
    #[serde(default, skip_serializing_if = "Checksum::is_sha256")]
    pub checksum: Checksum,
    /// Follow symlinks at `path` itself (not below it), as `cp -L` does for its operands: the
    /// root is what `path` resolves to, named after `path`. Absent means false. (An agent
    /// without the feature `follow` ignores it and sends the symlink.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
}

/// How a copy's file data is checksummed end to end.
///
/// Both detect corruption, truncation and reordering of the data; neither is a signature (the
/// channel, not the checksum, is the trust boundary: see DESIGN.md). SHA-256 is the default of
/// version 1; XXH64 is what vmlink uses when the agent has it, because in a guest without
/// hardware SHA (TCG, or CPUs without SHA-NI) SHA-256 runs at 30-400 MiB/s and would bound the
/// copy, while XXH64 runs at memory speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksum {
    /// SHA-256: `FileEnd.sha256`, 64 lowercase hex digits.
    #[default]
    Sha256,
    /// XXH64 with seed 0: `FileEnd.xxh64`, 16 lowercase hex digits.
    Xxh64,
}

impl Checksum {
    /// For serde: SHA-256 is the default and is not written out.
    pub fn is_sha256(&self) -> bool {
        *self == Checksum::Sha256
    }

    /// The name of the `FileEnd` field, and of the algorithm in messages.
    pub fn name(self) -> &'static str {
        match self {
            Checksum::Sha256 => "sha256",
            Checksum::Xxh64 => "xxh64",
        }
    }

    /// How many hex digits the digest has.
    pub fn hex_len(self) -> usize {
        match self {
            Checksum::Sha256 => 64,
            Checksum::Xxh64 => 16,
        }
    }
}

/// What an [`Entry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file: `Data` frames and one `FileEnd` follow.
    File,
    /// A directory: the entries inside it follow (pre-order).
    Dir,
    /// A symbolic link, with its target.
    Symlink,
}

/// One file, directory or symlink of a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Its path relative to the copy, `/`-separated; the first component is the root entry's
    /// name. No empty, `.` or `..` component, no leading `/`, no NUL.
    pub path: String,
    /// Permission bits (at most `0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time (below 1e9).
    #[serde(default)]
    pub mtime_nsec: u32,
    /// A file's size when the sender knows it (not when streaming stdin); the receiver checks it.
    #[serde(default)]
    pub size: Option<u64>,
    /// A symlink's target (any string; never followed by the receiver).
    #[serde(default)]
    pub link_target: Option<String>,
}

impl Entry {
    /// Checks the entry's own rules (those in the field docs).
    pub fn validate(&self) -> Result<(), String> {
        if self.path.len() > MAX_PATH_LEN {
            return Err(format!(
                "entry path of {} bytes exceeds the limit of {MAX_PATH_LEN}",
                self.path.len()
            ));
        }
        for c in self.path.split('/') {
            let quoted: String = self.path.chars().take(200).collect();
            if c.is_empty() || c == "." || c == ".." {
                return Err(format!(
                    "entry {quoted:?} has an empty, '.' or '..' component or is absolute"
                ));
            }
            if c.len() > MAX_NAME_LEN {
                return Err(format!(
                    "entry {quoted:?} has a component over {MAX_NAME_LEN} bytes"
                ));
            }
            if c.contains('\0') {
                return Err(format!("entry {quoted:?} contains a NUL byte"));
            }
        }
        if self.mode > 0o7777 {
            return Err(format!("mode {:o} has bits above 0o7777", self.mode));
        }
        if self.mtime_nsec >= 1_000_000_000 {
            return Err("mtime_nsec is not below 1e9".into());
        }
        match (self.kind, &self.link_target) {
            (EntryKind::Symlink, Some(t)) => {
                if t.is_empty() || t.len() > MAX_PATH_LEN || t.contains('\0') {
                    return Err("a symlink target is empty, too long or contains NUL".into());
                }
            }
            (EntryKind::Symlink, None) => return Err("a symlink without a target".into()),
            (_, Some(_)) => return Err("a link target on an entry that is no symlink".into()),
            (_, None) => {}
        }
        if self.kind != EntryKind::File && self.size.is_some() {
            return Err("a size on an entry that is no file".into());
        }
        Ok(())
    }
}

/// The current file of a copy is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEnd {
    /// SHA-256 of the file's data, 64 lowercase hex digits (the default checksum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// XXH64 (seed 0) of the file's data, 16 lowercase hex digits. Exactly one of the two is
    /// set: the one the copy's `Put` or `Get` named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh64: Option<String>,
}

impl FileEnd {
    /// A `FileEnd` carrying `hex` as the digest of `checksum`.
    pub fn new(checksum: Checksum, hex: String) -> FileEnd {
        match checksum {
            Checksum::Sha256 => FileEnd {
                sha256: Some(hex),
                xxh64: None,
            },
            Checksum::Xxh64 => FileEnd {
                sha256: None,
                xxh64: Some(hex),
            },
        }
    }

    /// The checksum it carries and its hex digest (the decoder checked that there is exactly
    /// one, well formed).
    pub fn digest(&self) -> Option<(Checksum, &str)> {
        match (&self.sha256, &self.xxh64) {
            (Some(h), None) => Some((Checksum::Sha256, h)),
            (None, Some(h)) => Some((Checksum::Xxh64, h)),
            _ => None,
        }
    }
}

/// One message of the agent protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Version exchange; first on every connection, from both sides.
    Hello(Hello),
    /// Client: are you there?
    Ping,
    /// Agent: yes.
    Pong,
    /// Client: describe the guest.
    InfoRequest,
    /// Agent: the description.
    Info(Info),
    /// Client: run a command.
    Exec(Exec),
    /// Client: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// Client: end of the command's stdin.
    StdinEof,
    /// Agent: bytes the command wrote to stdout.
    Stdout(Vec<u8>),
    /// Agent: bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// Agent: the command ended (after all its output).
    Exit(Exit),
    /// Client: signal the command's process group.
    Signal(Signal),
    /// Either side: the request failed; the connection closes.
    Error(ErrorMessage),
    /// Client: receive a copy (entries follow) at this destination.
    Put(Put),
    /// Client: send a copy of this path.
    Get(Get),
    /// The sender of a copy: the next file, directory or symlink.
    Entry(Entry),
    /// The sender of a copy: bytes of the current file.
    Data(Vec<u8>),
    /// The sender of a copy: the current file is complete; its checksum.
    FileEnd(FileEnd),
    /// The sender of a copy: no more entries. The agent, after a `Put`: all committed.
    Done,
    /// Client: the terminal of a `tty` exec changed size.
    Resize(WindowSize),
    /// Client: run the script that follows in `Data` frames.
    Run(Run),
    /// Client: tail a file (`Data` frames follow, then `Done` unless following).
    Logs(Logs),
    /// Agent: stdin bytes the command took (the window opens again by that much).
    StdinAck(StdinAck),
}

impl Message {
    /// The message of a raw-bytes type (`Stdin`, `Stdout`, `Stderr`, `Data`) with `payload`;
    /// `None` for any other type. See [`Decoder::take_partial_raw`].
    pub fn from_raw(ty: MessageType, payload: Vec<u8>) -> Option<Message> {
        Some(match ty {
            MessageType::Stdin => Message::Stdin(payload),
            MessageType::Stdout => Message::Stdout(payload),
            MessageType::Stderr => Message::Stderr(payload),
            MessageType::Data => Message::Data(payload),
            _ => return None,
        })
    }

    /// The type byte this message travels with.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::Ping => MessageType::Ping,
            Message::Pong => MessageType::Pong,
            Message::InfoRequest => MessageType::InfoRequest,
            Message::Info(_) => MessageType::Info,
            Message::Exec(_) => MessageType::Exec,
            Message::Stdin(_) => MessageType::Stdin,
            Message::StdinEof => MessageType::StdinEof,
            Message::Stdout(_) => MessageType::Stdout,
            Message::Stderr(_) => MessageType::Stderr,
            Message::Exit(_) => MessageType::Exit,
            Message::Signal(_) => MessageType::Signal,
            Message::Error(_) => MessageType::Error,
            Message::Put(_) => MessageType::Put,
            Message::Get(_) => MessageType::Get,
            Message::Entry(_) => MessageType::Entry,
            Message::Data(_) => MessageType::Data,
            Message::FileEnd(_) => MessageType::FileEnd,
            Message::Done => MessageType::Done,
            Message::Resize(_) => MessageType::Resize,
            Message::Run(_) => MessageType::Run,
            Message::Logs(_) => MessageType::Logs,
            Message::StdinAck(_) => MessageType::StdinAck,
        }
    }

    /// Appends this message's frame to `out`.
    ///
    /// Fails only when the payload would exceed [`MAX_FRAME_LEN`] (a data chunk or a string that
    /// is too large): nothing is appended then.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let ty = self.message_type();
        let json = |v: serde_json::Result<Vec<u8>>| {
            // Serializing these plain structs to a Vec cannot fail; map it anyway.
            v.map_err(|e| FrameError::Encode {
                ty,
                reason: e.to_string(),
            })
        };
        let owned;
        let payload: &[u8] = match self {
            Message::Ping
            | Message::Pong
            | Message::InfoRequest
            | Message::StdinEof
            | Message::Done => &[],
            Message::Stdin(b) | Message::Stdout(b) | Message::Stderr(b) | Message::Data(b) => b,
            Message::Put(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Get(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Entry(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::FileEnd(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Hello(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Info(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Exec(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Exit(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Signal(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Error(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Resize(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Run(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::Logs(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
            Message::StdinAck(v) => {
                owned = json(serde_json::to_vec(v))?;
                &owned
            }
        };
        out.extend_from_slice(&encode_header(ty, payload.len())?);
        out.extend_from_slice(payload);
        Ok(())
    }

    /// This message's frame.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// An `Error` message.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Message {
        Message::Error(ErrorMessage {
            kind,
            message: message.into(),
        })
    }
}

/// The header of a frame of type `ty` carrying `len` payload bytes.
///
/// With it a sender can write a data frame's header and then the data from its own buffer, without
/// copying the data into a [`Message`].
pub fn encode_header(ty: MessageType, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = FRAME_VERSION;
    h[5] = ty as u8;
    // Flags (6..8) stay 0. `len` fits in u32: it is at most MAX_FRAME_LEN.
    h[8..].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(h)
}

/// A frame that cannot be accepted. The connection is unusable after any of these (the receiver
/// cannot find the next frame boundary with confidence), except [`FrameError::Encode`] and
/// [`FrameError::TooLong`] from an encoder, which mean nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not `VMLA`.
    #[error("not a vmlink agent frame: it starts with {got:02x?}, expected \"VMLA\"")]
    BadMagic {
        /// The four bytes received.
        got: [u8; 4],
    },
    /// A header layout this module does not know.
    #[error("unsupported agent frame version {version} (this side speaks {FRAME_VERSION})")]
    BadVersion {
        /// The version byte received.
        version: u8,
    },
    /// A type byte that names no message.
    #[error("unknown agent message type {ty}")]
    UnknownType {
        /// The type byte received.
        ty: u8,
    },
    /// Reserved flag bits set.
    #[error("agent frame of type {ty} has reserved flags {flags:#06x} set")]
    BadFlags {
        /// The frame's type.
        ty: MessageType,
        /// The flags received.
        flags: u16,
    },
    /// A payload over the bound.
    #[error("agent frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// The announced payload length.
        len: u64,
        /// The bound.
        max: usize,
    },
    /// A message that carries nothing came with a payload.
    #[error("agent message {ty} must be empty but has {len} bytes")]
    UnexpectedPayload {
        /// The frame's type.
        ty: MessageType,
        /// Its payload length.
        len: usize,
    },
    /// The JSON payload does not describe the message.
    #[error("agent message {ty} is malformed ({reason}): {quote}")]
    BadPayload {
        /// The frame's type.
        ty: MessageType,
        /// What serde said.
        reason: String,
        /// The start of the payload, escaped.
        quote: String,
    },
    /// A well-formed message that breaks a bound or rule of its own.
    #[error("agent message {ty} is invalid: {reason}")]
    Invalid {
        /// The frame's type.
        ty: MessageType,
        /// The rule broken.
        reason: String,
    },
    /// The peer closed the stream in the middle of a frame.
    #[error("the stream ended inside an agent frame ({partial_len} bytes of it received)")]
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        partial_len: usize,
    },
    /// A message could not be serialized.
    #[error("cannot encode agent message {ty}: {reason}")]
    Encode {
        /// The message's type.
        ty: MessageType,
        /// Why.
        reason: String,
    },
}

/// Checks the frame at the start of `buf`: `Ok(None)` until it is complete, then `Ok(Some(n))`
/// with `n` its total length (header included). Header errors are reported as soon as the
/// header has arrived.
pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut got = [0u8; 4];
    got.copy_from_slice(&h[..4]);
    if got != MAGIC {
        return Err(FrameError::BadMagic { got });
    }
    if h[4] != FRAME_VERSION {
        return Err(FrameError::BadVersion { version: h[4] });
    }
    let ty = MessageType::from_u8(h[5]).ok_or(FrameError::UnknownType { ty: h[5] })?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(FrameError::BadFlags { ty, flags });
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_LEN)
        .ok_or(FrameError::TooLong {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        })?;
    if ty.payload() == PayloadKind::Empty && len != 0 {
        return Err(FrameError::UnexpectedPayload { ty, len });
    }
    let total = HEADER_LEN + len;
    Ok((buf.len() >= total).then_some(total))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` until it is complete, then the message
/// and the number of bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(total) = check(buf)? else {
        return Ok(None);
    };
    // `check` validated the type byte.
    let ty = MessageType::from_u8(buf[5]).ok_or(FrameError::UnknownType { ty: buf[5] })?;
    let payload = &buf[HEADER_LEN..total];
    let message = match ty {
        MessageType::Ping => Message::Ping,
        MessageType::Pong => Message::Pong,
        MessageType::InfoRequest => Message::InfoRequest,
        MessageType::StdinEof => Message::StdinEof,
        MessageType::Stdin => Message::Stdin(payload.to_vec()),
        MessageType::Stdout => Message::Stdout(payload.to_vec()),
        MessageType::Stderr => Message::Stderr(payload.to_vec()),
        MessageType::Hello => {
            let hello: Hello = json(ty, payload)?;
            if hello.features.len() > MAX_FEATURES || hello.features.iter().any(|f| f.len() > 64) {
                return Err(FrameError::Invalid {
                    ty,
                    reason: format!(
                        "more than {MAX_FEATURES} features, or a feature name over 64 bytes"
                    ),
                });
            }
            Message::Hello(hello)
        }
        MessageType::Info => Message::Info(json(ty, payload)?),
        MessageType::Exec => {
            let exec: Exec = json(ty, payload)?;
            validate_exec(&exec).map_err(|reason| FrameError::Invalid { ty, reason })?;
            Message::Exec(exec)
        }
        MessageType::Exit => Message::Exit(json(ty, payload)?),
        MessageType::Signal => Message::Signal(json(ty, payload)?),
        MessageType::Error => Message::Error(json(ty, payload)?),
        MessageType::Done => Message::Done,
        MessageType::Data => Message::Data(payload.to_vec()),
        MessageType::Put => {
            let put: Put = json(ty, payload)?;
            validate_abs_path(&put.path).map_err(|reason| FrameError::Invalid { ty, reason })?;
            Message::Put(put)
        }
        MessageType::Get => {
            let get: Get = json(ty, payload)?;
            validate_abs_path(&get.path).map_err(|reason| FrameError::Invalid { ty, reason })?;
            Message::Get(get)
        }
        MessageType::Entry => {
            let entry: Entry = json(ty, payload)?;
            entry
                .validate()
                .map_err(|reason| FrameError::Invalid { ty, reason })?;
            Message::Entry(entry)
        }
        MessageType::FileEnd => {
            let end: FileEnd = json(ty, payload)?;
            let Some((checksum, hex)) = end.digest() else {
                return Err(FrameError::Invalid {
                    ty,
                    reason: "not exactly one of sha256 and xxh64".into(),
                });
            };
            if hex.len() != checksum.hex_len()
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(FrameError::Invalid {
                    ty,
                    reason: format!(
                        "{} is not {} lowercase hex digits",
                        checksum.name(),
                        checksum.hex_len()
                    ),
                });
            }
            Message::FileEnd(end)
        }
        MessageType::Resize => {
            let size: WindowSize = json(ty, payload)?;
            validate_window(&size).map_err(|reason| FrameError::Invalid { ty, reason })?;
            Message::Resize(size)
        }
        MessageType::Run => {
            let run: Run = json(ty, payload)?;
            validate_exec(&run.exec).map_err(|reason| FrameError::Invalid { ty, reason })?;
            if run.size > MAX_SCRIPT_LEN {
                return Err(FrameError::Invalid {
                    ty,
                    reason: format!(
                        "a script of {} bytes exceeds the limit of {MAX_SCRIPT_LEN}",
                        run.size
                    ),
                });
            }
            Message::Run(run)
        }
        MessageType::Logs => {
            let logs: Logs = json(ty, payload)?;
            validate_abs_path(&logs.path).map_err(|reason| FrameError::Invalid { ty, reason })?;
            if logs.lines > MAX_LOG_LINES {
                return Err(FrameError::Invalid {
                    ty,
                    reason: format!("{} lines exceed the limit of {MAX_LOG_LINES}", logs.lines),
                });
            }
            Message::Logs(logs)
        }
        MessageType::StdinAck => Message::StdinAck(json(ty, payload)?),
    };
    Ok(Some((message, total)))
}

fn json<T: serde::de::DeserializeOwned>(ty: MessageType, payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::BadPayload {
        ty,
        reason: e.to_string().replace('\n', " "),
        quote: payload
            .iter()
            .take(QUOTE_LEN)
            .flat_map(|b| std::ascii::escape_default(*b))
            .map(char::from)
            .collect(),
    })
}

fn validate_exec(exec: &Exec) -> Result<(), String> {
    if exec.argv.is_empty() {
        return Err("argv is empty".into());
    }
    if exec.argv.len() > MAX_ARGS {
        return Err(format!(
            "{} arguments exceed the limit of {MAX_ARGS}",
            exec.argv.len()
        ));
    }
    if exec.env.len() > MAX_ENV {
        return Err(format!(
            "{} environment variables exceed the limit of {MAX_ENV}",
            exec.env.len()
        ));
    }
    let strings = exec
        .argv
        .iter()
        .chain(exec.env.iter().flat_map(|(k, v)| [k, v]))
        .chain(exec.cwd.iter());
    for s in strings {
        if s.contains('\0') {
            return Err("a string contains a NUL byte".into());
        }
    }
    for (k, _) in &exec.env {
        if k.is_empty() || k.contains('=') {
            return Err("an environment variable name is empty or contains '='".into());
        }
    }
    if let Some(user) = &exec.user {
        if user.is_empty() || user.len() > MAX_USER_LEN || user.contains(['\0', ':', '/', '\n']) {
            return Err(
                "the user name is empty, too long, or contains NUL, ':', '/' or a newline".into(),
            );
        }
    }
    if let Some(w) = &exec.window {
        validate_window(w)?;
    }
    Ok(())
}

fn validate_window(w: &WindowSize) -> Result<(), String> {
    if w.rows == 0 || w.cols == 0 {
        return Err(format!("a window of {}x{} cells is empty", w.rows, w.cols));
    }
    Ok(())
}

fn validate_abs_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("the path is not absolute".into());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!(
            "a path of {} bytes exceeds the limit of {MAX_PATH_LEN}",
            path.len()
        ));
    }
    if path.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    Ok(())
}

/// Accumulates bytes as they are read and hands out whole messages.
///
/// ```
/// use vmlink_proto::agent::{Decoder, Message};
///
/// let frame = Message::Ping.encode()?;
/// let mut d = Decoder::new();
/// d.extend(&frame[..5]);
/// assert_eq!(d.next_message()?, None);
/// d.extend(&frame[5..]);
/// assert_eq!(d.next_message()?, Some(Message::Ping));
/// d.eof()?;
/// # Ok::<(), vmlink_proto::agent::FrameError>(())
/// ```
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    failed: Option<FrameError>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes read from the peer.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= MAX_DATA_CHUNK && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one is buffered. After an error every call returns it again.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match decode(&self.buf[self.start..]) {
            Ok(Some((message, n))) => {
                self.start += n;
                Ok(Some(message))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// For a reader that wants big payloads without copying them twice: when the buffered
    /// bytes start with a valid header of a raw-bytes frame (`Stdin`, `Stdout`, `Stderr`,
    /// `Data`) whose payload is not all buffered yet, takes that frame out of the decoder and
    /// returns its type, its whole payload length, and a buffer with the part already buffered
    /// (its capacity is the whole payload). The caller reads the rest of the payload from the
    /// stream into that buffer and makes the message with [`Message::from_raw`]; the decoder
    /// continues after the frame. `Ok(None)` in every other case (nothing is taken); an error
    /// when the header is invalid, as [`Decoder::next_message`] would report it.
    pub fn take_partial_raw(
        &mut self,
    ) -> Result<Option<(MessageType, usize, Vec<u8>)>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let buf = &self.buf[self.start..];
        match check(buf) {
            Ok(None) if buf.len() >= HEADER_LEN => {}
            Ok(_) => return Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        let ty = MessageType::from_u8(buf[5]).ok_or(FrameError::UnknownType { ty: buf[5] })?;
        if ty.payload() != PayloadKind::Bytes {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        let mut payload = Vec::with_capacity(len);
        payload.extend_from_slice(&buf[HEADER_LEN..]);
        self.buf.clear();
        self.start = 0;
        Ok(Some((ty, len, payload)))
    }

    /// How many bytes are buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The peer closed the stream: fine between frames, an error inside one.
    pub fn eof(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            partial_len => Err(FrameError::Truncated { partial_len }),
        }
    }
}

/// Invariant checks shared by the fuzz target `agent_frames` and the stable tests.
///
/// Not a public API: it panics when an invariant is broken, which is what a fuzzer needs.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Checks every frame-codec invariant on one fuzz input.
    ///
    /// Byte 0 (if any) is a chunk length (`% 64`, 0 meaning "one byte at a time") used to feed
    /// the rest, the payload, to a [`Decoder`]; the payload also goes to the one-shot [`decode`].
    pub fn check_agent_frames(data: &[u8]) {
        let Some((&chunk, payload)) = data.split_first() else {
            check_stream(&[], 1);
            return;
        };
        check_stream(payload, usize::from(chunk % 64).max(1));
    }

    fn check_stream(payload: &[u8], chunk: usize) {
        // One-shot: decode frames back to back.
        let mut expected = Vec::new();
        let mut rest = payload;
        let end: Result<(), FrameError> = loop {
            match decode(rest) {
                Ok(Some((message, n))) => {
                    assert!(n >= HEADER_LEN && n <= rest.len() && n <= HEADER_LEN + MAX_FRAME_LEN);
                    check_prefixes(&rest[..n], &Ok(Some((message.clone(), n))));
                    check_round_trip(&message);
                    expected.push(message);
                    rest = &rest[n..];
                }
                Ok(None) => {
                    check_prefixes(rest, &Ok(None));
                    break if rest.is_empty() {
                        Ok(())
                    } else {
                        Err(FrameError::Truncated {
                            partial_len: rest.len(),
                        })
                    };
                }
                Err(e) => {
                    check_message(&e);
                    check_prefixes(rest, &Err(e.clone()));
                    break Err(e);
                }
            }
        };

        // The accumulator, fed in chunks, gives the same messages and the same ending.
        let mut d = Decoder::new();
        let mut got = Vec::new();
        let mut error = None;
        for piece in payload.chunks(chunk) {
            d.extend(piece);
            loop {
                match d.next_message() {
                    Ok(Some(m)) => got.push(m),
                    Ok(None) => break,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if error.is_some() {
                break;
            }
        }
        assert_eq!(got, expected);
        match (error, &end) {
            (None, _) => assert_eq!(d.eof(), end),
            (Some(e), Err(first)) => {
                assert_eq!(&e, first);
                assert_eq!(d.eof(), Err(e));
            }
            (Some(e), Ok(())) => panic!("decoder failed with {e:?}, one-shot did not"),
        }
        check_partial_reader(payload, chunk, &expected, end.is_err());
    }

    /// A reader that takes raw payloads out of the decoder ([`Decoder::take_partial_raw`]) and
    /// fills them straight from the stream, as `vmlink_agent`'s does, sees the same messages,
    /// and fails exactly when the one-shot decode does.
    fn check_partial_reader(payload: &[u8], chunk: usize, expected: &[Message], fails: bool) {
        let mut d = Decoder::new();
        let mut got = Vec::new();
        let mut partial: Option<(MessageType, usize, Vec<u8>)> = None;
        let mut failed = false;
        let mut at = 0;
        'feed: while at < payload.len() {
            let n = chunk.min(payload.len() - at);
            if let Some((ty, len, buf)) = &mut partial {
                let n = n.min(*len - buf.len());
                buf.extend_from_slice(&payload[at..at + n]);
                at += n;
                if buf.len() == *len {
                    let m = Message::from_raw(*ty, std::mem::take(buf));
                    got.push(m.expect("take_partial_raw hands out raw types only"));
                    partial = None;
                }
                continue;
            }
            d.extend(&payload[at..at + n]);
            at += n;
            loop {
                match d.next_message() {
                    Ok(Some(m)) => got.push(m),
                    Ok(None) => match d.take_partial_raw() {
                        Ok(Some(p)) => {
                            assert!(p.2.len() < p.1 && p.1 <= MAX_FRAME_LEN);
                            assert_eq!(d.buffered(), 0, "the frame left the decoder whole");
                            partial = Some(p);
                            break;
                        }
                        Ok(None) => break,
                        Err(_) => {
                            failed = true;
                            break 'feed;
                        }
                    },
                    Err(_) => {
                        failed = true;
                        break 'feed;
                    }
                }
            }
        }
        let ended_inside = partial.is_some() || d.eof().is_err();
        assert_eq!(got, expected[..got.len().min(expected.len())].to_vec());
        if !failed && !ended_inside {
            assert_eq!(got, expected);
        }
        assert_eq!(
            failed || ended_inside,
            fails,
            "the partial reader and decode disagree"
        );
    }

    /// The outcome is decided when the header (for header errors) or the whole frame has arrived,
    /// never earlier, and every longer prefix gives the same outcome.
    fn check_prefixes(buf: &[u8], whole: &Result<Option<(Message, usize)>, FrameError>) {
        let header_error = matches!(
            whole,
            Err(FrameError::BadMagic { .. }
                | FrameError::BadVersion { .. }
                | FrameError::UnknownType { .. }
                | FrameError::BadFlags { .. }
                | FrameError::TooLong { .. }
                | FrameError::UnexpectedPayload { .. })
        );
        let decided_at = match whole {
            Ok(Some((_, n))) => *n,
            Ok(None) => buf.len() + 1,
            Err(_) if header_error => HEADER_LEN,
            Err(_) => check(buf).ok().flatten().unwrap_or(buf.len()),
        };
        // Prefixes at and near the decision point, and a sample before it.
        let step = (decided_at / 64).max(1);
        let lens = (0..decided_at.min(buf.len() + 1))
            .step_by(step)
            .chain(decided_at.saturating_sub(2)..=buf.len().min(decided_at + 2));
        for len in lens.filter(|&l| l <= buf.len()) {
            let prefix = decode(&buf[..len]);
            if len < decided_at {
                assert_eq!(prefix, Ok(None), "prefix of {len} bytes");
            } else {
                assert_eq!(&prefix, whole, "prefix of {len} bytes");
            }
        }
    }

    /// A message encodes within the bound and decodes back to itself, consuming all of it.
    pub fn check_round_trip(message: &Message) {
        let bytes = match message.encode() {
            Ok(b) => b,
            Err(e) => panic!("{message:?} decoded but does not encode: {e}"),
        };
        assert!(bytes.len() <= HEADER_LEN + MAX_FRAME_LEN);
        assert_eq!(check(&bytes), Ok(Some(bytes.len())));
        assert_eq!(decode(&bytes), Ok(Some((message.clone(), bytes.len()))));
    }

    fn check_message(e: &FrameError) {
        let m = e.to_string();
        assert!(!m.is_empty() && !m.contains('\n'), "{m:?}");
        assert!(m.len() <= 512, "{} bytes: {m}", m.len());
    }
}

#[cfg(test)]
mod tests {
    use super::fuzzing::{check_agent_frames, check_round_trip};
    use super::*;

    #[test]
    fn stdin_window_is_sent_only_when_asked_for_and_defaults_to_off() {
        let plain = Message::Exec(Exec {
            argv: vec!["cat".into()],
            stdin: true,
            ..Exec::default()
        });
        let bytes = plain.encode().expect("encodes");
        assert!(
            !String::from_utf8_lossy(&bytes).contains("stdin_window"),
            "an Exec without the window looks as it did before the feature"
        );
        let windowed = Message::Exec(Exec {
            argv: vec!["cat".into()],
            stdin: true,
            stdin_window: true,
            ..Exec::default()
        });
        let bytes = windowed.encode().expect("encodes");
        assert!(String::from_utf8_lossy(&bytes).contains("\"stdin_window\":true"));
        assert_eq!(decode(&bytes), Ok(Some((windowed, bytes.len()))));
        let ack = Message::StdinAck(StdinAck { bytes: 7 })
            .encode()
            .expect("encodes");
        assert_eq!(ack[5], 23, "StdinAck is type 23");
        assert!(matches!(decode(&ack[..HEADER_LEN]), Ok(None)));
    }

    #[test]
    fn follow_is_sent_only_when_asked_for_and_defaults_to_off() {
        let get = |follow| Get {
            path: "/etc/os-release".into(),
            checksum: Checksum::Sha256,
            follow,
        };
        let bytes = Message::Get(get(false)).encode().expect("encodes");
        let text = String::from_utf8_lossy(&bytes[HEADER_LEN..]).into_owned();
        assert_eq!(
            text, r#"{"path":"/etc/os-release"}"#,
            "as before the feature"
        );
        assert_eq!(
            decode(&bytes),
            Ok(Some((Message::Get(get(false)), bytes.len())))
        );
        let bytes = Message::Get(get(true)).encode().expect("encodes");
        assert!(String::from_utf8_lossy(&bytes).contains(r#""follow":true"#));
        assert_eq!(
            decode(&bytes),
            Ok(Some((Message::Get(get(true)), bytes.len())))
        );
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                software: "vmlink/0.1.0".into(),
                features: Vec::new(),
            }),
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                software: "vmlink-agent/0.1.0".into(),
                features: FEATURES.iter().map(|f| f.to_string()).collect(),
            }),
            Message::Ping,
            Message::Pong,
            Message::InfoRequest,
            Message::Info(Info {
                hostname: "guest".into(),
                os: "Debian GNU/Linux 12 (bookworm)".into(),
                kernel: "6.1.0-18-amd64".into(),
                uptime_secs: 42,
                agent_version: "0.1.0".into(),
                channels: vec!["vsock-listen:any:7878".into()],
            }),
            Message::Exec(Exec {
                argv: vec!["sh".into(), "-c".into(), "echo \"hi\"".into()],
                env: vec![("A".into(), "b=c".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                tty: false,
                window: None,
                user: None,
                stdin_window: false,
            }),
            Message::Exec(Exec {
                argv: vec!["sh".into()],
                stdin: true,
                stdin_window: true,
                tty: true,
                window: Some(WindowSize {
                    rows: 40,
                    cols: 132,
                }),
                user: Some("nobody".into()),
                ..Exec::default()
            }),
            Message::Resize(WindowSize {
                rows: 1,
                cols: 65535,
            }),
            Message::Run(Run {
                exec: Exec {
                    argv: vec!["deploy.sh".into(), "--fast".into()],
                    ..Exec::default()
                },
                size: 1234,
            }),
            Message::Logs(Logs {
                path: "/var/log/syslog".into(),
                lines: 10,
                follow: true,
            }),
            Message::Stdin(b"in\0put".to_vec()),
            Message::StdinEof,
            Message::StdinAck(StdinAck { bytes: 65536 }),
            Message::Stdout(vec![0xff; 1000]),
            Message::Stderr(Vec::new()),
            Message::Exit(Exit {
                code: Some(7),
                signal: None,
            }),
            Message::Exit(Exit {
                code: None,
                signal: Some(15),
            }),
            Message::Signal(Signal { signo: 2 }),
            Message::error(ErrorKind::Refused, "vsock CID 1 is not allowed"),
            Message::Put(Put {
                path: "/tmp/dest".into(),
                exact: false,
                checksum: Checksum::Sha256,
            }),
            Message::Put(Put {
                path: "/tmp/dest".into(),
                exact: true,
                checksum: Checksum::Xxh64,
            }),
            Message::Get(Get {
                path: "/etc/hostname".into(),
                checksum: Checksum::Sha256,
                follow: false,
            }),
            Message::Get(Get {
                path: "/etc/os-release".into(),
                checksum: Checksum::Xxh64,
                follow: true,
            }),
            Message::Entry(Entry {
                kind: EntryKind::File,
                path: "tree/a b/file".into(),
                mode: 0o644,
                mtime: 1_700_000_000,
                mtime_nsec: 5,
                size: Some(3),
                link_target: None,
            }),
            Message::Entry(Entry {
                kind: EntryKind::Symlink,
                path: "tree/link".into(),
                mode: 0o777,
                mtime: -1,
                mtime_nsec: 0,
                size: None,
                link_target: Some("../elsewhere".into()),
            }),
            Message::Data(vec![0, 1, 2]),
            Message::FileEnd(FileEnd::new(Checksum::Sha256, "ab".repeat(32))),
            Message::FileEnd(FileEnd::new(Checksum::Xxh64, "0123456789abcdef".into())),
            Message::Done,
            Message::error(ErrorKind::Io, "no space left on device (ENOSPC)"),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            check_round_trip(&m);
        }
    }

    #[test]
    fn a_stream_split_at_every_offset_gives_the_same_messages() {
        let mut stream = Vec::new();
        for m in samples() {
            m.encode_into(&mut stream).expect("encodes");
        }
        for at in 0..=stream.len() {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for piece in [&stream[..at], &stream[at..]] {
                d.extend(piece);
                while let Some(m) = d.next_message().expect("valid stream") {
                    got.push(m);
                }
            }
            assert_eq!(got, samples(), "split at {at}");
            assert_eq!(d.eof(), Ok(()));
        }
        check_agent_frames(&[[1u8].as_slice(), &stream].concat());
        check_agent_frames(&[[7u8].as_slice(), &stream].concat());
    }

    /// A reader that takes big payloads out with `take_partial_raw` and fills them straight
    /// from the stream sees the same messages as one that only uses `next_message`.
    #[test]
    fn taking_partial_payloads_out_gives_the_same_messages() {
        let mut stream = Vec::new();
        let mut want = samples();
        want.push(Message::Data((0..200_000u32).map(|i| i as u8).collect()));
        want.push(Message::Ping);
        want.push(Message::Stdout(vec![9; 70_000]));
        for m in &want {
            m.encode_into(&mut stream).expect("encodes");
        }
        for step in [1, 5, 12, 13, 4096, 65536] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            let mut partial: Option<(MessageType, usize, Vec<u8>)> = None;
            let mut at = 0;
            let mut taken = 0;
            while at < stream.len() {
                if let Some((_, len, buf)) = &mut partial {
                    let n = (*len - buf.len()).min(step).min(stream.len() - at);
                    buf.extend_from_slice(&stream[at..at + n]);
                    at += n;
                    if buf.len() == *len {
                        let (ty, _, buf) = partial.take().expect("partial");
                        got.push(Message::from_raw(ty, buf).expect("raw type"));
                    }
                    continue;
                }
                let n = step.min(stream.len() - at);
                d.extend(&stream[at..at + n]);
                at += n;
                loop {
                    if let Some(m) = d.next_message().expect("valid stream") {
                        got.push(m);
                    } else if let Some(p) = d.take_partial_raw().expect("valid header") {
                        assert_eq!(p.2.capacity(), p.1);
                        taken += 1;
                        partial = Some(p);
                        break;
                    } else {
                        break;
                    }
                }
            }
            assert!(partial.is_none());
            assert_eq!(got, want, "step {step}");
            assert_eq!(d.eof(), Ok(()));
            if step < 65536 {
                assert!(
                    taken >= 2,
                    "step {step}: the big payloads went the partial way"
                );
            }
        }
        // Nothing is taken from a frame that is complete, not raw, or has no whole header.
        let mut d = Decoder::new();
        d.extend(&Message::Data(vec![1; 10]).encode().expect("encodes")[..11]);
        assert_eq!(d.take_partial_raw(), Ok(None));
        let mut d = Decoder::new();
        let hello = samples().remove(0).encode().expect("encodes");
        d.extend(&hello[..hello.len() - 1]);
        assert_eq!(d.take_partial_raw(), Ok(None));
        assert_eq!(d.buffered(), hello.len() - 1);
        let mut d = Decoder::new();
        d.extend(b"VMLB\x01\x11\0\0\0\0\0\0");
        assert!(d.take_partial_raw().is_err());
    }

    #[test]
    fn a_data_frame_is_raw_bytes_after_the_header() {
        let frame = Message::Stdout(b"hello".to_vec())
            .encode()
            .expect("encodes");
        assert_eq!(&frame[..4], b"VMLA");
        assert_eq!(frame[4], FRAME_VERSION);
        assert_eq!(frame[5], MessageType::Stdout as u8);
        assert_eq!(&frame[6..12], &[0, 0, 5, 0, 0, 0]);
        assert_eq!(&frame[12..], b"hello");
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header_naming_the_length() {
        let mut h = encode_header(MessageType::Stdout, 0).expect("header");
        h[8..].copy_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes());
        let e = check(&h).expect_err("too long");
        assert_eq!(
            e,
            FrameError::TooLong {
                len: MAX_FRAME_LEN as u64 + 1,
                max: MAX_FRAME_LEN
            }
        );
        assert_eq!(
            e.to_string(),
            "agent frame of 1048577 bytes exceeds the limit of 1048576 bytes"
        );
        h[8..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check(&h)
            .expect_err("too long")
            .to_string()
            .contains("4294967295"));
        // A maximal frame is fine, and an encoder refuses one byte more.
        let big = Message::Stdin(vec![1; MAX_FRAME_LEN]);
        check_round_trip(&big);
        assert!(Message::Stdin(vec![1; MAX_FRAME_LEN + 1]).encode().is_err());
    }

    #[test]
    fn garbage_headers_are_refused_with_what_was_wrong() {
        let good = Message::Ping.encode().expect("encodes");
        let with = |at: usize, b: u8| {
            let mut f = good.clone();
            f[at] = b;
            decode(&f).expect_err("refused")
        };
        assert!(matches!(with(0, b'X'), FrameError::BadMagic { .. }));
        assert_eq!(with(4, 2), FrameError::BadVersion { version: 2 });
        assert_eq!(with(5, 0), FrameError::UnknownType { ty: 0 });
        assert_eq!(with(5, 24), FrameError::UnknownType { ty: 24 });
        assert!(matches!(
            with(7, 1),
            FrameError::BadFlags { flags: 0x100, .. }
        ));
        assert_eq!(
            with(8, 1),
            FrameError::UnexpectedPayload {
                ty: MessageType::Ping,
                len: 1
            }
        );
        let e = decode(b"GET / HTTP/1.1\r\n").expect_err("not ours");
        assert_eq!(
            e.to_string(),
            "not a vmlink agent frame: it starts with [47, 45, 54, 20], expected \"VMLA\""
        );
    }

    #[test]
    fn malformed_and_out_of_bounds_requests_are_refused() {
        let frame = |ty: MessageType, payload: &[u8]| {
            let mut f = encode_header(ty, payload.len()).expect("header").to_vec();
            f.extend_from_slice(payload);
            f
        };
        let e = decode(&frame(MessageType::Exec, b"{\"argv\": 5}")).expect_err("bad");
        assert!(matches!(e, FrameError::BadPayload { .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
        let e = decode(&frame(MessageType::Exec, b"{\"argv\": []}")).expect_err("empty");
        assert_eq!(
            e.to_string(),
            "agent message Exec is invalid: argv is empty"
        );
        let many = Exec {
            argv: vec!["x".into(); MAX_ARGS + 1],
            ..Exec::default()
        };
        let e = decode(&Message::Exec(many).encode().expect("encodes")).expect_err("too many");
        assert!(
            e.to_string()
                .contains("4097 arguments exceed the limit of 4096"),
            "{e}"
        );
        let nul = Exec {
            argv: vec!["a\0b".into()],
            ..Exec::default()
        };
        assert!(decode(&Message::Exec(nul).encode().expect("encodes")).is_err());
        // Unknown fields are ignored (a newer client), unknown error kinds are kept as Unknown.
        let (m, _) = decode(&frame(MessageType::Hello, b"{\"version\":2,\"future\":1}"))
            .expect("valid")
            .expect("complete");
        assert_eq!(
            m,
            Message::Hello(Hello {
                version: 2,
                software: String::new(),
                features: Vec::new(),
            })
        );
        let (m, _) = decode(&frame(
            MessageType::Error,
            b"{\"kind\":\"quota\",\"message\":\"m\"}",
        ))
        .expect("valid")
        .expect("complete");
        assert_eq!(m, Message::error(ErrorKind::Unknown, "m"));
    }

    #[test]
    fn tty_run_and_logs_requests_out_of_bounds_are_refused() {
        let invalid = |m: Message| {
            let e = decode(&m.encode().expect("encodes")).expect_err("refused");
            assert!(matches!(e, FrameError::Invalid { .. }), "{e}");
            e.to_string()
        };
        let e = invalid(Message::Hello(Hello {
            version: 1,
            software: String::new(),
            features: vec!["f".into(); MAX_FEATURES + 1],
        }));
        assert!(e.contains("more than 64 features"), "{e}");
        let e = invalid(Message::Resize(WindowSize { rows: 0, cols: 80 }));
        assert!(e.contains("0x80"), "{e}");
        let e = invalid(Message::Run(Run {
            exec: Exec {
                argv: vec!["s".into()],
                ..Exec::default()
            },
            size: MAX_SCRIPT_LEN + 1,
        }));
        assert!(e.contains("exceeds the limit of 16777216"), "{e}");
        let e = invalid(Message::Logs(Logs {
            path: "/var/log/x".into(),
            lines: MAX_LOG_LINES + 1,
            follow: false,
        }));
        assert!(e.contains("100001 lines"), "{e}");
        invalid(Message::Logs(Logs {
            path: "relative".into(),
            lines: 1,
            follow: false,
        }));
        for user in ["", "a:b", "../x", "a\0"] {
            invalid(Message::Exec(Exec {
                argv: vec!["id".into()],
                user: Some(user.into()),
                ..Exec::default()
            }));
        }
        invalid(Message::Exec(Exec {
            argv: vec!["sh".into()],
            tty: true,
            window: Some(WindowSize { rows: 24, cols: 0 }),
            ..Exec::default()
        }));
    }

    #[test]
    fn a_stream_that_ends_inside_a_frame_is_truncated() {
        let frame = Message::Stdout(b"abc".to_vec()).encode().expect("encodes");
        let mut d = Decoder::new();
        d.extend(&frame[..frame.len() - 1]);
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(
            d.eof(),
            Err(FrameError::Truncated {
                partial_len: frame.len() - 1
            })
        );
    }

    #[test]
    fn copy_messages_with_escaping_or_oversized_paths_are_refused() {
        let entry = |path: &str| Entry {
            kind: EntryKind::File,
            path: path.into(),
            mode: 0o644,
            mtime: 0,
            mtime_nsec: 0,
            size: None,
            link_target: None,
        };
        for bad in [
            "../x",
            "a/../b",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "",
            "a/",
            "a\0b",
        ] {
            let e = decode(&Message::Entry(entry(bad)).encode().expect("encodes")).expect_err(bad);
            assert!(
                matches!(
                    e,
                    FrameError::Invalid {
                        ty: MessageType::Entry,
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
        let long = "a/".repeat(MAX_PATH_LEN / 2) + "b";
        let e = decode(&Message::Entry(entry(&long)).encode().expect("encodes")).expect_err("long");
        assert!(e.to_string().contains("exceeds the limit of 4096"), "{e}");
        let name = "n".repeat(MAX_NAME_LEN + 1);
        assert!(decode(&Message::Entry(entry(&name)).encode().expect("encodes")).is_err());
        let mut sym = entry("l");
        sym.kind = EntryKind::Symlink;
        assert!(decode(&Message::Entry(sym.clone()).encode().expect("encodes")).is_err());
        sym.link_target = Some("/anywhere".into());
        check_round_trip(&Message::Entry(sym));
        let mut mode = entry("f");
        mode.mode = 0o10000;
        assert!(decode(&Message::Entry(mode).encode().expect("encodes")).is_err());
        for (path, ok) in [("/tmp/x", true), ("tmp/x", false), ("", false)] {
            let m = Message::Put(Put {
                path: path.into(),
                exact: false,
                checksum: Checksum::Sha256,
            });
            assert_eq!(
                decode(&m.encode().expect("encodes")).is_ok(),
                ok,
                "{path:?}"
            );
            let m = Message::Get(Get {
                path: path.into(),
                checksum: Checksum::Xxh64,
                follow: false,
            });
            assert_eq!(
                decode(&m.encode().expect("encodes")).is_ok(),
                ok,
                "{path:?}"
            );
        }
        for sha in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
            let m = Message::FileEnd(FileEnd::new(Checksum::Sha256, sha.clone()));
            assert!(decode(&m.encode().expect("encodes")).is_err(), "{sha}");
        }
        for xxh in ["ab".repeat(32), "ab".repeat(7), "0123456789ABCDEF".into()] {
            let m = Message::FileEnd(FileEnd::new(Checksum::Xxh64, xxh.clone()));
            assert!(decode(&m.encode().expect("encodes")).is_err(), "{xxh}");
        }
        for both in [
            FileEnd {
                sha256: None,
                xxh64: None,
            },
            FileEnd {
                sha256: Some("ab".repeat(32)),
                xxh64: Some("0123456789abcdef".into()),
            },
        ] {
            let e = decode(&Message::FileEnd(both).encode().expect("encodes")).expect_err("one");
            assert!(e.to_string().contains("exactly one"), "{e}");
        }
        // A version-1 peer that knows no `checksum` field reads the default (SHA-256).
        let old: Get = serde_json::from_str(r#"{"path":"/x"}"#).expect("old Get");
        assert_eq!(old.checksum, Checksum::Sha256);
        assert!(!serde_json::to_string(&Put {
            path: "/x".into(),
            exact: false,
            checksum: Checksum::Sha256,
        })
        .expect("json")
        .contains("checksum"));
        assert_eq!(
            decode(
                &[
                    encode_header(MessageType::Done, 1).expect("h").as_slice(),
                    b"x"
                ]
                .concat()
            ),
            Err(FrameError::UnexpectedPayload {
                ty: MessageType::Done,
                len: 1
            })
        );
    }

    #[test]
    fn exit_maps_signals_to_128_plus_n() {
        let e = Exit {
            code: None,
            signal: Some(15),
        };
        assert_eq!(e.shell_status(), 143);
        assert_eq!(e.to_string(), "killed by signal 15");
    }

    #[test]
    fn exit_statuses_a_hostile_agent_makes_up_are_failures_without_overflow() {
        let status = |code, signal| Exit { code, signal }.shell_status();
        // Real wait statuses.
        assert_eq!(status(Some(0), None), 0);
        assert_eq!(status(Some(255), None), 255);
        assert_eq!(status(None, Some(1)), 129);
        assert_eq!(status(None, Some(MAX_SIGNAL)), 128 + MAX_SIGNAL);
        // Signals no kernel has: 128 + 2147483647 overflowed (a panic in debug builds; in
        // release it wrapped, and -128 wraps to 0, success).
        for signal in [i32::MAX, i32::MIN, -128, -1, 0, MAX_SIGNAL + 1, 127, 128] {
            assert_eq!(status(None, Some(signal)), 255, "signal {signal}");
        }
        // Codes no process can exit with (std::process::exit(256) exits 0).
        for code in [256, 512, -1, -256, i32::MAX, i32::MIN] {
            assert_eq!(status(Some(code), None), 255, "code {code}");
        }
        // Both or neither: not a wait status.
        assert_eq!(status(Some(0), Some(9)), 255);
        assert_eq!(status(None, None), 255);
        let both = Exit {
            code: Some(0),
            signal: Some(9),
        };
        assert!(!both.success());
        assert_eq!(
            both.to_string(),
            "malformed exit status (code 0 and signal 9)"
        );
        assert!(Exit {
            code: Some(0),
            signal: None
        }
        .success());
        for code in [Some(0), Some(1), None] {
            for signal in [None, Some(-1), Some(9), Some(i32::MAX)] {
                let s = status(code, signal);
                assert!((0..=255).contains(&s), "{code:?} {signal:?} gave {s}");
            }
        }
    }
}
