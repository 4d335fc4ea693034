//! `guest-network-get-interfaces`, `guest-get-fsinfo` and the `guest-fsfreeze-*` commands:
//! what the guest's kernel says about its interfaces and mounted filesystems, in qemu-ga 7.2's
//! shapes (QAPI schema `GuestNetworkInterface`, `GuestFilesystemInfo`).

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use serde_json::{json, Map, Value};
use vmlink_proto::qga::ErrorReply;

/// `guest-network-get-interfaces`: one entry per interface, in the kernel's order (getifaddrs:
/// link entries first, so interface index order), each with its hardware address, its IPv4
/// and IPv6 addresses (in that order) and, when it has an address, the counters of
/// `/proc/net/dev`. As in qemu-ga, `ip-addresses` and `statistics` are absent for an interface
/// without an address.
pub(crate) fn network_interfaces() -> Result<Value, ErrorReply> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| ErrorReply::generic(format!("getifaddrs failed: {}", e.desc())))?;
    let stats = net_dev_stats();
    let mut list: Vec<Map<String, Value>> = Vec::new();
    for ifa in addrs {
        let at = match list
            .iter()
            .position(|m| m.get("name") == Some(&json!(ifa.interface_name)))
        {
            Some(at) => at,
            None => {
                let mut m = Map::new();
                m.insert("name".into(), json!(ifa.interface_name));
                list.push(m);
                list.len() - 1
            }
        };
        let info = &mut list[at];
        if !info.contains_key("hardware-address") {
            if let Some(mac) = hardware_address(&ifa.interface_name) {
                info.insert("hardware-address".into(), json!(mac));
            }
        }
        let Some(address) = ifa.address.as_ref() else {
            continue;
        };
        let prefix_of = |bits: &[u8]| -> u32 { bits.iter().map(|b| b.count_ones()).sum() };
        let item = if let Some(v4) = address.as_sockaddr_in() {
            let prefix = ifa
                .netmask
                .as_ref()
                .and_then(|n| n.as_sockaddr_in())
                .map_or(0, |n| prefix_of(&n.ip().octets()));
            json!({ "ip-address": v4.ip().to_string(), "ip-address-type": "ipv4", "prefix": prefix })
        } else if let Some(v6) = address.as_sockaddr_in6() {
            let prefix = ifa
                .netmask
                .as_ref()
                .and_then(|n| n.as_sockaddr_in6())
                .map_or(0, |n| prefix_of(&n.ip().octets()));
            json!({ "ip-address": v6.ip().to_string(), "ip-address-type": "ipv6", "prefix": prefix })
        } else {
            continue;
        };
        if let Value::Array(a) = info
            .entry("ip-addresses")
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            a.push(item);
        }
        if !info.contains_key("statistics") {
            if let Some(s) = stats.get(&ifa.interface_name) {
                info.insert("statistics".into(), s.clone());
            }
        }
    }
    Ok(Value::Array(list.into_iter().map(Value::Object).collect()))
}

/// The first six octets of the interface's link address (what `SIOCGIFHWADDR` returns for
/// Ethernet and loopback), as `xx:xx:xx:xx:xx:xx`; `None` when the kernel reports none.
fn hardware_address(name: &str) -> Option<String> {
    if name.contains('/') || name.starts_with('.') {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
    let mut octets: Vec<u8> = text
        .trim()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(|s| u8::from_str_radix(s, 16).ok())
        .collect::<Option<Vec<_>>>()?;
    if octets.is_empty() {
        return None;
    }
    octets.resize(6, 0);
    Some(
        octets[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// `/proc/net/dev`, per interface, as `GuestNetworkInterfaceStat`.
fn net_dev_stats() -> HashMap<String, Value> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let mut out = HashMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let n: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if n.len() < 12 {
            continue;
        }
        out.insert(
            name.trim().to_string(),
            json!({
                "rx-bytes": n[0], "rx-packets": n[1], "rx-errs": n[2], "rx-dropped": n[3],
                "tx-bytes": n[8], "tx-packets": n[9], "tx-errs": n[10], "tx-dropped": n[11],
            }),
        );
    }
    out
}

/// A mounted filesystem on a block device.
#[derive(Debug, Clone)]
struct Mount {
    dir: String,
    fstype: String,
    major: u64,
    minor: u64,
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Filesystems on block devices, in mount order: as qemu-ga, entries whose device number has
/// major 0 (proc, tmpfs, 9p, overlay, ...) are skipped, except btrfs, whose real device is
/// looked up from its source.
fn block_mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(devno), Some(dir), Some(fstype), Some(source)) = (
            fields.get(2),
            fields.get(4),
            fields.get(sep + 1),
            fields.get(sep + 2),
        ) else {
            continue;
        };
        let Some((major, minor)) = devno
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        else {
            continue;
        };
        let (major, minor) = if major == 0 {
            if *fstype != "btrfs" {
                continue;
            }
            match nix::sys::stat::stat(unescape(source).as_str()) {
                Ok(st) => (
                    nix::sys::stat::major(st.st_rdev),
                    nix::sys::stat::minor(st.st_rdev),
                ),
                Err(_) => continue,
            }
        } else {
            (major, minor)
        };
        out.push(Mount {
            dir: unescape(dir),
            fstype: fstype.to_string(),
            major,
            minor,
        });
    }
    out
}

