//! `/v1`: resolve ids, read an order's ids and its log.
//!
//! Reads come from MySQL (`order_lifecycle_ids` by its unique index,
//! `lifecycle_events` by `(order_id, seq)`): one or two indexed queries per
//! request, a batch in the same two. Redis is not consulted: it follows the
//! log a moment behind, and an answer mixing the two could contradict
//! itself (an id resolved by Redis, its status from MySQL).

use std::collections::{BTreeMap, HashMap};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::domain::{IdRecord, IdStatus, LifecycleId, OrderId};
use crate::store::{event_log, id_projection, StoreError};

/// Most log entries per page.
pub const MAX_PAGE: u32 = 1000;
/// Log entries per page when `limit` is not given.
pub const DEFAULT_PAGE: u32 = 100;
/// Most event and transition text per page of log entries: a page ends
/// early (with `next_after_seq`) rather than grow past it; one entry is
/// always served, whatever its size.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// One id resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub lifecycle_id: String,
    pub order_id: String,
    pub id_type: &'static str,
    pub status: &'static str,
    pub replaced_by: Option<String>,
    /// For cancel-type ids: the id whose cancellation was requested.
    pub target_id: Option<String>,
    /// The order's active id of the same type now, if any.
    pub active_id: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

fn resolved(order: &OrderId, record: &IdRecord, ids: &[IdRecord]) -> Resolved {
    Resolved {
        lifecycle_id: record.lifecycle_id.to_string(),
        order_id: order.to_string(),
        id_type: record.id_type.as_str(),
        status: record.status.as_str(),
        replaced_by: record.replaced_by.as_ref().map(ToString::to_string),
        target_id: record.target.as_ref().map(ToString::to_string),
        active_id: ids
            .iter()
            .find(|r| r.id_type == record.id_type && r.status == IdStatus::Active)
            .map(|r| r.lifecycle_id.to_string()),
        created_at_ms: record.issued_at_ms,
        updated_at_ms: record.updated_at_ms,
    }
}

fn parse_id(raw: &str) -> Result<LifecycleId, ApiError> {
    LifecycleId::parse(raw).map_err(|e| ApiError::BadRequest {
        code: "invalid_id",
        message: format!("not a lifecycle id: {e}"),
    })
}

fn parse_order(raw: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(raw).map_err(|e| ApiError::BadRequest {
        code: "invalid_order_id",
        message: format!("not an order id: {e}"),
    })
}

/// Resolves ids: each bound id with its order's records.
async fn lookup(
    state: &ApiState,
    ids: &[LifecycleId],
) -> Result<HashMap<LifecycleId, Resolved>, ApiError> {
    let store = state.store()?;
    let mut conn = store.pool().acquire().await.map_err(StoreError::from)?;
    let owners = id_projection::owners_of(&mut conn, ids).await?;
    let mut orders: Vec<OrderId> = owners.values().cloned().collect();
    orders.sort();
    orders.dedup();
    let records = id_projection::load_records(&mut conn, &orders, false).await?;
    Ok(owners
        .iter()
        .filter_map(|(id, order)| {
            let ids = records.get(order)?;
            let record = ids.iter().find(|r| &r.lifecycle_id == id)?;
            Some((id.clone(), resolved(order, record, ids)))
        })
        .collect())
}

/// `GET /v1/ids/{lifecycle_id}`.
pub async fn resolve(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Json<Resolved>, ApiError> {
    let id = parse_id(&raw)?;
    lookup(&state, std::slice::from_ref(&id))
        .await?
        .remove(&id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound {
            code: "unknown_id",
            message: format!("no order has the id {id}"),
        })
}

/// The body of a batch resolve.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub ids: Vec<String>,
}

/// One entry of a batch answer: the id resolved, or why not.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BatchEntry {
    Resolved(Resolved),
    Failed {
        lifecycle_id: String,
        error: BatchError,
    },
}

