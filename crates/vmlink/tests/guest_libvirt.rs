//! libvirt drives a lab guest wired as docs/guest-setup.md tells users to wire theirs.
//!
//! The lab boots its guest through `tests/libvirt/qemu-via-libvirt.sh`, which turns the lab's
//! QEMU arguments into a libvirt domain: the guest's virtio-serial ports are the `<channel>`
//! elements of the guide (`org.vmlink.ctl`, `org.vmlink.data`, `org.qemu.guest_agent.0`), so
//! libvirt, not the lab, creates them. libvirt's embedded QEMU driver runs it
//! (`qemu:///embed?root=DIR`: no daemon, all state under DIR), and every `virsh` here is a real
//! libvirt client of that domain. In the guest runs one `vmlink-agent --qga`, as the guide
//! says. Then:
//! * libvirt's own agent commands (`virsh guestinfo`, `domifaddr --source agent`, `domtime`,
//!   `guestvcpus`, `domfsfreeze`/`domfsthaw`, `qemu-agent-command`) talk qemu-ga's protocol to
//!   vmlink-agent and get answers libvirt understands;
//! * `vmlink serial-bridge` over the two sockets libvirt made, then `exec` and `cp` both ways.
//!
//! The host-only test checks every XML snippet of the guide against libvirt's schema
//! (`virt-xml-validate`) and lets libvirt define a domain with them (`virsh define`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use vmlink_lab::{GuestIo, LabConfig};

use common::{run_vmlink as vmlink, Bridge};

const WRAPPER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/libvirt/qemu-via-libvirt.sh"
);
const GUIDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/guest-setup.md");
const DOMAIN: &str = "vmlab";
/// Where the guest mounts its one block filesystem (ext4 on a brd RAM disk).
const FS_DIR: &str = "/run/fs";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fails, naming the install step, when libvirt's tools are missing: the test is not skipped.
fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is not installed: run scripts/install-deps.sh (libvirt-clients, \
         libvirt-daemon-driver-qemu)"
    );
}

/// libvirt's embedded QEMU driver with all its state under one directory. One process at a
/// time may load it, so each `virsh` waits for the one before to end.
struct Libvirt {
    root: PathBuf,
}

impl Libvirt {
    /// A fresh root whose qemu.conf runs QEMU as the caller (the lab's files are the caller's),
    /// with no relabelling or namespaces.
    fn new(root: PathBuf) -> Libvirt {
        std::fs::create_dir_all(root.join("etc")).expect("libvirt root");
        std::fs::write(
            root.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\n\
             security_driver = \"none\"\nnamespaces = []\nstdio_handler = \"file\"\n",
        )
        .expect("qemu.conf");
        Libvirt { root }
    }

