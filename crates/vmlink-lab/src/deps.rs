//! Host dependencies: Debian packages, the guest kernel, the accelerator.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::Accel;
use crate::error::LabError;

pub(crate) const QEMU: &str = "qemu-system-x86_64";
pub(crate) const QBOOT: &str = "/usr/share/qemu/qboot.rom";
pub(crate) const BUSYBOX: &str = "/bin/busybox";
pub(crate) const MODPROBE: &str = "/sbin/modprobe";

/// Set to `1` to forbid installing packages.
pub const NO_INSTALL_ENV: &str = "VMLINK_LAB_NO_INSTALL";
/// Overrides the cache directory.
pub const CACHE_ENV: &str = "VMLINK_LAB_CACHE";
/// The program run in place of `qemu-system-x86_64` (see [`crate::LabConfig::qemu`]).
pub const QEMU_ENV: &str = "VMLINK_LAB_QEMU";

/// The program that runs a guest: `configured`, else `$VMLINK_LAB_QEMU`, else
/// `qemu-system-x86_64` from `PATH`.
pub(crate) fn qemu_program(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    match std::env::var_os(QEMU_ENV).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => which(QEMU).unwrap_or_else(|| PathBuf::from(QEMU)),
    }
}

/// The directory for the unpacked kernel and the initramfs images.
pub(crate) fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("vmlink-lab");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache/vmlink-lab");
    }
    std::env::temp_dir().join(format!("vmlink-lab-{}", nix::unistd::geteuid()))
}

/// Finds `name` in `PATH`, plus the sbin directories a non-root PATH lacks.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether dpkg has `package` installed: its file list exists (dpkg
/// removes it on removal). Cheaper than running dpkg-query on every run.
fn dpkg_installed(package: &str) -> bool {
    let info = Path::new("/var/lib/dpkg/info");
    info.join(format!("{package}.list")).is_file()
        || info.join(format!("{package}:amd64.list")).is_file()
}

/// A guest kernel: the bzImage and its release.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    pub(crate) image: PathBuf,
    pub(crate) version: String,
}

/// Compares version strings the way `sort -V` roughly does: runs of
/// digits numerically, everything else bytewise.
pub(crate) fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The newest `/boot/vmlinuz-*` whose modules are installed.
pub(crate) fn find_kernel() -> Option<Kernel> {
    let mut found: Vec<Kernel> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            let image = e.path();
            let readable = std::fs::File::open(&image).is_ok();
            let has_modules = Path::new("/lib/modules")
                .join(&version)
                .join("modules.dep")
                .is_file();
            (readable && has_modules).then_some(Kernel { image, version })
        })
        .collect();
    found.sort_by(|a, b| version_cmp(&b.version, &a.version));
    found.into_iter().next()
}

/// Packages whose absence keeps the lab from working. Same list as the
/// shell recipe: QEMU and its firmware, busybox-static, the kernel (with
/// tiny-initramfs, which keeps initramfs-tools and a systemd upgrade out),
/// cpio, xz-utils and kmod.
pub(crate) fn missing_packages() -> Vec<String> {
    let mut pkgs = Vec::new();
    if which(QEMU).is_none() {
        pkgs.push("qemu-system-x86");
    }
    if !Path::new(QBOOT).is_file() {
        pkgs.push("qemu-system-data");
    }
    if !Path::new(BUSYBOX).is_file() || !dpkg_installed("busybox-static") {
        pkgs.push("busybox-static");
    }
    if which("cpio").is_none() {
        pkgs.push("cpio");
    }
    if which("xz").is_none() {
        pkgs.push("xz-utils");
    }
    if !Path::new(MODPROBE).is_file() {
        pkgs.push("kmod");
    }
    if find_kernel().is_none() {
        pkgs.push("linux-image-amd64");
        if !["initramfs-tools", "dracut", "tiny-initramfs"]
            .iter()
            .any(|p| dpkg_installed(p))
        {
            pkgs.push("tiny-initramfs");
        }
    }
    pkgs.into_iter().map(String::from).collect()
}

fn run_apt(
    mut cmd: Command,
    what: &str,
    packages: &[String],
) -> Result<std::process::Output, LabError> {
    let out = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| LabError::Install {
            packages: packages.to_vec(),
            detail: format!("cannot run {what}"),
            source: Some(e),
        })?;
    if !out.status.success() {
        return Err(LabError::Install {
            packages: packages.to_vec(),
            detail: format!("{what} exited with {}", out.status),
            source: None,
        });
    }
    Ok(out)
}

