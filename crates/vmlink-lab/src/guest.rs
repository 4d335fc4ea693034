//! One running guest: QEMU's command line, its process, and the threads
//! that carry the guest's output and status.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

use crate::config::{Accel, GuestIo, LabConfig};
use crate::error::LabError;
use crate::Outcome;

/// How long a guest may take to power off after reporting its status.
const POWEROFF_GRACE: Duration = Duration::from_secs(5);
/// How long `spawn` waits for QEMU to listen on the `serials` sockets.
const SOCKET_WAIT: Duration = Duration::from_secs(30);
/// How much of the console and of QEMU's own output is kept for messages.
const KEEP_TAIL: usize = 256 * 1024;

/// Extra kernel command line, for debugging boots (e.g. `loglevel=7`).
pub const APPEND_ENV: &str = "VMLINK_LAB_APPEND";

/// Kernel command line. `pci=noacpi` skips ACPI PCI interrupt-link
/// evaluation, `cryptomgr.notests` the crypto self-tests (~0.35 s under
/// TCG), `mitigations=off` the speculative-execution workarounds that only
/// cost time in a throwaway guest. `init_on_alloc=0` turns off Debian's
/// default clearing of every freshly allocated page, a hardening measure
/// that TCG makes expensive: each vsock packet buffer and each new tmpfs
/// page was cleared, and vsock throughput in a lab guest went up 1.5-2.5x
/// without it (docs/benchmarks.md, "The lab guest's kernel options").
pub(crate) const CMDLINE: &str =
    "console=ttyS0 panic=-1 loglevel=4 mitigations=off pci=noacpi cryptomgr.notests \
     tsc=reliable rodata=off init_on_alloc=0 \
     initcall_blacklist=init_kprobe_trace,crypto_kdf108_init";

/// CPU model under TCG: everything TCG can emulate, less ERMS and FSRM
/// ("enhanced"/"fast short" `rep movsb`). TCG runs `rep movs`/`rep stos`
/// one element per turn of a loop, so a copy done with `rep movsb` costs a
/// turn per byte. Without ERMS, glibc's memcpy uses vector loops, and the
/// kernel falls back to the choice `TCG_CMDLINE` completes. (QEMU 7.2's
/// TCG offers no FSRM; newer ones may, and from Linux 6.4 FSRM alone makes
/// the kernel copy to and from user space with `rep movsb`.)
const TCG_CPU: &str = "max,-erms,-fsrm";

/// Kernel command line added under TCG. `clearcpuid=rep_good` drops the
/// kernel's own "rep string ops are fast" flag, so that (in Linux 6.1, the
/// lab's kernel) copies to and from user space and `memcpy` use unrolled
/// loops instead of `rep movsq`. In a lab guest, reading a tmpfs file went
/// from 229 MB/s (`rep movsb`) to 494 (`rep movsq`) to 725 (unrolled), and
/// raw vsock throughput rose ~1.7x over hybrid vsock and 2.5-3.6x over
/// vsock loopback (docs/benchmarks.md, "String instructions under TCG").
/// Under KVM the flags stay, as they are fast there.
const TCG_CMDLINE: &str = "clearcpuid=rep_good";

/// QEMU option values are split on `,`; `,,` stands for a literal comma.
pub(crate) fn qemu_escape(s: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    <OsString as std::os::unix::ffi::OsStringExt>::from_vec(out)
}

fn opt(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(qemu_escape(path.as_os_str()));
    s.push(suffix);
    s
}

/// Everything QEMU's command line depends on.
#[derive(Debug)]
pub(crate) struct QemuPlan<'a> {
    pub(crate) cfg: &'a LabConfig,
    pub(crate) mem_mib: u64,
    pub(crate) accel: Accel,
    pub(crate) kernel: &'a Path,
    pub(crate) initrd: &'a Path,
    pub(crate) run_dir: &'a Path,
    pub(crate) shares: &'a [PathBuf],
    pub(crate) append: Option<String>,
}

