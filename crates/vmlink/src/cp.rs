//! `vmlink cp SRC DST`: copy files, directories and symlinks to or from a guest through its
//! `vmlink-agent`, like scp and docker cp. The work is in `vmlink_agent::client` (`put`, `get`)
//! and `vmlink_agent::files`; this module parses the two operands and draws the progress bar.
//!
//! # Operands
//!
//! Exactly one of SRC and DST is remote, `TARGET:PATH`; the other is a local path, or `-`
//! (stdin as SRC, stdout as DST). Since addresses contain colons, the rule is: **TARGET is the
//! shortest prefix, ending right before a `:/`, that parses as a connecting address; PATH is
//! the rest, from that `/`**, so PATH is always absolute:
//!
//! ```text
//! vsock:3:7878:/tmp/x            -> vsock:3:7878            /tmp/x
//! unix:/run/agent.sock:/etc/a:b  -> unix:/run/agent.sock    /etc/a:b
//! vsock:3:7878,connect-timeout=2s:/x -> vsock:3:7878,connect-timeout=2s  /x
//! ```
//!
//! An operand with no such prefix is local (write `./name` for a local file whose name would
//! parse as `TARGET:/...`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::target::{Resolved, Target, TargetError};
use vmlink_agent::client::{Client, GetDest, PutSource};
use vmlink_agent::files::CopySummary;

/// Copy files and directories to or from a guest (TARGET:PATH), like scp
///
/// One side is TARGET:PATH (PATH absolute; TARGET is the shortest prefix
/// before a ":/" that is a connecting address), the other a local path or
/// "-" (stdin as SRC: one file written as exactly PATH; stdout as DST: one
/// regular file). Directories copy recursively; modes and mtimes are kept,
/// except that a copy from the guest drops setuid and setgid bits and an
/// existing directory the copy enters keeps its own mode and mtime;
/// symlinks are copied as symlinks, never followed (-L follows SRC itself
/// when it is one, as docker cp -L does; so does every copy to stdout, with
/// an agent recent enough to have it).
/// Every file is written to a temporary file beside its destination,
/// checked against a checksum sent with the data (XXH64, or SHA-256 with an
/// older agent), fsynced and renamed into place: a failed or interrupted
/// copy leaves no partial file. Like cp: when DST is an existing directory,
/// SRC goes inside it under its own name; otherwise it is created as DST.
///
/// Over qga+ADDR (a guest with only qemu-guest-agent): single files only,
/// in 4 MiB guest-file-read/-write chunks, symlinks followed on both sides;
/// host -> guest goes through a temporary file, checked with the guest's
/// sha256sum and renamed with mv.
///
/// Examples:
///   vmlink cp ./build vsock:3:7878:/opt/app          # -> /opt/app/build (if /opt/app exists)
///   vmlink cp vsock:3:7878:/var/log/syslog .
///   tar c dir | vmlink cp - vsock:3:7878:/tmp/dir.tar
///   vmlink cp vsock:3:7878:/etc/os-release - | head   # a symlink on Debian: followed
///   vmlink cp -L vsock:3:7878:/etc/localtime ./       # the zone file, not the link
///   vmlink cp --json big.img lab:demo:/tmp/   # {"bytes":..,"seconds":..,"mib_s":..}
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// What to copy: a local path, TARGET:PATH, or - for stdin.
    src: String,
    /// Where to: a local path, TARGET:PATH, or - for stdout.
    dst: String,
    /// No progress bar (there is none anyway unless stderr is a terminal).
    #[arg(short, long)]
    quiet: bool,
    /// When done, print one JSON object on stdout: direction ("put" or "get"), entries, bytes,
    /// checksum, seconds (from connecting to the agent to the end of the copy, process start
    /// excluded, as `vmlink bench` measures) and mib_s. Not with "-" as DST.
    #[arg(long)]
    json: bool,
    /// When SRC itself is a symlink, copy what it points to (under SRC's name) instead of the
    /// link; symlinks inside a copied directory stay symlinks. A copy to stdout (DST -)
    /// always follows.
    #[arg(short = 'L', long)]
    follow_link: bool,
}

/// An operand that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    /// Neither side is remote, or both are.
    #[error("exactly one of SRC and DST must be TARGET:PATH (e.g. vsock:3:7878:/tmp/x); got {src:?} and {dst:?}")]
    Sides {
        /// SRC as given.
        src: String,
        /// DST as given.
        dst: String,
    },
    /// Neither side is remote, and one looks like TARGET:PATH with a relative PATH.
    #[error("{arg}: the guest path after {target} must be absolute (e.g. {target}:/tmp/x)")]
    RelativePath {
        /// The operand as given.
        arg: String,
        /// The TARGET it starts with.
        target: String,
    },
    /// `--json` with stdout as the destination.
    #[error("--json cannot be used when the copy itself goes to stdout (DST -)")]
    JsonToStdout,
    /// The address part is a listening address.
    #[error("{addr} is a listening address; cp needs the agent's connecting address")]
    Listening {
        /// The address.
        addr: String,
    },
}

