//! Options for one guest, and their validation.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::LabError;

/// Which QEMU accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM only when `kvm_intel` or `kvm_amd` is loaded and `kvm_pvm` is not
    /// (a PVM host's `/dev/kvm` cannot boot a stock kernel); TCG otherwise.
    #[default]
    Auto,
    /// Software emulation.
    Tcg,
    /// KVM with `-cpu host`, even where it is known not to work.
    Kvm,
}

/// Where the guest command's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestIo {
    /// Copied to this process's stdout and stderr as they arrive.
    Inherit,
    /// Collected into [`crate::Outcome::stdout`] and [`crate::Outcome::stderr`].
    Capture,
}

/// How to boot one guest. `LabConfig::default()` is what most callers want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// Guest memory in QEMU's `-m` syntax: a number of MiB, or a number with
    /// a `K`, `M`, `G` or `T` suffix. Default `1G`.
    pub mem: String,
    /// Number of vCPUs, 1 to 64. Default 2.
    pub cpus: u32,
    /// Stop the guest after this long; the outcome's code is then 124.
    /// `None` waits forever. Default 600 s.
    pub timeout: Option<Duration>,
    /// Load `vsock_loopback` in the guest (AF_VSOCK to CID 1 inside it).
    pub vsock_loopback: bool,
    /// More kernel modules to load in the guest before the command starts.
    pub modules: Vec<String>,
    /// Extra virtio-serial ports `(NAME, UNIX_PATH)`: the guest sees
    /// `/dev/virtio-ports/NAME`; QEMU listens on `UNIX_PATH`
    /// (`server=on,wait=off`) and a host process connects to it.
    pub serials: Vec<(String, PathBuf)>,
    /// A vhost-user-vsock backend's socket: guest RAM becomes a shared memfd
    /// and the guest gets a `vhost-user-vsock-pci` device on this socket.
    /// The backend must be listening before the guest starts.
    pub vhost_user_vsock: Option<PathBuf>,
    /// Appended to QEMU's command line, one argv word each.
    pub qemu_args: Vec<String>,
    /// The program run in place of `qemu-system-x86_64`, with the same
    /// arguments: another QEMU build, or a wrapper that hands the guest to a
    /// manager (the libvirt test runs it under libvirt this way). It must
    /// exit when the guest does, and take QEMU with it when it is killed:
    /// the lab stops a guest (its timeout, [`crate::Guest::kill`], `lab
    /// down`) by SIGKILLing this process. Default: `$VMLINK_LAB_QEMU`, else
    /// `qemu-system-x86_64` from `PATH`.
    pub qemu: Option<PathBuf>,
    /// Run the command as the guest's PID 1 instead of the lab's init: it may
    /// exec an init system (`/lib/systemd/systemd`). No exit status comes
    /// back then (the outcome's code is 125 when the guest ends); the guest
    /// ends when PID 1 powers it off or exits. Default false.
    pub init: bool,
    /// More directories shared read-write at the same path.
    pub shares: Vec<PathBuf>,
    /// Share the current directory read-write at the same path. Default true.
    pub share_cwd: bool,
    /// Copy the guest console (kernel log) to stderr.
    pub verbose: bool,
    /// Extra environment variables for the command, on top of the caller's.
    pub env: Vec<(String, String)>,
    /// Accelerator choice. Default [`Accel::Auto`].
    pub accel: Accel,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            mem: "1G".to_owned(),
            cpus: 2,
            timeout: Some(Duration::from_secs(600)),
            vsock_loopback: false,
            modules: Vec::new(),
            serials: Vec::new(),
            vhost_user_vsock: None,
            qemu_args: Vec::new(),
            qemu: None,
            init: false,
            shares: Vec::new(),
            share_cwd: true,
            verbose: false,
            env: Vec::new(),
            accel: Accel::Auto,
        }
    }
}

/// Names reserved for the lab's own virtio-serial ports.
pub(crate) const RESERVED_PORT_PREFIX: &str = "vmlab.";

/// Largest guest memory accepted, in MiB (1 TiB).
const MAX_MEM_MIB: u64 = 1 << 20;
/// Smallest guest memory accepted, in MiB: the kernel, the initramfs and
/// the tmpfs overlay must fit.
const MIN_MEM_MIB: u64 = 128;

