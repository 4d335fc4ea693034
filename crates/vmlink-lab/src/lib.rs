//! Throwaway QEMU guests for end-to-end tests: boot a fresh Linux guest
//! under TCG, run one command in it, get its status and output back.
//!
//! ```no_run
//! use vmlink_lab::{GuestIo, LabConfig};
//! let cfg = LabConfig { vsock_loopback: true, ..LabConfig::default() };
//! let out = vmlink_lab::run(&cfg, &["uname".into(), "-r".into()], GuestIo::Capture)?;
//! assert_eq!(out.code, 0);
//! # Ok::<(), vmlink_lab::LabError>(())
//! ```
//!
//! The guest sees the host's `/` read-only under a tmpfs overlay (it may
//! write anywhere; the writes vanish with it) and the current directory,
//! plus [`LabConfig::shares`], read-write at the same paths. So host
//! programs, including the caller's own test binary, run there unchanged.
//! The command runs as root, in the caller's working directory, with the
//! caller's environment (less session variables such as `SSH_*`, `PWD`,
//! `DISPLAY`) plus [`LabConfig::env`] and `VMLINK_LAB_GUEST=1`, stdin
//! `/dev/null`. It is looked up in `PATH` and exec'd without a shell. Its
//! status is [`Outcome::code`]; 124 means the timeout stopped the guest,
//! 125 that the guest could not run it. This is the project's Rust version
//! of the shell recipe `run-guest`, with the same semantics.
//!
//! # How a guest boots
//!
//! [`prepare`] (called by [`run`] and [`spawn`]) installs what is missing
//! on a Debian 12 host (`qemu-system-x86`, `busybox-static`,
//! `linux-image-amd64` with `tiny-initramfs`, `cpio`, `xz-utils`; see
//! [`NO_INSTALL_ENV`]), takes the newest `/boot/vmlinuz-*` that has
//! modules, and caches two files under `$VMLINK_LAB_CACHE` or
//! `~/.cache/vmlink-lab` (written to a temporary name and renamed, so
//! concurrent runs are safe):
//!
//! * the kernel's XZ payload unpacked into a plain ELF `vmlinux`, which QEMU
//!   boots through the PVH entry point (`CONFIG_PVH=y`) with qboot as
//!   firmware. Booting the bzImage instead would make the guest decompress
//!   itself, ~3 s under TCG.
//! * the first half of the initramfs, a cpio archive this crate writes
//!   itself (no staging directory, so `/dev/console` needs no root):
//!   busybox, the stage scripts, and the twelve modules behind
//!   `virtio_pci`, `virtio_console`, `9pnet_virtio`, `9p` and `overlay`.
//!
//! Each guest then gets a run directory under `$TMPDIR` with the initramfs
//! (the cached archive plus a small second archive: the mount table, the
//! command as a shell script, extra modules and a `modules.dep`) and four
//! FIFOs for QEMU's `file` chardevs: the command's stdout and stderr and its
//! status each have a virtio-serial port (`vmlab.stdout`, `vmlab.stderr`,
//! `vmlab.ret`), and the console is the fourth. The lab opens the read ends
//! before QEMU starts (QEMU's open of a FIFO would otherwise block), and
//! one thread polls them all. No state is polled on a timer: the status
//! and QEMU's exit arrive as channel messages, and `Guest::wait` sleeps in
//! `recv_timeout` until the next deadline (the timeout, or 5 s after the
//! status, when a guest that did not shut down is killed). Serial sockets
//! are awaited with inotify. QEMU is started by a thread that lives until
//! it exits, with `PR_SET_PDEATHSIG`, so it cannot outlive a killed test
//! process; dropping a [`Guest`] kills it too.
//!
//! In the guest, stage 1 (PID 1 in the initramfs) loads the modules with
//! two `modprobe`s running in parallel (virtio on one vCPU, 9p and overlay
//! on the other, then `9pnet_virtio`), mounts everything with one
//! `mount -a` (host root over 9p with `cache=loose`, the overlay with its
//! upper directory on the initramfs, `/run`, `/dev`, `/proc`, `/sys`, the
//! shares over 9p with `cache=mmap`), fills `/dev` with one `cp -a`, mounts
//! devpts and `/dev/shm`, moves the new root to `/` and starts stage 2.
//! Stage 2 (PID 1 in the new root) sets the hostname `vmlab`, finds the
//! ports in sysfs and links `/dev/virtio-ports/NAME` for the caller's
//! [`LabConfig::serials`] (there is no udev), loads drivers for virtio
//! devices that still have none through the host's `modprobe` by modalias
//! (e.g. devices added with [`LabConfig::qemu_args`]), runs the command in
//! a subshell, writes its status to `vmlab.ret` and reboots; QEMU runs with
//! `-no-reboot`, so it exits.
//!
//! # Where the time goes
//!
//! `run(["true"])` takes about 3.4 s here (2 cores, TCG, median; the shell
//! recipe about 5.9 s in the same batch; `TIMINGS.md` has the runs). From
//! the guest kernel's timestamps and the lab's own (`verbose` prints them):
//!
//! | step | time |
//! |---|---|
//! | QEMU start-up, loading the 66 MB vmlinux, firmware | ~0.1 s |
//! | kernel entry to `/init` (`-smp 2`) | 1.8-2.3 s |
//! | stage 1: modules | 0.3-0.6 s |
//! | stage 1: mounts; stage 2 | ~0.2 s |
//! | the command (`/usr/bin/true`, dynamically linked, read over 9p) | ~0.1 s |
//! | status to QEMU's exit (`reboot -f`) | ~0.05 s |
//!
//! Under TCG every process costs: a busybox applet ~15 ms (fork), a
//! dynamically linked host program ~70-130 ms. So the stages use shell
//! builtins wherever they can and batch the rest. What the measured
//! changes saved (medians of interleaved runs on a machine shared with
//! other builds; treat as ±0.1 s):
//!
//! * `cryptomgr.notests` ~0.35 s (crypto self-tests), and
//!   `initcall_blacklist=init_kprobe_trace,crypto_kdf108_init` ~0.2 s
//!   (kprobe-event files; a self-test);
//! * `rodata=off` ~0.2 s: no read-only remapping of kernel and module text,
//!   whose TLB flushes are costly across TCG vCPUs;
//! * `reboot -f` instead of `poweroff -f` ~0.25 s from status to exit;
//! * loading modules in two parallel chains ~0.3 s;
//! * hiding the modules' `_ftrace_eval_map` sections ~0.2 s: for each
//!   module with trace-event enum maps (9pnet, netfs, fscache) the kernel
//!   rescans every trace event's format. The section is renamed in place;
//!   that breaks the module signature, which is therefore stripped, so the
//!   guest kernel loads unsigned modules and is tainted `E` (harmless; it
//!   does not enforce signatures);
//! * batching stage 1 and 2 (about ten processes instead of the
//!   recipe's forty-odd; no `busybox --install`), and running stage 2 from
//!   the initramfs's busybox (a hard link, reached as `/run/vmlab/busybox`,
//!   whose code TCG has already translated): not measured on their own;
//!   with the module changes above they take `/init`-to-command from the
//!   recipe's ~1.6 s to ~0.6 s;
//! * resolving `PATH` on the host and `exec -a NAME /full/path` instead of
//!   going through `/usr/bin/env` ~0.1 s (one dynamic exec less).
//!
//! * `init_on_alloc=0` ~0.2-0.7 s (4 interleaved pairs, 2.7-3.4 s against
//!   2.9-4.1 s): Debian's kernel clears every page it allocates, and under
//!   TCG that clearing is one of the costliest things a guest does. It also
//!   makes vsock 1.5-2.5x faster in a lab guest (docs/benchmarks.md).
//!
//! Under TCG only, the guest CPU is `max,-erms,-fsrm` and the kernel gets
//! `clearcpuid=rep_good`: TCG runs `rep movs`/`rep stos` one element per
//! turn, so copies to and from user space and `memcpy` are much faster as
//! the kernel's unrolled loops, and glibc's `memcpy` as vector loops. Not
//! for boot time (`lab run -- true`, 4 alternating pairs: 2.10-2.84 s
//! against 2.50-2.89 s before): it makes tmpfs reads ~3x faster, raw vsock
//! ~1.7x over hybrid vsock and 2.5-3.6x over vsock loopback
//! (docs/benchmarks.md, "String instructions under TCG"). `clearcpuid`
//! taints the kernel (`CPU_OUT_OF_SPEC`); under KVM neither is used.
//!
//! `tsc=reliable` is there for the guest's clocks rather than speed: time
//! reads go through the vDSO instead of trapping to the HPET
//! (`perf_counter` steps of 1.5 µs instead of 7-12 µs).
//!
//! Tried and left out: `acpi=off` (boots ~0.1 s faster but leaves the guest
//! on the jiffies clocksource even with `tsc=reliable`), other `-cpu` models
//! (no measurable change), `nokaslr`, dropping LSMs, `quiet` (the log level
//! is already 4).
//!
//! # Gotchas that shaped it
//!
//! From the recipe's list:
//!
//! * The host's `/dev/kvm` comes from `kvm_pvm`, which only boots PVM
//!   kernels: [`Accel::Auto`] picks KVM only with `kvm_intel`/`kvm_amd` and
//!   no `kvm_pvm` (the KVM path is untested here).
//! * bookworm-backports' `qemu-utils` 10.x breaks QEMU 7.2's packages: the
//!   installer pins `qemu-utils` to `qemu-system-x86`'s version. Installing
//!   `tiny-initramfs` with the kernel keeps `initramfs-tools`, udev and a
//!   systemd upgrade out.
//! * busybox runs its own applets before `PATH` (so the command is exec'd by
//!   full path), and there is no udev (so the lab makes the
//!   `/dev/virtio-ports` links and loads drivers by modalias itself).
//! * `pci=noacpi` and qboot make the kernel log harmless "failed to assign"
//!   lines for the virtio devices' legacy I/O BARs.
//! * With `acpi=off`, `poweroff -f` cannot end QEMU; `reboot -f` with
//!   `-no-reboot` always can.
//! * A guest read on a virtio-serial port returns EOF until a host client is
//!   connected; writes block until one is, and return once QEMU has the
//!   data, so all output is in when the status arrives. [`spawn`] returns
//!   once QEMU listens on the sockets, so the host can connect first.
//! * vhost-user needs guest RAM the backend can map:
//!   [`LabConfig::vhost_user_vsock`] backs RAM with a shared memfd.
//! * Wrappers (pyenv shims, `cargo test`) are slow under TCG: run
//!   interpreters and test binaries directly.
//! * The root's 9p `cache=loose` is not coherent: host files changed while
//!   a guest runs may look stale there, except in the read-write shares.
//!
//! And new ones:
//!
//! * The initramfs has no `/proc`, so busybox cannot re-exec itself through
//!   `/proc/self/exe`: stage 1 calls applets as `/bin/busybox APPLET`. It
//!   needs `/dev/null` for background jobs, and busybox `modprobe` cannot
//!   see which modules are loaded, so the late phase's `modules.dep` leaves
//!   out the early phases' modules.
//! * Without udev and with `mount -a` there is no natural place for
//!   `/dev/pts`, `/dev/shm` and `/dev/fd`: they come from a template
//!   directory in the initramfs, copied in one `cp -a`.
//! * The parent-death signal fires when the *thread* that forked exits:
//!   QEMU is forked by the waiter thread, which lives exactly as long.
//! * The waiter waits with `WNOWAIT`, so QEMU's pid stays reserved until the
//!   lab has stopped signalling it.
//!
//! # Environment
//!
//! * [`NO_INSTALL_ENV`] (`VMLINK_LAB_NO_INSTALL=1`): never run `apt-get`.
//! * [`CACHE_ENV`] (`VMLINK_LAB_CACHE`): the cache directory.
//! * [`QEMU_ENV`] (`VMLINK_LAB_QEMU`): the program run in place of
//!   `qemu-system-x86_64` (another build, or a wrapper); see [`LabConfig::qemu`].
//! * [`APPEND_ENV`] (`VMLINK_LAB_APPEND`): extra kernel command line, e.g.
//!   `loglevel=7` with [`LabConfig::verbose`] to debug a boot.
//! * [`GUEST_ENV`] (`VMLINK_LAB_GUEST=1`): set for the guest command; see
//!   [`in_guest`].

