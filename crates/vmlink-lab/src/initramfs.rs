//! The guest's initramfs: busybox, the kernel modules needed to reach the
//! host's root over 9p, and the two init stages.
//!
//! The image is two concatenated cpio archives. The first (cached) holds
//! busybox, the base modules and the scripts; the second is written for
//! each run and holds that run's files: the mount table, the command, the
//! extra modules and a `modules.dep` covering all modules.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cache;
use crate::cpio::Cpio;
use crate::error::LabError;

/// Modules every guest needs, by name: PCI transport, the serial ports,
/// 9p over virtio, and overlayfs. Their dependencies come along.
pub(crate) const BASE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "9p",
    "overlay",
    "9pnet_virtio",
];

/// The base modules in load phases. The first two have disjoint dependency
/// closures (virtio; 9p with netfs and fscache) and load in parallel, one
/// per vCPU; the last needs both. Loading is slow under TCG: 9pnet and
/// fscache take 0.1-0.3 s each, mostly updating trace-event enum maps.
const PHASES: [&[&str]; 2] = [&["virtio_pci", "virtio_console"], &["9p", "overlay"]];

/// Stage 1, PID 1 in the initramfs. Every busybox applet that is not a
/// shell builtin costs a fork (~10 ms under TCG), so the work is batched:
/// one modprobe for all modules, one `mount -a` per mount table.
const STAGE1: &str = r#"#!/bin/busybox sh
# vmlink-lab stage 1: PID 1 in the initramfs. There is no /proc here, so
# applets are called through $B (busybox finds itself via /proc/self/exe).
B=/bin/busybox
fail() {
    echo "vmlink-lab: stage 1: $*"
    $B poweroff -f
}
{ read -r m0; read -r m1; read -r m2; } < /vmlab/modules
{ $B modprobe -a $m0; $B ip link set lo up; } &
$B modprobe -a $m1
wait
[ -z "$m2" ] || $B modprobe -a $m2
$B mount -a -T /vmlab/fstab || fail "mounting the guest filesystems failed (see above)"
$B cp -a /vmlab/dev/. /newroot/dev/ || fail "populating /dev failed"
$B mount -a -T /vmlab/fstab2 || fail "mounting devpts and /dev/shm failed"
echo "<6>vmlink-lab: stage1 done" > /newroot/dev/kmsg
cd /newroot
$B mount --move . / || fail "moving the new root to / failed"
exec $B chroot . /run/vmlab/busybox sh /run/vmlab/stage2
fail "could not start stage 2"
"#;

/// Stage 2, PID 1 in the new root (busybox from the initramfs, whose files
/// stay reachable as the guest's /run).
const STAGE2: &str = r#"# vmlink-lab stage 2: PID 1 in the guest's root.
V=/run/vmlab
mark() { echo "<6>vmlink-lab: $*" > /dev/kmsg; }
warn() { echo "<3>vmlink-lab: $*" > /dev/kmsg; }
fail() { echo "vmlink-lab: stage 2: $*" > /dev/console; poweroff -f; }
mark stage2
echo vmlab > /proc/sys/kernel/hostname
read -r want < $V/ports
out= err= ret= i=0
while :; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        n=
        read -r n < "$p/name"
        case $n in
            vmlab.stdout) out=/dev/${p##*/} ;;
            vmlab.stderr) err=/dev/${p##*/} ;;
            vmlab.ret) ret=/dev/${p##*/} ;;
            '') ;;
            *) [ -e "/dev/virtio-ports/$n" ] || ln -s "../${p##*/}" "/dev/virtio-ports/$n" ;;
        esac
    done
    missing=
    for n in $want; do [ -e "/dev/virtio-ports/$n" ] || missing="$missing $n"; done
    [ -n "$out" ] && [ -n "$err" ] && [ -n "$ret" ] && [ -z "$missing" ] && break
    i=$((i + 1))
    [ $i -lt 1000 ] || fail "virtio-serial ports did not appear: ${out:-vmlab.stdout} ${err:-vmlab.stderr} ${ret:-vmlab.ret}$missing"
    read -t 0.01 n <> $V/tick