#[derive(Debug, Serialize)]
pub struct BatchError {
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct BatchResponse {
    /// In request order.
    pub results: Vec<BatchEntry>,
}

/// `POST /v1/ids/resolve` with `{"ids": [...]}`.
pub async fn resolve_batch(
    State(state): State<ApiState>,
    body: Result<Json<BatchRequest>, JsonRejection>,
) -> Result<Json<BatchResponse>, ApiError> {
    let Json(request) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BadRequest {
            code: "body_too_large",
            message: format!("the body exceeds {} bytes", super::MAX_BODY_BYTES),
        },
        _ => ApiError::BadRequest {
            code: "invalid_body",
            message: format!("expected {{\"ids\": [\"...\"]}}: {}", e.body_text()),
        },
    })?;
    if request.ids.len() > state.max_batch_ids {
        return Err(ApiError::BadRequest {
            code: "batch_too_large",
            message: format!(
                "{} ids asked; at most {} per request",
                request.ids.len(),
                state.max_batch_ids
            ),
        });
    }
    let parsed: Vec<Result<LifecycleId, String>> = request
        .ids
        .iter()
        .map(|raw| LifecycleId::parse(raw).map_err(|e| e.to_string()))
        .collect();
    let valid: Vec<LifecycleId> = parsed.iter().filter_map(|p| p.clone().ok()).collect();
    let found = lookup(&state, &valid).await?;
    let results = request
        .ids
        .iter()
        .zip(parsed)
        .map(|(raw, parsed)| match parsed {
            Err(e) => BatchEntry::Failed {
                lifecycle_id: raw.chars().take(80).collect(),
                error: BatchError {
                    code: "invalid_id",
                    message: format!("not a lifecycle id: {e}"),
                },
            },
            // A repeated id is answered each time it is asked.
            Ok(id) => match found.get(&id) {
                Some(r) => BatchEntry::Resolved(r.clone()),
                None => BatchEntry::Failed {
                    lifecycle_id: id.to_string(),
                    error: BatchError {
                        code: "unknown_id",
                        message: format!("no order has the id {id}"),
                    },
                },
            },
        })
        .collect();
    Ok(Json(BatchResponse { results }))
}

/// One id of an order.
#[derive(Debug, Serialize)]
pub struct IdRecordBody {
    pub lifecycle_id: String,
    pub id_type: &'static str,
    pub status: &'static str,
    /// The id that replaced this one.
    pub replaced_by: Option<String>,
    /// The id this one replaced.
    pub replaces: Option<String>,
    pub target_id: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Log sequence numbers of the entries that issued and last changed it.
    pub issued_seq: u64,
    pub updated_seq: u64,
}

#[derive(Debug, Serialize)]
pub struct OrderIds {
    pub order_id: String,
    /// In the order they were issued.
    pub ids: Vec<IdRecordBody>,
    /// The active id per type (the whole order's, on every page).
    pub active: BTreeMap<&'static str, String>,
    /// Pass as `after_seq` for the next page; `null` on the last page.
    pub next_after_seq: Option<u64>,
}

/// `GET /v1/orders/{order_id}/ids?after_seq=&limit=`: the ids issued
/// after log entry `after_seq`, in the order they were issued, `limit` at
/// most (default 1,000) but never splitting the ids one entry issued (a
/// close issues up to three), so that `next_after_seq` is a clean cursor.
/// `active` is always the whole order's.
pub async fn order_ids(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<OrderIds>, ApiError> {
    let order = parse_order(&raw)?;
    let (after, limit) = page_query(query, MAX_PAGE)?;
    let store = state.store()?;
    let mut conn = store.pool().acquire().await.map_err(StoreError::from)?;
    let mut records = id_projection::load_records(&mut conn, std::slice::from_ref(&order), false)
        .await?
        .remove(&order)
        .unwrap_or_default();
    if records.is_empty() {
        return Err(ApiError::NotFound {
            code: "unknown_order",
            message: format!("no ids recorded for order {order}"),
        });
    }
    records.sort_by(|a, b| (a.issued_seq, &a.lifecycle_id).cmp(&(b.issued_seq, &b.lifecycle_id)));
    let replaces: HashMap<&LifecycleId, &LifecycleId> = records
        .iter()
        .filter_map(|r| r.replaced_by.as_ref().map(|by| (by, &r.lifecycle_id)))
        .collect();
    let (page, next_after_seq) = ids_page(&records, after, limit as usize);
    let ids = page
        .iter()
        .map(|r| IdRecordBody {
            lifecycle_id: r.lifecycle_id.to_string(),
            id_type: r.id_type.as_str(),
            status: r.status.as_str(),
            replaced_by: r.replaced_by.as_ref().map(ToString::to_string),
            replaces: replaces.get(&r.lifecycle_id).map(|x| x.to_string()),
            target_id: r.target.as_ref().map(ToString::to_string),
            created_at_ms: r.issued_at_ms,
            updated_at_ms: r.updated_at_ms,
            issued_seq: r.issued_seq,
            updated_seq: r.updated_seq,
        })
        .collect();
    let active = records
        .iter()
        .filter(|r| r.status == IdStatus::Active)
        .map(|r| (r.id_type.as_str(), r.lifecycle_id.to_string()))
        .collect();
    Ok(Json(OrderIds {
        order_id: order.to_string(),
        ids,
        active,
        next_after_seq,
    }))
}

/// The page of `records` (sorted by issued_seq) after `after`: `limit`
/// ids, plus those issued by the same entry as the last one; and the
/// cursor of the next page, if any.
fn ids_page(records: &[IdRecord], after: u64, limit: usize) -> (&[IdRecord], Option<u64>) {
    let start = records.partition_point(|r| r.issued_seq <= after);
    let later = &records[start..];
    let mut end = later.len().min(limit);
    while end > 0 && end < later.len() && later[end].issued_seq == later[end - 1].issued_seq {
        end += 1;
    }
    let next = (end < later.len()).then(|| later[end - 1].issued_seq);
    (&later[..end], next)
}

/// Paging of an order's ids or events.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// What follows this log sequence number (default 0: from the start).
    pub after_seq: Option<u64>,
    /// Page size, 1 to 1000.
    pub limit: Option<u32>,
}