mod cache;
mod config;
mod cpio;
mod deps;
mod error;
mod guest;
mod initramfs;
mod shell;
pub mod testing;
mod vmlinux;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use config::{Accel, GuestIo, LabConfig};
pub use deps::{CACHE_ENV, NO_INSTALL_ENV, QEMU_ENV};
pub use error::LabError;
pub use guest::{Guest, APPEND_ENV};
pub use shell::GUEST_ENV;

use initramfs::ModuleDb;

/// How a guest command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The command's exit status; 124 when the timeout stopped the guest;
    /// 125 when the guest could not run the command (QEMU error, boot
    /// failure, killed).
    pub code: i32,
    /// The command's stdout ([`GuestIo::Capture`]; empty otherwise).
    pub stdout: Vec<u8>,
    /// The command's stderr ([`GuestIo::Capture`]; empty otherwise), plus
    /// the lab's own explanation when the code is 124 or 125.
    pub stderr: Vec<u8>,
    /// From starting QEMU to its exit.
    pub elapsed: Duration,
}

impl Outcome {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// A host ready to boot guests: kernel and initramfs found or built.
#[derive(Debug, Clone)]
pub struct Prepared {
    kernel_version: String,
    boot_kernel: PathBuf,
    base_initramfs: PathBuf,
    accel: Accel,
    modules: Arc<ModuleDb>,
}

impl Prepared {
    /// The guest kernel's release, e.g. `6.1.0-56-amd64`.
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    /// The image QEMU boots: the cached, unpacked vmlinux (PVH), or the
    /// bzImage when it could not be unpacked.
    pub fn kernel(&self) -> &Path {
        &self.boot_kernel
    }

