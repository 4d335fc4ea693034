//! Unpacks a compressed bzImage into the plain ELF `vmlinux` that QEMU can
//! boot through the kernel's PVH entry point. Under TCG the guest would
//! otherwise spend ~3 s XZ-decompressing itself.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cache;
use crate::deps::Kernel;
use crate::error::LabError;

/// Compressed payload formats: magic bytes and the tool that unpacks them.
const FORMATS: &[(&[u8], &str, &[&str])] = &[
    (b"\xfd7zXZ\x00", "xz", &["-dc"]),
    (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
];

/// Offset of the first occurrence of `needle` in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// True when `path` holds a complete 64-bit ELF file: the magic is right and
/// every program header's file range lies inside the file.
pub(crate) fn is_complete_elf64(path: &Path) -> bool {
    fn check(path: &Path) -> std::io::Result<bool> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let mut eh = [0u8; 64];
        f.read_exact(&mut eh)?;
        if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
            return Ok(false);
        }
        let u16_at = |b: &[u8], o: usize| u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
        let u64_at = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54), u16_at(&eh, 56));
        if phnum == 0 || phentsize < 56 {
            return Ok(false);
        }
        for i in 0..phnum {
            let mut ph = [0u8; 56];
            f.seek(SeekFrom::Start(phoff + i * phentsize))?;
            f.read_exact(&mut ph)?;
            let (offset, filesz) = (u64_at(&ph, 8), u64_at(&ph, 32));
            if offset.saturating_add(filesz) > len {
                return Ok(false);
            }
        }
        Ok(true)
    }
    check(path).unwrap_or(false)
}

/// Whether the kernel config says it can be booted through PVH.
fn has_pvh(kernel: &Kernel) -> bool {
    std::fs::read_to_string(format!("/boot/config-{}", kernel.version))
        .map(|c| c.lines().any(|l| l == "CONFIG_PVH=y"))
        .unwrap_or(false)
}

/// The cached vmlinux for `kernel`, unpacked now if needed; `None` when the
/// kernel cannot be booted that way (the caller then boots the bzImage).
pub(crate) fn vmlinux(kernel: &Kernel, cache_dir: &Path) -> Result<Option<PathBuf>, LabError> {
    if !has_pvh(kernel) {
        return Ok(None);
    }
    let meta =
        std::fs::metadata(&kernel.image).map_err(|e| LabError::io("read", &kernel.image, e))?;
    let key = cache::key(&[
        kernel.image.as_os_str().as_encoded_bytes(),
        &meta.len().to_le_bytes(),
        &cache::mtime_ns(&meta).to_le_bytes(),
    ]);
    let out = cache_dir.join(format!("vmlinux-{}-{}", kernel.version, &key[..12]));
    if out.is_file() {
        return Ok(Some(out));
    }
    let image = std::fs::read(&kernel.image).map_err(|e| LabError::io("read", &kernel.image, e))?;
    for (magic, tool, args) in FORMATS {
        let Some(offset) = find(&image, magic) else {
            continue;
        };
        let Some(tool_path) = crate::deps::which(tool) else {
            continue;
        };
        let mut input =
            File::open(&kernel.image).map_err(|e| LabError::io("read", &kernel.image, e))?;
        input
            .seek(SeekFrom::Start(offset as u64))
            .map_err(|e| LabError::io("read", &kernel.image, e))?;
        let written = cache::write_atomic_with(&out, |tmp_file, tmp_path| {
            // The payload is followed by the rest of the bzImage, which the
            // tool calls trailing garbage: its exit status is ignored, and
            // the ELF check below decides.
            let _ = Command::new(&tool_path)
                .args(*args)
                .stdin(Stdio::from(input))
                .stdout(Stdio::from(tmp_file))
                .stderr(Stdio::null())
                .status()
                .map_err(|e| LabError::Tool {
                    program: tool.to_string(),
                    detail: "could not be started".to_owned(),
                    source: Some(e),
                })?;
            Ok(is_complete_elf64(tmp_path))
        })?;
        if written {
            cache::remove_stale(cache_dir, "vmlinux-", &out);
            return Ok(Some(out));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_locates_magic() {
        assert_eq!(find(b"abc\xfd7zXZ\x00def", b"\xfd7zXZ\x00"), Some(3));
        assert_eq!(find(b"abc", b"\x1f\x8b\x08"), None);
    }

    #[test]
    fn elf_check_rejects_truncated_files() {
        let dir = std::env::temp_dir().join(format!("vmlink-lab-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        // This test binary is itself a complete ELF64 file.
        let exe = std::env::current_exe().expect("current_exe");
        assert!(is_complete_elf64(&exe));
        let data = std::fs::read(&exe).expect("read");
        let cut = dir.join("cut");
        // Keeps the headers but cuts into the loadable segments.
        std::fs::write(&cut, &data[..64 * 1024]).expect("write");
        assert!(!is_complete_elf64(&cut));
        let junk = dir.join("junk");
        std::fs::write(
            &junk,
            b"not an elf file at all, not at all, really not, no no no no no no no",
        )
        .expect("write");
        assert!(!is_complete_elf64(&junk));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
