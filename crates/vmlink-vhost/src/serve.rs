//! Running VMs: one vhost-user daemon per VM, restarted with a fresh device whenever its VMM
//! disconnects (QEMU restarting, or reconnecting its chardev), so that a VM going away frees all
//! of its connections and buffers.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{VsockBackend, HOST_EVENT};
use crate::capture::Capture;
use crate::config::VmConfig;
use crate::counters::Counters;
use crate::device::{Device, DeviceConfig, DeviceError};
use crate::router::Router;

/// Why a VM stopped being served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The device could not start.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The vhost-user side could not start.
    #[error("vhost-user socket {path}: {msg}")]
    VhostUser {
        /// The socket.
        path: String,
        /// What failed.
        msg: String,
    },
}

/// The device config for `vm`, with the default bounds.
pub fn device_config(vm: &VmConfig) -> DeviceConfig {
    DeviceConfig {
        tx_buffer_size: vm.tx_buffer_size,
        max_connections: vm.max_connections,
        ..DeviceConfig::new(vm.guest_cid, vm.uds_path.clone())
    }
}

/// Serves `vm` forever: waits for its VMM on `vm.socket`, runs the device until the VMM goes
/// away, then starts over with a fresh device. `first` is the device for the first round (the
/// caller creates it to report bind errors before starting). Returns only on a setup error.
pub fn serve_vm(
    vm: &VmConfig,
    first: Device,
    counters: Arc<Counters>,
    router: Option<Arc<Router>>,
    capture: Option<Arc<Capture>>,
) -> Result<(), ServeError> {
    let mut next = Some(first);
    let vhost_err = |msg: String| ServeError::VhostUser {
        path: vm.socket.display().to_string(),
        msg,
    };
    loop {
        let device = match next.take() {
            Some(d) => d,
            None => Device::with_router(device_config(vm), counters.clone(), router.clone())?,
        };
        let epoll_fd = device.epoll_fd();
        let backend = VsockBackend::new(device)
            .map_err(|e| vhost_err(e.to_string()))?
            .with_capture(capture.clone())
            .with_poll(Duration::from_micros(u64::from(vm.poll_us)));
        let backend = Arc::new(RwLock::new(backend));
        let mut daemon = VhostUserDaemon::new(
            format!("vmlink-vhost-cid{}", vm.guest_cid),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| vhost_err(format!("{e:?}")))?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(epoll_fd, EventSet::IN, u64::from(HOST_EVENT))
                .map_err(|e| vhost_err(format!("cannot watch the host side: {e}")))?;
        }
        // Bind before saying so: a VMM started on that line finds the socket there.
        let listener = Listener::new(&vm.socket, true)
            .map_err(|e| vhost_err(format!("cannot listen: {e}")))?;
        info!(
            cid = vm.guest_cid,
            "waiting for the VMM on {}",
            vm.socket.display()
        );
        let session = daemon.start(listener).and_then(|()| daemon.wait());
        // The session is over however it ended: stop the worker threads.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match session {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!(
                cid = vm.guest_cid,
                "VMM disconnected; freeing the VM's state"
            ),
            Err(e) => warn!(cid = vm.guest_cid, "vhost-user session ended: {e}"),
        }
        info!(cid = vm.guest_cid, "counters: {}", counters.snapshot());
        drop(daemon);
        drop(backend);
    }
}
