//! A native vhost-user frontend that plays a Linux guest's virtio-vsock driver, so that a
//! vhost-user-vsock backend can be measured and tested without QEMU and without a guest.
//!
//! - [`machine`]: the vhost-user handshake as QEMU does it for `vhost-user-vsock-pci`, the
//!   memfd-backed guest memory and the split virtqueues (driver side, with `EVENT_IDX`).
//! - [`driver`]: the virtio-vsock driver model (Linux 6.1's `virtio_transport.c` and
//!   `virtio_transport_common.c`): RX buffers, TX packets, credit, connection states.
//! - [`workload`]: upload, download, 1-byte round trips, many connections and a half-close,
//!   with host-side endpoints on Unix sockets in their own threads; every byte is checked.
//!
//! Shared by `examples/vsock_driver.rs` (the benchmark) and `tests/native_driver.rs`.
//! Never opens an AF_VSOCK socket: everything here is Unix sockets, memfds and eventfds.

pub mod driver;
pub mod machine;
pub mod workload;