/// `(after_seq, limit)` of a page query, checked.
fn page_query(
    query: Result<Query<PageQuery>, QueryRejection>,
    default_limit: u32,
) -> Result<(u64, u32), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest {
        code: "invalid_query",
        message: format!("after_seq and limit are whole numbers: {}", e.body_text()),
    })?;
    let limit = query.limit.unwrap_or(default_limit);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            message: format!("limit must be between 1 and {MAX_PAGE}"),
        });
    }
    let after = query.after_seq.unwrap_or(0);
    if i64::try_from(after).is_err() {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            message: format!("after_seq must be at most {}", i64::MAX),
        });
    }
    Ok((after, limit))
}

#[derive(Debug, Serialize)]
pub struct EventSource {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The schema registry id of the message, when it came framed.
    pub schema_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct EventEntryBody {
    pub seq: u64,
    pub event_id: String,
    pub kind: String,
    pub outcome: String,
    pub transitions: serde_json::Value,
    /// The input event in the contract's JSON form.
    pub event: serde_json::Value,
    pub occurred_at_ms: i64,
    /// Where it was read; `null` for synthetic entries (legacy import).
    pub source: Option<EventSource>,
}

#[derive(Debug, Serialize)]
pub struct OrderEvents {
    pub order_id: String,
    pub events: Vec<EventEntryBody>,
    /// Pass as `after_seq` for the next page; `null` on the last page.
    pub next_after_seq: Option<u64>,
}

/// `GET /v1/orders/{order_id}/events?after_seq=&limit=`.
pub async fn order_events(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<OrderEvents>, ApiError> {
    let order = parse_order(&raw)?;
    let (after, limit) = page_query(query, DEFAULT_PAGE)?;
    let store = state.store()?;
    let page = event_log::order_entries(store.pool(), &order, after, limit, MAX_PAGE_BYTES).await?;
    let entries = page.entries;
    if entries.is_empty() && after == 0 {
        return Err(ApiError::NotFound {
            code: "unknown_order",
            message: format!("no log entries for order {order}"),
        });
    }
    let next_after_seq = page.full.then(|| entries.last().map(|e| e.seq)).flatten();
    let events = entries
        .into_iter()
        .map(|e| EventEntryBody {
            seq: e.seq,
            event_id: e.event_id,
            kind: e.kind,
            outcome: e.outcome,
            transitions: serde_json::from_str(&e.transitions).unwrap_or(serde_json::Value::Null),
            event: serde_json::from_str(&e.payload).unwrap_or(serde_json::Value::Null),
            occurred_at_ms: e.occurred_at_ms,
            source: e.source.map(|s| EventSource {
                topic: s.topic,
                partition: s.partition,
                offset: s.offset,
                schema_id: s.schema_id,
            }),
        })
        .collect();
    Ok(Json(OrderEvents {
        order_id: order.to_string(),
        events,
        next_after_seq,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::IdType;

    fn record(id: &str, seq: u64) -> IdRecord {
        IdRecord {
            lifecycle_id: LifecycleId::parse(id).unwrap(),
            id_type: IdType::CloseId,
            status: IdStatus::Active,
            replaced_by: None,
            target: None,
            issued_at_ms: 0,
            updated_at_ms: 0,
            issued_seq: seq,
            updated_seq: seq,
        }
    }

    /// A page never splits the ids one entry issued (a close issues up to
    /// three), so that its last seq is a cursor that skips nothing.
    #[test]
    fn an_ids_page_keeps_the_ids_of_one_entry_together() {
        let records = [
            record("O", 1),
            record("C", 2),
            record("SC", 2),
            record("TC", 2),
            record("X", 3),
        ];
        let ids = |page: &[IdRecord]| {
            page.iter()
                .map(|r| r.lifecycle_id.to_string())
                .collect::<Vec<_>>()
        };
        let (page, next) = ids_page(&records, 0, 2);
        assert_eq!(
            (ids(page), next),
            (
                vec!["O".into(), "C".into(), "SC".into(), "TC".into()],
                Some(2)
            )
        );
        let (page, next) = ids_page(&records, 2, 2);
        assert_eq!((ids(page), next), (vec!["X".to_owned()], None));
        let (page, next) = ids_page(&records, 0, 5);
        assert_eq!((page.len(), next), (5, None));
        let (page, next) = ids_page(&records, 1, 1);
        assert_eq!((page.len(), next), (3, Some(2)));
        let (page, next) = ids_page(&records, 3, 1);
        assert_eq!((page.len(), next), (0, None));
    }
}