done
# No udev: load drivers for virtio devices that have none yet (devices from
# extra QEMU arguments), through the host's modprobe.
al=
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/driver" ] && continue
    [ -r "$d/modalias" ] && read -r a < "$d/modalias" && al="$al $a"
done
[ -z "$al" ] || /sbin/modprobe -q -a -b $al || warn "modprobe for$al failed"
read -r check < $V/check
for m in $check; do
    [ -d "/sys/module/$m" ] || echo "vmlink-lab: warning: kernel module $m did not load" > $err
done
mark command
if [ -e $V/init ]; then
    # LabConfig::init: the command replaces this shell as PID 1 (e.g. systemd).
    exec < /dev/null > $out 2> $err
    . $V/cmd.sh
fi
( . $V/cmd.sh ) < /dev/null > $out 2> $err
rc=$?
mark "command finished with status $rc"
echo $rc > $ret
exec reboot -f
"#;

/// Mount table for devpts and /dev/shm, once /dev exists.
const FSTAB2: &str = "devpts /newroot/dev/pts devpts gid=5,mode=620,ptmxmode=666 0 0\n\
                      tmpfs /newroot/dev/shm tmpfs mode=1777,nosuid,nodev 0 0\n";

/// 9p options of the read-only root: loose caching is fast, not coherent.
const ROOT_9P: &str = "trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose,access=any";
/// 9p options of the read-write shares: writes go straight to the host.
const SHARE_9P: &str = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=any";

/// A kernel module and its file under `/lib/modules/<version>/`.
#[derive(Debug, Clone)]
struct ModuleEntry {
    path: String,
    deps: Vec<String>,
}

/// `modules.dep`, `modules.builtin` and `modules.alias` of one kernel.
#[derive(Debug)]
pub(crate) struct ModuleDb {
    version: String,
    dir: PathBuf,
    by_name: HashMap<String, ModuleEntry>,
    builtin: HashSet<String>,
    /// Plain aliases, read from `modules.alias` (1.3 MB) only when a name
    /// is not a module.
    aliases: std::sync::OnceLock<HashMap<String, String>>,
}

/// Plain (wildcard-free) `alias NAME MODULE` lines; wildcard ones are for devices.
fn parse_aliases(text: &str) -> HashMap<String, String> {
    let mut aliases = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("alias"), Some(pattern), Some(module)) =
            (words.next(), words.next(), words.next())
        {
            if !pattern.contains(['*', '?', '[']) {
                aliases
                    .entry(normalize(pattern))
                    .or_insert_with(|| normalize(module));
            }
        }
    }
    aliases
}

/// `a-b` and `a_b` name the same module.
pub(crate) fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a `modules.dep` path: basename without `.ko[.xz|.zst|.gz]`.
pub(crate) fn module_name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.find(".ko").map_or(base, |i| &base[..i]);
    normalize(stem)
}

