//! virtio-serial between a host Unix socket (QEMU's chardev) and the
//! guest's port, through the real virtio-console driver.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use vmlink_lab::{GuestIo, LabConfig};
use vmlink_transport::{Addr, Error, Stream};

const PORT: &str = "org.vmlink.test";
const HOST_BYTES: usize = 3 << 20;
const GUEST_BYTES: usize = 2 << 20;

/// Guest half: read the host's length-prefixed payload from the port, answer
/// with its digest and a payload of the guest's own.
fn guest_half() {
    // A port that does not exist: the error lists the ones that do.
    let e = Stream::connect(&"vport:no.such.port".parse::<Addr>().expect("addr"))
        .expect_err("missing port");
    assert!(matches!(e, Error::NoSuchPort { .. }), "{e:?}");
    assert!(e.to_string().contains(PORT), "{e}");

    // Opening waits until the host end is connected (reads would be EOF before).
    let mut s = Stream::connect(
        &format!("vport:{PORT},connect-timeout=60s")
            .parse::<Addr>()
            .expect("addr"),
    )
    .expect("open the port");
    let mut len = [0u8; 8];
    s.read_exact(&mut len).expect("length");
    let mut data = vec![0u8; u64::from_le_bytes(len) as usize];
    s.read_exact(&mut data).expect("host payload");
    s.write_all(&common::sha(&data)).expect("digest");
    s.write_all(&common::payload(2, GUEST_BYTES))
        .expect("guest payload");
}

#[test]
fn virtio_serial_moves_data_both_ways_between_host_socket_and_guest_port() {
    if vmlink_lab::in_guest() {
        return guest_half();
    }
    let dir = std::env::temp_dir().join(format!("vmlink-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("port.sock");
    let cfg = LabConfig {
        serials: vec![(PORT.into(), sock.clone())],
        timeout: Some(vmlink_lab::testing::GUEST_TIMEOUT),
        ..LabConfig::default()
    };
    let exe = std::env::current_exe().expect("test binary");
    let argv: Vec<std::ffi::OsString> = vec![
        exe.into(),
        "virtio_serial_moves_data_both_ways_between_host_socket_and_guest_port".into(),
        "--exact".into(),
        "--nocapture".into(),
    ];
    let guest = vmlink_lab::spawn(&cfg, &argv, GuestIo::Capture).expect("boot the guest");
    // spawn() returns once QEMU's chardev socket exists.
    let mut host = UnixStream::connect(&sock).expect("connect to QEMU's chardev socket");
    let data = common::payload(1, HOST_BYTES);
    host.write_all(&(data.len() as u64).to_le_bytes())
        .expect("length");
    host.write_all(&data).expect("payload");
    let mut digest = [0u8; 32];
    host.read_exact(&mut digest).expect("digest from guest");
    assert_eq!(digest.to_vec(), common::sha(&data));
    let mut back = vec![0u8; GUEST_BYTES];
    host.read_exact(&mut back).expect("guest payload");
    assert_eq!(
        common::sha(&back),
        common::sha(&common::payload(2, GUEST_BYTES))
    );
    let out = guest.wait().expect("guest ends");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        out.code,
        0,
        "guest half failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}
