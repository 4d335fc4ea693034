//! The address grammar: one string names every host<->guest channel.
//!
//! The grammar is socat's shape: `KIND:ARGS[,OPTION[=VALUE]]...`, lowercase,
//! one kind per channel and a `-listen` twin for the side that waits. The
//! normative description, with examples, is `docs/addresses.md`; this module
//! is its only implementation. Parsing is pure (no I/O, no name lookups), and
//! `Display` prints a form that parses back to the same [`Addr`], so an
//! address can be logged, stored and re-read.
//!
//! ```text
//! vsock:CID:PORT               vsock-listen:[CID:]PORT
//! vsock-seqpacket:CID:PORT     vsock-seqpacket-listen:[CID:]PORT
//! vsock-dgram:CID:PORT         vsock-dgram-listen:[CID:]PORT
//! unix:PATH                    unix-listen:PATH
//! unix-abstract:NAME           unix-abstract-listen:NAME
//! hvsock:UDS_PATH:PORT         hvsock-listen:UDS_PATH:PORT
//! vport:NAME_OR_PATH
//! tcp:HOST:PORT                tcp-listen:[HOST:]PORT
//! stdio   (alias -)
//! ```
//!
//! CIDs are numbers or the names `any`, `hypervisor` (0), `local` (1) and
//! `host` (2); a port is a number or `any` (`VMADDR_PORT_ANY`, listeners only).
//! Errors name the part that is wrong and show the expected form, in one line.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// `VMADDR_CID_ANY`.
pub const CID_ANY: u32 = u32::MAX;
/// `VMADDR_CID_HYPERVISOR`.
pub const CID_HYPERVISOR: u32 = 0;
/// `VMADDR_CID_LOCAL` (the loopback transport).
pub const CID_LOCAL: u32 = 1;
/// `VMADDR_CID_HOST`.
pub const CID_HOST: u32 = 2;
/// `VMADDR_PORT_ANY`: let the kernel pick a free port.
pub const PORT_ANY: u32 = u32::MAX;

/// Where virtio-serial ports appear by name in a guest.
pub const VPORT_DIR: &str = "/dev/virtio-ports";

/// A vsock context identifier. Displays as its well-known name when it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cid(pub u32);

impl Cid {
    /// `VMADDR_CID_ANY`.
    pub const ANY: Cid = Cid(CID_ANY);
    /// `VMADDR_CID_LOCAL`.
    pub const LOCAL: Cid = Cid(CID_LOCAL);
    /// `VMADDR_CID_HOST`.
    pub const HOST: Cid = Cid(CID_HOST);
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            CID_ANY => f.write_str("any"),
            CID_HYPERVISOR => f.write_str("hypervisor"),
            CID_LOCAL => f.write_str("local"),
            CID_HOST => f.write_str("host"),
            n => write!(f, "{n}"),
        }
    }
}

impl FromStr for Cid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(Cid::ANY),
            "hypervisor" => Ok(Cid(CID_HYPERVISOR)),
            "local" => Ok(Cid::LOCAL),
            "host" => Ok(Cid::HOST),
            _ => s.parse::<u32>().map(Cid).map_err(|_| {
                format!("CID `{s}` is not a number or one of any, hypervisor, local, host")
            }),
        }
    }
}

/// A vsock port; `any` is `VMADDR_PORT_ANY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VsockPort(pub u32);

impl fmt::Display for VsockPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == PORT_ANY {
            f.write_str("any")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl FromStr for VsockPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "any" {
            return Ok(VsockPort(PORT_ANY));
        }
        s.parse::<u32>()
            .map(VsockPort)
            .map_err(|_| format!("port `{s}` is not a number from 0 to 4294967295 or `any`"))
    }
}

/// The three vsock socket types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VsockType {
    /// `SOCK_STREAM`: a reliable byte stream.
    Stream,
    /// `SOCK_SEQPACKET`: a reliable stream of records; one read returns one record.
    Seqpacket,
    /// `SOCK_DGRAM`: connectionless datagrams (VMCI and Hyper-V transports only).
    Dgram,
}