/// Installs what is missing, unless [`NO_INSTALL_ENV`] forbids it.
pub(crate) fn ensure_packages(cache: &Path) -> Result<(), LabError> {
    let packages = missing_packages();
    if packages.is_empty() {
        return Ok(());
    }
    if std::env::var_os(NO_INSTALL_ENV).is_some_and(|v| v == "1") {
        return Err(LabError::MissingPackages {
            packages,
            reason: format!("{NO_INSTALL_ENV}=1 forbids installing them"),
        });
    }
    let sudo = if nix::unistd::geteuid().is_root() {
        None
    } else if let Some(sudo) = which("sudo") {
        Some(sudo)
    } else {
        return Err(LabError::MissingPackages {
            packages,
            reason: "not root and no sudo: install them, or run once as root".to_owned(),
        });
    };
    let command = |args: &[&str]| {
        let mut c = match &sudo {
            Some(sudo) => {
                let mut c = Command::new(sudo);
                c.arg(args[0]);
                c
            }
            None => Command::new(args[0]),
        };
        c.args(&args[1..]);
        c
    };

    // One installer at a time, across processes.
    std::fs::create_dir_all(cache)
        .map_err(|e| LabError::io("create the cache directory", cache, e))?;
    let lock_path = cache.join(".install.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| LabError::io("open", &lock_path, e))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| LabError::io("lock", &lock_path, errno.into()))?;
    // Another process may have installed them while this one waited.
    let packages = missing_packages();
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!(
        "vmlink-lab: installing {} with apt-get (set {NO_INSTALL_ENV}=1 to forbid this)",
        packages.join(" ")
    );
    run_apt(
        command(&["apt-get", "update", "-qq"]),
        "apt-get update",
        &packages,
    )?;

    let mut extra: Vec<String> = Vec::new();
    if packages.iter().any(|p| p == "qemu-system-x86") && dpkg_installed("qemu-utils") {
        // bookworm-backports' qemu-utils (10.x) declares
        // Breaks: qemu-system-common (<< 8.0), so apt would remove it to
        // install bookworm's QEMU 7.2. Pin it to qemu-system-x86's version
        // instead, so that qemu-img stays.
        if let Some(pin) = qemu_utils_pin() {
            extra.push(format!("qemu-utils={pin}"));
            extra.push("--allow-downgrades".to_owned());
        }
    }
    let mut args: Vec<&str> = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages.iter().map(String::as_str));
    args.extend(extra.iter().map(String::as_str));
    run_apt(command(&args), "apt-get install", &packages)?;

    let still = missing_packages();
    if !still.is_empty() {
        return Err(LabError::Install {
            packages: still,
            detail: "still missing after apt-get install".to_owned(),
            source: None,
        });
    }
    Ok(())
}

/// qemu-system-x86's candidate version, when qemu-utils is installed at a
/// different version and that candidate version is available for it.
fn qemu_utils_pin() -> Option<String> {
    let policy = Command::new("apt-cache")
        .args(["policy", "qemu-system-x86"])
        .output()
        .ok()?;
    let want = String::from_utf8_lossy(&policy.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Candidate:")
                .map(|v| v.trim().to_owned())
        })?;
    if want.is_empty() || want == "(none)" {
        return None;
    }
    let have = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "qemu-utils"])
        .output()
        .ok()?;
    if String::from_utf8_lossy(&have.stdout).trim() == want {
        return None;
    }
    let madison = Command::new("apt-cache")
        .args(["madison", "qemu-utils"])
        .output()
        .ok()?;
    let available = String::from_utf8_lossy(&madison.stdout)
        .lines()
        .any(|l| l.split('|').nth(1).map(str::trim) == Some(want.as_str()));
    available.then_some(want)
}

/// The accelerator to use: KVM only where it can boot a stock kernel.
pub(crate) fn choose_accel(accel: Accel) -> Accel {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    match accel {
        Accel::Tcg => Accel::Tcg,
        Accel::Kvm => {
            if pvm {
                eprintln!(
                    "vmlink-lab: warning: this host's KVM is kvm-pvm, which boots only PVM guest \
                     kernels; expect a hang or 'failed to set MSR 0x10a'"
                );
            }
            Accel::Kvm
        }
        Accel::Auto => {
            let usable = nix::unistd::access(
                "/dev/kvm",
                nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
            )
            .is_ok();
            let native = Path::new("/sys/module/kvm_intel").exists()
                || Path::new("/sys/module/kvm_amd").exists();
            if usable && native && !pvm {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(
            version_cmp("6.1.0-56-amd64", "6.1.0-9-amd64"),
            Ordering::Greater
        );
        assert_eq!(
            version_cmp("6.10.0-1-amd64", "6.9.0-1-amd64"),
            Ordering::Greater
        );
        assert_eq!(
            version_cmp("6.1.0-56-amd64", "6.1.0-56-amd64"),
            Ordering::Equal
        );
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
        assert_eq!(version_cmp("6.1.0-056", "6.1.0-56"), Ordering::Equal);
    }

    #[test]
    fn forced_tcg_stays_tcg() {
        assert_eq!(choose_accel(Accel::Tcg), Accel::Tcg);
    }
}
