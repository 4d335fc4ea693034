//! `vmlink lab`: throwaway QEMU guests with every channel wired, from the
//! `vmlink-lab` library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use vmlink_lab::{Accel, GuestIo, LabConfig};

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Boot a throwaway guest, run CMD in it, exit with CMD's status.
    ///
    /// The guest boots this machine's Debian kernel under QEMU (TCG unless
    /// KVM can boot a stock kernel). Its root filesystem is the host's /,
    /// read-only under a throwaway overlay; the current directory is shared
    /// read-write at the same path. CMD runs as root, in the current
    /// directory, with the caller's environment plus VMLINK_LAB_GUEST=1; its
    /// stdout and stderr come back separately. Exit status: CMD's own; 124 on
    /// timeout; 125 when the guest could not run it. QEMU, busybox-static and
    /// a kernel are installed with apt-get on first use when missing
    /// (VMLINK_LAB_NO_INSTALL=1 forbids that).
    ///
    /// Examples:
    ///   vmlink lab run -- uname -r
    ///   vmlink lab run --vsock loopback -- vmlink bench run vsock:local:5000
    ///   vmlink lab run --serial org.vmlink.ctl=/tmp/ctl.sock -- cat /dev/virtio-ports/org.vmlink.ctl
    #[command(verbatim_doc_comment)]
    Run(Box<RunArgs>),
    /// Boot a guest in the background with vmlink-agent running; reach it as lab:NAME.
    ///
    /// Examples:
    ///   vmlink lab up dev
    ///   vmlink exec lab:dev -- uname -a
    ///   vmlink cp ./build lab:dev:/tmp/
    ///   vmlink lab down dev
    #[command(verbatim_doc_comment)]
    Up(crate::lab_up::UpArgs),
    /// Stop lab guests started with `lab up`.
    Down(crate::lab_up::DownArgs),
    /// List lab guests started with `lab up`.
    Ls(crate::lab_up::LsArgs),
    /// The agent built into vmlink, for lab guests (serial ports and qga; not for direct use).
    #[command(hide = true)]
    Agent,
    /// The background process behind `lab up` (not for direct use).
    #[command(hide = true)]
    Supervise(crate::lab_up::UpArgs),
    /// Install what the lab needs and build its kernel and initramfs cache.
    Prepare,
    /// Boot one guest and show every channel working, with a bench table:
    /// virtio-serial (host <-> guest), vsock stream and seqpacket, Unix, TCP,
    /// hybrid vsock, and `vmlink relay` against socat on the same path.
    Demo(crate::demo::Args),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Give the guest vsock: `loopback` loads vsock_loopback (CID 1).
    #[arg(long, value_name = "KIND", value_parser = ["loopback"])]
    vsock: Option<String>,
    /// Add a virtio-serial port NAME whose host side is a Unix socket that
    /// QEMU listens on at PATH (repeatable).
    #[arg(long, value_name = "NAME=PATH", value_parser = parse_serial)]
    serial: Vec<(String, PathBuf)>,
    /// Add vhost-user-vsock-pci connected to a backend's SOCKET (guest RAM
    /// becomes a shared memfd). The backend must be listening already.
    #[arg(long, value_name = "SOCKET")]
    vhost_user_vsock: Option<PathBuf>,
    /// Guest memory, QEMU syntax.
    #[arg(long, default_value = "1G")]
    mem: String,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Stop the guest after this long (exit 124); 0 = never.
    #[arg(long, default_value = "600s", value_parser = vmlink_transport::addr::parse_duration)]
    timeout: Duration,
    /// Load a kernel module in the guest before CMD (repeatable).
    #[arg(long, value_name = "MODULE")]
    modprobe: Vec<String>,
    /// Also share DIR read-write at the same path (repeatable).
    #[arg(long, value_name = "DIR")]
    share: Vec<PathBuf>,
    /// Do not share the current directory.
    #[arg(long)]
    no_cwd: bool,
    /// Append one word to the QEMU command line (repeatable).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    qemu_arg: Vec<String>,
    /// Force TCG or KVM (default: KVM only where it can boot a stock kernel).
    #[arg(long, value_parser = ["auto", "tcg", "kvm"], default_value = "auto")]
    accel: String,
    /// Copy the guest's console (kernel log) to stderr.
    #[arg(short, long)]
    verbose: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

fn parse_serial(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
        _ => Err(format!("`{s}` is not NAME=UNIX_PATH")),
    }
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Demo(a) => crate::demo::run(a),
        Cmd::Up(a) => crate::lab_up::up(a),
        Cmd::Down(a) => crate::lab_up::down(a),
        Cmd::Ls(a) => crate::lab_up::ls(a),
        Cmd::Supervise(a) => crate::lab_up::supervise(a),
        Cmd::Agent => crate::lab_up::builtin_agent(),
        Cmd::Prepare => {
            let p = vmlink_lab::prepare(&LabConfig::default())?;
            eprintln!(
                "vmlink: lab ready: kernel {} ({}), initramfs {}",
                p.kernel_version(),
                p.kernel().display(),
                p.initramfs().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(a) => {
            let a = *a;
            let cfg = LabConfig {
                mem: a.mem,
                cpus: a.cpus,
                timeout: if a.timeout.is_zero() {
                    None
                } else {
                    Some(a.timeout)
                },
                vsock_loopback: a.vsock.is_some(),
                modules: a.modprobe,
                serials: a.serial,
                vhost_user_vsock: a.vhost_user_vsock,
                qemu_args: a.qemu_arg,
                shares: a.share,
                share_cwd: !a.no_cwd,
                verbose: a.verbose,
                accel: match a.accel.as_str() {
                    "tcg" => Accel::Tcg,
                    "kvm" => Accel::Kvm,
                    _ => Accel::Auto,
                },
                ..LabConfig::default()
            };
            if a.cmd.is_empty() {
                bail!("lab run needs a command after --");
            }
            let out = vmlink_lab::run(&cfg, &a.cmd, GuestIo::Inherit)?;
            Ok(ExitCode::from(out.code.clamp(0, 255) as u8))
        }
    }
}
