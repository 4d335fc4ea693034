//! The on-disk cache: content keys and atomic writes, so that concurrent
//! runs (several test binaries, several threads) never see a partial file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::LabError;

/// Hex SHA-256 over length-prefixed parts.
pub(crate) fn key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Modification time in nanoseconds, for cache keys.
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// A name for a temporary file next to `path`, unique in this process and
/// across processes.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Creates `path` by letting `fill` write a temporary file, then renaming
/// it into place if `fill` returns true. Returns what `fill` returned.
pub(crate) fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(File, &Path) -> Result<bool, LabError>,
) -> Result<bool, LabError> {
    let tmp = temp_path(path);
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| LabError::io("create", &tmp, e))?;
    let result = fill(file, &tmp);
    match result {
        Ok(true) => match std::fs::rename(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(LabError::io("rename into place", path, e))
            }
        },
        other => {
            let _ = std::fs::remove_file(&tmp);
            other
        }
    }
}

/// Writes `data` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), LabError> {
    write_atomic_with(path, |mut f, tmp| {
        f.write_all(data)
            .map_err(|e| LabError::io("write", tmp, e))?;
        Ok(true)
    })
    .map(|_| ())
}

/// Removes cache files named `prefix*` other than `keep` that are older
/// than two days (a concurrent run of another version may still want a
/// newer one), and temporary files left by killed runs.
pub(crate) fn remove_stale(dir: &Path, prefix: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let limit = if name.starts_with(prefix) && path != keep {
            Duration::from_secs(2 * 24 * 3600)
        } else if name.starts_with(&format!(".{prefix}")) && name.contains(".tmp.") {
            Duration::from_secs(3600)
        } else {
            continue;
        };
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > limit);
        if old {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_separates_parts() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        assert_eq!(key(&[b"x"]).len(), 64);
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = std::env::temp_dir().join(format!("vmlink-lab-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let target = dir.join("file");
        write_atomic(&target, b"one").expect("write");
        write_atomic(&target, b"two").expect("overwrite");
        assert_eq!(std::fs::read(&target).expect("read"), b"two");
        let declined = write_atomic_with(&dir.join("other"), |_, _| Ok(false)).expect("fill");
        assert!(!declined);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file")]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
