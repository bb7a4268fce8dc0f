//! Decoding tests: both encodings, detection, and every kind of bad input.

use super::*;
use crate::domain::{EventKind, IdType};

const SL_JSON: &str = r#"{"event_id":"e-42","order_id":"123456789","occurred_at_ms":1764300000000,
 "user_id":"7","user_type":"live",
 "stop_loss_added":{"stoploss_id":"SL111","price":"1.1950"}}"#;

#[test]
fn contract_json_example_decodes() {
    let e = decode(SL_JSON.as_bytes(), None).unwrap();
    assert_eq!(e.event_id.as_str(), "e-42");
    assert_eq!(e.order_id.as_ref().unwrap().as_str(), "123456789");
    assert_eq!(e.issued_ids()[0].0.as_str(), "SL111");
    assert_eq!(e.issued_ids()[0].1, IdType::StoplossId);
    match &e.kind {
        EventKind::StopLossAdded(k) => assert_eq!(k.price.as_ref().unwrap().as_str(), "1.1950"),
        other => panic!("wrong kind {other:?}"),
    }
}

#[test]
fn protobuf_and_json_round_trip_to_the_same_event() {
    let e = decode(SL_JSON.as_bytes(), Some(b"application/json")).unwrap();
    let pb = encode(&e, Encoding::Protobuf);
    assert_eq!(detect(None, &pb).unwrap(), Encoding::Protobuf);
    assert_eq!(decode(&pb, None).unwrap(), e);
    assert_eq!(decode(&pb, Some(b"application/x-protobuf")).unwrap(), e);
    let js = encode(&e, Encoding::Json);
    assert_eq!(
        decode(&js, Some(b"application/json; charset=utf-8")).unwrap(),
        e
    );
}

#[test]
fn json_leniencies() {
    let js = br#"{"event_id":"e1","order_id":123,"occurred_at_ms":"1764300000000","user_id":7,
        "order_placed":{"symbol":"EURUSD","order_type":"BUY"},"future_field":true}"#;
    let e = decode(js, None).unwrap();
    assert_eq!(e.order_id.unwrap().as_str(), "123");
    assert_eq!(e.occurred_at_ms, 1_764_300_000_000);
}

fn reason(payload: &[u8], content_type: Option<&[u8]>) -> &'static str {
    decode(payload, content_type).unwrap_err().reason()
}

#[test]
fn bad_input_gets_a_clear_typed_error() {
    let long = "x".repeat(80);
    type Case<'a> = (Vec<u8>, Option<&'a [u8]>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], None, "empty_message"),
        (vec![0xff, 0x13, 0x37, 0x00, 0x42], None, "undecodable_protobuf"),
        (b"{not json".to_vec(), None, "undecodable_json"),
        (b"{\"event_id\":\"e1\",\"order_id\":\"1\",\"occurred_at_ms\":1}".to_vec(), None, "missing_kind"),
        (
            br#"{"event_id":"e1","order_id":"1","occurred_at_ms":1,"order_placed":{},"pending_cancelled":{"cancel_id":"C"}}"#.to_vec(),
            None,
            "multiple_kinds",
        ),
        (
            format!(r#"{{"event_id":"e1","order_id":"1","occurred_at_ms":1,"stop_loss_added":{{"stoploss_id":"{long}"}}}}"#).into_bytes(),
            None,
            "invalid_field",
        ),
        (
            br#"{"event_id":"e1","order_id":"1","occurred_at_ms":1,"stop_loss_added":{"stoploss_id":"SL","price":1.5}}"#.to_vec(),
            None,
            "undecodable_json",
        ),
        (
            br#"{"event_id":"e1","order_id":"1","occurred_at_ms":1,"stop_loss_added":{}}"#.to_vec(),
            None,
            "missing_field",
        ),
        (
            br#"{"event_id":"e1","occurred_at_ms":1,"stop_loss_added":{"stoploss_id":"SL"}}"#.to_vec(),
            None,
            "missing_field",
        ),
        (
            br#"{"event_id":"e1","order_id":"1","occurred_at_ms":-5,"order_placed":{}}"#.to_vec(),
            None,
            "invalid_field",
        ),
        (
            br#"{"event_id":"e1","order_id":"1","occurred_at_ms":9223372036854775807,"order_placed":{}}"#.to_vec(),
            None,
            "invalid_field",
        ),
        (
            br#"{"event_id":"e1","order_id":"1","occurred_at_ms":1,"user_type":"gold","order_placed":{}}"#.to_vec(),
            None,
            "invalid_field",
        ),
        (
            br#"{"event_id":"e 1","order_id":"1","occurred_at_ms":1,"order_placed":{}}"#.to_vec(),
            None,
            "invalid_field",
        ),
        (
            br#"{"event_id":"e1","occurred_at_ms":1,"provider_confirmation":{"lifecycle_id":"SL"}}"#.to_vec(),
            None,
            "missing_field",
        ),
        (SL_JSON.as_bytes().to_vec(), Some(b"text/plain"), "unsupported_content_type"),
        (vec![b'{'; MAX_MESSAGE_BYTES + 1], None, "message_too_large"),
    ];
    for (payload, ct, expected) in cases {
        assert_eq!(
            reason(&payload, ct),
            expected,
            "{}",
            String::from_utf8_lossy(&payload[..payload.len().min(120)])
        );
    }
}