/// QEMU's arguments (without the program name).
pub(crate) fn qemu_args(p: &QemuPlan<'_>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |words: &[&str]| a.extend(words.iter().map(OsString::from));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    // qboot instead of SeaBIOS saves ~0.3 s; the kernel is PVH-booted.
    push(&["-machine", "pc", "-bios", crate::deps::QBOOT]);
    push(&[
        "-m",
        &format!("{}M", p.mem_mib),
        "-smp",
        &p.cfg.cpus.to_string(),
        "-nic",
        "none",
    ]);
    let kvm = matches!(p.accel, Accel::Kvm);
    if kvm {
        push(&["-accel", "kvm", "-cpu", "host"]);
    } else {
        push(&["-accel", "tcg", "-cpu", TCG_CPU]);
    }
    if p.cfg.vhost_user_vsock.is_some() {
        // vhost-user needs guest RAM the backend can map (gotcha 10).
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=vmlab_mem,size={}M,share=on",
                p.mem_mib
            ),
            "-numa",
            "node,memdev=vmlab_mem",
        ]);
    }
    let mut cmdline = CMDLINE.to_owned();
    if !kvm {
        cmdline.push(' ');
        cmdline.push_str(TCG_CMDLINE);
    }
    if let Some(extra) = &p.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    a.push("-kernel".into());
    a.push(p.kernel.into());
    // -kernel and -initrd take plain file names (no option syntax).
    a.push("-initrd".into());
    a.push(p.initrd.into());
    a.push("-append".into());
    a.push(cmdline.into());
    let fifo = |name: &str| p.run_dir.join(name);
    a.push("-serial".into());
    a.push("chardev:vmlab_con".into());
    a.push("-chardev".into());
    a.push(opt("file,id=vmlab_con,path=", &fifo("console"), ""));
    a.push("-fsdev".into());
    a.push("local,id=vmlab_root,path=/,security_model=none,readonly=on,multidevs=remap".into());
    a.push("-device".into());
    a.push("virtio-9p-pci,fsdev=vmlab_root,mount_tag=vmlab_root".into());
    a.push("-device".into());
    a.push("virtio-serial-pci,id=vmlab_vs".into());
    for (id, name) in [("out", "stdout"), ("err", "stderr"), ("ret", "ret")] {
        a.push("-chardev".into());
        a.push(opt(&format!("file,id=vmlab_{id},path="), &fifo(name), ""));
        a.push("-device".into());
        a.push(
            format!("virtserialport,bus=vmlab_vs.0,chardev=vmlab_{id},name=vmlab.{name}").into(),
        );
    }
    for (i, (name, path)) in p.cfg.serials.iter().enumerate() {
        a.push("-chardev".into());
        a.push(opt(
            &format!("socket,id=vmlab_ser{i},path="),
            path,
            ",server=on,wait=off",
        ));
        a.push("-device".into());
        a.push(format!("virtserialport,bus=vmlab_vs.0,chardev=vmlab_ser{i},name={name}").into());
    }
    for (i, share) in p.shares.iter().enumerate() {
        a.push("-fsdev".into());
        a.push(opt(
            &format!("local,id=vmlab_rw{i},path="),
            share,
            ",security_model=none,multidevs=remap",
        ));
        a.push("-device".into());
        a.push(format!("virtio-9p-pci,fsdev=vmlab_rw{i},mount_tag=vmlab_rw{i}").into());
    }
    if let Some(sock) = &p.cfg.vhost_user_vsock {
        a.push("-chardev".into());
        a.push(opt("socket,id=vmlab_vhu,path=", sock, ""));
        a.push("-device".into());
        a.push("vhost-user-vsock-pci,chardev=vmlab_vhu".into());
    }
    a.extend(p.cfg.qemu_args.iter().map(OsString::from));
    a
}

/// What the threads report to [`Guest::wait`].
#[derive(Debug)]
enum Event {
    /// The guest wrote its command's status to the `vmlab.ret` port.
    Status(i32),
    /// QEMU has exited (not yet reaped).
    Exited,
}