    /// The ends of libvirt's logs (QEMU's stderr, libvirt's errors), for a failure's report.
    fn logs(&self) -> String {
        let mut out = String::new();
        for f in [format!("log/qemu/{DOMAIN}.log"), "libvirt.log".into()] {
            let body = std::fs::read_to_string(self.root.join(&f)).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(20).collect();
            out.push_str(&format!("--- {f} (last lines)\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn uri(&self) -> String {
        format!("qemu:///embed?root={}", self.root.display())
    }

    /// `virsh ARGS` on this root, once no other virsh (the wrapper's `create`) holds it:
    /// both take `ROOT/virsh.lock` with flock(1) first.
    /// Each has a deadline: a virsh that hangs (a guest agent that never answers) is killed.
    fn virsh(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-s", "KILL", "180", "flock", "-w", "120"])
            .arg(self.root.join("virsh.lock"))
            .arg("virsh")
            .env(
                "LIBVIRT_LOG_OUTPUTS",
                format!("3:file:{}", self.root.join("libvirt.log").display()),
            )
            .args(["-c", &self.uri()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run virsh")
    }

    /// The virsh command line `cmd` (virsh's own quoting) on the running domain. Each virsh
    /// loads the driver afresh, and the driver reconnects to the domain (its monitor, its
    /// agent) in a thread that holds the domain's job. Agent commands and `destroy` do not wait
    /// for that job, so a monitor command runs first, in the same virsh, which does.
    fn domain_cmd(&self, cmd: &str) -> Output {
        self.virsh(&[&format!(
            "qemu-monitor-command {DOMAIN} --hmp 'info status' ; {cmd}"
        )])
    }

    /// [`Libvirt::domain_cmd`], which must succeed; its stdout without the monitor's line.
    fn agent(&self, cmd: &str) -> String {
        let out = self.domain_cmd(cmd);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "virsh {cmd}: {stdout}{}",
            text(&out.stderr)
        );
        let (first, rest) = stdout.split_once('\n').unwrap_or((&stdout, ""));
        assert_eq!(first.trim(), "VM status: running", "{stdout}");
        rest.to_owned()
    }

    /// `virsh ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {}: {}{}",
            args.join(" "),
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

/// The value of `key : value` in virsh's two-column output.
fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// Waits until the agent answers through the bridge (each ping waits for its answer), as long
/// as libvirt says the domain runs.
fn wait_ready(lv: &Libvirt, target: &str, bridge: &mut Bridge) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let out = vmlink(&["ping", target]);
        if out.status.success() {
            return;
        }
        if let Ok(Some(status)) = bridge.0.try_wait() {
            panic!("vmlink serial-bridge exited: {status}");
        }
        let state = lv.virsh(&["domstate", DOMAIN]);
        assert_eq!(
            text(&state.stdout).trim(),
            "running",
            "the domain is not running: {}",
            text(&state.stderr)
        );
        assert!(
            Instant::now() < deadline,
            "{target} never answered: {}",
            text(&out.stderr)
        );
    }
}

fn checks(lv: &Libvirt, work: &Path, ctl: &Path, data: &Path) {
    // The guide's serial pair, through the sockets libvirt created.
    let bridge_sock = work.join("agent.sock");
    let mut bridge = Bridge::start(ctl, Some(data), &bridge_sock, false);
    let target = format!("unix:{}", bridge_sock.display());
    wait_ready(lv, &target, &mut bridge);

    // libvirt runs its own agent commands against vmlink-agent --qga. `guestinfo` with no
    // option asks for everything, guest-get-disks included, which vmlink-agent does not serve:
    // libvirt leaves the disks out and reports the rest.
    let out = lv.agent(&format!(
        "qemu-agent-command {DOMAIN} '{{\"execute\":\"guest-ping\"}}'"
    ));
    assert_eq!(out.trim(), r#"{"return":{}}"#);
    let out = lv.agent(&format!(
        "qemu-agent-command {DOMAIN} '{{\"execute\":\"guest-info\"}}'"
    ));
    let info: serde_json::Value = serde_json::from_str(&out).expect("guest-info JSON");
    assert_eq!(
        info["return"]["version"],
        env!("CARGO_PKG_VERSION"),
        "{info}"
    );

    let out = lv.agent(&format!("guestinfo {DOMAIN}"));
    assert_eq!(field(&out, "hostname"), Some("vmlab"), "{out}");
    assert_eq!(field(&out, "os.id"), Some("debian"), "{out}");
    assert!(
        field(&out, "os.kernel-release").is_some_and(|v| !v.is_empty()),
        "{out}"
    );
    assert!(field(&out, "timezone.offset").is_some(), "{out}");
    assert!(field(&out, "user.count").is_some(), "{out}");
    assert_eq!(field(&out, "fs.count"), Some("1"), "{out}");
    assert_eq!(field(&out, "fs.0.mountpoint"), Some(FS_DIR), "{out}");
    assert_eq!(field(&out, "fs.0.fstype"), Some("ext4"), "{out}");
    assert_eq!(field(&out, "fs.0.name"), Some("ram0"), "{out}");
    assert_eq!(field(&out, "if.0.name"), Some("lo"), "{out}");
    assert_eq!(field(&out, "if.0.addr.0.addr"), Some("127.0.0.1"), "{out}");
    // No guest-get-disks: libvirt reports no disks (a stock qemu-ga would list /dev/ram0).
    assert_eq!(field(&out, "disk.count"), None, "{out}");

    let out = lv.agent(&format!("domifaddr {DOMAIN} --source agent"));
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().next() == Some("lo") && l.contains("127.0.0.1/8")),
        "{out}"
    );

    let out = lv.agent(&format!("domtime {DOMAIN}"));
    let guest: i64 = field(&out, "Time")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("domtime: {out}"));
    let host = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!((guest - host).abs() < 120, "guest {guest}, host {host}");

    let out = lv.agent(&format!("guestvcpus {DOMAIN}"));
    assert_eq!(field(&out, "vcpus"), Some("0-1"), "{out}");
    assert_eq!(field(&out, "online"), Some("0-1"), "{out}");

    // The RAM disk's ext4 is the guest's one block filesystem: listed, frozen, thawed.
    let out = lv.agent(&format!("domfsinfo {DOMAIN}"));
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().take(3).eq([FS_DIR, "ram0", "ext4"])),
        "{out}"
    );
    let out = lv.agent(&format!("domfsfreeze {DOMAIN}"));
    assert!(out.contains("Froze 1 filesystem(s)"), "{out}");
    let frozen = lv.agent(&format!(
        "qemu-agent-command {DOMAIN} '{{\"execute\":\"guest-fsfreeze-status\"}}'"
    ));
    assert_eq!(frozen.trim(), r#"{"return":"frozen"}"#);
    let out = lv.agent(&format!("domfsthaw {DOMAIN}"));
    assert!(out.contains("Thawed 1 filesystem(s)"), "{out}");
    let thawed = lv.agent(&format!(
        "qemu-agent-command {DOMAIN} '{{\"execute\":\"guest-fsfreeze-status\"}}'"
    ));
    assert_eq!(thawed.trim(), r#"{"return":"thawed"}"#);

    // A command vmlink-agent does not serve: libvirt reports it by name.
    let out = lv.domain_cmd(&format!("set-user-password {DOMAIN} root secret"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("guest-set-user-password has not been found"),
        "{}",
        text(&out.stderr)
    );

    // The vmlink agent over the two ports libvirt made.
    let out = vmlink(&["exec", &target, "--", "uname", "-n"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "vmlab");
    let payload = common::payload(7, 4 << 20);
    let up = work.join("up.bin");
    std::fs::write(&up, &payload).expect("write the payload");
    let out = vmlink(&[
        "cp",
        "-q",
        up.to_str().expect("UTF-8 path"),
        &format!("{target}:/run/x.bin"),
    ]);
    assert!(out.status.success(), "cp put: {}", text(&out.stderr));
    let down = work.join("down.bin");
    let out = vmlink(&[
        "cp",
        "-q",
        &format!("{target}:/run/x.bin"),
        down.to_str().expect("UTF-8 path"),
    ]);
    assert!(out.status.success(), "cp get: {}", text(&out.stderr));
    assert!(
        std::fs::read(&down).expect("read the copy") == payload,
        "the copy differs"
    );
}

/// Everything the test leaves: on drop, libvirt destroys the domain (or, failing that, QEMU is
/// killed by its pid), and the directory goes.
struct Domain {
    lv: Libvirt,
    work: PathBuf,
    destroyed: Option<Output>,
}

impl Domain {
    fn destroy(&mut self) -> &Output {
        if self.destroyed.is_none() {
            let out = self.lv.domain_cmd(&format!("destroy {DOMAIN}"));
            if !out.status.success() {
                let pidfile = self.lv.root.join(format!("run/qemu/{DOMAIN}.pid"));
                if let Ok(pid) = std::fs::read_to_string(pidfile) {
                    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                }
            }
            self.destroyed = Some(out);
        }
        self.destroyed.as_ref().expect("destroyed")
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.destroy();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

#[test]
fn libvirt_drives_a_guest_wired_as_the_guide_says() {
    if vmlink_lab::in_guest() {
        return;
    }
    require("virsh");
    require("flock");
    // A short path: libvirt's monitor socket lives under it.
    let work = PathBuf::from(format!("/tmp/vmlink-lv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let mut dom = Domain {
        lv: Libvirt::new(work.join("r")),
        work: work.clone(),
        destroyed: None,
    };
    let shim = work.join("qemu");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nexec bash {WRAPPER} {} \"$@\"\n",
            dom.lv.root.display()
        ),
    )
    .expect("write the QEMU shim");
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the shim");

    // The guide's <channel> elements as a user pastes them (the vsock one needs vhost_vsock on
    // the host), with DOMAIN's socket directory made real. The qemu-ga channel has no
    // <source>: libvirt picks its socket and connects to it itself.
    let channels: String = guide_snippets()
        .into_iter()
        .filter(|x| x.contains("<channel"))
        .collect::<String>()
        .replace(
            "/run/vmlink/DOMAIN",
            &work.join("DOMAIN").display().to_string(),
        );
    assert_eq!(
        channels.matches("<channel type='unix'>").count(),
        3,
        "{channels}"
    );
    std::fs::write(dom.lv.root.join("channels.xml"), &channels).expect("channels.xml");
    let (ctl, data) = (work.join("DOMAIN.ctl.sock"), work.join("DOMAIN.data.sock"));
    let cfg = LabConfig {
        // The lab waits for these sockets and links the ports by name in the guest; the
        // wrapper leaves its own port arguments out in favour of channels.xml.
        serials: vec![
            ("org.vmlink.ctl".into(), ctl.clone()),
            ("org.vmlink.data".into(), data.clone()),
        ],
        modules: vec!["brd".into(), "ext4".into()],
        qemu: Some(shim),
        timeout: Some(Duration::from_secs(300)),
        ..LabConfig::default()
    };
    let agent = Path::new(env!("CARGO_BIN_EXE_vmlink")).with_file_name("vmlink-agent");
    let script = format!(
        "mkfs.ext4 -q -F /dev/ram0 && mkdir -p {FS_DIR} && mount -t ext4 /dev/ram0 {FS_DIR} \
         && exec {} --qga",
        agent.display()
    );
    let argv: Vec<std::ffi::OsString> = vec!["sh".into(), "-c".into(), script.into()];
    let guest = match vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture) {
        Ok(g) => g,
        Err(e) => panic!("boot the guest: {e}\n{}", dom.lv.logs()),
    };

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        checks(&dom.lv, &work, &ctl, &data);
    }));
    let logs = dom.lv.logs();
    // The domain is libvirt's: libvirt stops it, then the lab sees "QEMU" (the wrapper) end.
    let destroyed = dom.destroy().clone();
    let outcome = guest.wait();
    if let Err(panic) = result {
        if let Ok(o) = outcome {
            eprintln!(
                "--- guest stdout\n{}\n--- guest stderr\n{}",
                text(&o.stdout),
                text(&o.stderr)
            );
        }
        eprintln!("{logs}");
        std::panic::resume_unwind(panic);
    }
    assert!(
        destroyed.status.success(),
        "virsh destroy: {}",
        text(&destroyed.stderr)
    );
}

