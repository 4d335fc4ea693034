//! VM configuration: `--vm` specs and the TOML config file.
//!
//! A spec is `guest-cid=3,socket=PATH,uds-path=PATH[,groups=a+b][,tx-buffer-size=SIZE]
//! [,max-connections=N][,poll-us=N]`. The TOML
//! file has one `[[vm]]` table per VM with the same keys (`groups` a list of strings), and may
//! name the stats socket (`--stats-socket`) in a top-level key, before the first table:
//!
//! ```toml
//! stats-socket = "/run/vmlink-vhost/stats.sock"
//!
//! [[vm]]
//! guest-cid = 3
//! socket = "/run/vm3/vhost.sock"
//! uds-path = "/run/vm3/vsock"
//! groups = ["web"]
//! tx-buffer-size = "256K"
//! max-connections = 1024
//! poll-us = 50
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::{DEFAULT_MAX_CONNECTIONS, DEFAULT_TX_BUFFER_SIZE};

/// Smallest `tx-buffer-size`.
pub const MIN_TX_BUFFER_SIZE: u32 = 4096;
/// Largest `tx-buffer-size` (64 MiB): the bound on buffered bytes per connection.
pub const MAX_TX_BUFFER_SIZE: u32 = 64 << 20;
/// Largest `max-connections`.
pub const MAX_MAX_CONNECTIONS: usize = 65536;
/// Default `poll-us`: how long a VM's thread keeps looking for the next packet after one
/// (see [`crate::backend::VsockBackend::with_poll`]).
pub const DEFAULT_POLL_US: u32 = 50;
/// Largest `poll-us` (1 ms): the bound on the CPU a VM's thread spends polling per event.
pub const MAX_POLL_US: u32 = 1000;

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The guest's CID, 3 to 4294967294.
    pub guest_cid: u64,
    /// The vhost-user socket the VMM (QEMU) connects to.
    pub socket: PathBuf,
    /// The hybrid vsock socket (see [`crate::device`]).
    pub uds_path: PathBuf,
    /// Groups: VMs that share a group may talk to each other.
    pub groups: Vec<String>,
    /// Per-connection buffer toward the host, in bytes.
    pub tx_buffer_size: u32,
    /// The most connections the VM may have at once (1 to 65536, default 1024).
    pub max_connections: usize,
    /// Microseconds the VM's thread polls for the next packet after handling one, instead of
    /// sleeping at once (0 to 1000, default 50; 0: never poll).
    pub poll_us: u32,
}

/// A bad `--vm` spec or config file. The message names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A spec or file problem, with its context.
    #[error("{0}")]
    Bad(String),
}

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError::Bad(msg.into())
}

/// Parses one `--vm` spec.
pub fn parse_vm_spec(spec: &str) -> Result<VmConfig, ConfigError> {
    let ctx = |m: String| bad(format!("--vm {spec:?}: {m}"));
    let mut cid = None;
    let mut socket = None;
    let mut uds = None;
    let mut groups = Vec::new();
    let mut tx = None;
    let mut max_conns = None;
    let mut poll = None;
    for part in spec.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            return Err(ctx(format!("`{part}` is not KEY=VALUE")));
        };
        if v.is_empty() {
            return Err(ctx(format!("`{k}` has an empty value")));
        }
        let dup = |set: bool| {
            if set {
                Err(ctx(format!("`{k}` given twice")))
            } else {
                Ok(())
            }
        };
        match k {
            "guest-cid" => {
                dup(cid.is_some())?;
                cid = Some(parse_cid(v).map_err(ctx)?);
            }
            "socket" => {
                dup(socket.is_some())?;
                socket = Some(PathBuf::from(v));
            }
            "uds-path" => {
                dup(uds.is_some())?;
                uds = Some(PathBuf::from(v));
            }
            "groups" => {
                dup(!groups.is_empty())?;
                groups = v.split('+').map(str::to_owned).collect();
            }
            "tx-buffer-size" => {
                dup(tx.is_some())?;
                tx = Some(parse_size(v).map_err(ctx)?);
            }
            "max-connections" => {
                dup(max_conns.is_some())?;
                max_conns = Some(parse_max_connections(v).map_err(ctx)?);
            }
            "poll-us" => {
                dup(poll.is_some())?;
                poll = Some(parse_poll_us(v).map_err(ctx)?);
            }
            _ => {
                return Err(ctx(format!(
                    "unknown key `{k}` (known: guest-cid, socket, uds-path, groups, tx-buffer-size, max-connections, poll-us)"
                )))
            }
        }
    }
    let vm = VmConfig {
        guest_cid: cid.ok_or_else(|| ctx("missing guest-cid=CID".into()))?,
        socket: socket.ok_or_else(|| ctx("missing socket=PATH".into()))?,
        uds_path: uds.ok_or_else(|| ctx("missing uds-path=PATH".into()))?,
        groups,
        tx_buffer_size: tx.unwrap_or(DEFAULT_TX_BUFFER_SIZE),
        max_connections: max_conns.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        poll_us: poll.unwrap_or(DEFAULT_POLL_US),
    };
    check_vm(&vm).map_err(ctx)?;
    Ok(vm)
}

