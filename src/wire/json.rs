//! The JSON form of the contract, for the existing producers: the same
//! envelope and field names as protobuf, with exactly one key for the kind.
//!
//! ```json
//! {"event_id":"e-42","order_id":"123456789","occurred_at_ms":1764300000000,
//!  "user_id":"7","user_type":"live",
//!  "stop_loss_added":{"stoploss_id":"SL111","price":"1.1950"}}
//! ```
//!
//! Accepted leniencies, all lossless: `occurred_at_ms` as a number or a
//! numeric string (proto3 JSON writes int64 as a string); `order_id` and
//! `user_id` as whole numbers; `null` for any absent field. Unknown keys are
//! ignored, as protobuf ignores unknown fields. Prices must be strings: a JSON
//! number would already have lost digits.

use serde_json::{Map, Value};

use super::protobuf::proto::{self, order_event::Kind};
use super::DecodeError;
use crate::domain::{kind_names, OrderEvent};

/// The `oneof kind` member names, each a possible top-level key.
pub const KIND_NAMES: [&str; 10] = kind_names::ALL;

/// Decodes a JSON event.
///
/// # Errors
/// [`DecodeError::Json`] for malformed JSON or wrongly typed fields,
/// [`DecodeError::MissingKind`] / [`DecodeError::MultipleKinds`] unless
/// exactly one kind key is present, and the validation errors of the
/// protobuf conversion.
pub fn decode(payload: &[u8]) -> Result<OrderEvent, DecodeError> {
    let mut object: Map<String, Value> =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
    let present: Vec<&str> = KIND_NAMES
        .into_iter()
        .filter(|k| object.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    let kind_name = match present.as_slice() {
        [] => return Err(DecodeError::MissingKind),
        [one] => *one,
        many => return Err(DecodeError::MultipleKinds(many.join(", "))),
    };
    let body = object.remove(kind_name).unwrap_or(Value::Null);
    let kind = kind_from_json(kind_name, body)?;
    let message = proto::OrderEvent {
        event_id: string_field(&object, "event_id", false)?,
        order_id: string_field(&object, "order_id", true)?,
        occurred_at_ms: millis_field(&object, "occurred_at_ms")?,
        user_id: string_field(&object, "user_id", true)?,
        user_type: string_field(&object, "user_type", false)?,
        kind: Some(kind),
    };
    OrderEvent::try_from(message)
}

fn kind_from_json(name: &str, body: Value) -> Result<Kind, DecodeError> {
    fn parse<T: serde::de::DeserializeOwned>(name: &str, body: Value) -> Result<T, DecodeError> {
        if !body.is_object() {
            return Err(DecodeError::invalid(name, "must be a JSON object"));
        }
        serde_json::from_value(body).map_err(|e| DecodeError::Json(format!("{name}: {e}")))
    }
    Ok(match name {
        kind_names::ORDER_PLACED => Kind::OrderPlaced(parse(name, body)?),
        kind_names::STOP_LOSS_ADDED => Kind::StopLossAdded(parse(name, body)?),
        kind_names::TAKE_PROFIT_ADDED => Kind::TakeProfitAdded(parse(name, body)?),
        kind_names::STOP_LOSS_CANCELLED => Kind::StopLossCancelled(parse(name, body)?),
        kind_names::TAKE_PROFIT_CANCELLED => Kind::TakeProfitCancelled(parse(name, body)?),
        kind_names::CLOSE_REQUESTED => Kind::CloseRequested(parse(name, body)?),
        kind_names::PENDING_CANCELLED => Kind::PendingCancelled(parse(name, body)?),
        kind_names::PENDING_MODIFIED => Kind::PendingModified(parse(name, body)?),
        kind_names::LEGACY_ID_IMPORTED => Kind::LegacyIdImported(parse(name, body)?),
        _ => Kind::ProviderConfirmation(parse(name, body)?),
    })
}

/// A string field; absent or `null` is empty. With `allow_integer`, a whole
/// number is taken as its decimal text.
fn string_field(
    object: &Map<String, Value>,
    name: &str,
    allow_integer: bool,
) -> Result<String, DecodeError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if allow_integer && (n.is_u64() || n.is_i64()) => Ok(n.to_string()),
        Some(_) => Err(DecodeError::invalid(name, "must be a string")),
    }
}

fn millis_field(object: &Map<String, Value>, name: &str) -> Result<i64, DecodeError> {
    let bad = || DecodeError::invalid(name, "must be a whole number of milliseconds");
    match object.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(bad),
        Some(Value::String(s)) => s.parse().map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

/// Encodes a domain event as contract JSON (also the form kept in the event
/// log's `payload` column).
pub fn encode(event: &OrderEvent) -> String {
    to_value(&proto::OrderEvent::from(event)).to_string()
}

fn to_value(m: &proto::OrderEvent) -> Value {
    let mut object = Map::new();
    object.insert("event_id".into(), Value::from(m.event_id.clone()));
    if !m.order_id.is_empty() {
        object.insert("order_id".into(), Value::from(m.order_id.clone()));
    }
    object.insert("occurred_at_ms".into(), Value::from(m.occurred_at_ms));
    if !m.user_id.is_empty() {
        object.insert("user_id".into(), Value::from(m.user_id.clone()));
    }
    if !m.user_type.is_empty() {
        object.insert("user_type".into(), Value::from(m.user_type.clone()));
    }
    let (name, body) = match &m.kind {
        Some(Kind::OrderPlaced(k)) => (kind_names::ORDER_PLACED, serde_json::to_value(k)),
        Some(Kind::StopLossAdded(k)) => (kind_names::STOP_LOSS_ADDED, serde_json::to_value(k)),
        Some(Kind::TakeProfitAdded(k)) => (kind_names::TAKE_PROFIT_ADDED, serde_json::to_value(k)),
        Some(Kind::StopLossCancelled(k)) => {
            (kind_names::STOP_LOSS_CANCELLED, serde_json::to_value(k))
        }
        Some(Kind::TakeProfitCancelled(k)) => {
            (kind_names::TAKE_PROFIT_CANCELLED, serde_json::to_value(k))
        }
        Some(Kind::CloseRequested(k)) => (kind_names::CLOSE_REQUESTED, serde_json::to_value(k)),
        Some(Kind::PendingCancelled(k)) => (kind_names::PENDING_CANCELLED, serde_json::to_value(k)),
        Some(Kind::PendingModified(k)) => (kind_names::PENDING_MODIFIED, serde_json::to_value(k)),
        Some(Kind::ProviderConfirmation(k)) => {
            (kind_names::PROVIDER_CONFIRMATION, serde_json::to_value(k))
        }
        Some(Kind::LegacyIdImported(k)) => {
            (kind_names::LEGACY_ID_IMPORTED, serde_json::to_value(k))
        }
        None => return Value::Object(object),
    };
    // Serializing plain strings and maps cannot fail.
    object.insert(name.into(), body.unwrap_or(Value::Null));
    Value::Object(object)
}
