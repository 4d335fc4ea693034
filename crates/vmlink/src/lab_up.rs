//! `vmlink lab up|down|ls`: persistent lab guests in the background, reachable as `lab:NAME`.
//!
//! Each guest has a state directory `STATE/NAME/` (STATE is `$VMLINK_LAB_STATE`, else
//! `$XDG_RUNTIME_DIR/vmlink/lab`, else `/tmp/vmlink-lab-$UID`) holding its sockets and a
//! `target` file: one line, the TARGET through which its agent is reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::os::unix::fs::DirBuilderExt;

use anyhow::Context;

use crate::target::{valid_lab_name, Target};

/// The directory that holds every lab guest's state directory.
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("VMLINK_LAB_STATE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("vmlink/lab");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/vmlink-lab-{uid}"))
}

/// The TARGET recorded for lab guest `name`.
pub fn lookup(name: &str) -> anyhow::Result<Target> {
    anyhow::ensure!(valid_lab_name(name), "invalid lab guest name {name:?}");
    let file = state_root().join(name).join("target");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no lab guest named {name} (no {}); start one with `vmlink lab up {name}`, \
             list them with `vmlink lab ls`",
            file.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    text.trim()
        .parse::<Target>()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{} is corrupt", file.display()))
}

/// `vmlink lab up`.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// The guest's name (1-32 of A-Z a-z 0-9 - _); reach it as lab:NAME.
    name: String,
    /// How the host reaches the agent. serial: virtio-serial ports org.vmlink.ctl and
    /// org.vmlink.data through a bridge. hvsock: vhost-user-vsock-pci served by vmlink-vhost
    /// in the supervisor (guest CID 3), the agent on vsock port 7878, reached by hybrid
    /// vsock. Neither needs vsock on the host. (No plain `vsock` channel: that would take the
    /// host kernel's vhost_vsock and an AF_VSOCK socket on the host; hvsock gives the guest
    /// the same virtio-vsock device and driver.)
    #[arg(long, value_parser = ["serial", "hvsock"], default_value = "serial")]
    channel: String,
    /// The vmlink-agent binary to run in the guest (default: the one next to this vmlink,
    /// else the agent built into vmlink).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Guest memory, QEMU syntax.
    #[arg(long, default_value = "1G")]
    mem: String,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Give up if the agent does not answer within this long.
    #[arg(long, default_value = "120s", value_parser = vmlink_transport::addr::parse_duration)]
    wait: Duration,
}

/// `vmlink lab down`.
#[derive(clap::Args, Debug)]
pub struct DownArgs {
    /// The guests to stop.
    #[arg(required_unless_present = "all")]
    names: Vec<String>,
    /// Stop every lab guest.
    #[arg(long)]
    all: bool,
}

/// `vmlink lab ls`.
#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

const PID_FILE: &str = "pid";
const TARGET_FILE: &str = "target";
const LOG_FILE: &str = "log";

fn dir_of(name: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        valid_lab_name(name),
        "lab guest name {name:?}: expected 1-32 characters of [A-Za-z0-9_-]"
    );
    Ok(state_root().join(name))
}

/// The state directory may sit in a shared /tmp: refuse one that another user made (or a
/// symlink), since its sockets give control of the guest.
fn check_owned(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    anyhow::ensure!(
        m.file_type().is_dir() && m.uid() == uid && m.mode() & 0o022 == 0,
        "{} is not a directory owned by uid {uid} and writable only by it; remove it or set \
         VMLINK_LAB_STATE",
        dir.display()
    );
    Ok(())
}