/// One operand.
#[derive(Debug, Clone, PartialEq)]
enum Side {
    /// `-`.
    Std,
    /// A local path.
    Local(PathBuf),
    /// An agent (TARGET) and an absolute path there.
    Remote(Target, String),
}

fn parse_side(s: &str) -> Result<Side, CpError> {
    if s == "-" {
        return Ok(Side::Std);
    }
    for (i, _) in s.match_indices(":/") {
        match s[..i].parse::<Target>() {
            Ok(t) => return Ok(Side::Remote(t, s[i + 1..].to_string())),
            Err(TargetError::Listening(addr)) => return Err(CpError::Listening { addr }),
            Err(_) => {}
        }
    }
    Ok(Side::Local(PathBuf::from(s)))
}

/// For the error when neither side is remote: an operand that starts with a connecting
/// address and a `:` not followed by `/` (`lab:dev:tmp/x`), which was meant as TARGET:PATH.
fn relative_remote(s: &str) -> Option<CpError> {
    s.match_indices(':').find_map(|(i, _)| {
        let rest = &s[i + 1..];
        (!rest.is_empty() && !rest.starts_with('/') && s[..i].parse::<Target>().is_ok()).then(
            || CpError::RelativePath {
                arg: s.to_string(),
                target: s[..i].to_string(),
            },
        )
    })
}

fn total_size(p: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| total_size(&e.path())).sum())
            .unwrap_or(0)
    } else if m.is_file() {
        m.len()
    } else {
        0
    }
}

fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