    /// The cached part of the initramfs.
    pub fn initramfs(&self) -> &Path {
        &self.base_initramfs
    }

    /// The accelerator guests will use ([`Accel::Auto`] resolved).
    pub fn accel(&self) -> Accel {
        self.accel
    }
}

/// Per-process memo of the expensive parts of [`prepare`].
#[derive(Debug)]
struct Memo {
    kernel_image: PathBuf,
    kernel_mtime: i128,
    boot_kernel: PathBuf,
    base_initramfs: PathBuf,
    modules: Arc<ModuleDb>,
}

static MEMO: Mutex<Option<Memo>> = Mutex::new(None);
static PACKAGES_OK: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// The extra modules `cfg` asks for, by name.
fn extra_modules(cfg: &LabConfig) -> Vec<String> {
    let mut m = Vec::new();
    if cfg.vsock_loopback {
        m.push("vsock_loopback".to_owned());
    }
    if cfg.vhost_user_vsock.is_some() {
        // The guest driver for vhost-user-vsock-pci: no udev to load it.
        m.push("vmw_vsock_virtio_transport".to_owned());
    }
    m.extend(cfg.modules.iter().cloned());
    m
}

/// Installs missing packages, finds the kernel, unpacks it and builds the
/// cached initramfs. [`run`] and [`spawn`] call it; calling it first (e.g.
/// once before a test suite) takes the first-run cost out of the first guest.
pub fn prepare(cfg: &LabConfig) -> Result<Prepared, LabError> {
    config::validate(cfg, None)?;
    let cache_dir = deps::cache_dir();
    if PACKAGES_OK.get().is_none() {
        deps::ensure_packages(&cache_dir)?;
        let _ = PACKAGES_OK.set(());
    }
    let kernel = deps::find_kernel().ok_or(LabError::NoKernel)?;
    let meta =
        std::fs::metadata(&kernel.image).map_err(|e| LabError::io("read", &kernel.image, e))?;
    let mtime = cache::mtime_ns(&meta);

    let mut memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = memo.as_ref().is_some_and(|m| {
        m.kernel_image == kernel.image
            && m.kernel_mtime == mtime
            && m.boot_kernel.is_file()
            && m.base_initramfs.is_file()
    });
    if !fresh {
        std::fs::create_dir_all(&cache_dir)
            .map_err(|e| LabError::io("create the cache directory", &cache_dir, e))?;
        let modules = Arc::new(ModuleDb::load(&kernel.version)?);
        let boot_kernel =
            vmlinux::vmlinux(&kernel, &cache_dir)?.unwrap_or_else(|| kernel.image.clone());
        let base_initramfs = initramfs::base_image(&modules, &cache_dir)?;
        *memo = Some(Memo {
            kernel_image: kernel.image.clone(),
            kernel_mtime: mtime,
            boot_kernel,
            base_initramfs,
            modules,
        });
    }
    let m = memo.as_ref().ok_or(LabError::NoKernel)?;
    // Unknown module names fail here, on the host, with a clear message.
    m.modules.closure(&extra_modules(cfg), &HashSet::new())?;
    Ok(Prepared {
        kernel_version: kernel.version,
        boot_kernel: m.boot_kernel.clone(),
        base_initramfs: m.base_initramfs.clone(),
        accel: deps::choose_accel(cfg.accel),
        modules: Arc::clone(&m.modules),
    })
}

/// Boots a guest, runs `argv` in it and waits for the outcome.
pub fn run(cfg: &LabConfig, argv: &[OsString], io: GuestIo) -> Result<Outcome, LabError> {
    spawn(cfg, argv, io)?.wait()
}

/// A fresh directory for one guest's files.
fn make_run_dir() -> Result<PathBuf, LabError> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for _ in 0..100 {
        let dir = base.join(format!(
            "vmlink-lab.{}.{}.{:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(LabError::io("create the run directory", dir, e)),
        }
    }
    Err(LabError::io(
        "create the run directory",
        base,
        std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    ))
}

/// A share directory, absolute and resolved.
fn share_path(option: &str, p: &Path) -> Result<PathBuf, LabError> {
    let real = std::fs::canonicalize(p)
        .map_err(|e| LabError::bad(option, format!("{}: {e}", p.display())))?;
    if !real.is_dir() {
        return Err(LabError::bad(
            option,
            format!("{} is not a directory", p.display()),
        ));
    }
    if real == Path::new("/") {
        return Err(LabError::bad(option, "/ cannot be shared read-write"));
    }
    Ok(real)
}

/// Boots a guest running `argv` and returns once it is under way and
/// QEMU listens on the sockets of `cfg.serials`.
pub fn spawn(cfg: &LabConfig, argv: &[OsString], io: GuestIo) -> Result<Guest, LabError> {
    let mem_mib = config::validate(cfg, Some(argv))?;
    let prepared = prepare(cfg)?;

    let cwd =
        std::env::current_dir().map_err(|e| LabError::io("find the current directory", ".", e))?;
    let mut shares = Vec::new();
    if cfg.share_cwd && cwd != Path::new("/") {
        shares.push(cwd.clone());
    }
    for (i, s) in cfg.shares.iter().enumerate() {
        shares.push(share_path(&format!("shares[{i}]"), s)?);
    }
    let shares = initramfs::order_shares(shares);

    let mut serial_paths = Vec::new();
    for (i, (_, path)) in cfg.serials.iter().enumerate() {
        let path = if path.is_absolute() {
            path.clone()
        } else {
            cwd.join(path)
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                // A stale socket from an earlier run; QEMU would replace it
                // too, but it must be gone for the wait below.
                std::fs::remove_file(&path)
                    .map_err(|e| LabError::io("remove the stale socket", &path, e))?;
            }
            Ok(_) => {
                return Err(LabError::bad(
                    format!("serials[{i}]"),
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(_) => {}
        }
        if !path.parent().is_some_and(Path::is_dir) {
            return Err(LabError::bad(
                format!("serials[{i}]"),
                format!("the directory of {} does not exist", path.display()),
            ));
        }
        serial_paths.push(path);
    }
    if let Some(sock) = &cfg.vhost_user_vsock {
        let is_socket = std::fs::metadata(sock)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false);
        if !is_socket {
            return Err(LabError::bad(
                "vhost_user_vsock",
                format!(
                    "{} is not a socket: start the vhost-user backend first",
                    sock.display()
                ),
            ));
        }
    }

    let env = shell::guest_env(std::env::vars_os(), &cfg.env);
    let path_var = env
        .iter()
        .find(|(n, _)| n == "PATH")
        .map(|(_, v)| v.as_os_str());
    let program = shell::resolve_program(&argv[0], path_var, &cwd);
    let script = shell::command_script(&env, &cwd, argv, program.as_deref());

    let extra = extra_modules(cfg);
    let run_archive = initramfs::run_archive(
        &prepared.modules,
        &initramfs::RunFiles {
            shares: &shares,
            extra_modules: &extra,
            port_names: cfg.serials.iter().map(|(n, _)| n.as_str()).collect(),
            init: cfg.init,
            command_script: script,
        },
    )?;

    let run_dir = make_run_dir()?;
    let result = (|| {
        let initrd = run_dir.join("initrd.cpio");
        let mut image = std::fs::read(&prepared.base_initramfs)
            .map_err(|e| LabError::io("read", &prepared.base_initramfs, e))?;
        image.extend_from_slice(&run_archive);
        std::fs::write(&initrd, &image).map_err(|e| LabError::io("write", &initrd, e))?;

        let serials_abs: Vec<(String, PathBuf)> = cfg
            .serials
            .iter()
            .zip(&serial_paths)
            .map(|((n, _), p)| (n.clone(), p.clone()))
            .collect();
        let cfg_abs = LabConfig {
            serials: serials_abs,
            ..cfg.clone()
        };
        let args = guest::qemu_args(&guest::QemuPlan {
            cfg: &cfg_abs,
            mem_mib,
            accel: prepared.accel,
            kernel: &prepared.boot_kernel,
            initrd: &initrd,
            run_dir: &run_dir,
            shares: &shares,
            append: std::env::var(APPEND_ENV)
                .ok()
                .filter(|s| !s.trim().is_empty()),
        });
        let program = deps::qemu_program(cfg.qemu.as_deref());
        if cfg.verbose {
            eprintln!(
                "vmlink-lab: accel={:?} kernel={} ({})",
                prepared.accel,
                prepared.boot_kernel.display(),
                prepared.kernel_version
            );
            let words: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            eprintln!("vmlink-lab: {} {}", program.display(), words.join(" "));
        }
        let mut cmd = std::process::Command::new(&program);
        cmd.args(&args);
        Ok(cmd)
    })();
    let cmd = match result {
        Ok(cmd) => cmd,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&run_dir);
            return Err(e);
        }
    };
    let keep = run_dir.clone();
    Guest::start(cmd, run_dir, &serial_paths, cfg.timeout, io, cfg.verbose).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&keep);
    })
}

/// True inside a lab guest: the lab sets `VMLINK_LAB_GUEST=1` in the guest
/// command's environment.
pub fn in_guest() -> bool {
    std::env::var_os(GUEST_ENV).is_some_and(|v| v == "1")
}