/// The supervisor's pid, if it is alive.
fn live_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// The agent command for the guest: `--agent PATH`, else the `vmlink-agent` beside this
/// program, else this program's built-in agent (`vmlink lab agent`, serial ports and qga only).
fn agent_command(given: Option<PathBuf>, channel: &str) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let sibling = exe.with_file_name("vmlink-agent");
    let p = match given {
        Some(p) => {
            anyhow::ensure!(p.is_file(), "--agent {}: no such file", p.display());
            p
        }
        None if sibling.is_file() => sibling,
        None if channel == "hvsock" => anyhow::bail!(
            "--channel hvsock needs the vmlink-agent binary (vsock): build it with \
             `cargo build --release -p vmlink-agent`, or pass --agent PATH"
        ),
        None => return Ok(vec![exe.into(), "lab".into(), "agent".into()]),
    };
    let listen = if channel == "hvsock" {
        format!("vsock-listen:any:{}", vmlink_agent::DEFAULT_PORT)
    } else {
        format!("vport:{}", vmlink_agent::DEFAULT_CTL_PORT)
    };
    Ok(vec![
        std::fs::canonicalize(&p)?.into(),
        "--listen".into(),
        listen.into(),
        "--qga".into(),
    ])
}

/// `vmlink lab agent`: the agent built into `vmlink`, for lab guests when no `vmlink-agent`
/// binary is at hand: the serial ports org.vmlink.ctl + org.vmlink.data, and qemu-ga's
/// protocol on org.qemu.guest_agent.0.
pub fn builtin_agent() -> anyhow::Result<ExitCode> {
    crate::block_on_detached(async {
        let ctl = vmlink_transport::Addr::new(vmlink_transport::Endpoint::Vport(
            vmlink_agent::DEFAULT_CTL_PORT.into(),
        ));
        let ports = vmlink_agent::SerialPorts::for_ctl(&ctl)
            .context("the control port is a vport address")?;
        eprintln!(
            "vmlink lab agent: serving virtio-serial {}",
            ports.describe()
        );
        let qga: vmlink_transport::Addr = vmlink_agent::DEFAULT_QGA_ADDR.parse()?;
        tokio::spawn(async move {
            match vmlink_agent::QgaChannel::open(&qga).await {
                Ok(ch) => {
                    vmlink_agent::serve_qga(
                        ch,
                        vmlink_agent::QgaPolicy::from_lists(None, None),
                        std::future::pending(),
                    )
                    .await
                }
                Err(e) => eprintln!("vmlink lab agent: qga: {e}"),
            }
        });
        vmlink_agent::run_all(
            Vec::new(),
            vec![ports],
            vmlink_agent::Policy::default(),
            crate::relay::shutdown_signal(),
        )
        .await?;
        Ok(ExitCode::SUCCESS)
    })?
}

/// Starts the supervisor in the background and waits until the agent answers.
pub fn up(a: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = dir_of(&a.name)?;
    if let Some(pid) = live_pid(&dir) {
        anyhow::bail!(
            "lab guest {} is already up (supervisor pid {pid}); `vmlink lab down {}` first",
            a.name,
            a.name
        );
    }
    // Fail early on a bad --agent.
    agent_command(a.agent.clone(), &a.channel)?;
    let root = state_root();
    if !root.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .with_context(|| format!("creating {}", root.display()))?;
    }
    check_owned(&root)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    check_owned(&dir)?;
    let log = std::fs::File::create(dir.join(LOG_FILE))?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "lab",
        "supervise",
        &a.name,
        "--channel",
        &a.channel,
        "--mem",
        &a.mem,
    ])
    .args(["--cpus", &a.cpus.to_string()])
    .stdin(std::process::Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    // SAFETY: setsid is async-signal-safe; the supervisor leaves our session so a
    // Ctrl-C in this terminal does not stop it.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    if let Some(agent) = &a.agent {
        cmd.arg("--agent").arg(std::fs::canonicalize(agent)?);
    }
    let mut child = cmd.spawn().context("starting the lab supervisor")?;
    let start = Instant::now();
    let target = dir.join(TARGET_FILE);
    loop {
        if target.exists() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "lab guest {} did not come up (supervisor {status}); its log:\n{}",
                a.name,
                log_tail(&dir)
            );
        }
        if start.elapsed() > a.wait {
            // SIGTERM, not SIGKILL: the supervisor then stops its QEMU too, rather than
            // leaving it running without a supervisor.
            // SAFETY: the supervisor is our child and not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let stop = Instant::now();
            while child.try_wait()?.is_none() {
                if stop.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            anyhow::bail!(
                "lab guest {}: the agent did not answer within {:?} (stopped; `vmlink lab down {}` \
                 removes what is left); the end of its log ({}):\n{}",
                a.name,
                a.wait,
                a.name,
                dir.join(LOG_FILE).display(),
                log_tail(&dir)
            );
        }
        // The supervisor writes the file once; poll it (inotify would be overkill here).
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "lab guest {} is up in {:.1} s: try `vmlink exec lab:{} -- uname -a`; stop it with `vmlink lab down {}`",
        a.name,
        start.elapsed().as_secs_f64(),
        a.name,
        a.name
    );
    Ok(ExitCode::SUCCESS)
}

