//! Redis keys that the MySQL read model does not account for (`rebuild`
//! removes them; `verify` reports them), found one SCAN step at a time.

use std::collections::HashSet;

use super::id_projection;
use super::redis_projection::{RedisError, RedisProjection};
use super::{Store, StoreError};

/// Why a scan for stray keys stopped.
#[derive(Debug, thiserror::Error)]
pub enum StrayScanError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The two kinds of Redis key projected per id or per order.
#[derive(Debug, Clone, Copy)]
pub enum KeyKind {
    /// `global_order_lookup:{id}`: live while the id has a row.
    Lookup,
    /// `order_lifecycle_active:{order}`: live while the order has an active id.
    Active,
}

impl KeyKind {
    fn pattern(self, redis: &RedisProjection) -> String {
        match self {
            KeyKind::Lookup => redis.keys().lookup_pattern(),
            KeyKind::Active => redis.keys().active_pattern(),
        }
    }

    /// Which of `suffixes` (ids or orders) the read model accounts for.
    async fn live_among(
        self,
        store: &Store,
        suffixes: &[String],
    ) -> Result<HashSet<String>, StoreError> {
        let mut conn = store.pool().acquire().await?;
        match self {
            KeyKind::Lookup => id_projection::bound_ids_among(&mut conn, suffixes).await,
            KeyKind::Active => {
                id_projection::orders_with_active_ids_among(&mut conn, suffixes).await
            }
        }
    }
}

/// Keys of one kind that nothing in `order_lifecycle_ids` accounts for,
/// one SCAN step at a time (memory holds one step).
pub struct StrayKeys<'a> {
    store: &'a Store,
    redis: &'a RedisProjection,
    kind: KeyKind,
    pattern: String,
    /// `None` once the scan has come round.
    cursor: Option<u64>,
}

impl<'a> StrayKeys<'a> {
    pub fn new(store: &'a Store, redis: &'a RedisProjection, kind: KeyKind) -> Self {
        StrayKeys {
            store,
            redis,
            kind,
            pattern: kind.pattern(redis),
            cursor: Some(0),
        }
    }

    /// The stray keys of the next SCAN step (possibly none); `None` when the
    /// scan is complete.
    ///
    /// # Errors
    /// [`StrayScanError`] from Redis or the database.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<String>>, StrayScanError> {
        let Some(cursor) = self.cursor else {
            return Ok(None);
        };
        let (next, batch) = self.redis.scan(cursor, &self.pattern).await?;
        self.cursor = (next != 0).then_some(next);
        let suffixes: Vec<String> = batch
            .iter()
            .map(|k| k[self.pattern.len() - 1..].to_owned())
            .collect();
        let live = self.kind.live_among(self.store, &suffixes).await?;
        Ok(Some(
            batch
                .into_iter()
                .zip(&suffixes)
                .filter(|(_, s)| !live.contains(*s))
                .map(|(k, _)| k)
                .collect(),
        ))
    }
}