/// Parses QEMU `-m` syntax into MiB: a plain number is MiB, suffixes
/// `K`, `M`, `G`, `T` (either case, optionally followed by `B` or `iB`)
/// scale by 1024. The result must be a whole number of MiB.
pub(crate) fn parse_mem_mib(mem: &str) -> Result<u64, LabError> {
    let bad = |reason: &str| LabError::bad("mem", format!("{mem:?}: {reason}"));
    let s = mem.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(bad(
            "want a number of MiB, or a number with a K, M, G or T suffix",
        ));
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| bad("the number is too large"))?;
    let suffix = s[digits_end..].to_ascii_uppercase();
    let unit = suffix
        .strip_suffix("IB")
        .or_else(|| suffix.strip_suffix('B').filter(|u| !u.is_empty()))
        .unwrap_or(&suffix);
    // Size in KiB first, so that K is exact.
    let kib = match unit {
        "" | "M" => number.checked_mul(1024),
        "K" => Some(number),
        "G" => number.checked_mul(1024 * 1024),
        "T" => number.checked_mul(1024 * 1024 * 1024),
        _ => return Err(bad("unknown size suffix (use K, M, G or T)")),
    }
    .ok_or_else(|| bad("too large"))?;
    if kib % 1024 != 0 {
        return Err(bad("must be a whole number of MiB"));
    }
    let mib = kib / 1024;
    if mib < MIN_MEM_MIB {
        return Err(bad(&format!("at least {MIN_MEM_MIB} MiB is needed")));
    }
    if mib > MAX_MEM_MIB {
        return Err(bad("more than 1 TiB"));
    }
    Ok(mib)
}

/// A kernel module name as modprobe takes it.
pub(crate) fn check_module_name(option: &str, name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LabError::bad(
            option,
            format!("{name:?} is not a module name (letters, digits, '_' and '-')"),
        ))
    }
}

/// A virtio-serial port name usable as a file name under /dev/virtio-ports.
pub(crate) fn check_port_name(option: &str, name: &str) -> Result<(), LabError> {
    let charset_ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !charset_ok {
        return Err(LabError::bad(
            option,
            format!("{name:?} is not a port name (letters, digits, '.', '_' and '-')"),
        ));
    }
    if name.starts_with(RESERVED_PORT_PREFIX) {
        return Err(LabError::bad(
            option,
            format!("{name:?}: names starting with {RESERVED_PORT_PREFIX:?} are the lab's own"),
        ));
    }
    Ok(())
}

