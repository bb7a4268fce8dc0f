//! Any message, with or without a content-type: the whole decoding path
//! (size limits, the schema registry frame, detection of the encoding)
//! gives an event or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use order_lifecycle::wire;

fuzz_target!(|data: &[u8]| {
    let content_types: [Option<&[u8]>; 3] = [None, Some(b"application/json"), Some(b"application/x-protobuf")];
    let (which, payload) = data.split_first().unwrap_or((&0, data));
    let _ = wire::decode(payload, content_types[usize::from(*which) % 3]);
    let _ = wire::registry::schema_id(payload);
});
