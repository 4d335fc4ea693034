//! `vmlink capture` in a guest: the kernel's vsockmon device, a real vsock connection over the
//! loopback transport, and tshark reading the pcap back with its vsock dissector.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;

use vmlink_lab::{guest_test, LabConfig};
use vmlink_transport::{Addr, Listener, Stream};

fn capture_lab() -> LabConfig {
    LabConfig {
        modules: vec!["vsockmon".into()],
        ..common::vsock_lab()
    }
}

guest_test! {
    fn capture_records_a_vsock_conversation_that_tshark_decodes() cfg { capture_lab() } {
        let pcap = "/run/vsock.pcap";
        let mut cap = common::vmlink()
            .args(["capture", "-w", pcap])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmlink capture");
        let mut err = BufReader::new(cap.stderr.take().expect("stderr"));
        let mut line = String::new();
        err.read_line(&mut line).expect("read");
        assert!(line.contains("capturing vsock packets on vsockmon0"), "{line}");

        // One conversation over vsock loopback: a request, an echo, a close.
        let l = Listener::bind(&"vsock-listen:local:4321".parse::<Addr>().expect("addr")).expect("bind");
        let server = std::thread::spawn(move || {
            let mut s = l.accept().expect("accept");
            let mut b = [0u8; 14];
            s.read_exact(&mut b).expect("read");
            s.write_all(&b).expect("echo");
        });
        let mut c = Stream::connect(&"vsock:local:4321".parse::<Addr>().expect("addr")).expect("connect");
        c.write_all(b"hello vsockmon").expect("write");
        let mut back = [0u8; 14];
        c.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"hello vsockmon");
        drop(c);
        server.join().expect("server");

        // Stop the capture; it removes the interface it created.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(cap.id() as i32, libc::SIGINT) };
        let mut rest = String::new();
        err.read_to_string(&mut rest).expect("read");
        assert!(cap.wait().expect("capture ends").success(), "{rest}");
        assert!(rest.contains("packets captured"), "{rest}");
        assert!(!std::path::Path::new("/sys/class/net/vsockmon0").exists(), "interface left behind");

        let out = std::process::Command::new("tshark")
            .args(["-r", pcap, "-T", "fields", "-e", "vsock.src_port", "-e", "vsock.dst_port", "-e", "vsock.op", "-e", "vsock.payload"])
            .output()
            .expect("tshark");
        let text = String::from_utf8_lossy(&out.stdout);
        println!("measured: tshark read\n{text}");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The listener's port appears, and the request's bytes in two payloads (there and back).
        assert!(text.lines().any(|l| l.split('\t').any(|f| f == "4321")), "{text}");
        let hex: String = b"hello vsockmon".iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(text.matches(&hex).count(), 2, "{text}");
    }
}
