//! The wire contract: protobuf and JSON forms of `OrderEvent`, decoded into
//! domain events and encoded back.
//!
//! # Telling the encodings apart
//!
//! The Kafka header `content-type` decides: `application/x-protobuf` (also
//! `application/protobuf`, `application/octet-stream`) or `application/json`,
//! parameters such as `; charset=utf-8` ignored. Without the header the first
//! byte that is not ASCII whitespace decides: `{` means JSON. A protobuf
//! `OrderEvent` can never start with `{` (0x7B would be field 15 with the
//! deprecated group wire type, which the message does not use), so the rule is
//! unambiguous.
//!
//! Either form may come in the Schema Registry's frame (a byte 0, a schema
//! id, for protobuf a message-index path; see [`registry`]), as the
//! standard Confluent serializers write it, with or without the header.

pub mod json;
mod message;
pub mod protobuf;
pub mod registry;

pub use message::InboundMessage;

use crate::domain::OrderEvent;

/// Largest message accepted, in bytes. Real events are a few hundred bytes;
/// the limit keeps a hostile producer from making the log hold megabytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The Kafka header that names the encoding.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// The two encodings of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// The `content-type` header value producers set for this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// Why a message is not a valid event. Every variant is poison input: the
/// message is dead-lettered with [`DecodeError::reason`] and consumption
/// goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the message is empty")]
    Empty,
    #[error("the message is {bytes} bytes; at most {max} are accepted")]
    TooLarge { bytes: usize, max: usize },
    #[error("unsupported content-type {0:?}; expected application/x-protobuf or application/json")]
    UnsupportedContentType(String),
    #[error("not a protobuf OrderEvent: {0}")]
    Protobuf(String),
    #[error("not a JSON OrderEvent: {0}")]
    Json(String),
    #[error("no event kind; exactly one of {} is required", json::KIND_NAMES.join(", "))]
    MissingKind,
    #[error("more than one event kind ({0}); exactly one is allowed")]
    MultipleKinds(String),
    #[error("{field} is required")]
    MissingField { field: String },
    #[error("{field} {reason}")]
    InvalidField { field: String, reason: String },
    #[error("a malformed schema registry frame: {0}")]
    Framing(String),
}

impl DecodeError {
    /// Stable machine-readable reason for dead-letter headers and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_message",
            DecodeError::TooLarge { .. } => "message_too_large",
            DecodeError::UnsupportedContentType(_) => "unsupported_content_type",
            DecodeError::Protobuf(_) => "undecodable_protobuf",
            DecodeError::Json(_) => "undecodable_json",
            DecodeError::MissingKind => "missing_kind",
            DecodeError::MultipleKinds(_) => "multiple_kinds",
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::Framing(_) => "invalid_framing",
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl ToString) -> DecodeError {
        DecodeError::InvalidField {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

/// Picks the encoding from the `content-type` header, or from the payload
/// when there is none (see the module docs).
///
/// # Errors
/// [`DecodeError::UnsupportedContentType`] for any other declared type.
pub fn detect(content_type: Option<&[u8]>, payload: &[u8]) -> Result<Encoding, DecodeError> {
    if let Some(raw) = content_type {
        let text = String::from_utf8_lossy(raw);
        let media = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        return match media.as_str() {
            "application/x-protobuf" | "application/protobuf" | "application/octet-stream" => {
                Ok(Encoding::Protobuf)
            }
            "application/json" => Ok(Encoding::Json),
            _ => Err(DecodeError::UnsupportedContentType(
                text.chars().take(100).collect(),
            )),
        };
    }
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    Ok(if first == Some(&b'{') {
        Encoding::Json
    } else {
        Encoding::Protobuf
    })
}

/// Decodes one Kafka message value into a validated domain event.
///
/// # Errors
/// A [`DecodeError`] saying what is wrong; never panics on any input.
pub fn decode(payload: &[u8], content_type: Option<&[u8]>) -> Result<OrderEvent, DecodeError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            bytes: payload.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    if let Some(framed) = registry::unframe(payload)? {
        return match detect(content_type, framed.body)? {
            Encoding::Protobuf => protobuf::decode(registry::strip_message_indexes(framed.body)?),
            Encoding::Json => json::decode(framed.body),
        };
    }
    match detect(content_type, payload)? {
        Encoding::Protobuf => protobuf::decode(payload),
        Encoding::Json => json::decode(payload),
    }
}

/// Encodes a domain event in the chosen encoding (producers, tests, the
/// simulator).
pub fn encode(event: &OrderEvent, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => protobuf::encode(event),
        Encoding::Json => json::encode(event).into_bytes(),
    }
}

#[cfg(test)]
mod tests;
