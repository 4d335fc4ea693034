//! Packet capture in the Linux vsockmon link type (`LINKTYPE_VSOCK`, 271), which `tshark` and
//! Wireshark decode.
//!
//! The file is a classic pcap file. Each record is the 32-byte `struct af_vsockmon_hdr` of
//! `include/uapi/linux/vsockmon.h` (all little-endian: `src_cid` u64, `dst_cid` u64, `src_port`
//! u32, `dst_port` u32, `op` u16, `transport` u16, `len` u16 = 44, two reserved bytes), then the
//! 44-byte `struct virtio_vsock_hdr`, then the payload. Every packet of every VM of the process
//! goes into one file, in both directions, as the guest sent it or as it was given to the guest.
//!
//! Capture can be switched on and off while running ([`Capture::set_enabled`]; the binary does it
//! on `SIGUSR2`).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::device::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN,
};

/// `LINKTYPE_VSOCK`.
pub const LINKTYPE_VSOCK: u32 = 271;
/// Size of `struct af_vsockmon_hdr`.
pub const VSOCKMON_HDR_LEN: usize = 32;
/// Size of `struct virtio_vsock_hdr`.
pub const VIRTIO_HDR_LEN: usize = crate::device::HEADER_LEN;
/// Largest record: headers and a 64 KiB payload.
const SNAPLEN: u32 = 256 * 1024;

/// `AF_VSOCK_TRANSPORT_VIRTIO`.
const TRANSPORT_VIRTIO: u16 = 2;

/// vsockmon's operation class of a virtio-vsock operation, as the Linux kernel maps it.
pub fn vsockmon_op(op: u16) -> u16 {
    match op {
        OP_REQUEST | OP_RESPONSE => 1,             // AF_VSOCK_OP_CONNECT
        OP_RST | OP_SHUTDOWN => 2,                 // AF_VSOCK_OP_DISCONNECT
        OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => 3, // AF_VSOCK_OP_CONTROL
        OP_RW => 4,                                // AF_VSOCK_OP_PAYLOAD
        _ => 0,                                    // AF_VSOCK_OP_UNKNOWN
    }
}

/// One capture record's bytes (without the pcap record header).
pub fn record(h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(VSOCKMON_HDR_LEN + VIRTIO_HDR_LEN + payload.len());
    v.extend_from_slice(&h.src_cid.to_le_bytes());
    v.extend_from_slice(&h.dst_cid.to_le_bytes());
    v.extend_from_slice(&h.src_port.to_le_bytes());
    v.extend_from_slice(&h.dst_port.to_le_bytes());
    v.extend_from_slice(&vsockmon_op(h.op).to_le_bytes());
    v.extend_from_slice(&TRANSPORT_VIRTIO.to_le_bytes());
    v.extend_from_slice(&(VIRTIO_HDR_LEN as u16).to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&h.to_bytes());
    v.extend_from_slice(payload);
    v
}

/// A pcap file shared by every VM of the process.
#[derive(Debug)]
pub struct Capture {
    out: Mutex<BufWriter<File>>,
    enabled: AtomicBool,
}

impl Capture {
    /// Creates (truncates) `path` and writes the pcap file header. Capture starts `enabled` or
    /// not.
    pub fn create(path: &Path, enabled: bool) -> io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&SNAPLEN.to_le_bytes())?;
        out.write_all(&LINKTYPE_VSOCK.to_le_bytes())?;
        out.flush()?;
        Ok(Capture {
            out: Mutex::new(out),
            enabled: AtomicBool::new(enabled),
        })
    }

    /// Whether packets are being written.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Switches capture on or off; switching off flushes the file.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
        if !on {
            self.flush();
        }
    }

    /// Writes one packet if capture is on. A write error switches capture off (and is logged):
    /// a full disk must not stop the device.
    pub fn packet(&self, h: &Header, payload: &[u8]) {
        if !self.enabled() {
            return;
        }
        self.raw(&record(h, payload));
    }

    /// Writes one record that is already in the link type's layout (the vsockmon header, the
    /// transport header, the payload), as the kernel's vsockmon device delivers it.
    pub fn raw(&self, rec: &[u8]) {
        self.raw_cut(rec, rec.len());
    }

    /// [`Capture::raw`] for a record of which only the first `rec.len()` bytes were read: the
    /// pcap record keeps `orig_len` as the packet's real length, so that readers show it as cut
    /// short (as pcap does with a snap length).
    pub fn raw_cut(&self, rec: &[u8], orig_len: usize) {
        if !self.enabled() {
            return;
        }
        let orig_len = orig_len.max(rec.len());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let incl = rec.len().min(SNAPLEN as usize);
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let r = (|| {
            out.write_all(&(now.as_secs() as u32).to_le_bytes())?;
            out.write_all(&now.subsec_micros().to_le_bytes())?;
            out.write_all(&(incl as u32).to_le_bytes())?;
            out.write_all(&(orig_len.min(u32::MAX as usize) as u32).to_le_bytes())?;
            out.write_all(&rec[..incl])
        })();
        if let Err(e) = r {
            tracing::error!("packet capture failed, switching it off: {e}");
            self.enabled.store(false, Ordering::Relaxed);
        }
    }

    /// Flushes buffered records to the file.
    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.flush() {
            tracing::error!("packet capture failed, switching it off: {e}");
            self.enabled.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_vsockmon_then_virtio_header_then_payload() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 52,
            len: 2,
            type_: 1,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        };
        let r = record(&h, b"hi");
        assert_eq!(r.len(), 32 + 44 + 2);
        assert_eq!(&r[0..8], &3u64.to_le_bytes());
        assert_eq!(&r[16..20], &1024u32.to_le_bytes());
        assert_eq!(&r[24..26], &4u16.to_le_bytes(), "payload op");
        assert_eq!(&r[26..28], &2u16.to_le_bytes(), "virtio transport");
        assert_eq!(&r[28..30], &44u16.to_le_bytes(), "header length");
        assert_eq!(&r[32 + 30..32 + 32], &OP_RW.to_le_bytes());
        assert_eq!(&r[76..], b"hi");
        assert_eq!(vsockmon_op(OP_REQUEST), 1);
        assert_eq!(vsockmon_op(OP_RST), 2);
        assert_eq!(vsockmon_op(OP_CREDIT_UPDATE), 3);
        assert_eq!(vsockmon_op(99), 0);
    }

    #[test]
    fn a_cut_record_keeps_its_real_length() {
        let path = std::env::temp_dir().join(format!("vmlink-cap-cut-{}.pcap", std::process::id()));
        let cap = Capture::create(&path, true).expect("create");
        cap.raw(b"whole");
        cap.raw_cut(b"cut", 70_000);
        cap.flush();
        let b = std::fs::read(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        // File header 24 bytes; each record: ts (8), incl_len, orig_len, data.
        assert_eq!((u32_at(24 + 8), u32_at(24 + 12)), (5, 5));
        let second = 24 + 16 + 5;
        assert_eq!((u32_at(second + 8), u32_at(second + 12)), (3, 70_000));
        assert_eq!(&b[second + 16..], b"cut");
    }
}
