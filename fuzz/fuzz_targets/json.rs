//! Any bytes given to the JSON decoder: an event or a clear error, never a
//! panic; an event it accepts encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use order_lifecycle::wire::json;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = json::decode(data) {
        let again = json::decode(json::encode(&event).as_bytes())
            .expect("an accepted event's encoding decodes");
        assert_eq!(again, event, "JSON round trip");
    }
});
