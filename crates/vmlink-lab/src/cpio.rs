//! A writer for the cpio "newc" format, the one the kernel unpacks as an
//! initramfs. Writing it here means no `cpio` run, no staging directory,
//! and entries such as `/dev/console` that an unprivileged user could not
//! create on disk.

const S_IFIFO: u32 = 0o010_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// Builds one newc archive in memory. Several archives may be concatenated:
/// the kernel unpacks them in order, later files replacing earlier ones.
#[derive(Debug, Default)]
pub(crate) struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    pub(crate) fn new() -> Self {
        Cpio {
            buf: Vec::new(),
            // Inode numbers only matter for hard links (nlink > 1), which
            // are never written; start high to stay clear of other archives.
            next_ino: 0x1000,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.entry_ino(ino, name, mode, nlink, rdev, data);
    }

    fn entry_ino(
        &mut self,
        ino: u32,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) {
        let name = name.trim_start_matches('/');
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub(crate) fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[]);
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        assert!(
            u32::try_from(data.len()).is_ok(),
            "cpio newc cannot hold files of 4 GiB or more"
        );
        self.entry(name, S_IFREG | perm, 1, (0, 0), data);
    }

    /// One regular file under several names (hard links). The data goes
    /// with the first name; the kernel links the later ones to it.
    pub(crate) fn hard_linked(&mut self, names: &[&str], perm: u32, data: &[u8]) {
        assert!(
            u32::try_from(data.len()).is_ok(),
            "cpio newc cannot hold files of 4 GiB or more"
        );
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = u32::try_from(names.len()).unwrap_or(u32::MAX);
        for (i, name) in names.iter().enumerate() {
            let body = if i == 0 { data } else { &[] };
            self.entry_ino(ino, name, S_IFREG | perm, nlink, (0, 0), body);
        }
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    pub(crate) fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[]);
    }

    pub(crate) fn fifo(&mut self, name: &str, perm: u32) {
        self.entry(name, S_IFIFO | perm, 1, (0, 0), &[]);
    }

    /// Appends the trailer and returns the archive.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], i: usize) -> u32 {
        let start = 6 + 8 * i;
        let text = std::str::from_utf8(&header[start..start + 8]).expect("hex");
        u32::from_str_radix(text, 16).expect("hex")
    }

    #[test]
    fn layout_is_newc_with_four_byte_alignment() {
        let mut c = Cpio::new();
        c.file("/init", 0o755, b"hello");
        let a = c.finish();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(field(&a, 1), S_IFREG | 0o755);
        assert_eq!(field(&a, 6), 5); // size
        assert_eq!(field(&a, 11), 5); // "init\0"
                                      // 110-byte header + 5-byte name, padded to 116; data at 116.
        assert_eq!(&a[110..115], b"init\0");
        assert_eq!(&a[116..121], b"hello");
        // Data padded to 124, where the trailer starts.
        assert_eq!(&a[124..130], b"070701");
        assert_eq!(&a[124 + 110..124 + 120], b"TRAILER!!!");
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn cpio_tool_lists_and_extracts_it() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("cpio(1) not installed; skipped");
            return;
        }
        let mut c = Cpio::new();
        c.dir("d", 0o755);
        c.file("d/f", 0o644, b"data\n");
        c.symlink("d/l", "f");
        c.fifo("d/p", 0o600);
        c.char_dev("d/console", 0o600, 5, 1);
        c.hard_linked(&["d/h1", "d/h2"], 0o755, b"xy");
        let archive = c.finish();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(&archive).expect("write");
        }
        let out = child.wait_with_output().expect("cpio output");
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 7, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" d"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("-rw-r--r--") && lines[1].ends_with(" d/f"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with(" d/l -> f"),
            "{listing}"
        );
        assert!(lines[3].starts_with("prw-------"), "{listing}");
        assert!(
            lines[4].starts_with("crw-------") && lines[4].contains("5,"),
            "{listing}"
        );
        assert!(
            lines[5].starts_with("-rwxr-xr-x   2 ") && lines[5].ends_with(" d/h1"),
            "{listing}"
        );
        assert!(
            lines[6].starts_with("-rwxr-xr-x   2 ") && lines[6].ends_with(" d/h2"),
            "{listing}"
        );
    }
}