/// `guest-get-fsinfo`: as qemu-ga, in reverse mount order. `disk` lists the PCI addresses of
/// the disks under the filesystem; vmlink does not describe them yet (an empty list; see
/// docs/qga-compat.md).
pub(crate) fn fsinfo() -> Result<Value, ErrorReply> {
    let mut list = Vec::new();
    for m in block_mounts().into_iter().rev() {
        let sys = format!("/sys/dev/block/{}:{}", m.major, m.minor);
        let real = std::fs::canonicalize(&sys)
            .map_err(|e| ErrorReply::generic(format!("realpath(\"{sys}\"): {e}")))?;
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut fs = Map::new();
        fs.insert("name".into(), json!(name));
        fs.insert("mountpoint".into(), json!(m.dir));
        fs.insert("type".into(), json!(m.fstype));
        if let Ok(st) = nix::sys::statvfs::statvfs(m.dir.as_str()) {
            let used = st.blocks().saturating_sub(st.blocks_free());
            let total = used + st.blocks_available();
            fs.insert("used-bytes".into(), json!(used * st.fragment_size()));
            fs.insert("total-bytes".into(), json!(total * st.fragment_size()));
        }
        fs.insert("disk".into(), json!([]));
        list.push(Value::Object(fs));
    }
    Ok(Value::Array(list))
}

nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);

/// `guest-fsfreeze-freeze[-list]`: freezes the block filesystems (all, or those whose mount
/// point is in `only`), in reverse mount order; returns how many were frozen. The caller marks
/// the agent frozen when that is more than 0. A filesystem that does not support freezing is
/// skipped; any other failure thaws everything again and is the answer.
pub(crate) fn freeze(only: Option<&[String]>) -> Result<i64, ErrorReply> {
    let mut frozen = 0;
    for m in block_mounts().into_iter().rev() {
        if only.is_some_and(|o| !o.contains(&m.dir)) {
            continue;
        }
        let file = std::fs::File::open(&m.dir).map_err(|e| {
            let _ = thaw();
            ErrorReply::generic(format!(
                "failed to open {}: {}",
                m.dir,
                super::commands::errno_text(&e)
            ))
        })?;
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: the descriptor is open for the duration of the call; FIFREEZE ignores its
        // argument, which points at a live c_int anyway.
        match unsafe { fifreeze(file.as_raw_fd(), &mut arg) } {
            Ok(_) => frozen += 1,
            Err(nix::errno::Errno::EOPNOTSUPP) => {}
            Err(e) => {
                let _ = thaw();
                return Err(ErrorReply::generic(format!(
                    "failed to freeze {}: {}",
                    m.dir,
                    e.desc()
                )));
            }
        }
    }
    Ok(frozen)
}

/// `guest-fsfreeze-thaw`: thaws every block filesystem (FITHAW until it fails, since freezes
/// nest); returns how many were thawed.
pub(crate) fn thaw() -> Result<i64, ErrorReply> {
    let mut thawed = 0;
    for m in block_mounts() {
        let Ok(file) = std::fs::File::open(&m.dir) else {
            continue;
        };
        let mut counted = false;
        loop {
            let mut arg: nix::libc::c_int = 0;
            // SAFETY: as in `freeze`; FITHAW ignores its argument too.
            if unsafe { fithaw(file.as_raw_fd(), &mut arg) }.is_err() {
                break;
            }
            if !counted {
                thawed += 1;
                counted = true;
            }
        }
    }
    Ok(thawed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/tail\04"), r"/tail\04");
    }

    #[test]
    fn interfaces_have_names_and_loopback_has_a_zero_mac() {
        let v = network_interfaces().expect("interfaces");
        let list = v.as_array().expect("a list");
        for i in list {
            assert!(i["name"].is_string(), "{i}");
        }
        if let Some(lo) = list.iter().find(|i| i["name"] == "lo") {
            assert_eq!(lo["hardware-address"], "00:00:00:00:00:00");
        }
    }
}
