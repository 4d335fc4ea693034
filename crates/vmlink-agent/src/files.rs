//! File copies (`vmlink cp`): the sending and receiving ends, shared by the agent (`Put`, `Get`)
//! and the host client.
//!
//! # The stream
//!
//! A copy is a sequence of `Entry` messages in pre-order (a directory before what it holds),
//! each regular file followed by its `Data` frames and one `FileEnd` carrying the checksum of
//! the data (the [`Checksum`] the `Put` or `Get` named: XXH64 between current peers, SHA-256
//! with older ones), and a final `Done`. The first entry is the copy's root; every later entry's path
//! starts with the root's name.
//!
//! # Receiving: atomic, checksummed, confined
//!
//! - Every file is written to a temporary file `.NAME.vmlink-PID-N.tmp` (`NAME` cut to 100
//!   bytes) created (`O_EXCL`, mode 0600) in the directory it is going to, then checked (size,
//!   checksum), given its mode and mtime, `fsync`ed and renamed over its name. A temporary file
//!   is removed when anything fails and when the stream ends early (`TempFile` removes it on
//!   drop), so no partial file is ever visible under a real name.
//! - Symlinks are created under a temporary name and renamed likewise; they are never followed.
//! - Directory modes and mtimes are applied after their contents, deepest first (a read-only
//!   directory can still be filled), and only to directories the copy created: an existing
//!   directory it enters keeps its own.
//! - Setuid and setgid bits are dropped unless [`Receiver::keep_setid`] (the agent's `Put`:
//!   the host is trusted there; the host receiving a `Get` from a guest is not).
//! - Entry paths were checked by the decoder (no `..`, `.`, empty component or leading `/`).
//!   Before each entry is created, every directory between the destination and the entry is
//!   checked with `lstat`: it must be a real directory, not a symlink, so neither a symlink sent
//!   earlier in the same copy nor one already in the destination can lead outside it. (A local
//!   process racing the agent inside the destination directory is outside this model: whoever
//!   can write there can already write there.)
//! - At most [`MAX_ENTRIES`] entries per copy, and [`MAX_DIR_BYTES`] of directory paths kept
//!   until the end (for their modes and mtimes).
//!
//! # Sending
//!
//! The sender walks the tree with `lstat` (symlinks are sent as symlinks) on a blocking thread,
//! hashing as it reads, and hands ready-made frames (header and data in one buffer) to the async
//! side through a bounded channel, so disk, hashing and socket overlap.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::debug;
use vmlink_proto::agent::{
    encode_header, Checksum, Entry, EntryKind, ErrorKind, FileEnd, Get, Message, MessageType, Put,
    HEADER_LEN, MAX_ENTRIES,
};
use vmlink_transport::{ReadHalf, WriteHalf};
use xxhash_rust::xxh64::Xxh64;

use crate::framed::{write_message, FrameReader, WireError};
use crate::server::SessionError;

/// How many frames may wait between the disk thread and the socket: with [`COPY_CHUNK`], 8 MiB
/// in flight per direction and connection; a peer that sends frames of the largest size
/// (`MAX_FRAME_LEN`, 1 MiB) can make it 32 MiB.
const QUEUE: usize = 32;
/// The data per `Data` frame a copy sends: larger than exec's 64 KiB chunks (fewer frames,
/// syscalls and wakeups per byte), well under the frame bound.
pub const COPY_CHUNK: usize = 256 * 1024;

/// The most bytes of directory paths a receiver keeps until the end of a copy (to set each
/// directory's mode and mtime after its contents): 64 MiB, some 500,000 directories at a
/// typical depth. Without it, [`MAX_ENTRIES`] paths of `MAX_PATH_LEN` would be 4 GiB.
pub const MAX_DIR_BYTES: usize = 64 << 20;

/// A copy failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file operation failed. The OS error is in the text, with its symbolic name (ENOSPC),
    /// rather than a `#[source]`, because the peer gets the text only.
    #[error("cannot {op} {path:?}: {}", describe(error))]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// An entry would leave the destination, or is out of place.
    #[error("refusing entry {entry:?}: {reason}")]
    UnsafePath {
        /// The entry's path as sent.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A file's `FileEnd` carries another checksum than the copy agreed on.
    #[error("the sender checksummed {entry:?} with {got}, not with the agreed {expected}")]
    OtherChecksum {
        /// The entry.
        entry: String,
        /// What the `Put` or `Get` named.
        expected: &'static str,
        /// What the `FileEnd` carries.
        got: &'static str,
    },
    /// A file's data does not match the checksum its sender computed.
    #[error("checksum mismatch for {entry:?}: sent {expected}, received data hashes to {got}; nothing was renamed")]
    Checksum {
        /// The entry.
        entry: String,
        /// The sender's digest.
        expected: String,
        /// The receiver's.
        got: String,
    },
    /// A file's data is not as long as its entry said.
    #[error("{entry:?} was announced as {expected} bytes but {got} arrived")]
    Size {
        /// The entry.
        entry: String,
        /// Announced.
        expected: u64,
        /// Received.
        got: u64,
    },
    /// The sender broke the copy's sequence.
    #[error("{got} is out of place in a copy ({state})")]
    Sequence {
        /// What came.
        got: MessageType,
        /// Where the receiver was.
        state: &'static str,
    },
    /// More entries than [`MAX_ENTRIES`].
    #[error("the copy has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// The directories a receiver must finish (mode, mtime) name more than [`MAX_DIR_BYTES`].
    #[error("the copy's directories have more than {} MiB of paths", MAX_DIR_BYTES >> 20)]
    TooManyDirs,
    /// A source or destination that cannot be copied as asked.
    #[error("{0}")]
    Unsupported(String),
    /// The peer reported an error.
    #[error("the peer reported {kind}: {message}")]
    Peer {
        /// The category.
        kind: ErrorKind,
        /// The peer's sentence.
        message: String,
    },
    /// The stream ended before the copy was complete.
    #[error("the connection closed before the copy was complete")]
    Closed,
    /// The connection failed.
    #[error("the connection failed")]
    Wire(#[from] WireError),
}

impl FilesError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FilesError + 'a {
        move |source| FilesError::Io {
            op,
            path: path.to_path_buf(),
            error: source,
        }
    }

    /// The error kind to report to the peer.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FilesError::Io { .. } | FilesError::Unsupported(_) => ErrorKind::Io,
            FilesError::UnsafePath { .. }
            | FilesError::TooManyEntries
            | FilesError::TooManyDirs => ErrorKind::UnsafePath,
            FilesError::Checksum { .. }
            | FilesError::OtherChecksum { .. }
            | FilesError::Size { .. } => ErrorKind::ChecksumMismatch,
            FilesError::Peer { kind, .. } => *kind,
            FilesError::Sequence { .. } | FilesError::Wire(WireError::Frame(_)) => {
                ErrorKind::BadRequest
            }
            FilesError::Closed | FilesError::Wire(WireError::Io(_)) => ErrorKind::Internal,
        }
    }
}