fn parse_poll_us(v: &str) -> Result<u32, String> {
    let n: u32 = v
        .parse()
        .map_err(|_| format!("poll-us `{v}` is not a number of microseconds"))?;
    if n > MAX_POLL_US {
        return Err(format!("poll-us {n} is out of range (0 to {MAX_POLL_US})"));
    }
    Ok(n)
}

fn parse_cid(v: &str) -> Result<u64, String> {
    let cid: u64 = v
        .parse()
        .map_err(|_| format!("guest-cid `{v}` is not a number"))?;
    check_cid(cid)?;
    Ok(cid)
}

fn check_cid(cid: u64) -> Result<(), String> {
    if !(3..u64::from(u32::MAX)).contains(&cid) {
        return Err(format!(
            "guest-cid {cid} is reserved or too large (0, 1, 2 and 4294967295 and above are not guest CIDs)"
        ));
    }
    Ok(())
}

fn parse_max_connections(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_MAX_CONNECTIONS).contains(&n) => Ok(n),
        _ => Err(format!(
            "max-connections `{v}` is not a number from 1 to {MAX_MAX_CONNECTIONS}"
        )),
    }
}

/// Parses a size: a number of bytes, or a number with a `K` or `M` suffix (powers of 1024).
pub fn parse_size(v: &str) -> Result<u32, String> {
    let (num, mul) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 1024u64),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 1024 * 1024),
        _ => (v, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("tx-buffer-size `{v}` is not a size (bytes, or a number with K or M)")
    })?;
    let n = n.saturating_mul(mul);
    if !(u64::from(MIN_TX_BUFFER_SIZE)..=u64::from(MAX_TX_BUFFER_SIZE)).contains(&n) {
        return Err(format!(
            "tx-buffer-size {v} is out of range ({MIN_TX_BUFFER_SIZE} bytes to 64M)"
        ));
    }
    Ok(n as u32)
}

fn check_vm(vm: &VmConfig) -> Result<(), String> {
    check_cid(vm.guest_cid)?;
    for g in &vm.groups {
        if g.is_empty()
            || !g
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("group `{g}` must be letters, digits, `-` or `_`"));
        }
    }
    // `<uds_path>_<port>` must fit a Unix socket address (108 bytes with its NUL).
    let longest = vm.uds_path.as_os_str().len() + "_4294967295".len();
    if longest > 107 {
        return Err(format!(
            "uds-path {} is too long: `<uds-path>_<port>` must fit in 107 bytes",
            vm.uds_path.display()
        ));
    }
    Ok(())
}

