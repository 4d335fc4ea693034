//! `vmlink-vhost`: a vhost-user-vsock backend with a hybrid vsock host side, for one or more VMs.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use tracing::{debug, error, info, warn};
use vmlink_vhost::capture::Capture;
use vmlink_vhost::config::{self, VmConfig};
use vmlink_vhost::counters::Counters;
use vmlink_vhost::device::Device;
use vmlink_vhost::router::Router;
use vmlink_vhost::serve::{device_config, serve_vm};
use vmlink_vhost::stats::{self, VmStats};

/// A vhost-user-vsock device backend: gives QEMU guests vsock without the host's vhost_vsock
/// module. The host side is hybrid vsock: Unix sockets, Firecracker's convention.
#[derive(Debug, Parser)]
#[command(
    name = "vmlink-vhost",
    version,
    after_help = "Example: vmlink-vhost --vm guest-cid=3,socket=/run/vm1-vhost.sock,uds-path=/run/vm1.vsock\n\
    then QEMU: -chardev socket,id=c0,path=/run/vm1-vhost.sock -device vhost-user-vsock-pci,chardev=c0\n\
    (guest memory must be shared: -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem).\n\n\
Signals: SIGUSR1 logs every VM's counters; SIGUSR2 switches --pcap capture off and on; SIGTERM or\n\
SIGINT stop cleanly (capture flushed, this process's sockets removed, status 0).\n\
Logs: RUST_LOG (default info). More: docs/vhost.md."
)]
struct Args {
    /// A VM: guest-cid=CID,socket=PATH,uds-path=PATH[,groups=a+b][,tx-buffer-size=SIZE][,max-connections=N][,poll-us=N].
    /// `socket` is the vhost-user socket for QEMU; host clients connect to `uds-path` and send
    /// `CONNECT <port>\n`; guest connections to host port P go to `<uds-path>_<P>`. `poll-us`
    /// (default 50, 0 to 1000): how long the VM's thread keeps polling for the next packet
    /// after one before it sleeps; 0 never polls. Repeatable.
    #[arg(long = "vm", value_name = "SPEC")]
    vms: Vec<String>,
    /// A TOML file with one [[vm]] table per VM (same keys as --vm).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write every packet of every VM to FILE (pcap, link type 271 LINKTYPE_VSOCK, which tshark
    /// decodes). SIGUSR2 switches capture off and on while running.
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// Serve every VM's counters on a Unix socket at PATH, for scripts: each connection gets one
    /// line of JSON, {"vms":[{"guest_cid":3,"open_connections":N,"max_connections":N,
    /// "counters":{"tx_packets":N,...}}],"capture":true|false|null}, then end-of-file; nothing
    /// needs to be sent. Read it with `vmlink-vhost --print-stats PATH`, `socat -
    /// UNIX-CONNECT:PATH` or `nc -U PATH`. In the config file: `stats-socket = "PATH"` (before
    /// the first [[vm]]; this option wins). A file left by a killed backend is replaced.
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,
    /// Print the JSON document of the stats socket at PATH (a running backend's
    /// --stats-socket) to stdout and exit: status 1 if it cannot be read.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["vms", "config", "pcap", "stats_socket"]
    )]
    print_stats: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    if let Some(path) = &args.print_stats {
        return print_stats(path);
    }
    let (vms, stats_path) = match vm_list(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmlink-vhost: {e}");
            return ExitCode::from(2);
        }
    };
    let router = match Router::new(vms.iter().map(|v| (v.guest_cid, &v.groups[..]))) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("vmlink-vhost: cannot set up VM-to-VM routing: {e}");
            return ExitCode::from(1);
        }
    };
    let capture = match &args.pcap {
        None => None,
        Some(path) => match Capture::create(path, true) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                eprintln!("vmlink-vhost: --pcap {}: {e}", path.display());
                return ExitCode::from(1);
            }
        },
    };
    // SIGUSR1 logs every VM's counters, SIGUSR2 switches capture, SIGTERM and SIGINT stop the
    // backend cleanly: block them in every thread but the one that waits for them.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        eprintln!("vmlink-vhost: cannot block SIGUSR1, SIGUSR2, SIGTERM and SIGINT: {e}");
        return ExitCode::from(1);
    }
    check_open_file_limit(&vms);
    // Bind every VM's uds-path first, so that a bad path fails the start, not a thread.
    // A socket file someone still listens on belongs to a running process (another backend, or
    // this one started twice): refuse rather than take it over. Stale files are replaced.
    for vm in &vms {
        for path in &own_sockets(vm) {
            if is_in_use(path) {
                eprintln!(
                    "vmlink-vhost: VM with guest-cid {}: {} is in use: another process listens on it",
                    vm.guest_cid,
                    path.display()
                );
                return ExitCode::from(1);
            }
        }
    }
    if let Some(path) = &stats_path {
        if is_in_use(path) {
            eprintln!(
                "vmlink-vhost: stats socket {} is in use: another process listens on it",
                path.display()
            );
            return ExitCode::from(1);
        }
    }
    let mut started = Vec::new();
    for vm in vms {
        let counters = Arc::new(Counters::default());
        match Device::with_router(device_config(&vm), counters.clone(), Some(router.clone())) {
            Ok(d) => started.push((vm, d, counters)),
            Err(e) => {
                eprintln!("vmlink-vhost: VM with guest-cid {}: {e}", vm.guest_cid);
                return ExitCode::from(1);
            }
        }
    }
    let all: Vec<(u64, Arc<Counters>)> = started
        .iter()
        .map(|(vm, _, c)| (vm.guest_cid, c.clone()))
        .collect();
    // The stats socket: bound after the VMs' sockets, so that a VM that cannot start leaves no
    // stats file behind.
    let mut stats_file = None;
    if let Some(path) = &stats_path {
        let listener = match stats::bind(path) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "vmlink-vhost: stats socket {}: cannot listen: {e}",
                    path.display()
                );
                return ExitCode::from(1);
            }
        };
        stats_file = std::fs::metadata(path)
            .ok()
            .map(|m| (path.clone(), std::os::unix::fs::MetadataExt::ino(&m)));
        let vms: Vec<VmStats> = started
            .iter()
            .map(|(vm, _, c)| VmStats {
                guest_cid: vm.guest_cid,
                max_connections: vm.max_connections,
                counters: c.clone(),
            })
            .collect();
        let capture = capture.clone();
        let spawned = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || stats::serve(&listener, || stats::render(&vms, capture.as_deref())));
        if let Err(e) = spawned {
            eprintln!("vmlink-vhost: cannot start a thread: {e}");
            return ExitCode::from(1);
        }
        info!("stats on {}", path.display());
    }
    // What a clean stop removes: the sockets this process made (host listeners at
    // `<uds-path>_<port>` belong to their owners and stay).
    let mut ours: Vec<PathBuf> = started
        .iter()
        .flat_map(|(vm, _, _)| own_sockets(vm))
        .collect();
    ours.extend(stats_file.iter().map(|(p, _)| p.clone()));
    let signal_capture = capture.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(Signal::SIGUSR1) => {
                    for (cid, c) in &all {
                        info!(cid, "counters: {}", c.snapshot());
                    }
                }
                Ok(Signal::SIGUSR2) => match &signal_capture {
                    Some(c) => {
                        c.set_enabled(!c.enabled());
                        let state = if c.enabled() { "on" } else { "off" };
                        info!("packet capture {state}");
                    }
                    None => info!("SIGUSR2: no --pcap file, nothing to switch"),
                },
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                    // The guests lose their device: QEMU sees the socket close, as when the
                    // process dies, but the capture file is complete and no file is left.
                    if let Some(c) = &signal_capture {
                        c.flush();
                    }
                    for (cid, c) in &all {
                        info!(cid, "counters: {}", c.snapshot());
                    }
                    for p in &ours {
                        let _ = std::fs::remove_file(p);
                    }
                    info!("{sig}: stopped");
                    std::process::exit(0);
                }
                _ => {}
            }
        });
    let mut threads = Vec::new();
    for (vm, device, counters) in started {
        let router = router.clone();
        let capture = capture.clone();
        let name = format!("vm-cid{}", vm.guest_cid);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let r = serve_vm(&vm, device, counters, Some(router), capture);
            if let Err(e) = &r {
                error!(cid = vm.guest_cid, "{e}");
            }
            r.is_ok()
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                eprintln!("vmlink-vhost: cannot start a thread: {e}");
                return ExitCode::from(1);
            }
        }
    }
    info!("serving {} VM(s)", threads.len());
    let mut ok = true;
    for t in threads {
        ok &= t.join().unwrap_or(false);
    }
    // Every VM stopped (a setup error): remove the stats socket if it is still the one bound.
    if let Some((path, ino)) = stats_file {
        if std::fs::symlink_metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
        {
            let _ = std::fs::remove_file(&path);
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The VMs, and the stats socket (`--stats-socket`, else the config file's `stats-socket`).
fn vm_list(args: &Args) -> Result<(Vec<VmConfig>, Option<PathBuf>), config::ConfigError> {
    let mut vms = Vec::new();
    let mut stats_socket = None;
    if let Some(path) = &args.config {
        let file = config::load_config(path)?;
        vms.extend(file.vms);
        stats_socket = file.stats_socket;
    }
    for spec in &args.vms {
        vms.push(config::parse_vm_spec(spec)?);
    }
    if let Some(path) = &args.stats_socket {
        stats_socket = Some(path.clone());
    }
    config::check_all(&vms, stats_socket.as_deref())?;
    Ok((vms, stats_socket))
}

/// `--print-stats PATH`: copies the stats document to stdout.
fn print_stats(path: &Path) -> ExitCode {
    use std::io::Write;
    let doc = match stats::fetch(path, std::time::Duration::from_secs(5)) {
        Ok(d) if !d.is_empty() => d,
        Ok(_) => {
            eprintln!(
                "vmlink-vhost: --print-stats {}: the socket closed without a document",
                path.display()
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("vmlink-vhost: --print-stats {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    if out.write_all(&doc).and_then(|()| out.flush()).is_err() {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// File descriptors a VM holds besides its connections and host clients (epoll, timer,
/// listeners, vhost-user socket, queue eventfds, guest memory), with room to spare.
const FDS_PER_VM: u64 = 32;
/// File descriptors of the process besides its VMs (stdio, stats socket, capture file...).
const FDS_PER_PROCESS: u64 = 64;

/// Raises the soft limit on open files to the hard limit: every connection and every host
/// client in its `CONNECT` handshake holds one, and the soft limit is often 1024, what one VM's
/// default `max-connections` alone may need. Warns once if the VMs' bounds may need more than
/// the limit: a host listener then stops accepting until a descriptor is free.
fn check_open_file_limit(vms: &[VmConfig]) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        debug!(
            "cannot read the open file limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; a soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            debug!(
                "open file limit raised from {} to the hard limit {}",
                lim.rlim_cur, lim.rlim_max
            );
            lim = raised;
        } else {
            debug!(
                "cannot raise the open file limit from {} to {}: {}",
                lim.rlim_cur,
                lim.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    } else {
        debug!("open file limit: {}", lim.rlim_cur);
    }
    let need = vms
        .iter()
        .map(|vm| {
            let cfg = device_config(vm);
            (cfg.max_connections + cfg.max_handshakes) as u64 + FDS_PER_VM
        })
        .sum::<u64>()
        + FDS_PER_PROCESS;
    if need > lim.rlim_cur {
        warn!(
            "the open file limit ({}) is below what the VMs' bounds may take ({need}: max-connections + host clients in their handshake + {FDS_PER_VM} per VM, + {FDS_PER_PROCESS}): \
             when it runs out, host clients wait and guest connections get RST until a descriptor is free (raise it: ulimit -n, or LimitNOFILE= in a systemd unit)",
            lim.rlim_cur
        );
    }
}

/// The socket files a VM's device makes: its vhost-user socket, `uds-path` and the seqpacket
/// twin of `uds-path`.
fn own_sockets(vm: &VmConfig) -> [PathBuf; 3] {
    [
        vm.socket.clone(),
        vm.uds_path.clone(),
        vmlink_vhost::device::seqpacket_listener_path(&vm.uds_path),
    ]
}

/// Whether a process listens on the Unix socket at `path` (stream or seqpacket).
fn is_in_use(path: &Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    [SockType::Stream, SockType::SeqPacket]
        .into_iter()
        .any(|ty| {
            socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)
                .is_ok_and(|fd| connect(fd.as_raw_fd(), &addr).is_ok())
        })
}