/// Where one of QEMU's outputs goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Stdout,
    Stderr,
    Ret,
    Console,
    Qemu,
}

/// What the I/O thread collected.
#[derive(Debug, Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    console: Vec<u8>,
    qemu: Vec<u8>,
    status: Option<i32>,
}

fn keep_tail(buf: &mut Vec<u8>, data: &[u8]) {
    buf.extend_from_slice(data);
    if buf.len() > 2 * KEEP_TAIL {
        buf.drain(..buf.len() - KEEP_TAIL);
    }
}

/// Parses the status line the guest writes: a decimal number and `\n`.
pub(crate) fn parse_status(buf: &[u8]) -> Option<i32> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    std::str::from_utf8(&buf[..end]).ok()?.trim().parse().ok()
}

/// What one read from a source gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadResult {
    /// Data (delivered), or an interrupted read: try again.
    Data,
    /// Nothing there now.
    Empty,
    /// End of file or an error: the source is done.
    End,
}

struct IoThread {
    sources: Vec<(Sink, File)>,
    exit: OwnedFd,
    io: GuestIo,
    verbose: bool,
    started: Instant,
    events: Sender<Event>,
    out: Collected,
    ret: Vec<u8>,
}

impl IoThread {
    fn deliver(&mut self, sink: Sink, data: &[u8]) {
        match (sink, self.io) {
            (Sink::Stdout, GuestIo::Inherit) => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(data).and_then(|()| o.flush());
            }
            (Sink::Stdout, GuestIo::Capture) => self.out.stdout.extend_from_slice(data),
            (Sink::Stderr, GuestIo::Inherit) => {
                let _ = std::io::stderr().lock().write_all(data);
            }
            (Sink::Stderr, GuestIo::Capture) => self.out.stderr.extend_from_slice(data),
            (Sink::Ret, _) => {
                self.ret.extend_from_slice(data);
                if self.out.status.is_none() {
                    if let Some(code) = parse_status(&self.ret) {
                        if self.verbose {
                            eprintln!(
                                "vmlink-lab: +{} ms: status {code}",
                                self.started.elapsed().as_millis()
                            );
                        }
                        self.out.status = Some(code);
                        let _ = self.events.send(Event::Status(code));
                    }
                }
            }
            (Sink::Console, _) => {
                if self.verbose && self.out.console.is_empty() {
                    eprintln!(
                        "vmlink-lab: +{} ms: first console output",
                        self.started.elapsed().as_millis()
                    );
                }
                if self.verbose {
                    let _ = std::io::stderr().lock().write_all(data);
                }
                keep_tail(&mut self.out.console, data);
            }
            (Sink::Qemu, _) => {
                // QEMU's own messages (warnings, vhost-user errors) matter
                // even when the guest command's output is captured.
                let _ = std::io::stderr().lock().write_all(data);
                keep_tail(&mut self.out.qemu, data);
            }
        }
    }

    /// Reads what is available from source `i` and delivers it.
    fn read_from(&mut self, i: usize, buf: &mut [u8]) -> ReadResult {
        let (sink, file) = &self.sources[i];
        let sink = *sink;
        let result = (&*file).read(buf);
        match result {
            Ok(0) => ReadResult::End,
            Ok(n) => {
                let data = buf[..n].to_vec();
                self.deliver(sink, &data);
                ReadResult::Data
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => ReadResult::Data,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => ReadResult::Empty,
            Err(_) => ReadResult::End,
        }
    }

    fn run(mut self) -> Collected {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let ready: Vec<(bool, bool)>;
            let exiting;
            {
                let mut fds: Vec<PollFd<'_>> = self
                    .sources
                    .iter()
                    .map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                    .collect();
                fds.push(PollFd::new(self.exit.as_fd(), PollFlags::POLLIN));
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break,
                }
                let rev = |f: &PollFd<'_>| f.revents().unwrap_or(PollFlags::empty());
                exiting = !rev(&fds[fds.len() - 1]).is_empty();
                ready = fds[..fds.len() - 1]
                    .iter()
                    .map(|f| {
                        let r = rev(f);
                        (
                            r.intersects(PollFlags::POLLIN),
                            r.intersects(
                                PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL,
                            ),
                        )
                    })
                    .collect();
            }
            let mut closed = Vec::new();
            for (i, (readable, hup)) in ready.into_iter().enumerate() {
                if (readable || hup) && self.read_from(i, &mut buf) == ReadResult::End {
                    closed.push(i);
                }
            }
            for i in closed.into_iter().rev() {
                self.sources.remove(i);
            }
            if exiting {
                // QEMU is gone: whatever it wrote is in the pipes. Drain them.
                for (_, fd) in &self.sources {
                    if let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) {
                        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
                        let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags));
                    }
                }
                for i in 0..self.sources.len() {
                    while self.read_from(i, &mut buf) == ReadResult::Data {}
                }
                break;
            }
            if self.sources.is_empty() {
                break;
            }
        }
        self.out
    }
}

