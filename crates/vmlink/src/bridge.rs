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
        let in_use = vmlink_transport::unix_listened_on(path)
            .with_context(|| format!("probing {}", path.display()))?;
        anyhow::ensure!(
            !in_use,
            "{} is in use: something listens on it (another bridge?)",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}