impl VsockType {
    fn prefix(self) -> &'static str {
        match self {
            VsockType::Stream => "vsock",
            VsockType::Seqpacket => "vsock-seqpacket",
            VsockType::Dgram => "vsock-dgram",
        }
    }
}

/// What an address points at, without its options.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `vsock[-seqpacket|-dgram]:CID:PORT`
    Vsock {
        ty: VsockType,
        cid: Cid,
        port: VsockPort,
    },
    /// `vsock[-seqpacket|-dgram]-listen:[CID:]PORT`
    VsockListen {
        ty: VsockType,
        cid: Cid,
        port: VsockPort,
    },
    /// `unix:PATH`
    Unix(PathBuf),
    /// `unix-listen:PATH`
    UnixListen(PathBuf),
    /// `unix-abstract:NAME`
    UnixAbstract(String),
    /// `unix-abstract-listen:NAME`
    UnixAbstractListen(String),
    /// `hvsock:UDS_PATH:PORT`: `CONNECT PORT` through a VMM's Unix socket.
    Hvsock { uds: PathBuf, port: u32 },
    /// `hvsock-listen:UDS_PATH:PORT`: the listener at `UDS_PATH_PORT` that a
    /// VMM connects to when its guest connects to the host's PORT.
    HvsockListen { uds: PathBuf, port: u32 },
    /// `vport:NAME_OR_PATH`: a virtio-serial port in a guest.
    Vport(String),
    /// `tcp:HOST:PORT`
    Tcp { host: String, port: u16 },
    /// `tcp-listen:[HOST:]PORT`
    TcpListen { host: Option<String>, port: u16 },
    /// `stdio` or `-`
    Stdio,
}

/// Per-address options: `,name=value` after the address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Options {
    /// `connect-timeout=DURATION`: give up connecting (and, for `hvsock`,
    /// finishing the handshake; for `vport`, waiting for the host) after this.
    pub connect_timeout: Option<Duration>,
    /// `buffer-size=SIZE`: `SO_VM_SOCKETS_BUFFER_SIZE` (vsock), or
    /// `SO_SNDBUF`/`SO_RCVBUF` (unix, tcp).
    pub buffer_size: Option<u64>,
    /// `buffer-min-size=SIZE`: `SO_VM_SOCKETS_BUFFER_MIN_SIZE` (vsock only).
    pub buffer_min_size: Option<u64>,
    /// `buffer-max-size=SIZE`: `SO_VM_SOCKETS_BUFFER_MAX_SIZE` (vsock only).
    pub buffer_max_size: Option<u64>,
    /// `backlog=N`: the listen(2) backlog of a listening address.
    pub backlog: Option<u32>,
    /// `unlink`: remove a stale socket file before binding (unix, hvsock).
    pub unlink: bool,
}

impl Options {
    fn is_empty(&self) -> bool {
        *self == Options::default()
    }
}

/// A parsed address: an [`Endpoint`] and its [`Options`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Addr {
    /// What to connect to or listen on.
    pub endpoint: Endpoint,
    /// How.
    pub options: Options,
}

impl Addr {
    /// An address with default options.
    pub fn new(endpoint: Endpoint) -> Addr {
        Addr {
            endpoint,
            options: Options::default(),
        }
    }

    /// True for the `-listen` kinds that accept connections. A
    /// `vsock-dgram-listen` address is not one of them: it opens a single
    /// bound datagram socket (see `Stream::connect`).
    pub fn is_listen(&self) -> bool {
        matches!(
            self.endpoint,
            Endpoint::VsockListen {
                ty: VsockType::Stream | VsockType::Seqpacket,
                ..
            } | Endpoint::UnixListen(_)
                | Endpoint::UnixAbstractListen(_)
                | Endpoint::HvsockListen { .. }
                | Endpoint::TcpListen { .. }
        )
    }

    /// True when this address opens an `AF_VSOCK` socket.
    pub fn is_vsock(&self) -> bool {
        matches!(
            self.endpoint,
            Endpoint::Vsock { .. } | Endpoint::VsockListen { .. }
        )
    }