#[test]
fn error_messages_name_the_field_not_the_hostile_value() {
    let long = "Z".repeat(80);
    let js = format!(
        r#"{{"event_id":"e1","order_id":"1","occurred_at_ms":1,"stop_loss_added":{{"stoploss_id":"{long}"}}}}"#
    );
    let msg = decode(js.as_bytes(), None).unwrap_err().to_string();
    assert!(msg.contains("stop_loss_added.stoploss_id"), "{msg}");
    assert!(msg.contains("80 characters"), "{msg}");
    assert!(!msg.contains(&long));
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut rng = fastrand::Rng::with_seed(7);
    for len in 0..400 {
        let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let _ = decode(&bytes, None);
        let mut js = b"{".to_vec();
        js.extend_from_slice(&bytes);
        let _ = decode(&js, None);
    }
}

/// The Confluent serializers' frame, without a header: magic byte 0, the
/// schema id, for protobuf the message-index path (short `[0]` or the long
/// form count 1, index 0), then the message.
#[test]
fn schema_registry_framing_is_recognised_without_headers() {
    let e = decode(SL_JSON.as_bytes(), None).unwrap();
    let pb = encode(&e, Encoding::Protobuf);
    let js = encode(&e, Encoding::Json);
    let short = registry::frame(7, Encoding::Protobuf, &pb);
    assert_eq!(&short[..6], &[0, 0, 0, 0, 7, 0]);
    assert_eq!(decode(&short, None).unwrap(), e);
    assert_eq!(decode(&short, Some(b"application/x-protobuf")).unwrap(), e);
    let mut long = vec![0, 0, 1, 0, 0, 2, 0];
    long.extend_from_slice(&pb);
    assert_eq!(decode(&long, None).unwrap(), e);
    assert_eq!(registry::schema_id(&long), Some(65_536));
    let framed_json = registry::frame(42, Encoding::Json, &js);
    assert_eq!(decode(&framed_json, None).unwrap(), e);
    assert_eq!(registry::schema_id(&framed_json), Some(42));
    assert_eq!(registry::schema_id(&pb), None);
    assert_eq!(registry::schema_id(&js), None);
}

#[test]
fn a_malformed_frame_is_refused_with_its_own_reason() {
    let e = decode(SL_JSON.as_bytes(), None).unwrap();
    let pb = encode(&e, Encoding::Protobuf);
    let cases: Vec<Vec<u8>> = vec![
        vec![0],
        vec![0, 0, 0, 7],
        // The path [1]: another message of the file.
        [&[0, 0, 0, 0, 7, 2, 2][..], &pb].concat(),
        // A nested path [0, 1].
        [&[0, 0, 0, 0, 7, 4, 0, 2][..], &pb].concat(),
        // A path cut short.
        vec![0, 0, 0, 0, 7, 4, 0],
        // An endless varint.
        [&[0, 0, 0, 0, 7][..], &[0xff; 12]].concat(),
    ];
    for bytes in cases {
        let err = decode(&bytes, None).unwrap_err();
        assert_eq!(err.reason(), "invalid_framing", "{bytes:?}: {err}");
    }
}