/// The marker the kernel's sign-file appends after a module signature.
const SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// `data` without its appended signature, if it has one.
pub(crate) fn strip_signature(data: &[u8]) -> &[u8] {
    // Layout: module | signature | struct module_signature (12 bytes,
    // big-endian sig_len last) | magic.
    let Some(body) = data.strip_suffix(SIG_MAGIC) else {
        return data;
    };
    if body.len() < 12 {
        return data;
    }
    let info = &body[body.len() - 12..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match (body.len() - 12).checked_sub(sig_len) {
        Some(end) => &data[..end],
        None => data,
    }
}

/// Hides a module's `_ftrace_eval_map` section from the kernel by renaming
/// it (same length, in place). Loading a module with trace-event enum maps
/// makes the kernel rescan the print formats of every trace event in the
/// system, which under TCG costs 0.1-0.2 s per module (9pnet, netfs,
/// fscache). Without the maps, trace output shows those enums as numbers.
/// Returns false if `data` is not a 64-bit little-endian ELF file.
pub(crate) fn hide_eval_maps(data: &mut [u8]) -> bool {
    const NAME: &[u8] = b"_ftrace_eval_map\0";
    let u16_at = |d: &[u8], o: usize| {
        d.get(o..o + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u32_at = |d: &[u8], o: usize| {
        d.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let u64_at = |d: &[u8], o: usize| {
        d.get(o..o + 8).and_then(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            usize::try_from(u64::from_le_bytes(a)).ok()
        })
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return false;
    }
    let (Some(shoff), Some(shentsize), Some(shnum), Some(shstrndx)) = (
        u64_at(data, 0x28),
        u16_at(data, 0x3a),
        u16_at(data, 0x3c),
        u16_at(data, 0x3e),
    ) else {
        return false;
    };
    let Some(strtab) = u64_at(data, shoff + shstrndx * shentsize + 0x18) else {
        return false;
    };
    for i in 0..shnum {
        let Some(name) = u32_at(data, shoff + i * shentsize) else {
            return false;
        };
        let at = strtab + name;
        if data.get(at..at + NAME.len()) == Some(NAME) {
            data[at] = b'X';
        }
    }
    true
}

/// File name of a module in the initramfs: uncompressed, flat.
fn flat_name(path: &str) -> String {
    format!("{}.ko", module_name_of(path))
}

impl ModuleDb {
    pub(crate) fn parse(
        version: &str,
        dir: PathBuf,
        dep: &str,
        builtin: &str,
        alias: Option<&str>,
    ) -> Self {
        let mut by_name = HashMap::new();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let entry = ModuleEntry {
                path: path.trim().to_owned(),
                deps: deps.split_whitespace().map(str::to_owned).collect(),
            };
            by_name.insert(module_name_of(&entry.path), entry);
        }
        let builtin = builtin.lines().map(module_name_of).collect();
        let aliases = std::sync::OnceLock::new();
        if let Some(text) = alias {
            let _ = aliases.set(parse_aliases(text));
        }
        ModuleDb {
            version: version.to_owned(),
            dir,
            by_name,
            builtin,
            aliases,
        }
    }

    fn alias(&self, name: &str) -> Option<&String> {
        self.aliases
            .get_or_init(|| {
                parse_aliases(
                    &std::fs::read_to_string(self.dir.join("modules.alias")).unwrap_or_default(),
                )
            })
            .get(name)
    }

    pub(crate) fn load(version: &str) -> Result<Self, LabError> {
        let dir = Path::new("/lib/modules").join(version);
        let read = |name: &str, required: bool| -> Result<String, LabError> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(s) => Ok(s),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(String::new())
                }
                Err(e) => Err(LabError::io("read", p, e)),
            }
        };
        Ok(Self::parse(
            version,
            dir.clone(),
            &read("modules.dep", true)?,
            &read("modules.builtin", false)?,
            None,
        ))
    }

    /// Resolves names (or plain aliases) to `modules.dep` paths, each after
    /// its dependencies, skipping built-in ones and those in `skip`.
    /// Returns the paths and the resolved module names.
    pub(crate) fn closure(
        &self,
        names: &[String],
        skip: &HashSet<String>,
    ) -> Result<(Vec<String>, Vec<String>), LabError> {
        let mut order = Vec::new();
        let mut seen: HashSet<String> = skip.clone();
        let mut resolved = Vec::new();
        for name in names {
            let mut n = normalize(name);
            if !self.by_name.contains_key(&n) && !self.builtin.contains(&n) {
                match self.alias(&n) {
                    Some(real) => n = real.clone(),
                    None => {
                        return Err(LabError::NoModule {
                            module: name.clone(),
                            kernel_version: self.version.clone(),
                        })
                    }
                }
            }
            if self.builtin.contains(&n) {
                continue;
            }
            resolved.push(n.clone());
            self.visit(&n, &mut seen, &mut order)?;
        }
        Ok((order, resolved))
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), LabError> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let entry = self.by_name.get(name).ok_or_else(|| LabError::NoModule {
            module: name.to_owned(),
            kernel_version: self.version.clone(),
        })?;
        for dep in &entry.deps {
            self.visit(&module_name_of(dep), seen, order)?;
        }
        order.push(entry.path.clone());
        Ok(())
    }

    /// The `modules.dep` line for `path`, with flat file names, leaving out
    /// dependencies named in `loaded`.
    fn dep_line(&self, path: &str, loaded: &HashSet<String>) -> String {
        let entry = &self.by_name[&module_name_of(path)];
        let mut line = format!("{}:", flat_name(&entry.path));
        for d in entry
            .deps
            .iter()
            .filter(|d| !loaded.contains(&module_name_of(d)))
        {
            line.push(' ');
            line.push_str(&flat_name(d));
        }
        line.push('\n');
        line
    }

    /// The module file's contents, decompressed.
    fn read_module(&self, path: &str) -> Result<Vec<u8>, LabError> {
        let full = self.dir.join(path);
        let tool: Option<(&str, &[&str])> = if path.ends_with(".ko.xz") {
            Some(("xz", &["-dc"]))
        } else if path.ends_with(".ko.zst") {
            Some(("zstd", &["-dcq"]))
        } else if path.ends_with(".ko.gz") {
            Some(("gzip", &["-dc"]))
        } else {
            None
        };
        let data = match tool {
            None => std::fs::read(&full).map_err(|e| LabError::io("read", &full, e)),
            Some((tool, args)) => {
                let out = Command::new(tool)
                    .args(args)
                    .arg(&full)
                    .stderr(Stdio::inherit())
                    .output()
                    .map_err(|e| LabError::Tool {
                        program: tool.to_owned(),
                        detail: format!("could not be started to unpack {}", full.display()),
                        source: Some(e),
                    })?;
                if !out.status.success() {
                    return Err(LabError::Tool {
                        program: tool.to_owned(),
                        detail: format!("{} while unpacking {}", out.status, full.display()),
                        source: None,
                    });
                }
                Ok(out.stdout)
            }
        }?;
        // Both changes invalidate the signature, so it goes: the guest
        // kernel (which does not enforce signatures) then loads the module
        // as unsigned and marks itself tainted (E). Skipping the signature
        // check also saves time.
        let mut data = strip_signature(&data).to_vec();
        hide_eval_maps(&mut data);
        Ok(data)
    }
}

