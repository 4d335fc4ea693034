//! vmlink-vhost: a vhost-user-vsock device backend whose host side is hybrid vsock (Unix
//! sockets, the Firecracker convention), for several VMs in one process.
//!
//! - [`device`]: the vsock device model of one VM (connections, credit, shutdown, RST) and its
//!   hybrid host side, independent of vhost-user.
//! - [`backend`]: the thin vhost-user adapter on `vhost-user-backend`, `virtio-queue` and
//!   `virtio-vsock`.
//! - [`capture`]: packet capture in the vsockmon pcap link type.
//! - [`config`]: `--vm` specs and the TOML config file.
//! - [`counters`]: per-VM counters.
//! - [`fuzzing`]: the harness of the TX-path fuzz target.
//! - [`router`]: VM-to-VM routing between VMs that share a group.
//! - [`serve`]: running VMs, restarting each one's device when its VMM reconnects.
//! - [`stats`]: the stats socket: every VM's counters as JSON.
//!
//! See `docs/vhost.md` for the design and the bounds.

pub mod backend;
pub mod capture;
pub mod config;
pub mod counters;
pub mod device;
pub mod fuzzing;
pub mod router;
pub mod serve;
pub mod stats;
