//! TARGET: where a guest's agent is, for `ping`, `info`, `exec`, `cp`, `run` and `logs`.
//!
//! ```text
//! vsock:3:7878                 a vmlink-agent, at any connecting transport address
//! unix:/run/vmlink.sock        (hvsock:UDS:PORT, vport paths, tcp:... likewise)
//! lab:NAME                     a guest started with `vmlink lab up NAME`
//! qga+unix:/run/qga.sock       a guest that runs only a stock qemu-ga (its chardev socket)
//! ```
//!
//! `lab:NAME` is resolved through the lab's state directory (see `crate::lab_up`), which
//! records the connecting address of that guest's agent.

use std::fmt;
use std::str::FromStr;

use vmlink_transport::Addr;

/// A TARGET as the user wrote it.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A vmlink-agent at this connecting address.
    Agent(Addr),
    /// A stock qemu-guest-agent (or `vmlink-agent --qga`) at this connecting address.
    Qga(Addr),
    /// A guest started with `vmlink lab up NAME`.
    Lab(String),
}

/// A TARGET after `lab:NAME` has been looked up: what to speak, and where.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    /// vmlink's agent protocol.
    Agent(Addr),
    /// qemu-guest-agent's JSON protocol.
    Qga(Addr),
}

/// A TARGET that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The address part does not parse.
    #[error(transparent)]
    Addr(#[from] vmlink_transport::AddrError),
    /// A listening address was given where the agent must be reached.
    #[error("{0} is a listening address; TARGET needs the agent's connecting address (e.g. vsock:3:7878)")]
    Listening(String),
    /// `lab:` with a bad name.
    #[error("lab guest name {0:?}: expected 1-32 characters of [A-Za-z0-9_-]")]
    LabName(String),
}

/// Whether `name` is a valid lab guest name (also a safe directory name).
pub fn valid_lab_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Target, TargetError> {
        if let Some(name) = s.strip_prefix("lab:") {
            if !valid_lab_name(name) {
                return Err(TargetError::LabName(name.to_string()));
            }
            return Ok(Target::Lab(name.to_string()));
        }
        let (qga, rest) = match s.strip_prefix("qga+") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let addr: Addr = rest.parse()?;
        if addr.is_listen() {
            return Err(TargetError::Listening(addr.to_string()));
        }
        Ok(if qga {
            Target::Qga(addr)
        } else {
            Target::Agent(addr)
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Agent(a) => write!(f, "{a}"),
            Target::Qga(a) => write!(f, "qga+{a}"),
            Target::Lab(n) => write!(f, "lab:{n}"),
        }
    }
}

impl Target {
    /// Looks `lab:NAME` up; other targets resolve to themselves.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        match self {
            Target::Agent(a) => Ok(Resolved::Agent(a.clone())),
            Target::Qga(a) => Ok(Resolved::Qga(a.clone())),
            Target::Lab(name) => match crate::lab_up::lookup(name)? {
                Target::Lab(_) => anyhow::bail!("lab guest {name} points at another lab guest"),
                t => t.resolve(),
            },
        }
    }
}

impl Resolved {
    /// The vmlink-agent address, or an error saying this verb needs one.
    pub fn agent(self, verb: &str) -> anyhow::Result<Addr> {
        match self {
            Resolved::Agent(a) => Ok(a),
            Resolved::Qga(a) => anyhow::bail!(
                "`vmlink {verb}` does not work over qemu-guest-agent yet (target qga+{a}); \
                 it needs vmlink-agent"
            ),
        }
    }
}

/// For clap: a bad TARGET is a usage error (exit 2) naming the wrong part.
pub fn parse_target(s: &str) -> Result<Target, String> {
    s.parse::<Target>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            "vsock:3:7878"
                .parse::<Target>()
                .expect("parses")
                .to_string(),
            "vsock:3:7878"
        );
        assert!(matches!(
            "qga+unix:/run/q.sock".parse::<Target>().expect("parses"),
            Target::Qga(_)
        ));
        assert_eq!(
            "lab:dev-1".parse::<Target>().expect("parses"),
            Target::Lab("dev-1".into())
        );
        for bad in [
            "lab:",
            "lab:a/b",
            "lab:..",
            "vsock-listen:7878",
            "qga+nope:1",
            "x",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
        let e = "vsock-listen:7878"
            .parse::<Target>()
            .expect_err("listening")
            .to_string();
        assert!(e.contains("listening address"), "{e}");
    }
}