/// A name the guest's shell can `export`.
pub(crate) fn is_shell_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks everything that can be checked without touching the system.
pub(crate) fn validate(cfg: &LabConfig, argv: Option<&[OsString]>) -> Result<u64, LabError> {
    let mem_mib = parse_mem_mib(&cfg.mem)?;
    if !(1..=64).contains(&cfg.cpus) {
        return Err(LabError::bad(
            "cpus",
            format!("{} is not between 1 and 64", cfg.cpus),
        ));
    }
    if cfg.timeout == Some(Duration::ZERO) {
        return Err(LabError::bad(
            "timeout",
            "zero; use None to wait without a limit",
        ));
    }
    for (i, m) in cfg.modules.iter().enumerate() {
        check_module_name(&format!("modules[{i}]"), m)?;
    }
    let mut names = std::collections::HashSet::new();
    for (i, (name, path)) in cfg.serials.iter().enumerate() {
        check_port_name(&format!("serials[{i}]"), name)?;
        if !names.insert(name.as_str()) {
            return Err(LabError::bad(
                format!("serials[{i}]"),
                format!("port name {name:?} is used twice"),
            ));
        }
        if path.as_os_str().is_empty() || path.file_name().is_none() {
            return Err(LabError::bad(
                format!("serials[{i}]"),
                format!("{} is not a socket path", path.display()),
            ));
        }
    }
    if let Some(p) = &cfg.vhost_user_vsock {
        if p.as_os_str().is_empty() {
            return Err(LabError::bad("vhost_user_vsock", "empty socket path"));
        }
    }
    for (i, (name, value)) in cfg.env.iter().enumerate() {
        if !is_shell_name(name) {
            return Err(LabError::bad(
                format!("env[{i}]"),
                format!("{name:?} is not a variable name"),
            ));
        }
        if value.contains('\0') {
            return Err(LabError::bad(format!("env[{i}]"), "the value contains NUL"));
        }
    }
    for (i, a) in cfg.qemu_args.iter().enumerate() {
        if a.contains('\0') {
            return Err(LabError::bad(format!("qemu_args[{i}]"), "contains NUL"));
        }
    }
    if let Some(argv) = argv {
        if argv.is_empty() {
            return Err(LabError::bad("command", "empty argv"));
        }
        if argv[0].is_empty() {
            return Err(LabError::bad("command", "empty program name"));
        }
        for (i, a) in argv.iter().enumerate() {
            if std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str()).contains(&0) {
                return Err(LabError::bad(format!("command[{i}]"), "contains NUL"));
            }
        }
    }
    Ok(mem_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_accepts_qemu_sizes() {
        assert_eq!(parse_mem_mib("1G").ok(), Some(1024));
        assert_eq!(parse_mem_mib("1g").ok(), Some(1024));
        assert_eq!(parse_mem_mib("512M").ok(), Some(512));
        assert_eq!(parse_mem_mib("512").ok(), Some(512));
        assert_eq!(parse_mem_mib("2GiB").ok(), Some(2048));
        assert_eq!(parse_mem_mib("2GB").ok(), Some(2048));
        assert_eq!(parse_mem_mib("262144K").ok(), Some(256));
    }

    #[test]
    fn mem_rejects_bad_sizes() {
        for bad in [
            "", "G", "1.5G", "-1G", "1X", "100", "1000K", "2000T", "1 G B",
        ] {
            assert!(
                matches!(parse_mem_mib(bad), Err(LabError::BadOption { ref option, .. }) if option == "mem"),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn module_names_are_checked() {
        assert!(check_module_name("m", "vsock_loopback").is_ok());
        assert!(check_module_name("m", "9pnet-virtio").is_ok());
        for bad in ["", "-r", "a b", "a/b", "a;b", "x\n"] {
            assert!(check_module_name("m", bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn port_names_are_checked() {
        assert!(check_port_name("p", "org.example.ctl").is_ok());
        assert!(check_port_name("p", "t.port").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "vmlab.ret", "-x", "a,b"] {
            assert!(check_port_name("p", bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        let ok = LabConfig::default();
        let argv = [OsString::from("true")];
        assert_eq!(validate(&ok, Some(&argv)).ok(), Some(1024));

        let field = |cfg: LabConfig, argv: &[OsString]| match validate(&cfg, Some(argv)) {
            Err(LabError::BadOption { option, .. }) => option,
            other => panic!("expected BadOption, got {other:?}"),
        };
        assert_eq!(
            field(
                LabConfig {
                    cpus: 0,
                    ..ok.clone()
                },
                &argv
            ),
            "cpus"
        );
        assert_eq!(
            field(
                LabConfig {
                    cpus: 65,
                    ..ok.clone()
                },
                &argv
            ),
            "cpus"
        );
        assert_eq!(
            field(
                LabConfig {
                    timeout: Some(Duration::ZERO),
                    ..ok.clone()
                },
                &argv
            ),
            "timeout"
        );
        assert_eq!(
            field(
                LabConfig {
                    modules: vec!["ok".into(), "not ok".into()],
                    ..ok.clone()
                },
                &argv
            ),
            "modules[1]"
        );
        assert_eq!(
            field(
                LabConfig {
                    serials: vec![("a".into(), "/tmp/a".into()), ("a".into(), "/tmp/b".into())],
                    ..ok.clone()
                },
                &argv
            ),
            "serials[1]"
        );
        assert_eq!(
            field(
                LabConfig {
                    env: vec![("A-B".into(), "x".into())],
                    ..ok.clone()
                },
                &argv
            ),
            "env[0]"
        );
        assert_eq!(field(ok.clone(), &[]), "command");
        assert_eq!(field(ok, &[OsString::new()]), "command");
    }

    #[test]
    fn shell_names() {
        assert!(is_shell_name("PATH"));
        assert!(is_shell_name("_x1"));
        assert!(!is_shell_name("1x"));
        assert!(!is_shell_name("a-b"));
        assert!(!is_shell_name(""));
        assert!(!is_shell_name("a.b"));
    }
}
