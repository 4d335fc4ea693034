//! Test fixtures for crates whose tests boot lab guests.
//!
//! The pattern: a `#[test]` runs on the host, boots a guest that runs the
//! same test binary filtered to that one test, and asserts that it passed;
//! inside the guest ([`in_guest`](crate::in_guest) is true) the body runs
//! against the real kernel. [`guest_test!`](crate::guest_test) writes that
//! for you. A guest that cannot boot fails the test; nothing is skipped. A guest
//! that times out (a guest kernel that stalled under TCG, or hung silently) is
//! run once more, and the repeat is listed in [`retry_log`] for CI to show.

use std::ffi::OsString;

use crate::{GuestIo, LabConfig};

/// How long one guest test may run before the lab stops it (status 124
/// fails the test): a hang costs minutes, not the whole CI budget.
pub const GUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// Boots a guest with `cfg` that runs test `name` of the current test
/// binary, and panics (showing the guest's output) unless it passed.
pub fn run_self_in_guest(cfg: LabConfig, name: &str) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => panic!("cannot find the current test binary: {e}"),
    };
    let argv: Vec<OsString> = vec![
        exe.into(),
        name.into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let run = || match crate::run(&cfg, &argv, GuestIo::Capture) {
        Ok(o) => o,
        Err(e) => panic!("the lab guest for {name} did not run: {e}"),
    };
    let mut out = run();
    if out.code == 124 {
        // The guest timed out. Twice in CI on 2026-11-24 a guest hung for good while its test
        // had nothing to do with it: once with RCU stall reports on the console (a vCPU's timer
        // never fired: TCG on a loaded 2-core host), once with a silent console. Run it once
        // more, and say so where CI counts it (scripts/test.sh prints the list at the end); a
        // test that hangs by itself hangs again and fails.
        let first = String::from_utf8_lossy(&out.stderr).into_owned();
        let why = if kernel_stalled(&first) {
            "the guest kernel stalled (RCU stall reports)"
        } else {
            "the guest timed out"
        };
        eprintln!(
            "vmlink-lab: guest test {name}: {why}; running it once more. First attempt:\n{first}"
        );
        record_retry(name, why, &out.stderr);
        out = run();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines with "measured:" carry figures out of the guest into the
    // host's test output.
    for line in stdout.lines() {
        if let Some(at) = line.find("measured:") {
            println!("guest {}", &line[at..]);
        }
    }
    assert_eq!(
        out.code, 0,
        "guest test {name} failed with status {}\n--- guest stdout\n{stdout}\n--- guest stderr\n{stderr}",
        out.code
    );
    // The harness in the guest must have run exactly this one test.
    assert!(stdout.contains("1 passed"), "guest ran no test:\n{stdout}");
}

/// Whether a timed-out guest's console shows its kernel stalled (RCU stall reports), as
/// opposed to the test hanging on its own.
pub fn kernel_stalled(console: &str) -> bool {
    console.contains("rcu: INFO: rcu_preempt detected stalls")
        || console.contains("rcu: INFO: rcu_sched detected stalls")
        || console.contains("self-detected stall on CPU")
        || console.contains("kthread timer wakeup didn't happen")
}

/// Where guest tests run a second time after a time-out are listed, one a line (test name and
/// why), for CI to count.
pub fn retry_log() -> std::path::PathBuf {
    std::env::temp_dir().join("vmlink-lab-guest-retries.log")
}

/// How many lines of a timed-out attempt's output the retry log keeps.
const RETRY_TAIL_LINES: usize = 30;

/// Adds `name` and `why` to the retry log, with the last lines of the first attempt's output
/// (the test's stderr, then the lab's timeout message with the guest console's tail): nextest
/// shows nothing of a test that passes on its second run, so this is the only trace of the hang.
fn record_retry(name: &str, why: &str, first_stderr: &[u8]) {
    use std::io::Write;
    let tail = crate::guest::tail_lines(first_stderr, RETRY_TAIL_LINES, "  | ");
    let line = format!("{name}: {why}\n{tail}");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(retry_log())
        .and_then(|mut f| f.write_all(line.as_bytes()));
}

/// A config with `vsock_loopback` loaded and [`GUEST_TIMEOUT`].
pub fn vsock_lab() -> LabConfig {
    LabConfig {
        vsock_loopback: true,
        timeout: Some(GUEST_TIMEOUT),
        ..LabConfig::default()
    }
}

/// Reproducible pseudo-random bytes (xorshift), different per seed.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Defines a `#[test]` whose body runs inside a lab guest built by the
/// `cfg` block:
///
/// ```ignore
/// vmlink_lab::guest_test! {
///     fn vsock_works() cfg { vmlink_lab::testing::vsock_lab() } {
///         assert!(std::path::Path::new("/dev/vsock").exists());
///     }
/// }
/// ```
#[macro_export]
macro_rules! guest_test {
    ($(#[$m:meta])* fn $name:ident() cfg $cfg:block $body:block) => {
        #[test]
        $(#[$m])*
        fn $name() {
            if !$crate::in_guest() {
                $crate::testing::run_self_in_guest($cfg, stringify!($name));
                return;
            }
            $body
        }
    };
}

#[cfg(test)]
mod tests {
    use super::kernel_stalled;

    #[test]
    fn an_rcu_stall_on_the_console_is_a_kernel_stall_and_a_quiet_hang_is_not() {
        // The console tail of a guest that hung in CI (2026-11-24).
        let stalled = "vmlink-lab: timed out after 240s; last guest console lines:\n\
            console: [  171.870850] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
            console: [  171.873265] rcu: rcu_preempt kthread timer wakeup didn't happen for 15758 jiffies!";
        assert!(kernel_stalled(stalled));
        let quiet = "vmlink-lab: timed out after 180s; last guest console lines:\n\
            console: [    1.2] virtio_vsock: probe";
        assert!(!kernel_stalled(quiet));
    }
}