/// The cached first archive for this kernel, built if needed.
pub(crate) fn base_image(db: &ModuleDb, cache_dir: &Path) -> Result<PathBuf, LabError> {
    let bb_meta = std::fs::metadata(crate::deps::BUSYBOX)
        .map_err(|e| LabError::io("read", crate::deps::BUSYBOX, e))?;
    let dep_meta = std::fs::metadata(db.dir.join("modules.dep"))
        .map_err(|e| LabError::io("read", db.dir.join("modules.dep"), e))?;
    let key = cache::key(&[
        db.version.as_bytes(),
        &cache::mtime_ns(&dep_meta).to_le_bytes(),
        STAGE1.as_bytes(),
        STAGE2.as_bytes(),
        FSTAB2.as_bytes(),
        BASE_MODULES.join(" ").as_bytes(),
        &bb_meta.len().to_le_bytes(),
        &cache::mtime_ns(&bb_meta).to_le_bytes(),
        &std::os::unix::fs::MetadataExt::ino(&bb_meta).to_le_bytes(),
        // Bumped when the image layout changes.
        b"layout 4",
    ]);
    let out = cache_dir.join(format!("initramfs-{}-{}.cpio", db.version, &key[..16]));
    if out.is_file() {
        return Ok(out);
    }
    let names: Vec<String> = BASE_MODULES.iter().map(|s| (*s).to_owned()).collect();
    let (paths, _) = db.closure(&names, &HashSet::new())?;
    let busybox = std::fs::read(crate::deps::BUSYBOX)
        .map_err(|e| LabError::io("read", crate::deps::BUSYBOX, e))?;

    let mut c = Cpio::new();
    for d in [
        "dev",
        "proc",
        "sys",
        "lower",
        "newroot",
        "upper",
        "upper/u",
        "upper/w",
        "bin",
        "lib",
        "lib/modules",
    ] {
        c.dir(d, 0o755);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/kmsg", 0o644, 1, 11);
    // ash redirects a background job's stdin from /dev/null.
    c.char_dev("dev/null", 0o666, 1, 3);
    // Stage 2 runs this same busybox as /run/vmlab/busybox: no read over 9p,
    // and TCG reuses the code it already translated for stage 1.
    c.dir("vmlab", 0o755);
    c.dir("vmlab/run", 0o755);
    c.dir("vmlab/run/vmlab", 0o755);
    c.hard_linked(&["bin/busybox", "vmlab/run/vmlab/busybox"], 0o755, &busybox);
    c.file("init", 0o755, STAGE1.as_bytes());
    c.dir(&format!("lib/modules/{}", db.version), 0o755);
    for p in &paths {
        c.file(
            &format!("lib/modules/{}/{}", db.version, flat_name(p)),
            0o644,
            &db.read_module(p)?,
        );
    }
    c.file("vmlab/fstab2", 0o644, FSTAB2.as_bytes());
    // Copied onto the guest's devtmpfs in one `cp -a`.
    c.dir("vmlab/dev", 0o755);
    c.symlink("vmlab/dev/fd", "/proc/self/fd");
    c.symlink("vmlab/dev/stdin", "/proc/self/fd/0");
    c.symlink("vmlab/dev/stdout", "/proc/self/fd/1");
    c.symlink("vmlab/dev/stderr", "/proc/self/fd/2");
    c.dir("vmlab/dev/pts", 0o755);
    c.dir("vmlab/dev/shm", 0o1777);
    c.dir("vmlab/dev/virtio-ports", 0o755);
    // vmlab/run becomes the guest's /run (a bind mount).
    c.file("vmlab/run/vmlab/stage2", 0o644, STAGE2.as_bytes());
    c.fifo("vmlab/run/vmlab/tick", 0o600);
    let image = c.finish();

    std::fs::create_dir_all(cache_dir)
        .map_err(|e| LabError::io("create the cache directory", cache_dir, e))?;
    cache::write_atomic(&out, &image)?;
    cache::remove_stale(cache_dir, "initramfs-", &out);
    Ok(out)
}

/// Escapes a path for an fstab field (getmntent decodes octal escapes).
pub(crate) fn fstab_escape(path: &Path) -> String {
    let mut s = String::new();
    for &b in path.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' | b'#' => s.push_str(&format!("\\{b:03o}")),
            0x21..=0x7e => s.push(char::from(b)),
            _ => s.push_str(&format!("\\{b:03o}")),
        }
    }
    s
}