/// What a config file gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// Its VMs.
    pub vms: Vec<VmConfig>,
    /// The top-level `stats-socket` key.
    pub stats_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    stats_socket: Option<PathBuf>,
    vm: Vec<FileVm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileVm {
    guest_cid: u64,
    socket: PathBuf,
    uds_path: PathBuf,
    #[serde(default)]
    groups: Vec<String>,
    tx_buffer_size: Option<SizeValue>,
    max_connections: Option<u64>,
    poll_us: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Parses a TOML config file's text; `path` is used in messages.
pub fn parse_config(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    let ctx = |m: String| bad(format!("config {}: {m}", path.display()));
    let file: File = toml::from_str(text).map_err(|e| ctx(e.message().to_owned()))?;
    let mut vms = Vec::new();
    for (i, v) in file.vm.into_iter().enumerate() {
        let at = |m: String| {
            ctx(format!(
                "[[vm]] #{} (guest-cid {}): {m}",
                i + 1,
                v.guest_cid
            ))
        };
        let tx_buffer_size = match &v.tx_buffer_size {
            None => DEFAULT_TX_BUFFER_SIZE,
            Some(SizeValue::Bytes(n)) => parse_size(&n.to_string()).map_err(at)?,
            Some(SizeValue::Text(s)) => parse_size(s).map_err(at)?,
        };
        let max_connections = match v.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n) => parse_max_connections(&n.to_string()).map_err(at)?,
        };
        let poll_us = match v.poll_us {
            None => DEFAULT_POLL_US,
            Some(n) => parse_poll_us(&n.to_string()).map_err(at)?,
        };
        let vm = VmConfig {
            guest_cid: v.guest_cid,
            socket: v.socket.clone(),
            uds_path: v.uds_path.clone(),
            groups: v.groups.clone(),
            tx_buffer_size,
            max_connections,
            poll_us,
        };
        check_vm(&vm).map_err(at)?;
        vms.push(vm);
    }
    if file
        .stats_socket
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(ctx("stats-socket is empty".into()));
    }
    Ok(ConfigFile {
        vms,
        stats_socket: file.stats_socket,
    })
}

/// Reads and parses a TOML config file.
pub fn load_config(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("config {}: cannot read: {e}", path.display())))?;
    parse_config(&text, path)
}

/// Which of `vm`'s hybrid socket paths `p` is, if any: `<uds-path>_seqpacket` (the host side of
/// seqpacket connections) or `<uds-path>_<port>` (where guest connections to host port `port`
/// go, the port in decimal as the device writes it).
fn hybrid_path_of(p: &Path, vm: &VmConfig) -> Option<String> {
    let rest = p
        .as_os_str()
        .as_encoded_bytes()
        .strip_prefix(vm.uds_path.as_os_str().as_encoded_bytes())?
        .strip_prefix(b"_")?;
    if rest == b"seqpacket" {
        return Some("its seqpacket socket (`<uds-path>_seqpacket`)".into());
    }
    let port: u32 = std::str::from_utf8(rest).ok()?.parse().ok()?;
    (port.to_string().as_bytes() == rest)
        .then(|| format!("the socket of its host port {port} (`<uds-path>_{port}`)"))
}