/// The OS error with its symbolic name, so that a full disk reads "No space left on device
/// (ENOSPC)".
fn describe(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc_enospc) if libc_enospc == nix::libc::ENOSPC => "ENOSPC",
        Some(c) if c == nix::libc::EDQUOT => "EDQUOT",
        Some(c) if c == nix::libc::EACCES => "EACCES",
        Some(c) if c == nix::libc::EPERM => "EPERM",
        Some(c) if c == nix::libc::ENOENT => "ENOENT",
        Some(c) if c == nix::libc::EEXIST => "EEXIST",
        Some(c) if c == nix::libc::EISDIR => "EISDIR",
        Some(c) if c == nix::libc::ENOTDIR => "ENOTDIR",
        Some(c) if c == nix::libc::EROFS => "EROFS",
        _ => return e.to_string(),
    };
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    format!("{text} ({name})")
}

/// What a copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopySummary {
    /// Entries (files, directories, symlinks).
    pub entries: u64,
    /// File bytes.
    pub bytes: u64,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn mtime_of(m: &fs::Metadata) -> (i64, u32) {
    (m.mtime(), u32::try_from(m.mtime_nsec()).unwrap_or(0))
}

fn system_time(secs: i64, nsec: u32) -> SystemTime {
    let base = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    base.and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec))))
        .unwrap_or(UNIX_EPOCH)
}

/// Sets the mtime of `path` itself (not a symlink's target).
fn set_mtime_nofollow(path: &Path, secs: i64, nsec: u32) -> Result<(), FilesError> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let mtime = TimeSpec::new(secs, i64::from(nsec));
    let atime = TimeSpec::from(nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: nix::libc::UTIME_OMIT,
    });
    utimensat(None, path, &atime, &mtime, UtimensatFlags::NoFollowSymlink).map_err(|e| {
        FilesError::Io {
            op: "set the mtime of",
            path: path.to_path_buf(),
            error: io::Error::from(e),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// A temporary file that is removed on drop unless it was renamed into place.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.file = None;
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The longest file name (`NAME_MAX` on Linux), in bytes.
const NAME_MAX: usize = 255;

/// `.NAME.vmlink-PID-N.tmp` in `dir`, with `NAME` cut (at a character boundary) to at most 100
/// bytes, so that the whole name fits in [`NAME_MAX`] bytes whatever `name` is.
fn temp_name(dir: &Path, name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let suffix = format!(".vmlink-{}-{n}.tmp", std::process::id());
    let mut end = name.len().min(100).min(NAME_MAX - 1 - suffix.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    dir.join(format!(".{}{suffix}", &name[..end]))
}

/// The running checksum of one file's data.
enum Hasher {
    Sha256(Sha256),
    Xxh64(Xxh64),
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hasher::Sha256(_) => "Sha256",
            Hasher::Xxh64(_) => "Xxh64",
        })
    }
}

impl Hasher {
    fn new(checksum: Checksum) -> Hasher {
        match checksum {
            Checksum::Sha256 => Hasher::Sha256(Sha256::new()),
            Checksum::Xxh64 => Hasher::Xxh64(Xxh64::new(0)),
        }
    }

    fn update(&mut self, d: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(d),
            Hasher::Xxh64(h) => h.update(d),
        }
    }

    /// The digest as lowercase hex.
    fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => hex(&h.finalize()),
            Hasher::Xxh64(h) => format!("{:016x}", h.digest()),
        }
    }
}

/// The file being received.
#[derive(Debug)]
struct Current {
    entry: Entry,
    target: PathBuf,
    temp: TempFile,
    hasher: Hasher,
    len: u64,
}

/// Where a received file's data goes.
#[derive(Debug)]
enum Dest {
    /// A tree under `base`; the root entry is named `rename` (or its own name).
    Tree {
        base: PathBuf,
        rename: Option<String>,
    },
    /// One file to a writer (`-` as the destination).
    Stream,
}

/// The receiving end of a copy, synchronous: feed it messages with [`Receiver::handle`].
///
/// Dropping it before `Done` removes the file in progress.
#[derive(Debug)]
pub struct Receiver {
    dest: Dest,
    root: Option<String>,
    /// The root name the sender must use (see [`Receiver::expect_root`]).
    expect_root: Option<String>,
    current: Option<Current>,
    /// Directories this copy created, to finish (mode, mtime), in creation order. Directories
    /// that already existed are left as they are.
    dirs: Vec<(PathBuf, u32, i64, u32)>,
    /// The bytes of their paths, at most [`MAX_DIR_BYTES`].
    dir_bytes: usize,
    stream_out: Option<Box<dyn WriteDebug>>,
    summary: CopySummary,
    progress: Arc<AtomicU64>,
    /// The checksum the sender's `FileEnd`s must carry.
    checksum: Checksum,
    /// Keep setuid/setgid bits (see [`Receiver::keep_setid`]).
    keep_setid: bool,
}

/// A `Write` that can sit in a `Debug` struct.
pub trait WriteDebug: Write + Send {}
impl<W: Write + Send> WriteDebug for W {}
impl std::fmt::Debug for dyn WriteDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Write")
    }
}

/// What the receiver wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// More messages.
    More,
    /// The copy is complete and committed.
    Done(CopySummary),
}