    /// Whether records keep their boundaries (seqpacket, datagram).
    pub fn is_message_oriented(&self) -> bool {
        matches!(
            self.endpoint,
            Endpoint::Vsock {
                ty: VsockType::Seqpacket | VsockType::Dgram,
                ..
            } | Endpoint::VsockListen {
                ty: VsockType::Seqpacket | VsockType::Dgram,
                ..
            }
        )
    }

    /// The path of the Unix socket a `hvsock-listen` address binds:
    /// `UDS_PATH_PORT`, the Firecracker convention.
    pub fn hvsock_listener_path(uds: &std::path::Path, port: u32) -> PathBuf {
        vmlink_proto::hybrid::host_listener_path(uds, port)
    }
}

/// A malformed address: says which part is wrong and what form was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad address `{input}`: {problem} (expected {expected})")]
pub struct AddrError {
    /// The whole address as given.
    pub input: String,
    /// What is wrong, naming the part.
    pub problem: String,
    /// The form this kind of address takes.
    pub expected: &'static str,
}

const KINDS: &str = "vsock, vsock-listen, vsock-seqpacket, vsock-seqpacket-listen, vsock-dgram, \
vsock-dgram-listen, unix, unix-listen, unix-abstract, unix-abstract-listen, hvsock, \
hvsock-listen, vport, tcp, tcp-listen, stdio or -";

fn form_of(kind: &str) -> &'static str {
    match kind {
        "vsock" => "vsock:CID:PORT",
        "vsock-listen" => "vsock-listen:[CID:]PORT",
        "vsock-seqpacket" => "vsock-seqpacket:CID:PORT",
        "vsock-seqpacket-listen" => "vsock-seqpacket-listen:[CID:]PORT",
        "vsock-dgram" => "vsock-dgram:CID:PORT",
        "vsock-dgram-listen" => "vsock-dgram-listen:[CID:]PORT",
        "unix" => "unix:PATH",
        "unix-listen" => "unix-listen:PATH",
        "unix-abstract" => "unix-abstract:NAME",
        "unix-abstract-listen" => "unix-abstract-listen:NAME",
        "hvsock" => "hvsock:UDS_PATH:PORT",
        "hvsock-listen" => "hvsock-listen:UDS_PATH:PORT",
        "vport" => "vport:NAME_OR_PATH",
        "tcp" => "tcp:HOST:PORT",
        "tcp-listen" => "tcp-listen:[HOST:]PORT",
        "stdio" | "-" => "stdio",
        _ => "KIND:ARGS[,OPTION=VALUE]...",
    }
}

