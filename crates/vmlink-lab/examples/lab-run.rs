//! Runs one command in a lab guest, like the shell recipe's `run-guest`:
//!
//! ```text
//! cargo run -p vmlink-lab --example lab-run -- [--verbose] [--vsock] [--cpus N]
//!     [--mem SIZE] [--timeout SECS] [--modprobe MOD] [--no-cwd] -- COMMAND [ARG]...
//! ```
//!
//! Exits with the command's status; prints the wall time to stderr.

use std::ffi::OsString;
use std::time::{Duration, Instant};

fn main() {
    let mut cfg = vmlink_lab::LabConfig::default();
    let mut args = std::env::args_os().skip(1);
    let mut argv: Vec<OsString> = Vec::new();
    let mut timing = false;
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.into_string().ok())
                .unwrap_or_default()
        };
        match a.to_str() {
            Some("--verbose") => cfg.verbose = true,
            Some("--vsock") => cfg.vsock_loopback = true,
            Some("--no-cwd") => cfg.share_cwd = false,
            Some("--time") => timing = true,
            Some("--cpus") => cfg.cpus = value().parse().unwrap_or(0),
            Some("--mem") => cfg.mem = value(),
            Some("--timeout") => {
                cfg.timeout = Some(Duration::from_secs(value().parse().unwrap_or(0)))
            }
            Some("--modprobe") => cfg.modules.push(value()),
            Some("--qemu-arg") => cfg.qemu_args.push(value()),
            Some("--") => {
                argv.extend(args.by_ref());
                break;
            }
            _ => {
                argv.push(a);
                argv.extend(args.by_ref());
                break;
            }
        }
    }
    let start = Instant::now();
    let code = match vmlink_lab::run(&cfg, &argv, vmlink_lab::GuestIo::Inherit) {
        Ok(outcome) => outcome.code,
        Err(e) => {
            eprintln!("lab-run: {e}");
            125
        }
    };
    if timing {
        eprintln!("lab-run: {} ms", start.elapsed().as_millis());
    }
    std::process::exit(code);
}