/// A progress bar on stderr when it is a terminal, fed from `counter` until dropped.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(quiet: bool, total: Option<u64>, counter: Arc<AtomicU64>) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                task: None,
            };
        }
        let bar = match total {
            Some(t) => indicatif::ProgressBar::new(t).with_style(bar_style()),
            None => indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {bytes} {binary_bytes_per_sec} {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            ),
        };
        let b = bar.clone();
        // Redraws from the shared counter; the copy itself never waits for the bar.
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                b.set_position(counter.load(Ordering::Relaxed));
            }
        });
        Progress {
            bar: Some(bar),
            task: Some(task),
        }
    }

    fn finish(mut self, bytes: u64) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(b) = self.bar.take() {
            b.set_position(bytes);
            b.finish();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let (src, dst) = match (parse_side(&a.src), parse_side(&a.dst)) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    crate::runtime()?.block_on(async {
        let counter = Arc::new(AtomicU64::new(0));
        match (src, dst) {
            (local @ (Side::Local(_) | Side::Std), Side::Remote(target, path)) => {
                let addr = match target.resolve()? {
                    Resolved::Qga(q) => {
                        return qga_put(&q, &local, &path, a.quiet, a.json, counter).await
                    }
                    r => r.agent("cp")?,
                };
                let started = Instant::now();
                let client = Client::connect(&addr).await?;
                let (source, total) = match local {
                    Side::Local(p) if a.follow_link => {
                        let total = std::fs::canonicalize(&p).map_or(0, |t| total_size(&t));
                        (PutSource::Followed(p), Some(total))
                    }
                    Side::Local(p) => {
                        let total = total_size(&p);
                        (PutSource::Path(p), Some(total))
                    }
                    _ => (PutSource::Reader(Box::new(std::io::stdin())), None),
                };
                let progress = Progress::start(a.quiet, total, counter.clone());
                let Some(summary) = interruptible(client.put(source, &path, counter)).await? else {
                    return Ok(ExitCode::from(130));
                };
                progress.finish(summary.bytes);
                report(
                    a.json,
                    "put",
                    client.copy_checksum().name(),
                    &summary,
                    started.elapsed(),
                );
            }
            (Side::Remote(target, path), local @ (Side::Local(_) | Side::Std)) => {
                if a.json && matches!(local, Side::Std) {
                    return usage(CpError::JsonToStdout);
                }
                let addr = match target.resolve()? {
                    Resolved::Qga(q) => {
                        return qga_get(&q, &path, &local, a.quiet, a.json, counter).await
                    }
                    r => r.agent("cp")?,
                };
                let started = Instant::now();
                let client = Client::connect(&addr).await?;
                let (dest, follow) = match local {
                    Side::Local(p) => (GetDest::Path(p), a.follow_link),
                    _ => (GetDest::Writer(Box::new(std::io::stdout())), true),
                };
                let progress = Progress::start(a.quiet, None, counter.clone());
                let get = client.get_with(&path, dest, counter, follow);
                let Some(summary) = interruptible(get).await? else {
                    return Ok(ExitCode::from(130));
                };
                progress.finish(summary.bytes);
                report(
                    a.json,
                    "get",
                    client.copy_checksum().name(),
                    &summary,
                    started.elapsed(),
                );
            }
            (src, _) => {
                let sides = CpError::Sides {
                    src: a.src.clone(),
                    dst: a.dst.clone(),
                };
                // Both remote, or both local: when local, one may be TARGET:relative/path.
                if matches!(src, Side::Remote(..)) {
                    return usage(sides);
                }
                return usage(
                    relative_remote(&a.src)
                        .or_else(|| relative_remote(&a.dst))
                        .unwrap_or(sides),
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `--json`: one line describing the finished copy.
fn report(json: bool, direction: &str, checksum: &str, summary: &CopySummary, took: Duration) {
    if !json {
        return;
    }
    let secs = took.as_secs_f64();
    let v = serde_json::json!({
        "direction": direction,
        "entries": summary.entries,
        "bytes": summary.bytes,
        "checksum": checksum,
        "seconds": secs,
        "mib_s": summary.bytes as f64 / (1u64 << 20) as f64 / secs.max(1e-9),
    });
    println!("{v}");
}

/// Runs a copy until it ends or Ctrl-C: then the copy is dropped, which closes the connection
/// (the agent removes its temporary file) and removes ours (the receiver's drop), and the
/// runtime's shutdown waits for that. `None` when interrupted.
async fn interruptible<T>(
    copy: impl std::future::Future<Output = Result<T, vmlink_agent::client::ClientError>>,
) -> anyhow::Result<Option<T>> {
    tokio::select! {
        r = copy => Ok(Some(r?)),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("vmlink: cp interrupted; nothing partial was left");
            Ok(None)
        }
    }
}

/// What `--json` names as the checksum of a `qga+` copy: `crate::qga_target` compares SHA-256
/// (with the guest's `sha256sum`, when it has one).
const QGA_CHECKSUM: &str = "sha256";

/// Host -> guest over `qga+` (`crate::qga_target::put`), with the progress bar.
async fn qga_put(
    q: &vmlink_transport::Addr,
    local: &Side,
    path: &str,
    quiet: bool,
    json: bool,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let src = match local {
        Side::Local(p) => Some(p.as_path()),
        _ => None,
    };
    // One file, read through any symlink.
    let total = src.map(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
    let progress = Progress::start(quiet, total, counter.clone());
    // Ctrl-C is handled inside: the guest's temporary file is removed first.
    let Some(bytes) = crate::qga_target::put(q, src, path, counter).await? else {
        return Ok(ExitCode::from(130));
    };
    progress.finish(bytes);
    let summary = CopySummary { entries: 1, bytes };
    report(json, "put", QGA_CHECKSUM, &summary, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

/// Guest -> host over `qga+` (`crate::qga_target::get`), with the progress bar (its length
/// known once the guest file is open). Ctrl-C drops the copy, which removes the local
/// temporary file.
async fn qga_get(
    q: &vmlink_transport::Addr,
    path: &str,
    local: &Side,
    quiet: bool,
    json: bool,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let dst = match local {
        Side::Local(p) => Some(p.as_path()),
        _ => None,
    };
    let progress = Progress::start(quiet, None, counter.clone());
    let bar = progress.bar.clone();
    let total = move |n| {
        if let Some(b) = bar {
            b.set_length(n);
            b.set_style(bar_style());
        }
    };
    tokio::select! {
        r = crate::qga_target::get(q, path, dst, counter, total) => {
            let bytes = r?;
            progress.finish(bytes);
            let summary = CopySummary { entries: 1, bytes };
            report(json, "get", QGA_CHECKSUM, &summary, started.elapsed());
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!("vmlink: cp interrupted; nothing partial was left");
            return Ok(ExitCode::from(130));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn usage(e: CpError) -> anyhow::Result<ExitCode> {
    eprintln!("vmlink: error: {e}");
    Ok(ExitCode::from(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(s: &str) -> (String, String) {
        match parse_side(s) {
            Ok(Side::Remote(a, p)) => (a.to_string(), p),
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn the_target_is_the_shortest_address_prefix_before_a_colon_slash() {
        assert_eq!(remote("vsock:3:7878:/tmp/x").1, "/tmp/x");
        assert_eq!(remote("vsock:3:7878:/tmp/a:/b").1, "/tmp/a:/b");
        let (addr, path) = remote("unix:/run/agent.sock:/etc/a:b");
        assert!(addr.contains("/run/agent.sock"), "{addr}");
        assert_eq!(path, "/etc/a:b");
        assert_eq!(parse_side("-").ok(), Some(Side::Std));
        assert_eq!(
            parse_side("./vsock:3:7878:/x").ok(),
            Some(Side::Local("./vsock:3:7878:/x".into()))
        );
        assert_eq!(
            parse_side("dir/file").ok(),
            Some(Side::Local("dir/file".into()))
        );
        assert!(matches!(
            parse_side("vsock-listen:7878:/x"),
            Err(CpError::Listening { .. })
        ));
    }

    #[test]
    fn a_relative_guest_path_is_named_when_neither_side_is_remote() {
        let e = relative_remote("vsock:3:7878:tmp/x").expect("meant as remote");
        assert_eq!(
            e.to_string(),
            "vsock:3:7878:tmp/x: the guest path after vsock:3:7878 must be absolute \
             (e.g. vsock:3:7878:/tmp/x)"
        );
        assert!(matches!(
            relative_remote("lab:dev:x"),
            Some(CpError::RelativePath { target, .. }) if target == "lab:dev"
        ));
        for local in ["dir/file", "./vsock:3:7878:x", "a:b", "vsock:3:7878:", "-"] {
            assert!(relative_remote(local).is_none(), "{local}");
        }
    }
}
