//! Per-VM counters, readable from any thread while the device runs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// One per-VM counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum Counter {
            $($(#[$doc])* $name,)*
        }

        impl Counter {
            /// Every counter, in display order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// The counter's name as shown in logs and snapshots.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$name => stringify!($name),)*
                }
            }
        }
    };
}

counters! {
    /// Packets the guest put on its TX queue (parsed or not).
    tx_packets,
    /// Payload bytes the guest sent on established connections.
    tx_bytes,
    /// Packets given to the guest on its RX queue.
    rx_packets,
    /// Payload bytes given to the guest.
    rx_bytes,
    /// TX descriptor chains that virtio-vsock could not parse (bad descriptors, lengths).
    malformed_descriptors,
    /// RX descriptor chains (buffers the guest gave for packets to it) that virtio-vsock could
    /// not parse, or with no room for the payload that waits: returned unused, the packet waits
    /// for the next one.
    malformed_rx_descriptors,
    /// Packets with an unknown type or operation, or an operation not valid in the
    /// connection's state.
    bad_packets,
    /// Packets whose source CID is not the guest's CID: dropped.
    spoofed_cid,
    /// Packets to a CID this device cannot reach: dropped (a request is answered with RST).
    unroutable,
    /// Data beyond the credit this device gave: the connection is reset.
    credit_violations,
    /// Seqpacket connections reset because the guest queued more whole messages for a host
    /// socket than `tx-buffer-size / 4` (`device::seq_msg_bound`).
    seqpacket_limit,
    /// Empty seqpacket messages from the guest: dropped (a host reader would take one for
    /// end-of-file).
    empty_messages,
    /// Connections refused because the VM is at its connection bound.
    connection_limit,
    /// Guest connections to a host port where nothing listens: answered with RST.
    refused,
    /// RST packets sent to the guest.
    resets_sent,
    /// Host clients whose `CONNECT` line was invalid, too slow or cut short.
    handshake_errors,
    /// Host clients dropped because too many were still in their handshake.
    handshake_limit,
    /// Failed `accept`s of host clients (the process out of file descriptors, most often): the
    /// listener is not watched until the next tick or a closed connection.
    accept_errors,
    /// Host-initiated connections that the guest did not answer in time.
    connect_timeouts,
    /// Connections opened (both directions).
    connections_opened,
    /// Connections closed and freed, including those freed with the device when its VMM goes
    /// away: `connections_opened - connections_closed` is the number open.
    connections_closed,
    /// Packets forwarded to another VM of this process.
    forwarded,
    /// Packets to another VM dropped because its inbox was full (the connection is reset).
    forward_dropped,
    /// Control packets dropped because the guest did not take its RX queue fast enough.
    rx_overflow,
    /// Times the VM's thread found work by polling after an event (`poll-us`), without
    /// sleeping and being woken.
    poll_hits,
}

const N: usize = Counter::ALL.len();

/// A VM's counters. Shared behind an `Arc`; every update is a relaxed atomic add.
#[derive(Debug, Default)]
pub struct Counters {
    values: [AtomicU64; N],
}

impl Counters {
    /// Adds `n` to `c` and returns the new value.
    pub fn add(&self, c: Counter, n: u64) -> u64 {
        self.values[c as usize]
            .fetch_add(n, Ordering::Relaxed)
            .wrapping_add(n)
    }

    /// Adds one to `c` and returns the new value.
    pub fn inc(&self, c: Counter) -> u64 {
        self.add(c, 1)
    }

    /// The current value of `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(Counter::ALL.iter().map(|&c| (c, self.get(c))).collect())
    }
}

/// Counter values at one instant. `Display` shows `name=value` pairs, zeros left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot(pub Vec<(Counter, u64)>);

impl Snapshot {
    /// The value of `c` in this snapshot.
    pub fn get(&self, c: Counter) -> u64 {
        self.0.iter().find(|(k, _)| *k == c).map_or(0, |(_, v)| *v)
    }
}

/// A JSON object (or any serde map) of every counter by name, in display order, zeros included:
/// what the stats socket shows.
impl serde::Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (c, v) in &self.0 {
            m.serialize_entry(c.name(), v)?;
        }
        m.end()
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (c, v) in &self.0 {
            if *v == 0 {
                continue;
            }
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{}={v}", c.name())?;
        }
        if first {
            f.write_str("(all zero)")?;
        }
        Ok(())
    }
}

/// True when `n` is a power of two: log the 1st, 2nd, 4th, 8th... occurrence of a guest error,
/// so that a flood cannot flood the log.
pub(crate) fn should_log(n: u64) -> bool {
    n.is_power_of_two()
}