/// What goes into one run's archive.
#[derive(Debug)]
pub(crate) struct RunFiles<'a> {
    pub(crate) shares: &'a [PathBuf],
    pub(crate) extra_modules: &'a [String],
    pub(crate) port_names: Vec<&'a str>,
    /// Run the command as PID 1 ([`crate::LabConfig::init`]).
    pub(crate) init: bool,
    pub(crate) command_script: Vec<u8>,
}

/// The second archive, for one run.
pub(crate) fn run_archive(db: &ModuleDb, files: &RunFiles<'_>) -> Result<Vec<u8>, LabError> {
    let names = |list: &[&str]| {
        list.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<String>>()
    };
    let none = HashSet::new();
    let (p0, n0) = db.closure(&names(PHASES[0]), &none)?;
    let (p1, n1) = db.closure(&names(PHASES[1]), &none)?;
    let set = |paths: &[String]| {
        paths
            .iter()
            .map(|p| module_name_of(p))
            .collect::<HashSet<String>>()
    };
    let (s0, s1) = (set(&p0), set(&p1));
    // Parallel only if no module is in both closures (true for Debian's
    // kernels); otherwise everything loads in one sequence.
    let parallel = s0.is_disjoint(&s1);
    let early: HashSet<String> = s0.union(&s1).cloned().collect();
    let mut last_names: Vec<String> = names(BASE_MODULES)
        .into_iter()
        .filter(|n| !PHASES.iter().any(|p| p.contains(&n.as_str())))
        .collect();
    last_names.extend(files.extra_modules.iter().cloned());
    let (p2, n2) = db.closure(&last_names, &early)?;
    let (_, extra_names) = db.closure(files.extra_modules, &none)?;

    let mut c = Cpio::new();
    // modules.dep for busybox modprobe, which cannot see what is loaded
    // (no /proc yet): each late module lists only late dependencies.
    let mut dep = String::new();
    for p in p0.iter().chain(&p1) {
        dep.push_str(&db.dep_line(p, &none));
    }
    for p in &p2 {
        dep.push_str(&db.dep_line(p, &early));
    }
    let base_files: HashSet<String> = {
        let base: Vec<String> = names(BASE_MODULES);
        db.closure(&base, &none)?.0.into_iter().collect()
    };
    for p in p2.iter().filter(|p| !base_files.contains(*p)) {
        c.file(
            &format!("lib/modules/{}/{}", db.version, flat_name(p)),
            0o644,
            &db.read_module(p)?,
        );
    }
    c.file(
        &format!("lib/modules/{}/modules.dep", db.version),
        0o644,
        dep.as_bytes(),
    );
    let phases = if parallel {
        format!("{}\n{}\n{}\n", n0.join(" "), n1.join(" "), n2.join(" "))
    } else {
        let mut all = n0.clone();
        all.extend(n1.iter().cloned());
        format!("{}\n\n{}\n", all.join(" "), n2.join(" "))
    };
    c.file("vmlab/modules", 0o644, phases.as_bytes());
    // Modules asked for by name, checked in /sys/module before the command.
    c.file(
        "vmlab/run/vmlab/check",
        0o644,
        format!("{}\n", extra_names.join(" ")).as_bytes(),
    );

    let mut fstab = format!(
        "vmlab_root /lower 9p {ROOT_9P} 0 0\n\
         overlay /newroot overlay lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w,xino=off 0 0\n\
         /vmlab/run /newroot/run none bind 0 0\n\
         devtmpfs /newroot/dev devtmpfs defaults 0 0\n\
         proc /newroot/proc proc defaults 0 0\n\
         sysfs /newroot/sys sysfs defaults 0 0\n"
    );
    for (i, share) in files.shares.iter().enumerate() {
        fstab.push_str(&format!(
            "vmlab_rw{i} {} 9p {SHARE_9P} 0 0\n",
            fstab_escape(&Path::new("/newroot").join(share.strip_prefix("/").unwrap_or(share)))
        ));
    }
    c.file("vmlab/fstab", 0o644, fstab.as_bytes());
    c.file(
        "vmlab/run/vmlab/ports",
        0o644,
        format!("{}\n", files.port_names.join(" ")).as_bytes(),
    );
    c.file("vmlab/run/vmlab/cmd.sh", 0o644, &files.command_script);
    if files.init {
        c.file("vmlab/run/vmlab/init", 0o644, b"");
    }
    Ok(c.finish())
}