impl Receiver {
    /// A receiver that writes a tree at `dest` (see `Put` for `exact`). `dest` must exist as a
    /// directory (then the root goes inside it, unless `exact`), or its parent must.
    pub fn new(dest: &Path, exact: bool, progress: Arc<AtomicU64>) -> Result<Receiver, FilesError> {
        let is_dir = fs::metadata(dest).map(|m| m.is_dir()).unwrap_or(false);
        let dest = if is_dir && !exact {
            Dest::Tree {
                base: dest.to_path_buf(),
                rename: None,
            }
        } else {
            let name = dest
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| FilesError::Unsupported(format!("{dest:?} names no file")))?;
            let parent = match dest.parent() {
                Some(p) if p.as_os_str().is_empty() => Path::new("."),
                Some(p) => p,
                None => return Err(FilesError::Unsupported(format!("{dest:?} has no parent"))),
            };
            let m = fs::metadata(parent).map_err(FilesError::io("open the directory", parent))?;
            if !m.is_dir() {
                return Err(FilesError::Unsupported(format!(
                    "{parent:?} is not a directory"
                )));
            }
            Dest::Tree {
                base: parent.to_path_buf(),
                rename: Some(name.to_string()),
            }
        };
        Ok(Receiver::with(dest, None, progress))
    }

    /// A receiver that writes one file's data to `out` (`-` as the destination).
    pub fn to_writer(out: Box<dyn WriteDebug>, progress: Arc<AtomicU64>) -> Receiver {
        Receiver::with(Dest::Stream, Some(out), progress)
    }

    fn with(dest: Dest, out: Option<Box<dyn WriteDebug>>, progress: Arc<AtomicU64>) -> Receiver {
        Receiver {
            dest,
            root: None,
            expect_root: None,
            current: None,
            dirs: Vec::new(),
            dir_bytes: 0,
            stream_out: out,
            summary: CopySummary::default(),
            progress,
            checksum: Checksum::Sha256,
            keep_setid: false,
        }
    }

    /// Keeps the setuid and setgid bits of the modes the sender sends (the agent receiving a
    /// `Put` from the host, which administers the guest). By default they are dropped, as `cp`
    /// does without `-p`: the host receiving from a guest (which may be compromised) must not
    /// get a setuid binary planted by `sudo vmlink cp GUEST:/x /usr/local/bin/`.
    pub fn keep_setid(mut self, keep: bool) -> Receiver {
        self.keep_setid = keep;
        self
    }

    /// Expects the sender's `FileEnd`s to carry `checksum` (what the `Put` or `Get` named; the
    /// default is SHA-256).
    pub fn checksum(mut self, checksum: Checksum) -> Receiver {
        self.checksum = checksum;
        self
    }

    /// Refuses a copy whose root entry is not named `name`. A client fetching `/x/foo` into an
    /// existing directory expects `foo`: otherwise the sender (the guest) would choose which
    /// name in that directory gets written, `.bashrc` for one (as scp's CVE-2019-6111).
    pub fn expect_root(mut self, name: &str) -> Receiver {
        self.expect_root = Some(name.to_string());
        self
    }

    /// The mode to give an entry the sender sent with `mode`: its permission and sticky bits,
    /// and setuid/setgid only with [`Receiver::keep_setid`].
    fn mode(&self, mode: u32) -> u32 {
        // S_ISUID | S_ISGID.
        const SETID: u32 = 0o6000;
        if self.keep_setid {
            mode & 0o7777
        } else {
            mode & 0o7777 & !SETID
        }
    }

    /// Handles one message of the copy.
    pub fn handle(&mut self, m: Message) -> Result<Flow, FilesError> {
        match (m, self.current.is_some()) {
            (Message::Entry(e), false) => self.entry(e).map(|()| Flow::More),
            (Message::Data(d), true) => self.data(&d).map(|()| Flow::More),
            (Message::FileEnd(end), true) => self.file_end(&end).map(|()| Flow::More),
            (Message::Done, false) => self.done().map(Flow::Done),
            (Message::Error(e), _) => Err(FilesError::Peer {
                kind: e.kind,
                message: e.message,
            }),
            (other, inside) => Err(FilesError::Sequence {
                got: other.message_type(),
                state: if inside {
                    "inside a file"
                } else {
                    "between entries"
                },
            }),
        }
    }

    /// Maps an entry to its target path, checking every directory on the way.
    fn target(&mut self, e: &Entry) -> Result<PathBuf, FilesError> {
        let unsafe_path = |reason: String| FilesError::UnsafePath {
            entry: e.path.clone(),
            reason,
        };
        // Decoded entries are already validated; checked again for entries built locally.
        e.validate().map_err(unsafe_path)?;
        let mut parts = e.path.split('/');
        let first = parts.next().unwrap_or_default();
        match &self.root {
            None => {
                if e.path.contains('/') {
                    return Err(unsafe_path(
                        "the first entry must be the copy's root".into(),
                    ));
                }
                if let Some(expected) = self.expect_root.as_deref().filter(|x| *x != first) {
                    return Err(unsafe_path(format!(
                        "the copy's root must be named {expected:?}, after what was asked for"
                    )));
                }
                self.root = Some(first.to_string());
            }
            Some(root) if root == first && e.path.contains('/') => {}
            Some(root) => {
                return Err(unsafe_path(format!(
                    "every entry must be inside the copy's root {root:?}"
                )))
            }
        }
        let Dest::Tree { base, rename } = &self.dest else {
            return Ok(PathBuf::new());
        };
        let mut target = base.clone();
        target.push(rename.as_deref().unwrap_or(first));
        let rest: Vec<&str> = parts.collect();
        for c in rest {
            // `target` is a directory this entry goes through: a real one, not a symlink.
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(unsafe_path(format!(
                        "{target:?} is a symlink; entries are never written through one"
                    )))
                }
                Ok(_) => return Err(unsafe_path(format!("{target:?} is not a directory"))),
                Err(source) => {
                    return Err(FilesError::Io {
                        op: "find the directory",
                        path: target,
                        error: source,
                    })
                }
            }
            target.push(c);
        }
        // Belt and braces: the result has only normal components below `base`.
        if target
            .strip_prefix(base)
            .map(|r| r.components().any(|c| !matches!(c, Component::Normal(_))))
            .unwrap_or(true)
        {
            return Err(unsafe_path("it resolves outside the destination".into()));
        }
        Ok(target)
    }

    fn entry(&mut self, e: Entry) -> Result<(), FilesError> {
        self.summary.entries += 1;
        if self.summary.entries > MAX_ENTRIES {
            return Err(FilesError::TooManyEntries);
        }
        let target = self.target(&e)?;
        if matches!(self.dest, Dest::Stream) {
            if e.kind != EntryKind::File || self.summary.entries > 1 {
                return Err(FilesError::Unsupported(format!(
                    "{:?} is not a regular file; only one file can be copied to stdout",
                    e.path
                )));
            }
            self.current = Some(Current {
                entry: e,
                target,
                temp: TempFile {
                    path: PathBuf::new(),
                    file: None,
                },
                hasher: Hasher::new(self.checksum),
                len: 0,
            });
            return Ok(());
        }
        let parent = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("entry");
        match e.kind {
            EntryKind::Dir => {
                match fs::symlink_metadata(&target) {
                    // An existing directory keeps its mode and mtime (as with cp and scp
                    // without -p): the copy only enters it.
                    Ok(m) if m.is_dir() => return Ok(()),
                    Ok(_) => {
                        return Err(FilesError::UnsafePath {
                            entry: e.path,
                            reason: format!("{target:?} exists and is not a directory"),
                        })
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&target)
                            .map_err(FilesError::io("create the directory", &target))?;
                    }
                    Err(source) => {
                        return Err(FilesError::Io {
                            op: "inspect",
                            path: target,
                            error: source,
                        })
                    }
                }
                // Created by this copy: writable for us until the end, when its own mode is
                // applied.
                let mode = self.mode(e.mode);
                fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(FilesError::io("set the mode of", &target))?;
                self.dir_bytes += target.as_os_str().len();
                if self.dir_bytes > MAX_DIR_BYTES {
                    return Err(FilesError::TooManyDirs);
                }
                self.dirs.push((target, mode, e.mtime, e.mtime_nsec));
            }
            EntryKind::Symlink => {
                let link = e.link_target.clone().unwrap_or_default();
                let temp = temp_name(parent, name);
                std::os::unix::fs::symlink(&link, &temp)
                    .map_err(FilesError::io("create the symlink", &temp))?;
                let guard = TempFile {
                    path: temp,
                    file: None,
                };
                set_mtime_nofollow(&guard.path, e.mtime, e.mtime_nsec)?;
                fs::rename(&guard.path, &target).map_err(FilesError::io("rename onto", &target))?;
                std::mem::forget(guard);
            }
            EntryKind::File => {
                let temp = temp_name(parent, name);
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&temp)
                    .map_err(FilesError::io("create the temporary file", &temp))?;
                self.current = Some(Current {
                    entry: e,
                    target,
                    temp: TempFile {
                        path: temp,
                        file: Some(file),
                    },
                    hasher: Hasher::new(self.checksum),
                    len: 0,
                });
            }
        }
        Ok(())
    }

    fn data(&mut self, d: &[u8]) -> Result<(), FilesError> {
        let Some(cur) = &mut self.current else {
            return Ok(());
        };
        cur.hasher.update(d);
        cur.len += d.len() as u64;
        self.progress.fetch_add(d.len() as u64, Ordering::Relaxed);
        if let Some(out) = &mut self.stream_out {
            return out
                .write_all(d)
                .map_err(FilesError::io("write", Path::new("stdout")));
        }
        if let Some(f) = &mut cur.temp.file {
            f.write_all(d)
                .map_err(FilesError::io("write", &cur.temp.path))?;
        }
        Ok(())
    }

    fn file_end(&mut self, end: &FileEnd) -> Result<(), FilesError> {
        let Some(mut cur) = self.current.take() else {
            return Ok(());
        };
        let hasher = std::mem::replace(&mut cur.hasher, Hasher::new(self.checksum));
        let got = hasher.finish();
        if let Some(expected) = cur.entry.size {
            if expected != cur.len {
                return Err(FilesError::Size {
                    entry: cur.entry.path,
                    expected,
                    got: cur.len,
                });
            }
        }
        match end.digest() {
            Some((c, expected)) if c == self.checksum => {
                if got != expected {
                    return Err(FilesError::Checksum {
                        entry: cur.entry.path,
                        expected: format!("{} {expected}", c.name()),
                        got: format!("{} {got}", c.name()),
                    });
                }
            }
            other => {
                return Err(FilesError::OtherChecksum {
                    entry: cur.entry.path,
                    expected: self.checksum.name(),
                    got: other.map_or("nothing", |(c, _)| c.name()),
                });
            }
        }
        self.summary.bytes += cur.len;
        if let Some(out) = &mut self.stream_out {
            return out
                .flush()
                .map_err(FilesError::io("flush", Path::new("stdout")));
        }
        let path = cur.temp.path.clone();
        let mode = self.mode(cur.entry.mode);
        if let Some(f) = &cur.temp.file {
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(FilesError::io("set the mode of", &path))?;
            f.set_times(
                fs::FileTimes::new()
                    .set_modified(system_time(cur.entry.mtime, cur.entry.mtime_nsec)),
            )
            .map_err(FilesError::io("set the mtime of", &path))?;
            f.sync_all().map_err(FilesError::io("fsync", &path))?;
        }
        fs::rename(&path, &cur.target).map_err(FilesError::io("rename onto", &cur.target))?;
        // Renamed: nothing to remove any more.
        cur.temp.path = PathBuf::new();
        Ok(())
    }

    fn done(&mut self) -> Result<CopySummary, FilesError> {
        if self.root.is_none() {
            return Err(FilesError::Sequence {
                got: MessageType::Done,
                state: "before any entry",
            });
        }
        for (dir, mode, secs, nsec) in std::mem::take(&mut self.dirs).iter().rev() {
            fs::set_permissions(dir, fs::Permissions::from_mode(*mode))
                .map_err(FilesError::io("set the mode of", dir))?;
            set_mtime_nofollow(dir, *secs, *nsec)?;
        }
        Ok(self.summary)
    }
}

