//! Any bytes given to the protobuf decoder: an event or a clear error,
//! never a panic; an event it accepts encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use order_lifecycle::wire::protobuf;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = protobuf::decode(data) {
        let again = protobuf::decode(&protobuf::encode(&event))
            .expect("an accepted event's encoding decodes");
        assert_eq!(again, event, "protobuf round trip");
    }
});