/// The last lines of a lab guest's log (supervisor and guest console), for an error message.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The background process of one lab guest: QEMU, the serial bridge, the state directory.
pub fn supervise(a: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = dir_of(&a.name)?;
    let argv = agent_command(a.agent.clone(), &a.channel)?;
    std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id()))?;
    let (ctl, data, qga) = (
        dir.join("ctl.sock"),
        dir.join("data.sock"),
        dir.join("qga.sock"),
    );
    let hvsock = a.channel == "hvsock";
    let vsock_uds = dir.join("vsock.sock");
    let vhost_user = if hvsock {
        Some(start_vhost(&dir, &vsock_uds)?)
    } else {
        None
    };
    let cfg = vmlink_lab::LabConfig {
        mem: a.mem.clone(),
        cpus: a.cpus,
        timeout: None,
        vhost_user_vsock: vhost_user,
        serials: vec![
            (vmlink_agent::DEFAULT_CTL_PORT.into(), ctl.clone()),
            (vmlink_agent::DEFAULT_DATA_PORT.into(), data.clone()),
            ("org.qemu.guest_agent.0".into(), qga.clone()),
        ],
        ..vmlink_lab::LabConfig::default()
    };
    let guest = vmlink_lab::spawn(&cfg, &argv, vmlink_lab::GuestIo::Inherit)?;
    let qemu = guest.pid();
    eprintln!("vmlink: lab guest {} booting (QEMU pid {qemu})", a.name);
    let agent_sock = dir.join("agent.sock");
    let result = crate::runtime()?.block_on(async {
        let stop = crate::relay::shutdown_signal();
        let mut stop = std::pin::pin!(stop);
        let listener = crate::bridge::bind_unix(&agent_sock)?;
        // The guest may end by itself (its agent exited, a crash): then so does the supervisor.
        let mut ended = tokio::task::spawn_blocking(move || guest.wait());
        let bridge = tokio::spawn(vmlink_agent::mux::serve_bridge(
            ctl,
            Some(data),
            listener,
            std::future::pending(),
        ));
        let target: Target = if hvsock {
            format!(
                "hvsock:{}:{}",
                vsock_uds.display(),
                vmlink_agent::DEFAULT_PORT
            )
        } else {
            format!("unix:{}", agent_sock.display())
        }
        .parse()
        .map_err(anyhow::Error::msg)?;
        let Target::Agent(addr) = &target else {
            unreachable!("a unix: or hvsock: address is an agent target");
        };
        let ready = async {
            loop {
                let ok = async {
                    let c = vmlink_agent::client::Client::connect(addr).await.ok()?;
                    c.ping().await.ok()
                };
                if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), ok).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let stop_qemu = || {
            // SAFETY: QEMU is our child (not yet reaped: `ended` reaps it), so the pid is ours.
            unsafe { libc::kill(qemu as i32, libc::SIGKILL) };
        };
        tokio::select! {
            _ = ready => {}
            _ = &mut stop => { bridge.abort(); stop_qemu(); return Ok(ended.await?) }
            out = &mut ended => { bridge.abort(); return Ok(out?) }
        }
        let tmp = dir.join("target.tmp");
        std::fs::write(&tmp, format!("{target}\n"))?;
        std::fs::rename(&tmp, dir.join(TARGET_FILE))?;
        eprintln!("vmlink: lab guest {} is up at {target}", a.name);
        let out = tokio::select! {
            _ = &mut stop => { stop_qemu(); ended.await? }
            out = &mut ended => out?,
        };
        bridge.abort();
        Ok::<_, anyhow::Error>(out)
    });
    let _ = std::fs::remove_file(dir.join(TARGET_FILE));
    let _ = std::fs::remove_file(dir.join(PID_FILE));
    for s in [
        "ctl.sock",
        "data.sock",
        "qga.sock",
        "agent.sock",
        "vsock.sock",
        "vhost-user.sock",
    ] {
        let _ = std::fs::remove_file(dir.join(s));
    }
    match &result {
        Ok(Ok(out)) => eprintln!("vmlink: lab guest {} stopped (status {})", a.name, out.code),
        Ok(Err(e)) => eprintln!("vmlink: lab guest {} failed: {e}", a.name),
        Err(e) => eprintln!("vmlink: lab guest {}: {e:#}", a.name),
    }
    result.map(|_| ExitCode::SUCCESS)
}