impl Drop for Receiver {
    /// A copy that ends before `Done` (an error, an interrupt) still gives the directories it
    /// created their own mode and mtime, best effort, deepest first: they exist now, so a
    /// retry would leave them as they are (with the owner's `rwx` added while filling them).
    fn drop(&mut self) {
        for (dir, mode, secs, nsec) in self.dirs.iter().rev() {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(*mode));
            let _ = set_mtime_nofollow(dir, *secs, *nsec);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sending

/// What the sending thread hands the socket writer.
#[derive(Debug)]
enum Out {
    /// One encoded frame, to write.
    Frame(Vec<u8>),
    /// One `Data` frame already cut into the buffers of an in-process chunk stream
    /// ([`WriteHalf::chunk_shape`]), to hand over whole: over virtio-serial the agent's file
    /// reads land in the mux's DATA frames, with no copy between.
    Chunks(Vec<Vec<u8>>),
}

/// Where a sender's frames go: a bounded channel to the socket writer.
#[derive(Debug)]
pub struct FrameSink {
    tx: mpsc::Sender<Out>,
    progress: Arc<AtomicU64>,
    checksum: Checksum,
    /// The writer's [`WriteHalf::chunk_shape`].
    shape: Option<(usize, usize)>,
}

impl FrameSink {
    fn frame(&self, frame: Vec<u8>) -> Result<(), FilesError> {
        self.send(Out::Frame(frame))
    }

    fn send(&self, out: Out) -> Result<(), FilesError> {
        self.tx.blocking_send(out).map_err(|_| FilesError::Closed)
    }

    fn message(&self, m: &Message) -> Result<(), FilesError> {
        let frame = m.encode().map_err(WireError::Frame)?;
        self.frame(frame)
    }

    /// Sends a file's data from `r`, then its `FileEnd`. Returns its length.
    fn data_from(&self, r: &mut dyn Read, path: &Path) -> Result<u64, FilesError> {
        let mut hasher = Hasher::new(self.checksum);
        let mut len = 0u64;
        loop {
            if let Some((room, max)) = self.shape {
                let n = self.data_chunks(r, path, room, max, &mut hasher)?;
                if n == 0 {
                    break;
                }
                len += n;
                continue;
            }
            // Read into spare capacity (no zeroing: `File` reads into uninitialised memory,
            // and a 256 KiB memset per frame cost 10 % of a copy's CPU in a TCG guest).
            let mut buf = Vec::with_capacity(HEADER_LEN + COPY_CHUNK);
            buf.extend_from_slice(&[0u8; HEADER_LEN]);
            // (`read_to_end` retries `EINTR` itself.)
            r.take(COPY_CHUNK as u64)
                .read_to_end(&mut buf)
                .map_err(FilesError::io("read", path))?;
            let n = buf.len() - HEADER_LEN;
            if n == 0 {
                break;
            }
            hasher.update(&buf[HEADER_LEN..HEADER_LEN + n]);
            len += n as u64;
            let header = encode_header(MessageType::Data, n).map_err(WireError::Frame)?;
            buf[..HEADER_LEN].copy_from_slice(&header);
            buf.truncate(HEADER_LEN + n);
            self.frame(buf)?;
            self.progress.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.message(&Message::FileEnd(FileEnd::new(
            self.checksum,
            hasher.finish(),
        )))?;
        Ok(len)
    }

    /// [`FrameSink::data_from`]'s step for an in-process chunk stream: reads one `Data`
    /// frame's worth (its header and data together [`COPY_CHUNK`] bytes at most, so that they
    /// fill whole buffers) straight into buffers of `room` bytes of header room and at most
    /// `max` bytes of frame, the first starting with the frame's header, and sends them as
    /// one item. Returns the bytes read (0 at the end of the file: nothing sent).
    fn data_chunks(
        &self,
        r: &mut dyn Read,
        path: &Path,
        room: usize,
        max: usize,
        hasher: &mut Hasher,
    ) -> Result<u64, FilesError> {
        let mut chunks = Vec::new();
        let mut n = 0usize;
        let most = COPY_CHUNK - HEADER_LEN;
        while n < most {
            let head = if chunks.is_empty() { HEADER_LEN } else { 0 };
            let want = (max - head).min(most - n);
            let mut buf = Vec::with_capacity(room + head + want);
            buf.resize(room + head, 0);
            // Into spare capacity, as `data_from` does.
            r.take(want as u64)
                .read_to_end(&mut buf)
                .map_err(FilesError::io("read", path))?;
            let got = buf.len() - room - head;
            if got == 0 {
                break;
            }
            hasher.update(&buf[room + head..]);
            n += got;
            chunks.push(buf);
            if got < want {
                break; // the end of the file
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let header = encode_header(MessageType::Data, n).map_err(WireError::Frame)?;
        chunks[0][room..room + HEADER_LEN].copy_from_slice(&header);
        self.send(Out::Chunks(chunks))?;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n as u64)
    }
}

fn utf8(path: &Path) -> Result<&str, FilesError> {
    path.to_str().ok_or_else(|| {
        FilesError::Unsupported(format!(
            "{path:?} is not UTF-8; this version copies UTF-8 names only"
        ))
    })
}

/// Sends the tree at `root` (not following symlinks) under the name `name`, then `Done`.
pub fn send_tree(sink: &FrameSink, root: &Path, name: &str) -> Result<CopySummary, FilesError> {
    let mut summary = CopySummary::default();
    send_one(sink, root, name, &mut summary)?;
    sink.message(&Message::Done)?;
    Ok(summary)
}

fn send_one(
    sink: &FrameSink,
    path: &Path,
    rel: &str,
    summary: &mut CopySummary,
) -> Result<(), FilesError> {
    summary.entries += 1;
    if summary.entries > MAX_ENTRIES {
        return Err(FilesError::TooManyEntries);
    }
    let m = fs::symlink_metadata(path).map_err(FilesError::io("inspect", path))?;
    let (mtime, mtime_nsec) = mtime_of(&m);
    let mut entry = Entry {
        kind: EntryKind::File,
        path: rel.to_string(),
        mode: m.mode() & 0o7777,
        mtime,
        mtime_nsec,
        size: None,
        link_target: None,
    };
    let ft = m.file_type();
    if ft.is_symlink() {
        let t = fs::read_link(path).map_err(FilesError::io("read the symlink", path))?;
        entry.kind = EntryKind::Symlink;
        entry.link_target = Some(utf8(&t)?.to_string());
        sink.message(&Message::Entry(entry))?;
    } else if ft.is_dir() {
        entry.kind = EntryKind::Dir;
        sink.message(&Message::Entry(entry))?;
        let mut names = Vec::new();
        for d in fs::read_dir(path).map_err(FilesError::io("list", path))? {
            let d = d.map_err(FilesError::io("list", path))?;
            names.push(d.file_name());
        }
        names.sort();
        for n in names {
            let child = path.join(&n);
            let n = utf8(Path::new(&n))?;
            send_one(sink, &child, &format!("{rel}/{n}"), summary)?;
        }
    } else if ft.is_file() {
        let mut f = File::open(path).map_err(FilesError::io("open", path))?;
        entry.size = Some(m.len());
        sink.message(&Message::Entry(entry))?;
        summary.bytes += sink.data_from(&mut f, path)?;
    } else {
        return Err(FilesError::Unsupported(format!(
            "{path:?} is not a regular file, directory or symlink"
        )));
    }
    Ok(())
}

/// Sends one file named `name` whose data is read from `r` (e.g. stdin), then `Done`.
pub fn send_stream(
    sink: &FrameSink,
    r: &mut dyn Read,
    name: &str,
) -> Result<CopySummary, FilesError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let entry = Entry {
        kind: EntryKind::File,
        path: name.to_string(),
        mode: 0o644,
        mtime: i64::try_from(now.as_secs()).unwrap_or(0),
        mtime_nsec: now.subsec_nanos(),
        size: None,
        link_target: None,
    };
    sink.message(&Message::Entry(entry))?;
    let bytes = sink.data_from(r, Path::new("stdin"))?;
    sink.message(&Message::Done)?;
    Ok(CopySummary { entries: 1, bytes })
}

// ---------------------------------------------------------------------------------------------
// Async glue: one side of a connection.

/// Runs `produce` on a blocking thread and writes its frames to `w` in order; file data is
/// checksummed with `checksum`.
pub(crate) async fn send_frames<F>(
    w: &mut WriteHalf,
    progress: Arc<AtomicU64>,
    checksum: Checksum,
    produce: F,
) -> Result<CopySummary, FilesError>
where
    F: FnOnce(&FrameSink) -> Result<CopySummary, FilesError> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Out>(QUEUE);
    let shape = w
        .chunk_shape()
        .filter(|&(_, max)| max > HEADER_LEN && max <= COPY_CHUNK);
    let producer = tokio::task::spawn_blocking(move || {
        produce(&FrameSink {
            tx,
            progress,
            checksum,
            shape,
        })
    });
    let mut write_error = None;
    while let Some(out) = rx.recv().await {
        let written = match out {
            Out::Frame(frame) => w.write_all(&frame).await,
            Out::Chunks(chunks) => {
                let mut r = Ok(());
                for c in chunks {
                    r = w.send_chunk(c).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
        };
        if let Err(e) = written {
            write_error = Some(e);
            break;
        }
    }
    // Stops the producer at its next frame if the write failed.
    drop(rx);
    let produced = producer
        .await
        .map_err(|e| FilesError::Unsupported(format!("the copy's sending thread failed: {e}")))?;
    match (produced, write_error) {
        (_, Some(e)) => Err(WireError::Io(e).into()),
        (r, None) => r,
    }
}

/// Reads the copy from `reader` and feeds it to `receiver` on a blocking thread until `Done`.
pub(crate) async fn receive_frames(
    reader: &mut FrameReader<ReadHalf>,
    receiver: Receiver,
) -> Result<CopySummary, FilesError> {
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    let mut consumer = tokio::task::spawn_blocking(move || {
        let mut receiver = receiver;
        while let Some(m) = rx.blocking_recv() {
            if let Flow::Done(s) = receiver.handle(m)? {
                return Ok(s);
            }
        }
        // Dropping `receiver` here removes the file in progress.
        Err(FilesError::Closed)
    });
    let mut tx = Some(tx);
    loop {
        tokio::select! {
            r = &mut consumer => {
                return r.map_err(|e| FilesError::Unsupported(format!("the copy's receiving thread failed: {e}")))?;
            }
            m = reader.next(), if tx.is_some() => {
                let m = match m {
                    Ok(Some(m)) => m,
                    // Closing the channel makes the consumer clean up and end.
                    Ok(None) => { tx = None; continue; }
                    // Returning drops `tx`: the consumer cleans up on its own.
                    Err(e) => return Err(e.into()),
                };
                if let Some(t) = &tx {
                    if t.send(m).await.is_err() {
                        tx = None;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's requests.

/// Serves a `Put`: receives the copy, answers `Done` once it is committed.
pub(crate) async fn serve_put(
    put: Put,
    mut reader: FrameReader<ReadHalf>,
    w: &mut WriteHalf,
) -> Result<(), SessionError> {
    let result = match Receiver::new(Path::new(&put.path), put.exact, Arc::default()) {
        // The host administers the guest: the modes it sends are kept, setuid and setgid too.
        Ok(receiver) => {
            let receiver = receiver.checksum(put.checksum).keep_setid(true);
            receive_frames(&mut reader, receiver).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(summary) => {
            debug!(path = put.path, ?summary, "put done");
            write_message(w, &Message::Done).await?;
            let _ = w.shutdown_write();
            Ok(())
        }
        Err(e) => fail(reader, w, e).await,
    }
}

/// Serves a `Get`: sends the copy of `get.path`.
pub(crate) async fn serve_get(
    get: Get,
    reader: FrameReader<ReadHalf>,
    w: &mut WriteHalf,
) -> Result<(), SessionError> {
    let path = PathBuf::from(&get.path);
    let name = match path.file_name().and_then(|n| n.to_str()) {
        Some(n) => n.to_string(),
        None => {
            let e = FilesError::Unsupported(format!("{:?} names no file or directory", get.path));
            return fail(reader, w, e).await;
        }
    };
    let checksum = get.checksum;
    let follow = get.follow;
    match send_frames(w, Arc::default(), checksum, move |sink| {
        if follow {
            // What `path` names, through any symlinks; the root keeps `path`'s name.
            let target = fs::canonicalize(&path).map_err(FilesError::io("follow", &path))?;
            send_tree(sink, &target, &name)
        } else {
            send_tree(sink, &path, &name)
        }
    })
    .await
    {
        Ok(summary) => {
            debug!(path = get.path, ?summary, "get done");
            let _ = w.shutdown_write();
            Ok(())
        }
        Err(FilesError::Wire(e)) => Err(SessionError::Wire(e)),
        Err(e) => fail(reader, w, e).await,
    }
}

/// Sends an `Error` for `e`, half-closes, and drops what the client still sends (until it
/// closes, at most 2 s) so that the error is read rather than reset away.
async fn fail(
    reader: FrameReader<ReadHalf>,
    w: &mut WriteHalf,
    e: FilesError,
) -> Result<(), SessionError> {
    let message = vmlink_transport::error_chain(&e as &(dyn std::error::Error + 'static));
    write_message(w, &Message::error(e.kind(), &message)).await?;
    let _ = w.shutdown_write();
    let mut reader = reader;
    let drain = async { while let Ok(Some(_)) = reader.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    Err(SessionError::Refused(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A fresh empty directory under the temp directory.
    fn fresh_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("vmlink-files-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create a test directory");
        d
    }

    fn entry(kind: EntryKind, path: &str, mode: u32, mtime: i64) -> Entry {
        Entry {
            kind,
            path: path.into(),
            mode,
            mtime,
            mtime_nsec: 0,
            size: None,
            link_target: None,
        }
    }

    /// Feeds a file entry, its data and its `FileEnd` to `r`.
    fn send_file(r: &mut Receiver, path: &str, mode: u32, data: &[u8]) {
        let e = Entry {
            size: Some(data.len() as u64),
            ..entry(EntryKind::File, path, mode, 1_000_000_000)
        };
        assert_eq!(r.handle(Message::Entry(e)).expect("file entry"), Flow::More);
        r.handle(Message::Data(data.to_vec())).expect("data");
        let end = FileEnd::new(Checksum::Sha256, hex(&Sha256::digest(data)));
        r.handle(Message::FileEnd(end)).expect("file end");
    }

    /// Feeds a directory entry to `r`.
    fn dir(r: &mut Receiver, path: &str, mode: u32, mtime: i64) {
        r.handle(Message::Entry(entry(EntryKind::Dir, path, mode, mtime)))
            .expect("dir entry");
    }

    fn done(r: &mut Receiver) {
        assert!(matches!(r.handle(Message::Done), Ok(Flow::Done(_))));
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("lstat").mode() & 0o7777
    }

    fn mtime(p: &Path) -> i64 {
        fs::symlink_metadata(p).expect("lstat").mtime()
    }

    fn temp_files(d: &Path) -> Vec<PathBuf> {
        fs::read_dir(d)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect()
    }

    /// A tree `root/` (mode 0o2775) holding `root/f` (mode 0o4777) and `root/g` (0o2755).
    fn receive_setid_tree(keep: bool) -> PathBuf {
        let dest = fresh_dir("setid");
        let mut r = Receiver::new(&dest, false, Arc::default())
            .expect("receiver")
            .keep_setid(keep);
        dir(&mut r, "root", 0o2775, 1_000_000_000);
        send_file(&mut r, "root/f", 0o4777, b"#!/bin/sh\n");
        send_file(&mut r, "root/g", 0o2755, b"g");
        done(&mut r);
        dest.join("root")
    }

    /// The messages in `wire`, with each run of `Data` frames as one "Data" line (its frames
    /// may be cut differently), and every `Data` byte.
    fn messages(mut wire: &[u8]) -> (Vec<String>, Vec<u8>) {
        let (mut lines, mut data) = (Vec::<String>::new(), Vec::new());
        while !wire.is_empty() {
            let (m, n) = vmlink_proto::agent::decode(wire)
                .expect("a valid frame")
                .expect("a whole frame");
            match m {
                Message::Data(d) => {
                    data.extend(d);
                    if lines.last().is_none_or(|l| l != "Data") {
                        lines.push("Data".into());
                    }
                }
                m => lines.push(format!("{m:?}")),
            }
            wire = &wire[n..];
        }
        (lines, data)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_stream_gets_the_same_frames_as_a_socket_cut_into_its_buffers() {
        let dir = fresh_dir("chunks");
        let big: Vec<u8> = (0..2 * COPY_CHUNK + 90_007)
            .map(|i| (i % 253) as u8)
            .collect();
        fs::write(dir.join("big"), &big).expect("write");
        fs::write(dir.join("empty"), b"").expect("write");
        async fn send(w: &mut WriteHalf, d: PathBuf) -> CopySummary {
            send_frames(w, Arc::default(), Checksum::Xxh64, move |sink| {
                send_tree(sink, &d, "d")
            })
            .await
            .expect("sent")
        }

        // Over a socket: frames written as they are.
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let (_, mut sock) =
            vmlink_transport::AsyncStream::from_std(vmlink_transport::Stream::from_unix(a, "pair"))
                .expect("stream")
                .into_split();
        let reader = std::thread::spawn(move || {
            let mut wire = Vec::new();
            let mut b = b;
            b.read_to_end(&mut wire).expect("read");
            wire
        });
        let summary = send(&mut sock, dir.clone()).await;
        drop(sock);
        let over_socket = messages(&reader.join().expect("reader"));
        assert_eq!(summary.bytes, big.len() as u64);

        // Over an in-process chunk stream like the serial mux's: the same frames, in
        // buffers of the stream's shape.
        let (room, max) = (20, 64 * 1024);
        let (_data_tx, data) = mpsc::channel(1);
        let (tx, mut out) = mpsc::channel(4);
        let (_, mut w) = vmlink_transport::AsyncStream::in_memory_chunks(
            data,
            vmlink_transport::ChunkOut {
                tx,
                headroom: room,
                max,
            },
            "test",
        )
        .into_split();
        let collect = tokio::spawn(async move {
            let mut bufs = Vec::new();
            while let Some(b) = out.recv().await {
                bufs.push(b);
            }
            bufs
        });
        send(&mut w, dir.clone()).await;
        drop(w);
        let bufs = collect.await.expect("collect");
        assert!(bufs.iter().all(|b| b.len() > room && b.len() <= room + max));
        assert!(bufs.iter().all(|b| b[..room].iter().all(|&x| x == 0)));
        // Each whole `Data` frame fills four buffers exactly, the last one (90 007 bytes and
        // the two frames' headers) one and part of another; the six other messages take one
        // each.
        let full = bufs.iter().filter(|b| b.len() == room + max).count();
        assert_eq!((full, bufs.len()), (9, 16));
        let wire: Vec<u8> = bufs.iter().flat_map(|b| b[room..].to_vec()).collect();
        let over_chunks = messages(&wire);
        assert_eq!(over_chunks.0, over_socket.0);
        assert!(over_chunks.1 == big, "the file's bytes differ over chunks");
        assert!(
            over_socket.1 == big,
            "the file's bytes differ over a socket"
        );
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn setuid_and_setgid_are_dropped_by_default() {
        let root = receive_setid_tree(false);
        assert_eq!(mode(&root.join("f")), 0o777);
        assert_eq!(mode(&root.join("g")), 0o755);
        assert_eq!(mode(&root), 0o775);
        fs::remove_dir_all(root.parent().expect("parent")).expect("clean up");
    }

    #[test]
    fn setuid_and_setgid_are_kept_when_asked() {
        // (As root, or the owner of the files: the tests run as either.)
        let root = receive_setid_tree(true);
        assert_eq!(mode(&root.join("f")), 0o4777);
        assert_eq!(mode(&root), 0o2775);
        if nix::unistd::geteuid().is_root() {
            // An unprivileged owner outside the group may not keep setgid on a file.
            assert_eq!(mode(&root.join("g")), 0o2755);
        }
        fs::remove_dir_all(root.parent().expect("parent")).expect("clean up");
    }

    #[test]
    fn existing_directories_keep_their_mode_and_mtime_and_created_ones_get_the_sent_ones() {
        let dest = fresh_dir("existing");
        let root = dest.join("root");
        fs::create_dir_all(root.join("old")).expect("dirs");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o750)).expect("mode");
        fs::set_permissions(root.join("old"), fs::Permissions::from_mode(0o751)).expect("mode");
        set_mtime_nofollow(&root.join("old"), 1_111_111_111, 0).expect("mtime");
        let sent = 1_500_000_000;
        let mut r = Receiver::new(&dest, false, Arc::default()).expect("receiver");
        dir(&mut r, "root", 0o777, sent);
        dir(&mut r, "root/old", 0o777, sent);
        dir(&mut r, "root/new", 0o705, sent);
        send_file(&mut r, "root/new/f", 0o640, b"data");
        done(&mut r);
        assert_eq!(mode(&root), 0o750);
        // Its mtime is now (`new` was created in it), not the sent one.
        assert_ne!(mtime(&root), sent);
        assert_eq!(mode(&root.join("old")), 0o751);
        assert_eq!(mtime(&root.join("old")), 1_111_111_111);
        assert_eq!(mode(&root.join("new")), 0o705);
        assert_eq!(mtime(&root.join("new")), sent);
        assert_eq!(mode(&root.join("new/f")), 0o640);
        assert_eq!(fs::read(root.join("new/f")).expect("read"), b"data");
        fs::remove_dir_all(&dest).expect("clean up");
    }

    #[test]
    fn a_copy_cut_short_still_gives_the_directories_it_created_their_mode_and_mtime() {
        let dest = fresh_dir("cut-short");
        let sent = 1_500_000_000;
        let mut r = Receiver::new(&dest, false, Arc::default()).expect("receiver");
        dir(&mut r, "root", 0o750, sent);
        dir(&mut r, "root/ro", 0o555, sent);
        send_file(&mut r, "root/ro/f", 0o640, b"data");
        // No Done: the copy failed or was interrupted here.
        drop(r);
        assert_eq!(mode(&dest.join("root")), 0o750);
        assert_eq!(mode(&dest.join("root/ro")), 0o555);
        assert_eq!(mtime(&dest.join("root/ro")), sent);
        assert_eq!(mtime(&dest.join("root")), sent);
        fs::set_permissions(dest.join("root/ro"), fs::Permissions::from_mode(0o755))
            .expect("writable again");
        fs::remove_dir_all(&dest).expect("clean up");
    }

    #[test]
    fn a_name_of_255_bytes_of_utf8_is_received_under_its_full_name() {
        let dest = fresh_dir("long-name");
        let name = "語".repeat(85);
        assert_eq!(name.len(), 255);
        let mut r = Receiver::new(&dest, false, Arc::default()).expect("receiver");
        send_file(&mut r, &name, 0o644, b"long");
        done(&mut r);
        assert_eq!(fs::read(dest.join(&name)).expect("read"), b"long");
        assert!(temp_files(&dest).is_empty());
        fs::remove_dir_all(&dest).expect("clean up");
    }

    #[test]
    fn temp_names_fit_in_name_max_and_cut_at_a_char_boundary() {
        for name in [
            "語".repeat(85),
            "a".repeat(255),
            "aé".repeat(85),
            "x".into(),
        ] {
            let t = temp_name(Path::new("/d"), &name);
            let t = t.file_name().and_then(|n| n.to_str()).expect("UTF-8");
            assert!(t.len() <= 255, "{} bytes: {t}", t.len());
            assert!(t.starts_with('.') && t.ends_with(".tmp"), "{t}");
        }
    }
}