/// Removes a directory when dropped, also when an assertion fails.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guide's XML blocks, in order.
fn guide_snippets() -> Vec<String> {
    let guide = std::fs::read_to_string(GUIDE).expect("read docs/guest-setup.md");
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in guide.lines() {
        match (&mut cur, line.trim()) {
            (None, "```xml") => cur = Some(String::new()),
            (Some(s), "```") => {
                out.push(std::mem::take(s));
                cur = None;
            }
            (Some(s), _) => {
                s.push_str(line);
                s.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn the_guides_libvirt_snippets_are_valid_domain_xml() {
    if vmlink_lab::in_guest() {
        return;
    }
    require("virt-xml-validate");
    require("virsh");
    let snippets = guide_snippets();
    assert!(
        snippets.len() >= 3,
        "expected the vsock, the two vmlink ports and the qemu-ga channel: {snippets:?}"
    );
    let all = snippets.concat();
    for want in [
        "<vsock model='virtio'>",
        "name='org.vmlink.ctl'",
        "name='org.vmlink.data'",
        "name='org.qemu.guest_agent.0'",
    ] {
        assert!(all.contains(want), "the guide lost {want}");
    }
    let work = std::env::temp_dir().join(format!("vmlink-lv-xml-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let _cleanup = RemoveOnDrop(work.clone());
    // One domain with every snippet, as a user would paste them into <devices>; the
    // channel sockets' directory is DOMAIN's, made real here.
    let devices = all.replace(
        "/run/vmlink/DOMAIN",
        &work.join("DOMAIN").display().to_string(),
    );
    let xml = format!(
        "<domain type='kvm'>\n  <name>guide</name>\n  <memory unit='MiB'>256</memory>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <devices>\n{devices}  \
         </devices>\n</domain>\n"
    );
    let file = work.join("guide.xml");
    std::fs::write(&file, &xml).expect("write the domain");
    let out = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .output()
        .expect("run virt-xml-validate");
    assert!(
        out.status.success(),
        "{xml}\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // libvirt's own parser and checks (defining needs no vhost-vsock on this host; starting
    // would).
    let lv = Libvirt::new(work.join("r"));
    lv.ok(&["define", file.to_str().expect("UTF-8 path")]);
    let dumped = lv.ok(&["dumpxml", "guide"]);
    assert!(dumped.contains("<vsock model='virtio'>"), "{dumped}");
    assert_eq!(
        dumped.matches("<channel type='unix'>").count(),
        3,
        "{dumped}"
    );
    assert!(
        dumped.contains("virtio-serial"),
        "libvirt adds the controller: {dumped}"
    );
    lv.ok(&["undefine", "guide"]);
}
