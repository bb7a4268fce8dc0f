//! Redis keys that the MySQL read model does not account for (`verify`
//! reports them; `rebuild` and `verify --repair` remove those this service
//! can explain, see [`UnexplainedKeys`]), found one SCAN step at a time.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `global_order_lookup:{id}`: live while the id has a row.
    Lookup,
    /// `order_lifecycle_active:{order}`: live while the order has an active id.
    Active,
}

/// What happens to a stray `global_order_lookup` key. That namespace is
/// the legacy platform's too, and `import-legacy` skips ids it refuses, so
/// a lookup key no id accounts for may be one this service never wrote
/// (or one from a newer database, after a restore): this service cannot
/// explain it, and removes it only when the operator asks
/// (`--remove-unexplained-keys`). Active-id hashes are this service's
/// alone: a stray one is always removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnexplainedKeys {
    /// Report and keep them.
    #[default]
    Keep,
    /// Remove them like any stray key.
    Remove,
}

/// What [`remove_stray`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StrayRemoval {
    /// Keys deleted.
    pub removed: u64,
    /// Keys still stray but kept ([`UnexplainedKeys::Keep`]).
    pub kept: u64,
}

impl UnexplainedKeys {
    /// The policy a `--remove-unexplained-keys` flag asks for.
    pub fn removed_if(flag: bool) -> UnexplainedKeys {
        if flag {
            UnexplainedKeys::Remove
        } else {
            UnexplainedKeys::Keep
        }
    }
}

impl KeyKind {
    /// Whether a stray key of this kind is removed under `policy`.
    pub fn removable(self, policy: UnexplainedKeys) -> bool {
        self == KeyKind::Active || policy == UnexplainedKeys::Remove
    }

    /// The kind of `key` and its suffix (id or order), if it is one of
    /// `redis`'s projected keys.
    fn of<'k>(redis: &RedisProjection, key: &'k str) -> Option<(KeyKind, &'k str)> {
        [KeyKind::Lookup, KeyKind::Active]
            .into_iter()
            .find_map(|kind| {
                let pattern = kind.pattern(redis);
                key.strip_prefix(pattern.trim_end_matches('*'))
                    .map(|suffix| (kind, suffix))
            })
    }

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

/// Deletes those of `keys` that are still stray, and none if one of them
/// changes meanwhile: WATCH the keys, ask the read model again which of
/// them it accounts for, then delete the rest in one MULTI/EXEC. A key
/// found stray by an earlier scan may have become live since (the id bound
/// by a batch, projected by the follower): written after the WATCH, it
/// aborts the deletion (nothing is deleted; the next `rebuild` or `verify`
/// looks again); written before, its row was committed before it was
/// projected, so the re-check sees it. Keys still stray that `policy` keeps
/// are counted, not deleted.
///
/// The watch is on `redis`'s connection: no other task may use that
/// projection meanwhile (`rebuild` and `verify --repair` have their own).
///
/// # Errors
/// [`StrayScanError`] from Redis or the database.
pub async fn remove_stray(
    store: &Store,
    redis: &RedisProjection,
    keys: &[String],
    policy: UnexplainedKeys,
) -> Result<StrayRemoval, StrayScanError> {
    let watched: Vec<&String> = keys.iter().collect();
    redis.watch_keys(&watched).await?;
    // Each key with its kind and suffix (id or order), classified once.
    let classified: Vec<(&String, KeyKind, String)> = keys
        .iter()
        .filter_map(|k| KeyKind::of(redis, k).map(|(kind, suffix)| (k, kind, suffix.to_owned())))
        .collect();
    let mut still = Vec::with_capacity(keys.len());
    let mut kept = 0;
    for kind in [KeyKind::Lookup, KeyKind::Active] {
        let suffixes: Vec<String> = classified
            .iter()
            .filter(|(_, k, _)| *k == kind)
            .map(|(_, _, s)| s.clone())
            .collect();
        if suffixes.is_empty() {
            continue;
        }
        let live = kind.live_among(store, &suffixes).await?;
        let stray = classified
            .iter()
            .filter(|(_, k, s)| *k == kind && !live.contains(s))
            .map(|(key, _, _)| *key);
        if kind.removable(policy) {
            still.extend(stray);
        } else {
            kept += stray.count() as u64;
        }
    }
    match redis.delete_watched(&still).await? {
        Some(removed) => Ok(StrayRemoval { removed, kept }),
        None => {
            tracing::info!(
                keys = still.len(),
                "stray keys changed while being removed; left for the next look"
            );
            Ok(StrayRemoval { removed: 0, kept })
        }
    }
}