/// Parses a duration such as `500ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration like 500ms, 5s or 2m");
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult_ms)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses a size such as `4096`, `64K`, `1M` or `1G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size like 4096, 64K, 1M or 1G");
    let upper = s.to_ascii_uppercase();
    let t = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Formats a size the way [`parse_size`] reads it back.
pub fn format_size(n: u64) -> String {
    for (suffix, m) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if n >= m && n % m == 0 {
            return format!("{}{suffix}", n / m);
        }
    }
    n.to_string()
}

/// Splits `A:B` at the last colon, minding `[v6]` brackets.
fn split_last_colon(s: &str) -> Option<(&str, &str)> {
    let i = s.rfind(':')?;
    Some((&s[..i], &s[i + 1..]))
}

impl FromStr for Addr {
    type Err = AddrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let mut parts = input.split(',');
        let head = parts.next().unwrap_or("");
        let (kind, rest) = match head.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (head, None),
        };
        let expected = form_of(kind);
        let err = |problem: String| AddrError {
            input: input.to_string(),
            problem,
            expected,
        };
        let need = |what: &str| -> Result<&str, AddrError> {
            match rest {
                Some(r) if !r.is_empty() => Ok(r),
                _ => Err(err(format!("`{kind}` needs {what}"))),
            }
        };
        let none = |rest: Option<&str>| -> Result<(), AddrError> {
            match rest {
                None => Ok(()),
                Some(r) => Err(err(format!("`{kind}` takes no argument, got `{r}`"))),
            }
        };
        let vsock_type = |k: &str| match k {
            "vsock" | "vsock-listen" => VsockType::Stream,
            "vsock-seqpacket" | "vsock-seqpacket-listen" => VsockType::Seqpacket,
            _ => VsockType::Dgram,
        };
        let tcp_port = |p: &str| -> Result<u16, AddrError> {
            p.parse::<u16>()
                .map_err(|_| err(format!("TCP port `{p}` is not a number from 0 to 65535")))
        };
        let strip_brackets = |h: &str| -> String {
            h.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(h)
                .to_string()
        };

        let endpoint = match kind {
            "vsock" | "vsock-seqpacket" | "vsock-dgram" => {
                let r = need("CID:PORT")?;
                let (c, p) = r
                    .split_once(':')
                    .ok_or_else(|| err(format!("`{r}` has no `:` between CID and PORT")))?;
                let cid: Cid = c.parse().map_err(err)?;
                let port: VsockPort = p.parse().map_err(err)?;
                if port.0 == PORT_ANY {
                    return Err(err(
                        "a connecting address needs a real port, not `any`".into()
                    ));
                }
                Endpoint::Vsock {
                    ty: vsock_type(kind),
                    cid,
                    port,
                }
            }
            "vsock-listen" | "vsock-seqpacket-listen" | "vsock-dgram-listen" => {
                let r = need("[CID:]PORT")?;
                let (cid, p) = match r.split_once(':') {
                    Some((c, p)) => (c.parse().map_err(err)?, p),
                    None => (Cid::ANY, r),
                };
                Endpoint::VsockListen {
                    ty: vsock_type(kind),
                    cid,
                    port: p.parse().map_err(err)?,
                }
            }
            "unix" => Endpoint::Unix(need("a PATH")?.into()),
            "unix-listen" => Endpoint::UnixListen(need("a PATH")?.into()),
            "unix-abstract" => Endpoint::UnixAbstract(need("a NAME")?.into()),
            "unix-abstract-listen" => Endpoint::UnixAbstractListen(need("a NAME")?.into()),
            "hvsock" | "hvsock-listen" => {
                let r = need("UDS_PATH:PORT")?;
                let (path, p) = split_last_colon(r)
                    .filter(|(path, _)| !path.is_empty())
                    .ok_or_else(|| err(format!("`{r}` has no `:PORT` after the socket path")))?;
                let port: u32 = p
                    .parse()
                    .map_err(|_| err(format!("port `{p}` is not a number from 0 to 4294967295")))?;
                if kind == "hvsock" {
                    Endpoint::Hvsock {
                        uds: path.into(),
                        port,
                    }
                } else {
                    Endpoint::HvsockListen {
                        uds: path.into(),
                        port,
                    }
                }
            }
            "vport" => Endpoint::Vport(need("a port NAME or a device PATH")?.into()),
            "tcp" => {
                let r = need("HOST:PORT")?;
                let (h, p) = split_last_colon(r)
                    .filter(|(h, _)| !h.is_empty())
                    .ok_or_else(|| err(format!("`{r}` has no HOST:PORT")))?;
                Endpoint::Tcp {
                    host: strip_brackets(h),
                    port: tcp_port(p)?,
                }
            }
            "tcp-listen" => {
                let r = need("[HOST:]PORT")?;
                match split_last_colon(r) {
                    Some((h, p)) if !h.is_empty() => Endpoint::TcpListen {
                        host: Some(strip_brackets(h)),
                        port: tcp_port(p)?,
                    },
                    Some((_, _)) => return Err(err(format!("`{r}` has an empty HOST"))),
                    None => Endpoint::TcpListen {
                        host: None,
                        port: tcp_port(r)?,
                    },
                }
            }
            "stdio" | "-" => {
                none(rest)?;
                Endpoint::Stdio
            }
            "" => return Err(err("the address is empty".into())),
            other => {
                return Err(AddrError {
                    input: input.to_string(),
                    problem: format!("unknown kind `{other}`; known: {KINDS}"),
                    expected: "KIND:ARGS[,OPTION=VALUE]...",
                })
            }
        };

        let mut addr = Addr::new(endpoint);
        for opt in parts {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            let val = || value.ok_or_else(|| err(format!("option `{name}` needs a value")));
            let o = &mut addr.options;
            match name {
                "connect-timeout" => o.connect_timeout = Some(parse_duration(val()?).map_err(err)?),
                "buffer-size" => o.buffer_size = Some(parse_size(val()?).map_err(err)?),
                "buffer-min-size" => o.buffer_min_size = Some(parse_size(val()?).map_err(err)?),
                "buffer-max-size" => o.buffer_max_size = Some(parse_size(val()?).map_err(err)?),
                "backlog" => {
                    let v = val()?;
                    o.backlog = Some(
                        v.parse()
                            .map_err(|_| err(format!("backlog `{v}` is not a number")))?,
                    )
                }
                "unlink" => {
                    if let Some(v) = value {
                        return Err(err(format!("option `unlink` takes no value, got `{v}`")));
                    }
                    o.unlink = true
                }
                "" => return Err(err("empty option after `,`".into())),
                other => {
                    return Err(err(format!(
                        "unknown option `{other}`; known: connect-timeout, buffer-size, \
                         buffer-min-size, buffer-max-size, backlog, unlink"
                    )))
                }
            }
        }
        addr.check_options().map_err(err)?;
        Ok(addr)
    }
}

impl Addr {
    /// Rejects options that mean nothing for this kind of address.
    fn check_options(&self) -> Result<(), String> {
        let o = &self.options;
        let kind = self.kind();
        let vsock = self.is_vsock();
        let listen = self.is_listen();
        if (o.buffer_min_size.is_some() || o.buffer_max_size.is_some()) && !vsock {
            return Err(format!(
                "buffer-min-size and buffer-max-size apply to vsock only, not `{kind}`"
            ));
        }
        if o.buffer_size.is_some() && matches!(self.endpoint, Endpoint::Vport(_) | Endpoint::Stdio)
        {
            return Err(format!("buffer-size does not apply to `{kind}`"));
        }
        if o.connect_timeout.is_some() && (listen || matches!(self.endpoint, Endpoint::Stdio)) {
            return Err(format!(
                "connect-timeout applies to connecting addresses, not `{kind}`"
            ));
        }
        if o.backlog.is_some() && !listen {
            return Err(format!(
                "backlog applies to -listen addresses, not `{kind}`"
            ));
        }
        if o.unlink
            && !matches!(
                self.endpoint,
                Endpoint::UnixListen(_) | Endpoint::HvsockListen { .. }
            )
        {
            return Err(format!(
                "unlink applies to unix-listen and hvsock-listen, not `{kind}`"
            ));
        }
        Ok(())
    }

    /// The address kind, e.g. `vsock-seqpacket-listen`.
    pub fn kind(&self) -> &'static str {
        match &self.endpoint {
            Endpoint::Vsock { ty, .. } => ty.prefix(),
            Endpoint::VsockListen { ty, .. } => match ty {
                VsockType::Stream => "vsock-listen",
                VsockType::Seqpacket => "vsock-seqpacket-listen",
                VsockType::Dgram => "vsock-dgram-listen",
            },
            Endpoint::Unix(_) => "unix",
            Endpoint::UnixListen(_) => "unix-listen",
            Endpoint::UnixAbstract(_) => "unix-abstract",
            Endpoint::UnixAbstractListen(_) => "unix-abstract-listen",
            Endpoint::Hvsock { .. } => "hvsock",
            Endpoint::HvsockListen { .. } => "hvsock-listen",
            Endpoint::Vport(_) => "vport",
            Endpoint::Tcp { .. } => "tcp",
            Endpoint::TcpListen { .. } => "tcp-listen",
            Endpoint::Stdio => "stdio",
        }
    }

    /// The device path of a `vport` address: NAME under `/dev/virtio-ports`,
    /// or the path itself when it contains a `/`.
    pub fn vport_path(name_or_path: &str) -> PathBuf {
        if name_or_path.contains('/') {
            PathBuf::from(name_or_path)
        } else {
            PathBuf::from(VPORT_DIR).join(name_or_path)
        }
    }
}

fn fmt_host(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind();
        match &self.endpoint {
            Endpoint::Vsock { cid, port, .. } => write!(f, "{kind}:{cid}:{port}")?,
            Endpoint::VsockListen { cid, port, .. } => {
                if *cid == Cid::ANY {
                    write!(f, "{kind}:{port}")?
                } else {
                    write!(f, "{kind}:{cid}:{port}")?
                }
            }
            Endpoint::Unix(p) | Endpoint::UnixListen(p) => write!(f, "{kind}:{}", p.display())?,
            Endpoint::UnixAbstract(n) | Endpoint::UnixAbstractListen(n) => write!(f, "{kind}:{n}")?,
            Endpoint::Hvsock { uds, port } | Endpoint::HvsockListen { uds, port } => {
                write!(f, "{kind}:{}:{port}", uds.display())?
            }
            Endpoint::Vport(n) => write!(f, "{kind}:{n}")?,
            Endpoint::Tcp { host, port } => write!(f, "{kind}:{}:{port}", fmt_host(host))?,
            Endpoint::TcpListen {
                host: Some(h),
                port,
            } => write!(f, "{kind}:{}:{port}", fmt_host(h))?,
            Endpoint::TcpListen { host: None, port } => write!(f, "{kind}:{port}")?,
            Endpoint::Stdio => f.write_str("stdio")?,
        }
        if self.options.is_empty() {
            return Ok(());
        }
        let o = &self.options;
        if let Some(d) = o.connect_timeout {
            write!(f, ",connect-timeout={}", format_duration(d))?;
        }
        if let Some(n) = o.buffer_size {
            write!(f, ",buffer-size={}", format_size(n))?;
        }
        if let Some(n) = o.buffer_min_size {
            write!(f, ",buffer-min-size={}", format_size(n))?;
        }
        if let Some(n) = o.buffer_max_size {
            write!(f, ",buffer-max-size={}", format_size(n))?;
        }
        if let Some(n) = o.backlog {
            write!(f, ",backlog={n}")?;
        }
        if o.unlink {
            f.write_str(",unlink")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Addr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn every_kind_round_trips_through_display() {
        for s in [
            "vsock:3:1234",
            "vsock:host:22",
            "vsock:local:5000,connect-timeout=5s,buffer-size=1M",
            "vsock-listen:1234",
            "vsock-listen:local:any",
            "vsock-seqpacket:host:9",
            "vsock-seqpacket-listen:any",
            "vsock-dgram:hypervisor:7",
            "vsock-dgram-listen:3:7,buffer-min-size=4K,buffer-max-size=1G",
            "unix:/run/x.sock",
            "unix-listen:/tmp/a b,backlog=64,unlink",
            "unix-abstract:vmlink",
            "unix-abstract-listen:vmlink",
            "hvsock:/run/fc/v.sock:52",
            "hvsock-listen:/run/fc/v.sock:1234,unlink",
            "vport:org.vmlink.ctl",
            "vport:/dev/vport1p1,connect-timeout=500ms",
            "tcp:127.0.0.1:80",
            "tcp:[::1]:80",
            "tcp-listen:8080",
            "tcp-listen:[::1]:8080",
            "stdio",
        ] {
            let a = p(s);
            assert_eq!(a.to_string(), s, "display of {s}");
            assert_eq!(p(&a.to_string()), a, "reparse of {s}");
        }
    }

    #[test]
    fn cid_names_and_numbers_mean_the_same() {
        assert_eq!(p("vsock:2:5"), p("vsock:host:5"));
        assert_eq!(p("vsock:1:5"), p("vsock:local:5"));
        assert_eq!(p("vsock:0:5"), p("vsock:hypervisor:5"));
        assert_eq!(p("vsock-listen:4294967295:5"), p("vsock-listen:5"));
        assert_eq!(
            p("vsock-listen:any").endpoint,
            Endpoint::VsockListen {
                ty: VsockType::Stream,
                cid: Cid::ANY,
                port: VsockPort(PORT_ANY)
            }
        );
    }

    #[test]
    fn dash_is_stdio() {
        assert_eq!(p("-").endpoint, Endpoint::Stdio);
    }

    #[test]
    fn hvsock_path_may_contain_colons() {
        assert_eq!(
            p("hvsock:/tmp/a:b:9").endpoint,
            Endpoint::Hvsock {
                uds: "/tmp/a:b".into(),
                port: 9
            }
        );
        assert_eq!(
            Addr::hvsock_listener_path("/tmp/v.sock".as_ref(), 1234),
            PathBuf::from("/tmp/v.sock_1234")
        );
    }

    #[test]
    fn vport_names_resolve_under_dev_virtio_ports() {
        assert_eq!(
            Addr::vport_path("org.vmlink.ctl"),
            PathBuf::from("/dev/virtio-ports/org.vmlink.ctl")
        );
        assert_eq!(
            Addr::vport_path("/dev/vport0p1"),
            PathBuf::from("/dev/vport0p1")
        );
    }

    fn bad(s: &str) -> AddrError {
        match s.parse::<Addr>() {
            Ok(a) => panic!("{s} parsed as {a:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_name_the_wrong_part_and_the_expected_form() {
        let e = bad("vsock:x:5");
        assert!(e.problem.contains("CID `x`"), "{e}");
        assert_eq!(e.expected, "vsock:CID:PORT");
        let e = bad("vsock:3:99999999999");
        assert!(e.problem.contains("port `99999999999`"), "{e}");
        let e = bad("vsock:3");
        assert!(e.problem.contains("no `:`"), "{e}");
        let e = bad("vsock:3:any");
        assert!(e.problem.contains("not `any`"), "{e}");
        let e = bad("tcp:localhost:http");
        assert!(e.problem.contains("TCP port `http`"), "{e}");
        let e = bad("hvsock:/tmp/v.sock");
        assert!(e.problem.contains(":PORT"), "{e}");
        assert_eq!(e.expected, "hvsock:UDS_PATH:PORT");
        let e = bad("vsok:1:2");
        assert!(e.problem.contains("unknown kind `vsok`"), "{e}");
        let e = bad("unix:");
        assert!(e.problem.contains("needs a PATH"), "{e}");
        let e = bad("stdio:x");
        assert!(e.problem.contains("takes no argument"), "{e}");
        let e = bad("");
        assert!(e.problem.contains("empty"), "{e}");
        // The message is one line and carries all three parts.
        let msg = bad("vsock:x:5").to_string();
        assert!(!msg.contains('\n'));
        assert!(
            msg.contains("vsock:x:5") && msg.contains("expected vsock:CID:PORT"),
            "{msg}"
        );
    }

    #[test]
    fn options_are_checked_against_the_kind() {
        assert!(bad("unix:/x,buffer-min-size=1K")
            .problem
            .contains("vsock only"));
        assert!(bad("vsock-listen:5,connect-timeout=1s")
            .problem
            .contains("connecting"));
        assert!(bad("vsock:1:5,backlog=3").problem.contains("-listen"));
        assert!(bad("tcp:h:1,unlink").problem.contains("unlink"));
        assert!(bad("vsock:1:5,frobnicate=1")
            .problem
            .contains("unknown option `frobnicate`"));
        assert!(bad("vsock:1:5,connect-timeout=soon")
            .problem
            .contains("`soon` is not a duration"));
        assert!(bad("vsock:1:5,buffer-size=lots")
            .problem
            .contains("`lots` is not a size"));
        assert!(bad("vsock:1:5,connect-timeout")
            .problem
            .contains("needs a value"));
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
    }
}