/// Opens the read end of a FIFO without waiting for a writer. QEMU's
/// `file` chardev opens the write end at startup and would block until a
/// reader exists (gotcha 15); with the reader already open it never does.
fn open_fifo(path: &Path) -> Result<File, LabError> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| LabError::io("create the FIFO", path, e.into()))?;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| LabError::io("open the FIFO", path, e))?;
    Ok(f)
}

/// A booted (or booting) guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Guest {
    pid: Pid,
    waiter: Option<JoinHandle<Option<Child>>>,
    io: Option<JoinHandle<Collected>>,
    events: Receiver<Event>,
    run_dir: PathBuf,
    started: Instant,
    timeout: Option<Duration>,
    io_mode: GuestIo,
    verbose: bool,
    exited: bool,
    killed: bool,
    done: bool,
}

/// Parts handed from the thread that starts QEMU.
type Started = Result<(Pid, Option<ChildStdout>, Option<ChildStderr>), std::io::Error>;

impl Guest {
    /// Starts QEMU and the threads around it. `cmd` is QEMU's command.
    pub(crate) fn start(
        mut cmd: Command,
        run_dir: PathBuf,
        serials: &[PathBuf],
        timeout: Option<Duration>,
        io_mode: GuestIo,
        verbose: bool,
    ) -> Result<Guest, LabError> {
        let started = Instant::now();
        let cmd_program = PathBuf::from(cmd.get_program());
        let fifos: Vec<(Sink, File)> = [
            (Sink::Stdout, "stdout"),
            (Sink::Stderr, "stderr"),
            (Sink::Ret, "ret"),
            (Sink::Console, "console"),
        ]
        .into_iter()
        .map(|(sink, name)| open_fifo(&run_dir.join(name)).map(|f| (sink, f)))
        .collect::<Result<_, _>>()?;

        // Watch the socket directories before QEMU can create the sockets.
        let inotify = if serials.is_empty() {
            None
        } else {
            let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
                .map_err(|e| LabError::io("watch", serials[0].clone(), e.into()))?;
            for s in serials {
                let dir = s
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                ino.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                    .map_err(|e| LabError::io("watch", dir, e.into()))?;
            }
            Some(ino)
        };

        // Closed by the waiter thread when QEMU has exited: a POLLHUP for
        // everyone polling the read end.
        let (exit_r, exit_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| LabError::Qemu {
                what: "could not be started".to_owned(),
                stderr: String::new(),
                source: Some(e.into()),
            })?;
        let (events_tx, events) = mpsc::channel();
        let (started_tx, started_rx) = mpsc::channel::<Started>();

        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the prctl(2) and getppid(2) system calls, which are
        // async-signal-safe; it allocates nothing and touches no state
        // shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                // QEMU dies with the thread that started it (the waiter
                // thread below, which lives until QEMU exits), so a killed
                // test process leaves no guest behind.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let waiter_events = events_tx.clone();
        let waiter = std::thread::Builder::new()
            .name("vmlink-lab-qemu".to_owned())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return None;
                    }
                };
                let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
                let _ = started_tx.send(Ok((pid, child.stdout.take(), child.stderr.take())));
                // Wait without reaping, so that the pid cannot be reused
                // while another thread may still signal it.
                while let Err(nix::errno::Errno::EINTR) =
                    waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
                {
                }
                drop(exit_w);
                let _ = waiter_events.send(Event::Exited);
                Some(child)
            })
            .map_err(|e| LabError::Qemu {
                what: "could not be started (no thread)".to_owned(),
                stderr: String::new(),
                source: Some(e),
            })?;

        let (pid, qout, qerr) = match started_rx.recv() {
            Ok(Ok(parts)) => {
                if verbose {
                    eprintln!(
                        "vmlink-lab: +{} ms: QEMU started",
                        started.elapsed().as_millis()
                    );
                }
                parts
            }
            Ok(Err(e)) => {
                let _ = waiter.join();
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(LabError::Qemu {
                    what: format!("({}) could not be started", cmd_program.display()),
                    stderr: String::new(),
                    source: Some(e),
                });
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(LabError::Qemu {
                    what: "could not be started".to_owned(),
                    stderr: String::new(),
                    source: None,
                });
            }
        };

        let mut sources = fifos;
        if let Some(o) = qout {
            sources.push((Sink::Qemu, File::from(OwnedFd::from(o))));
        }
        if let Some(e) = qerr {
            sources.push((Sink::Qemu, File::from(OwnedFd::from(e))));
        }
        let io_exit = exit_r
            .try_clone()
            .map_err(|e| LabError::io("dup", &run_dir, e))?;
        let io_thread = IoThread {
            sources,
            exit: io_exit,
            io: io_mode,
            verbose,
            started,
            events: events_tx,
            out: Collected::default(),
            ret: Vec::new(),
        };
        let io = std::thread::Builder::new()
            .name("vmlink-lab-io".to_owned())
            .spawn(move || io_thread.run())
            .map_err(|e| LabError::Qemu {
                what: "could not be watched (no thread)".to_owned(),
                stderr: String::new(),
                source: Some(e),
            })?;

        let mut guest = Guest {
            pid,
            waiter: Some(waiter),
            io: Some(io),
            events,
            run_dir,
            started,
            timeout,
            io_mode,
            verbose,
            exited: false,
            killed: false,
            done: false,
        };
        if let Some(ino) = inotify {
            if let Err(e) = wait_for_sockets(serials, &ino, exit_r.as_fd(), SOCKET_WAIT) {
                let e = match e {
                    // QEMU exited: its own message says why.
                    None => {
                        let collected = guest.finish_now();
                        LabError::Qemu {
                            what: "exited before creating the serial sockets".to_owned(),
                            stderr: String::from_utf8_lossy(&collected.qemu).into_owned(),
                            source: None,
                        }
                    }
                    Some(e) => e,
                };
                return Err(e);
            }
        }
        Ok(guest)
    }

    /// Kills QEMU now; [`Guest::wait`] then returns promptly (code 125,
    /// unless the command's status had already arrived).
    pub fn kill(&mut self) {
        if !self.exited && !self.done {
            let _ = kill(self.pid, Signal::SIGKILL);
            self.killed = true;
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        u32::try_from(self.pid.as_raw()).unwrap_or(0)
    }

    /// Waits for the guest to finish (or times it out) and returns the outcome.
    pub fn wait(mut self) -> Result<Outcome, LabError> {
        let deadline = self.timeout.map(|t| self.started + t);
        let mut status: Option<i32> = None;
        let mut poweroff_deadline: Option<Instant> = None;
        let mut timed_out = false;
        while !self.exited {
            let next = if self.killed {
                None
            } else if status.is_some() {
                poweroff_deadline
            } else {
                deadline
            };
            let event = match next {
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => self
                    .events
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            match event {
                Ok(Event::Status(code)) => {
                    status = Some(code);
                    poweroff_deadline = Some(Instant::now() + POWEROFF_GRACE);
                }
                Ok(Event::Exited) => self.exited = true,
                Err(RecvTimeoutError::Timeout) => {
                    if status.is_none() {
                        timed_out = true;
                    }
                    self.kill();
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if self.verbose {
            eprintln!(
                "vmlink-lab: +{} ms: QEMU exited",
                self.started.elapsed().as_millis()
            );
        }
        let collected = self.finish_now();
        let code = match collected.status.or(status) {
            Some(code) => code,
            None if timed_out => 124,
            None => 125,
        };
        let mut outcome = Outcome {
            code,
            stdout: collected.stdout,
            stderr: collected.stderr,
            elapsed: self.started.elapsed(),
        };
        let note = match code {
            _ if collected.status.is_some() => None,
            124 => Some(format!(
                "vmlink-lab: timed out after {:.0?}; last guest console lines:\n{}",
                self.timeout.unwrap_or_default(),
                tail_lines(&collected.console, 10, "console: ")
            )),
            _ => Some(format!(
                "vmlink-lab: the guest reported no exit status{}; last guest console lines:\n{}",
                if self.killed { " (killed)" } else { "" },
                tail_lines(&collected.console, 30, "console: ")
            )),
        };
        if let Some(note) = note {
            match self.io_mode {
                GuestIo::Capture => outcome.stderr.extend_from_slice(note.as_bytes()),
                GuestIo::Inherit => {
                    let _ = std::io::stderr().lock().write_all(note.as_bytes());
                }
            }
        }
        Ok(outcome)
    }

    /// Kills QEMU if still running, reaps it, joins the threads, removes
    /// the run directory. Returns what the I/O thread collected.
    fn finish_now(&mut self) -> Collected {
        if self.done {
            return Collected::default();
        }
        if !self.exited {
            // Still running (dropped, or spawn failed half-way): kill it.
            self.kill();
            while !self.exited {
                match self.events.recv() {
                    Ok(Event::Exited) | Err(_) => self.exited = true,
                    Ok(Event::Status(_)) => {}
                }
            }
        }
        if let Some(w) = self.waiter.take() {
            if let Ok(Some(mut child)) = w.join() {
                let _ = child.wait();
            }
        }
        let collected = self
            .io
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        self.done = true;
        collected
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.finish_now();
    }
}

/// The last `n` lines of `buf`, each prefixed.
pub(crate) fn tail_lines(buf: &[u8], n: usize, prefix: &str) -> String {
    let text = String::from_utf8_lossy(buf);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    for l in &lines[start..] {
        out.push_str(prefix);
        out.push_str(l.trim_end_matches('\r'));
        out.push('\n');
    }
    out
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// How a socket path looks while QEMU sets it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocketState {
    /// No socket file yet: awaited with inotify.
    Missing,
    /// The file is there, but the table does not (yet) show it listening.
    Bound,
    /// Connects will be accepted.
    Listening,
}

/// How long a socket file may stand without `/proc/net/unix` showing it
/// listening before the file is trusted anyway (a socket in another
/// network namespace, or an old socket still open under the same path).
const BIND_GRACE: Duration = Duration::from_millis(250);

/// Where `p` stands. A server binds before it listens, and the kernel
/// creates the socket file before it even records the address, so a socket
/// file alone is no promise that a connect succeeds: one in between is
/// refused. `/proc/net/unix` tells (flag `__SO_ACCEPTCON`, 0x10000), and
/// looking there does not connect, so QEMU sees no client come and go.
fn socket_state(p: &Path) -> SocketState {
    if !is_socket(p) {
        return SocketState::Missing;
    }
    match std::fs::read(PROC_NET_UNIX) {
        // Without procfs, trust the file.
        Err(_) => SocketState::Listening,
        Ok(table) => match listening_in(&table, p.as_os_str().as_bytes()) {
            Some(true) => SocketState::Listening,
            Some(false) | None => SocketState::Bound,
        },
    }
}

const PROC_NET_UNIX: &str = "/proc/net/unix";

/// `table` is `/proc/net/unix`: `Num RefCount Protocol Flags Type St Inode
/// Path`, the path last and unquoted (it may hold spaces). `None`: no
/// socket has `path` as its address; `Some(true)`: every one that has it
/// listens (an older socket whose file was replaced keeps the address).
fn listening_in(table: &[u8], path: &[u8]) -> Option<bool> {
    let mut found = None;
    for line in table.split(|&b| b == b'\n').skip(1) {
        let mut rest = line;
        let mut fields = Vec::with_capacity(7);
        for _ in 0..7 {
            let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
            rest = &rest[start..];
            let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        let line_path = rest.strip_prefix(b" ").unwrap_or(rest);
        let flags = std::str::from_utf8(fields[3])
            .ok()
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .unwrap_or(0);
        if line_path == path {
            found = Some(found.unwrap_or(true) && flags & 0x1_0000 != 0);
        }
    }
    found
}

/// Waits for every path in `paths` to be a listening socket. `Err(None)`
/// means QEMU exited first (its `exit` pipe hung up). The file's creation
/// is awaited with inotify; `listen()` gives no event, so between the two
/// (microseconds) the table is looked at every millisecond, for at most
/// [`BIND_GRACE`] before the file is trusted.
fn wait_for_sockets(
    paths: &[PathBuf],
    ino: &Inotify,
    exit: BorrowedFd<'_>,
    limit: Duration,
) -> Result<(), Option<LabError>> {
    let deadline = Instant::now() + limit;
    // The path found bound (not yet listening), and since when: each path gets its own grace.
    let mut bound_since: Option<(&PathBuf, Instant)> = None;
    loop {
        let pending = paths.iter().find_map(|p| match socket_state(p) {
            SocketState::Listening => None,
            SocketState::Bound
                if bound_since.is_some_and(|(b, t)| b == p && t.elapsed() >= BIND_GRACE) =>
            {
                None
            }
            state => Some((p, state)),
        });
        let Some((waiting, state)) = pending else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Some(LabError::SocketTimeout {
                path: waiting.clone(),
                seconds: limit.as_secs(),
            }));
        }
        let mut fds = [
            PollFd::new(ino.as_fd(), PollFlags::POLLIN),
            PollFd::new(exit, PollFlags::POLLIN),
        ];
        let wait = if state == SocketState::Bound {
            if bound_since.is_none_or(|(b, _)| b != waiting) {
                bound_since = Some((waiting, Instant::now()));
            }
            left.min(Duration::from_millis(1))
        } else {
            left
        };
        // In whole milliseconds, rounded up: a shorter wait must not become
        // a zero timeout and spin.
        let timeout =
            PollTimeout::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(Some(LabError::io("wait for", waiting.clone(), e.into())));
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            // Sockets may have appeared just before QEMU exited; that is
            // still an exit.
            return Err(None);
        }
        while let Ok(events) = ino.read_events() {
            if events.is_empty() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_told_from_bound_ones() {
        let table = b"Num       RefCount Protocol Flags    Type St Inode Path\n\
0000000000000000: 00000002 00000000 00010000 0001 01 31337 /run/a b.sock\n\
0000000000000000: 00000002 00000000 00000000 0001 01 31338 /run/bound.sock\n\
0000000000000000: 00000002 00000000 00010000 0001 01 31339 /run/twice.sock\n\
0000000000000000: 00000002 00000000 00000000 0001 01 31340 /run/twice.sock\n\
0000000000000000: 00000003 00000000 00000000 0001 03 31341\n";
        assert_eq!(listening_in(table, b"/run/a b.sock"), Some(true));
        assert_eq!(listening_in(table, b"/run/bound.sock"), Some(false));
        // An old listener under the same address does not make a new bound
        // socket ready.
        assert_eq!(listening_in(table, b"/run/twice.sock"), Some(false));
        assert_eq!(listening_in(table, b"/run/a"), None);
        assert_eq!(listening_in(table, b"/run/missing.sock"), None);
    }

    #[test]
    fn socket_state_follows_a_real_socket_through_bind_and_listen() {
        if std::fs::read(PROC_NET_UNIX).is_err() {
            eprintln!("no {PROC_NET_UNIX} here: nothing to check");
            return;
        }
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        // A short path: sun_path holds 108 bytes, whatever TMPDIR says.
        let dir = PathBuf::from(format!("/tmp/vmlink-lab-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("s.sock");
        assert_eq!(socket_state(&path), SocketState::Missing);
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .expect("socket");
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
        // Bound, not yet listening: what QEMU's socket is for a moment.
        let bound = socket_state(&path);
        listen(&fd, Backlog::new(1).expect("backlog")).expect("listen");
        let listening = socket_state(&path);
        drop(fd);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(bound, SocketState::Bound);
        assert_eq!(listening, SocketState::Listening);
    }

    #[test]
    fn commas_are_doubled_for_qemu() {
        assert_eq!(qemu_escape(OsStr::new("/tmp/a,b")), "/tmp/a,,b");
        assert_eq!(qemu_escape(OsStr::new("plain")), "plain");
    }

    #[test]
    fn status_line_parses() {
        assert_eq!(parse_status(b"0\n"), Some(0));
        assert_eq!(parse_status(b"137\n"), Some(137));
        assert_eq!(parse_status(b"12"), None);
        assert_eq!(parse_status(b"x\n"), None);
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2, "> "), "> b\n> c\n");
        assert_eq!(tail_lines(b"", 2, "> "), "");
    }

    #[test]
    fn qemu_args_carry_every_option() {
        let cfg = LabConfig {
            serials: vec![("t.port".into(), "/tmp/x,y.sock".into())],
            vhost_user_vsock: Some("/tmp/vhu.sock".into()),
            qemu_args: vec!["-machine".into(), "q35".into()],
            cpus: 3,
            ..LabConfig::default()
        };
        let shares = [PathBuf::from("/work/a b")];
        let args = qemu_args(&QemuPlan {
            cfg: &cfg,
            mem_mib: 1536,
            accel: Accel::Tcg,
            kernel: Path::new("/k"),
            initrd: Path::new("/run/i"),
            run_dir: Path::new("/run"),
            shares: &shares,
            append: Some("loglevel=7".into()),
        });
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| -> Vec<&str> {
            args.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(after("-m"), ["1536M"]);
        assert_eq!(after("-smp"), ["3"]);
        assert!(after("-append")[0].ends_with(" clearcpuid=rep_good loglevel=7"));
        assert_eq!(after("-cpu"), ["max,-erms,-fsrm"]);
        assert!(after("-chardev")
            .contains(&"socket,id=vmlab_ser0,path=/tmp/x,,y.sock,server=on,wait=off"));
        assert!(after("-device")
            .contains(&"virtserialport,bus=vmlab_vs.0,chardev=vmlab_ser0,name=t.port"));
        assert!(after("-fsdev")
            .contains(&"local,id=vmlab_rw0,path=/work/a b,security_model=none,multidevs=remap"));
        assert!(after("-object").contains(&"memory-backend-memfd,id=vmlab_mem,size=1536M,share=on"));
        assert!(after("-device").contains(&"vhost-user-vsock-pci,chardev=vmlab_vhu"));
        assert_eq!(&args[args.len() - 2..], ["-machine", "q35"]);
    }

    #[test]
    fn kvm_keeps_the_host_cpu_and_its_string_ops() {
        let cfg = LabConfig::default();
        let args = qemu_args(&QemuPlan {
            cfg: &cfg,
            mem_mib: 512,
            accel: Accel::Kvm,
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            run_dir: Path::new("/run"),
            shares: &[],
            append: None,
        });
        let joined = args.join(OsStr::new(" ")).to_string_lossy().into_owned();
        assert!(joined.contains("-accel kvm -cpu host "), "{joined}");
        assert!(!joined.contains("clearcpuid"), "{joined}");
    }
}
