//! The Confluent Schema Registry wire format, as the standard Kafka
//! serializers (Java, `confluent-kafka-python`, `@kafkajs/confluent-schema-registry`)
//! write it, recognised without headers: a magic byte 0, the schema id as 4
//! bytes big-endian, then for JSON the document, and for protobuf the
//! message-index path (zig-zag varints: a count, then one index per level;
//! the single byte 0 stands for `[0]`, the first message of the file)
//! followed by the message.
//!
//! Unambiguous beside the plain forms: a protobuf message never starts with
//! byte 0 (it would be field number 0, which does not exist), and JSON never
//! does either. `OrderEvent` is the first message of `order_event.proto`, so
//! its path is `[0]`; any other path names another message and is refused.

use super::DecodeError;

/// The magic byte that starts a framed message.
const MAGIC: u8 = 0;

/// A framed message: the schema id and what follows the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    pub schema_id: u32,
    /// The JSON document, or the message-index path and the protobuf
    /// message (see [`strip_message_indexes`]).
    pub body: &'a [u8],
}

/// The frame of `payload`, if it has one.
///
/// # Errors
/// [`DecodeError::Framing`]: the magic byte without a whole schema id.
pub fn unframe(payload: &[u8]) -> Result<Option<Framed<'_>>, DecodeError> {
    match payload {
        [MAGIC, a, b, c, d, body @ ..] => Ok(Some(Framed {
            schema_id: u32::from_be_bytes([*a, *b, *c, *d]),
            body,
        })),
        [MAGIC, ..] => Err(DecodeError::Framing(format!(
            "{} bytes: the schema registry frame needs a magic byte and a 4-byte schema id",
            payload.len()
        ))),
        _ => Ok(None),
    }
}

/// The schema id of a framed payload, if it is one (for the log entry and
/// the allow-list).
pub fn schema_id(payload: &[u8]) -> Option<u32> {
    unframe(payload).ok().flatten().map(|f| f.schema_id)
}

/// The protobuf message after the message-index path, which must name the
/// first message of the file (`OrderEvent`).
///
/// # Errors
/// [`DecodeError::Framing`]: a truncated or overlong path, or one naming
/// another message.
pub fn strip_message_indexes(body: &[u8]) -> Result<&[u8], DecodeError> {
    let mut rest = body;
    let count = zigzag(&mut rest)?;
    let path: Vec<i64> = if count == 0 {
        vec![0]
    } else {
        if !(1..=8).contains(&count) {
            return Err(DecodeError::Framing(format!(
                "a message-index path of {count} levels"
            )));
        }
        (0..count)
            .map(|_| zigzag(&mut rest))
            .collect::<Result<_, _>>()?
    };
    if path != [0] {
        return Err(DecodeError::Framing(format!(
            "the message-index path {path:?} names another message than OrderEvent, [0]"
        )));
    }
    Ok(rest)
}

/// One zig-zag varint, consumed from `bytes`.
fn zigzag(bytes: &mut &[u8]) -> Result<i64, DecodeError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some((&byte, rest)) = bytes.split_first() else {
            return Err(DecodeError::Framing(
                "a truncated message-index path".into(),
            ));
        };
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
        }
    }
    Err(DecodeError::Framing(
        "an overlong varint in the message-index path".into(),
    ))
}

/// Frames `message` as the registry's serializers do, with the short
/// `[0]` path for protobuf (for tests, which stand in for those producers).
pub fn frame(schema_id: u32, encoding: super::Encoding, message: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(message.len() + 6);
    framed.push(MAGIC);
    framed.extend_from_slice(&schema_id.to_be_bytes());
    if encoding == super::Encoding::Protobuf {
        framed.push(0);
    }
    framed.extend_from_slice(message);
    framed
}
