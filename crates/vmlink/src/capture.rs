//! `vmlink capture`: record a guest's vsock traffic through the kernel's vsockmon device, in
//! the pcap link type that Wireshark's vsock dissector reads (LINKTYPE_VSOCK, 271): seed 002's
//! recipe (`ip link add type vsockmon`, then a capture tool) as one command.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Capture this guest's vsock packets (vsockmon) into a pcap file for tshark/Wireshark
///
/// Every transport that reports to vsockmon counts: virtio-vsock, vsock_loopback.
///
/// Creates the vsockmon interface if it is missing (loading the vsockmon
/// module; needs root) and removes it again at the end. Stops on Ctrl-C /
/// SIGTERM, after --count packets or after --duration. Read the file with
/// `tshark -r FILE` or Wireshark (link type vsock, 271).
///
/// Examples:
///   vmlink capture -w vsock.pcap                       # until Ctrl-C
///   vmlink capture -w /tmp/x.pcap --count 100
///   tshark -r vsock.pcap -T fields -e vsock.src_port -e vsock.dst_port -e vsock.op
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The pcap file to write (replaced).
    #[arg(short = 'w', long, default_value = "vsock.pcap")]
    write: PathBuf,
    /// The vsockmon interface.
    #[arg(short, long, default_value = "vsockmon0")]
    interface: String,
    /// Stop after this many packets.
    #[arg(short, long)]
    count: Option<u64>,
    /// Stop after this long (e.g. 10s).
    #[arg(long, value_parser = vmlink_transport::addr::parse_duration)]
    duration: Option<Duration>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An AF_PACKET socket bound to one interface.
fn packet_socket(ifindex: i32) -> anyhow::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a packet socket (needs root)");
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    // SAFETY: sll is a valid sockaddr_ll and its size is passed with it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("binding the packet socket");
    }
    // Wake up every 200 ms to notice a stop request.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: tv is a valid timeval and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("setting a receive timeout");
    }
    Ok(fd)
}

/// `ARPHRD_VSOCKMON`: the link type of a vsockmon interface (`/sys/class/net/IF/type`).
const ARPHRD_VSOCKMON: u32 = 826;

/// Checks that the existing interface at `sys` (`/sys/class/net/NAME`) is a vsockmon device:
/// any other would be recorded under the vsock link type, and its packets misread.
fn check_vsockmon(sys: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(sys.join("type"))
        .with_context(|| format!("reading the link type of interface {name}"))?;
    let t: u32 = text
        .trim()
        .parse()
        .with_context(|| format!("parsing the link type of interface {name}: {text:?}"))?;
    if t != ARPHRD_VSOCKMON {
        bail!(
            "interface {name} is not a vsockmon device (its link type is {t}, a vsockmon's is \
             {ARPHRD_VSOCKMON}): give -i a vsockmon interface, or a name that does not exist \
             to have one created"
        );
    }
    Ok(())
}

/// Writes one record received from the packet socket: `got` is its real length (`recv` with
/// `MSG_TRUNC`), `buf` holds its first bytes; a record cut to `buf` keeps its real length.
fn write_received(cap: &vmlink_vhost::capture::Capture, buf: &[u8], got: usize) {
    let len = got.min(buf.len());
    cap.raw_cut(&buf[..len], got);
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let sys = PathBuf::from("/sys/class/net").join(&a.interface);
    let created = if sys.exists() {
        check_vsockmon(&sys, &a.interface)?;
        false
    } else {
        // The module may be built in, or loaded already; `ip` says what is wrong if not.
        let _ = Command::new("modprobe").arg("vsockmon").output();
        ip(&["link", "add", "name", &a.interface, "type", "vsockmon"])
            .context("creating the vsockmon interface (root and the vsockmon module needed)")?;
        true
    };
    let result = capture(&a, &sys);
    if created {
        if let Err(e) = ip(&["link", "del", &a.interface]) {
            eprintln!("vmlink: {e:#}");
        }
    }
    result
}

fn capture(a: &Args, sys: &std::path::Path) -> anyhow::Result<ExitCode> {
    ip(&["link", "set", &a.interface, "up"])?;
    let ifindex: i32 = std::fs::read_to_string(sys.join("ifindex"))
        .context("reading the interface index")?
        .trim()
        .parse()
        .context("parsing the interface index")?;
    let sock = packet_socket(ifindex)?;
    let cap = vmlink_vhost::capture::Capture::create(&a.write, true)
        .with_context(|| format!("creating {}", a.write.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let rt = crate::runtime()?;
    // Signal handlers are installed in the runtime's context, before the first packet.
    let signal = {
        let _in_runtime = rt.enter();
        crate::relay::shutdown_signal()
    };
    let s2 = stop.clone();
    rt.spawn(async move {
        signal.await;
        s2.store(true, Ordering::Relaxed);
    });
    eprintln!(
        "vmlink: capturing vsock packets on {} into {}",
        a.interface,
        a.write.display()
    );
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        if stop.load(Ordering::Relaxed)
            || a.count.is_some_and(|c| n >= c)
            || a.duration.is_some_and(|d| start.elapsed() >= d)
        {
            break;
        }
        // SAFETY: buf is valid for buf.len() bytes for the duration of the call.
        let got = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e).context("receiving from the packet socket"),
            }
        }
        // MSG_TRUNC returns the real length; keep what fits.
        write_received(&cap, &buf, got as usize);
        n += 1;
    }
    cap.flush();
    eprintln!("vmlink: {n} packets captured to {}", a.write.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmlink-capture-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    #[test]
    fn a_record_cut_to_the_buffer_keeps_its_real_length() {
        let dir = scratch("cut");
        let file = dir.join("x.pcap");
        let cap = vmlink_vhost::capture::Capture::create(&file, true).expect("create");
        write_received(&cap, &[7u8; 100], 300);
        cap.flush();
        let b = std::fs::read(&file).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        // After the 24-byte file header: seconds, microseconds, incl_len, orig_len.
        assert_eq!((u32_at(32), u32_at(36)), (100, 300));
        assert_eq!(b.len(), 24 + 16 + 100);
    }

    #[test]
    fn only_a_vsockmon_interface_is_captured() {
        let dir = scratch("type");
        std::fs::write(dir.join("type"), "826\n").expect("write");
        check_vsockmon(&dir, "vsockmon0").expect("a vsockmon device");
        std::fs::write(dir.join("type"), "1\n").expect("write");
        let e = check_vsockmon(&dir, "eth0")
            .expect_err("ethernet")
            .to_string();
        assert!(
            e.contains("interface eth0 is not a vsockmon device (its link type is 1"),
            "{e}"
        );
        std::fs::remove_file(dir.join("type")).expect("rm");
        check_vsockmon(&dir, "gone").expect_err("no type file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