/// Share directories in mount order (parents before children), deduplicated.
pub(crate) fn order_shares(mut shares: Vec<PathBuf>) -> Vec<PathBuf> {
    shares.sort_by(|a, b| a.components().cmp(b.components()));
    shares.dedup();
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> ModuleDb {
        ModuleDb::parse(
            "6.1.0-test",
            PathBuf::from("/nonexistent"),
            "kernel/net/vmw_vsock/vsock_loopback.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vsock.ko:\n\
             kernel/fs/overlayfs/overlay.ko.xz:\n",
            "kernel/drivers/tty/serial/8250/8250.ko\n",
            Some("alias net-pf-40 vsock\nalias virtio:d00000013v* vmw_vsock_virtio_transport\n"),
        )
    }

    #[test]
    fn module_names_from_paths() {
        assert_eq!(module_name_of("kernel/fs/9p/9p.ko"), "9p");
        assert_eq!(module_name_of("kernel/a/b/foo-bar.ko.xz"), "foo_bar");
        assert_eq!(module_name_of("x.ko.zst"), "x");
        assert_eq!(flat_name("kernel/fs/overlayfs/overlay.ko.xz"), "overlay.ko");
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let (paths, names) = db()
            .closure(&["vsock-loopback".to_owned()], &HashSet::new())
            .expect("closure");
        let names_of: Vec<String> = paths.iter().map(|p| module_name_of(p)).collect();
        assert_eq!(
            names_of,
            [
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vsock_loopback"
            ]
        );
        assert_eq!(names, ["vsock_loopback"]);
    }

    #[test]
    fn closure_skips_loaded_and_builtin_and_follows_plain_aliases() {
        let skip: HashSet<String> = ["vsock".to_owned()].into();
        let (paths, _) = db()
            .closure(&["vsock_loopback".to_owned(), "8250".to_owned()], &skip)
            .expect("closure");
        assert_eq!(paths.len(), 2);
        let (paths, names) = db()
            .closure(&["net-pf-40".to_owned()], &HashSet::new())
            .expect("alias");
        assert_eq!(paths, ["kernel/net/vmw_vsock/vsock.ko"]);
        assert_eq!(names, ["vsock"]);
    }

    #[test]
    fn closure_reports_unknown_modules() {
        let err = db()
            .closure(&["nosuchmod".to_owned()], &HashSet::new())
            .expect_err("unknown");
        assert!(matches!(err, LabError::NoModule { ref module, .. } if module == "nosuchmod"));
    }

    #[test]
    fn dep_lines_use_flat_names() {
        let d = db();
        assert_eq!(
            d.dep_line("kernel/net/vmw_vsock/vsock_loopback.ko", &HashSet::new()),
            "vsock_loopback.ko: vmw_vsock_virtio_transport_common.ko vsock.ko\n"
        );
        let loaded: HashSet<String> = ["vsock".to_owned()].into();
        assert_eq!(
            d.dep_line("kernel/net/vmw_vsock/vsock_loopback.ko", &loaded),
            "vsock_loopback.ko: vmw_vsock_virtio_transport_common.ko\n"
        );
    }

    #[test]
    fn signature_is_stripped() {
        let mut signed = b"MODULE-BODY".to_vec();
        signed.extend_from_slice(b"SIGNATURE");
        // struct module_signature: 8 bytes of fields, then sig_len (BE).
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&9u32.to_be_bytes());
        signed.extend_from_slice(SIG_MAGIC);
        assert_eq!(strip_signature(&signed), b"MODULE-BODY");
        assert_eq!(strip_signature(b"unsigned"), b"unsigned");
    }

    /// A minimal ELF64 file: header, a string table, three section headers.
    fn tiny_elf(names: &[u8], name_offsets: [u32; 2]) -> Vec<u8> {
        let mut d = vec![0u8; 64];
        d[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let strtab_off = d.len();
        d.extend_from_slice(names);
        while d.len() % 8 != 0 {
            d.push(0);
        }
        let shoff = d.len();
        d[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        d[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        d[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        d[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes()); // shstrndx
        for (i, name) in [0u32, name_offsets[0], name_offsets[1]].iter().enumerate() {
            let mut sh = vec![0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            if i == 1 {
                sh[0x18..0x20].copy_from_slice(&(strtab_off as u64).to_le_bytes());
            }
            d.extend_from_slice(&sh);
        }
        d
    }

    #[test]
    fn eval_map_section_is_renamed_in_place() {
        let names = b"\0.shstrtab\0.rela_ftrace_eval_map\0";
        // Section 2's name is the tail of ".rela_ftrace_eval_map".
        let mut elf = tiny_elf(names, [1, 16]);
        let before = elf.clone();
        assert!(hide_eval_maps(&mut elf));
        assert_eq!(elf.len(), before.len());
        let changed: Vec<usize> = (0..elf.len()).filter(|&i| elf[i] != before[i]).collect();
        assert_eq!(changed, [64 + 16]);
        assert_eq!(&elf[64 + 11..64 + 33], b".relaXftrace_eval_map\0");
        assert!(!hide_eval_maps(
            &mut b"not an elf file at all, certainly not 64 bytes long, no no no no".to_vec()
        ));
    }

    #[test]
    fn fstab_fields_are_escaped() {
        assert_eq!(
            fstab_escape(Path::new("/a b/c\\d#e")),
            "/a\\040b/c\\134d\\043e"
        );
        assert_eq!(fstab_escape(Path::new("/plain/path")), "/plain/path");
    }

    #[test]
    fn shares_mount_parents_first() {
        let got = order_shares(vec![
            "/work/main".into(),
            "/work".into(),
            "/a-b".into(),
            "/a".into(),
            "/work".into(),
        ]);
        let want: Vec<PathBuf> = vec![
            "/a".into(),
            "/a-b".into(),
            "/work".into(),
            "/work/main".into(),
        ];
        assert_eq!(got, want);
    }
}