/// Starts vmlink-vhost's device for guest CID 3 on a thread of this process; returns its
/// vhost-user socket once it listens.
fn start_vhost(dir: &Path, uds: &Path) -> anyhow::Result<PathBuf> {
    let socket = dir.join("vhost-user.sock");
    let vm = vmlink_vhost::config::parse_vm_spec(&format!(
        "guest-cid=3,socket={},uds-path={}",
        socket.display(),
        uds.display()
    ))?;
    let counters = std::sync::Arc::new(vmlink_vhost::counters::Counters::default());
    let device = vmlink_vhost::device::Device::new(
        vmlink_vhost::serve::device_config(&vm),
        counters.clone(),
    )?;
    std::thread::Builder::new()
        .name("vhost-user-vsock".into())
        .spawn(move || {
            if let Err(e) = vmlink_vhost::serve::serve_vm(&vm, device, counters, None, None) {
                eprintln!("vmlink: vhost-user-vsock backend: {e}");
            }
        })?;
    // The backend creates its socket when it starts listening; nothing else signals it.
    let start = Instant::now();
    while !socket.exists() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the vhost-user-vsock backend did not listen on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(socket)
}

/// Stops guests.
pub fn down(a: DownArgs) -> anyhow::Result<ExitCode> {
    let names = if a.all { list()? } else { a.names };
    let mut failed = false;
    for name in names {
        let dir = dir_of(&name)?;
        if !dir.exists() {
            eprintln!("vmlink: no lab guest named {name}");
            failed = true;
            continue;
        }
        if let Some(pid) = live_pid(&dir) {
            // SAFETY: sending SIGTERM to the supervisor we started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let start = Instant::now();
            while live_pid(&dir).is_some() && start.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(pid) = live_pid(&dir) {
                // SAFETY: as above; it did not stop in time.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("lab guest {name} is down");
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn list() -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    match std::fs::read_dir(state_root()) {
        Ok(rd) => {
            for e in rd.flatten() {
                if let Some(n) = e.file_name().to_str() {
                    if valid_lab_name(n) && e.path().join(LOG_FILE).is_file() {
                        names.push(n.to_string());
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("listing lab guests"),
    }
    names.sort();
    Ok(names)
}

/// Lists guests.
pub fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let names = list()?;
    if !a.json {
        println!("{:<20} {:<8} {:<8} TARGET", "NAME", "STATE", "PID");
    }
    for name in names {
        let dir = state_root().join(&name);
        let pid = live_pid(&dir);
        let target = std::fs::read_to_string(dir.join(TARGET_FILE))
            .map(|t| t.trim().to_string())
            .ok();
        let state = match (pid, &target) {
            (Some(_), Some(_)) => "up",
            (Some(_), None) => "booting",
            (None, _) => "dead",
        };
        if a.json {
            let v = serde_json::json!({
                "name": name, "state": state, "pid": pid, "target": target,
                "log": dir.join(LOG_FILE),
            });
            println!("{v}");
        } else {
            println!(
                "{:<20} {:<8} {:<8} {}",
                name,
                state,
                pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                target.unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
