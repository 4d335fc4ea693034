//! `vmlink serial-bridge`: the host side of a vmlink-agent that serves virtio-serial.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Serve a guest's virtio-serial vmlink-agent to many clients on a Unix socket
///
/// Reach a guest's vmlink-agent over virtio-serial: connect to QEMU's
/// chardev sockets of the guest's org.vmlink.ctl (and org.vmlink.data)
/// ports and serve every connection to LISTEN as one multiplexed stream to
/// the agent (docs/serial-mux.md). QEMU lets one client use a chardev at a
/// time; this bridge is that client, so any number of `vmlink` commands can
/// use the guest at once through LISTEN. Reconnects when QEMU restarts.
///
/// Examples:
///   vmlink serial-bridge /run/vm1/ctl.sock /run/vm1/data.sock --listen /run/vm1/agent.sock &
///   vmlink exec unix:/run/vm1/agent.sock -- uname -a
///
/// libvirt puts the chardev sockets where `<channel type='unix'>` says
/// (docs/guest-setup.md).
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// QEMU's chardev socket for the control port (org.vmlink.ctl).
    ctl: PathBuf,
    /// QEMU's chardev socket for the data port (org.vmlink.data), if the guest has one.
    data: Option<PathBuf>,
    /// The Unix socket to serve clients on (created; a stale one is replaced, one in use is
    /// refused).
    #[arg(long, value_name = "PATH")]
    listen: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(async {
        let stop = crate::relay::shutdown_signal();
        let listener = bind_unix(&a.listen)?;
        eprintln!(
            "vmlink: serial bridge for {} serving unix:{}",
            a.ctl.display(),
            a.listen.display()
        );
        vmlink_agent::mux::serve_bridge(a.ctl, a.data, listener, stop).await;
        let _ = std::fs::remove_file(&a.listen);
        Ok(ExitCode::SUCCESS)
    })
}

/// Binds a Unix listener at `path`, replacing a stale socket file: never another kind of
/// file, and never a socket that something still listens on (a second bridge would take the
/// path from the first, whose clients would then reach the wrong one).
pub fn bind_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            m.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        anyhow::ensure!(
            !listened_on(path)?,
            "{} is in use: something listens on it (another bridge?)",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Whether a process listens on the Unix socket at `path`: a connect that does not block
/// (a full listen queue still answers EAGAIN, "in use") and is refused only when nothing
/// listens. Any other failure is an error naming the path.
fn listened_on(path: &std::path::Path) -> anyhow::Result<bool> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is a valid value; sun_path is filled below within bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    anyhow::ensure!(
        bytes.len() < addr.sun_path.len(),
        "{}: the path is too long for a Unix socket",
        path.display()
    );
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    anyhow::ensure!(
        fd >= 0,
        "probing {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: connect(2) on our socket with a pointer to a sockaddr_un and its size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(true),
        Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => Ok(false),
        _ => Err(anyhow::anyhow!("probing {}: {e}", path.display())),
    }
}
