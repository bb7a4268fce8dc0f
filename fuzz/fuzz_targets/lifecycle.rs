//! Any sequence of events over a few orders and ids keeps the lifecycle
//! rules: one active id per type, ids bound once, sequences 1..n, replay
//! gives the same state (the checks of the domain's property test).
#![no_main]

use libfuzzer_sys::fuzz_target;
use order_lifecycle::testing::sequences::{event, steps_from_bytes, InvariantCheck};

fuzz_target!(|data: &[u8]| {
    let mut check = InvariantCheck::new();
    for (n, step) in steps_from_bytes(data).enumerate() {
        if let Err(broken) = check.step(&event(step, n)) {
            panic!("{broken}");
        }
    }
    if let Err(broken) = check.finish() {
        panic!("{broken}");
    }
});
