//! The vmlink-vhost TX path on arbitrary guest rings and memory: descriptor tables, avail rings,
//! packet headers and payloads are all the input's (layout: `vmlink_vhost::fuzzing`). The device
//! must drop and count what is wrong and never panic.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use vmlink_vhost::fuzzing::TxHarness;

thread_local! {
    static HARNESS: RefCell<Option<TxHarness>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        let harness = h.get_or_insert_with(|| TxHarness::new().expect("harness"));
        harness.run(data);
    });
});