/// Checks a whole set of VMs: at least one, and no CID, socket or uds-path used twice, nor one
/// VM's `socket` or `uds-path` one of the sockets a VM derives from its `uds-path`
/// (`<uds-path>_seqpacket`, `<uds-path>_<port>`); and that `stats_socket`, if any, is none of
/// the VMs' socket files (`socket`, `uds-path`, `<uds-path>_*`).
pub fn check_all(vms: &[VmConfig], stats_socket: Option<&Path>) -> Result<(), ConfigError> {
    if vms.is_empty() {
        return Err(bad("no VM: give --vm SPEC or --config FILE"));
    }
    let mut cids = HashSet::new();
    let mut paths = HashSet::new();
    for vm in vms {
        if !cids.insert(vm.guest_cid) {
            return Err(bad(format!(
                "guest-cid {} is used by two VMs",
                vm.guest_cid
            )));
        }
        for p in [&vm.socket, &vm.uds_path] {
            if !paths.insert(p.clone()) {
                return Err(bad(format!(
                    "path {} is used twice (each VM needs its own socket and uds-path)",
                    p.display()
                )));
            }
        }
        if let Some(stats) = stats_socket {
            let mut prefix = vm.uds_path.clone().into_os_string();
            prefix.push("_");
            if stats == vm.socket
                || stats == vm.uds_path
                || stats
                    .as_os_str()
                    .as_encoded_bytes()
                    .starts_with(prefix.as_encoded_bytes())
            {
                return Err(bad(format!(
                    "stats socket {} is a socket path of the VM with guest-cid {}",
                    stats.display(),
                    vm.guest_cid
                )));
            }
        }
    }
    for vm in vms {
        for (key, p) in [("socket", &vm.socket), ("uds-path", &vm.uds_path)] {
            for other in vms {
                if let Some(what) = hybrid_path_of(p, other) {
                    return Err(bad(format!(
                        "{key} {} of the VM with guest-cid {} is {what} of the VM with guest-cid {}",
                        p.display(),
                        vm.guest_cid,
                        other.guest_cid
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_spec_parses() {
        let vm = parse_vm_spec(
            "guest-cid=3,socket=/run/a.sock,uds-path=/run/a,groups=x+y,tx-buffer-size=1M,max-connections=64,poll-us=0",
        )
        .expect("valid");
        assert_eq!(vm.max_connections, 64);
        assert_eq!(vm.poll_us, 0);
        assert_eq!(vm.guest_cid, 3);
        assert_eq!(vm.socket, Path::new("/run/a.sock"));
        assert_eq!(vm.uds_path, Path::new("/run/a"));
        assert_eq!(vm.groups, ["x", "y"]);
        assert_eq!(vm.tx_buffer_size, 1 << 20);
    }

    #[test]
    fn spec_errors_name_the_bad_part() {
        let cases = [
            (
                "guest-cid=2,socket=/a,uds-path=/b",
                "guest-cid 2 is reserved",
            ),
            (
                "guest-cid=x,socket=/a,uds-path=/b",
                "guest-cid `x` is not a number",
            ),
            ("guest-cid=3,uds-path=/b", "missing socket=PATH"),
            (
                "guest-cid=3,socket=/a,uds-path=/b,color=red",
                "unknown key `color`",
            ),
            (
                "guest-cid=3,socket=/a,uds-path=/b,tx-buffer-size=1",
                "out of range",
            ),
            (
                "guest-cid=3,socket=/a,uds-path=/b,max-connections=0",
                "max-connections `0` is not a number from 1 to 65536",
            ),
            (
                "guest-cid=3,socket=/a,uds-path=/b,poll-us=1001",
                "poll-us 1001 is out of range (0 to 1000)",
            ),
            (
                "guest-cid=3,socket=/a,uds-path=/b,poll-us=-1",
                "poll-us `-1` is not a number of microseconds",
            ),
            (
                "guest-cid=3,socket=/a,socket=/c,uds-path=/b",
                "`socket` given twice",
            ),
            (
                "guest-cid=3,socket,uds-path=/b",
                "`socket` is not KEY=VALUE",
            ),
            (
                "guest-cid=3,socket=/a,uds-path=/b,groups=a+",
                "group `` must be",
            ),
        ];
        for (spec, want) in cases {
            let e = parse_vm_spec(spec).expect_err(spec).to_string();
            assert!(e.contains(want), "{spec}: {e}");
            assert!(e.starts_with("--vm "), "{e}");
        }
    }

    #[test]
    fn a_config_file_parses_and_errors_name_the_vm() {
        let text = r#"
[[vm]]
guest-cid = 3
socket = "/run/3.sock"
uds-path = "/run/3"
groups = ["a"]

[[vm]]
guest-cid = 4
socket = "/run/4.sock"
uds-path = "/run/4"
tx-buffer-size = "64K"
max-connections = 8
poll-us = 200
"#;
        let file = parse_config(text, Path::new("c.toml")).expect("valid");
        assert_eq!(file.stats_socket, None);
        let vms = file.vms;
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[1].tx_buffer_size, 64 * 1024);
        assert_eq!(vms[0].tx_buffer_size, DEFAULT_TX_BUFFER_SIZE);
        assert_eq!(vms[1].max_connections, 8);
        assert_eq!(vms[0].max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(vms[1].poll_us, 200);
        assert_eq!(vms[0].poll_us, DEFAULT_POLL_US);
        check_all(&vms, None).expect("distinct");

        let e = parse_config(&text.replace("\"64K\"", "12"), Path::new("c.toml"))
            .expect_err("too small")
            .to_string();
        assert!(
            e.contains("[[vm]] #2 (guest-cid 4): tx-buffer-size 12 is out of range"),
            "{e}"
        );
        let e = parse_config("[[vm]]\nguest-cid = 3\n", Path::new("c.toml"))
            .expect_err("missing")
            .to_string();
        assert!(
            e.starts_with("config c.toml: ") && e.contains("socket"),
            "{e}"
        );
        let e = check_all(&[vms[0].clone(), vms[0].clone()], None)
            .expect_err("dup")
            .to_string();
        assert_eq!(e, "guest-cid 3 is used by two VMs");
    }

    #[test]
    fn no_vm_path_is_a_socket_another_vm_derives_from_its_uds_path() {
        let vm = |cid: u64, socket: &str, uds: &str| VmConfig {
            guest_cid: cid,
            socket: socket.into(),
            uds_path: uds.into(),
            groups: Vec::new(),
            tx_buffer_size: DEFAULT_TX_BUFFER_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            poll_us: DEFAULT_POLL_US,
        };
        let a = vm(3, "/run/3.sock", "/run/3");
        let clashes = [
            (vm(4, "/run/3_seqpacket", "/run/4"), "socket /run/3_seqpacket of the VM with guest-cid 4 is its seqpacket socket"),
            (vm(4, "/run/4.sock", "/run/3_1000"), "uds-path /run/3_1000 of the VM with guest-cid 4 is the socket of its host port 1000"),
            (vm(4, "/run/3_4294967295", "/run/4"), "host port 4294967295"),
        ];
        for (b, want) in clashes {
            for pair in [[a.clone(), b.clone()], [b.clone(), a.clone()]] {
                let e = check_all(&pair, None).expect_err(want).to_string();
                assert!(
                    e.contains(want) && e.ends_with("of the VM with guest-cid 3"),
                    "{e}"
                );
            }
        }
        // A VM's own socket counts too.
        let e = check_all(&[vm(3, "/run/3_52", "/run/3")], None)
            .expect_err("own port")
            .to_string();
        assert!(e.contains("host port 52"), "{e}");
        // Names that share the prefix but are no socket the device makes are fine.
        for (socket, uds) in [
            ("/run/3_vhost.sock", "/run/4"),
            ("/run/3_052", "/run/3_x"),
            ("/run/3_4294967296", "/run/3_seqpacket2"),
        ] {
            check_all(&[a.clone(), vm(4, socket, uds)], None).expect(socket);
        }
    }

    #[test]
    fn the_stats_socket_is_a_top_level_key_and_no_vm_path() {
        let text = "stats-socket = \"/run/stats.sock\"\n\n[[vm]]\nguest-cid = 3\nsocket = \"/run/3.sock\"\nuds-path = \"/run/3\"\n";
        let file = parse_config(text, Path::new("c.toml")).expect("valid");
        assert_eq!(
            file.stats_socket.as_deref(),
            Some(Path::new("/run/stats.sock"))
        );
        check_all(&file.vms, Some(Path::new("/run/stats.sock"))).expect("distinct");
        for clash in ["/run/3.sock", "/run/3", "/run/3_seqpacket", "/run/3_1000"] {
            let e = check_all(&file.vms, Some(Path::new(clash)))
                .expect_err(clash)
                .to_string();
            assert!(
                e.contains("is a socket path of the VM with guest-cid 3"),
                "{e}"
            );
        }
        // A key after a [[vm]] table belongs to that table: TOML's rule, named in the error.
        let late =
            "[[vm]]\nguest-cid = 3\nsocket = \"/a\"\nuds-path = \"/b\"\nstats-socket = \"/s\"\n";
        let e = parse_config(late, Path::new("c.toml"))
            .expect_err("stats-socket inside [[vm]]")
            .to_string();
        assert!(e.contains("stats-socket"), "{e}");
    }
}
