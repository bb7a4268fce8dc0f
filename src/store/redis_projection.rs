//! The Redis read model the platform already reads:
//!
//! - `global_order_lookup:{lifecycle_id}` (string) -> `order_id`, for every id
//!   ever issued; the Python dispatcher resolves provider confirmations with it.
//! - `order_lifecycle_active:{order_id}` (hash) -> `id_type` -> the active
//!   `lifecycle_id` of that type; absent when the order has no active id.
//!
//! - `order_lifecycle:projected_position` (string): the log position the keys
//!   reflect, written in the same MULTI/EXEC as the keys. The projection's
//!   checkpoint lives with its data: a flushed or replaced Redis has no (or an
//!   older) position, and the follower re-projects from there.
//!
//! Every key is prefixed with the configured key prefix (empty in
//! production, so the names are exactly the legacy ones).

use redis::aio::ConnectionManager;

use crate::domain::{IdType, LifecycleId, OrderId};

/// A Redis failure; always transient for the caller (retry later), since the
/// projection can be rebuilt from the log at any time.
pub type RedisError = redis::RedisError;

/// Writes the Redis keys.
#[derive(Clone)]
pub struct RedisProjection {
    conn: ConnectionManager,
    prefix: String,
}

/// The key names, in one place.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    prefix: String,
}

impl RedisKeys {
    /// Keys under `prefix` (empty for the legacy names).
    pub fn new(prefix: &str) -> RedisKeys {
        RedisKeys {
            prefix: prefix.to_owned(),
        }
    }

    /// `global_order_lookup:{id}`.
    pub fn lookup(&self, id: &LifecycleId) -> String {
        format!("{}global_order_lookup:{id}", self.prefix)
    }

    /// `order_lifecycle_active:{order_id}`.
    pub fn active(&self, order: &OrderId) -> String {
        format!("{}order_lifecycle_active:{order}", self.prefix)
    }

    /// Pattern matching every lookup key (for SCAN).
    pub fn lookup_pattern(&self) -> String {
        format!("{}global_order_lookup:*", self.prefix)
    }

    /// Pattern matching every active-id hash (for SCAN).
    pub fn active_pattern(&self) -> String {
        format!("{}order_lifecycle_active:*", self.prefix)
    }

    /// `order_lifecycle:projected_position`.
    pub fn position(&self) -> String {
        format!("{}order_lifecycle:projected_position", self.prefix)
    }
}

/// The active ids of one order, as the hash holds them.
pub type ActiveIds = Vec<(IdType, LifecycleId)>;

impl RedisProjection {
    /// Connects with a connection manager that reconnects by itself.
    ///
    /// # Errors
    /// [`RedisError`] when the URL is invalid or the server unreachable.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisProjection, RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisProjection {
            conn,
            prefix: prefix.to_owned(),
        })
    }

    /// The key names this projection writes.
    pub fn keys(&self) -> RedisKeys {
        RedisKeys::new(&self.prefix)
    }

    /// The log position the keys reflect; `None` when Redis has none (new
    /// or flushed).
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn position(&self) -> Result<Option<i64>, RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(self.keys().position())
            .query_async(&mut conn)
            .await
    }

    /// [`RedisProjection::position`], and WATCHes the position key, so that
    /// the next [`RedisProjection::write`] is abandoned if the key changes
    /// (a FLUSHALL, another writer) in between.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn watch_position(&self) -> Result<Option<i64>, RedisError> {
        let mut conn = self.conn.clone();
        // UNWATCH first: a round that ended without writing left its WATCH
        // (and possibly its "changed" mark) on the connection.
        let key = self.keys().position();
        let (position,): (Option<i64>,) = redis::pipe()
            .cmd("UNWATCH")
            .ignore()
            .cmd("WATCH")
            .arg(&key)
            .ignore()
            .cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        Ok(position)
    }

    /// Sets lookups, replaces the active-id hashes of `orders` and records
    /// `position`, in one MULTI/EXEC: a reader never sees a hash half
    /// rewritten, and the position never claims more than was written.
    /// Returns `false`, having written nothing, when the position key changed
    /// since [`RedisProjection::watch_position`].
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable; nothing is assumed written.
    pub async fn write(
        &self,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
        position: i64,
    ) -> Result<bool, RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.set(self.keys().position(), position).ignore();
        self.add_key_writes(&mut pipe, lookups, orders);
        let mut conn = self.conn.clone();
        let reply: redis::Value = pipe.query_async(&mut conn).await?;
        Ok(reply != redis::Value::Nil)
    }

    /// Sets the projected position (0: re-project everything).
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn set_position(&self, position: i64) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.keys().position())
            .arg(position)
            .query_async(&mut conn)
            .await
    }

    /// One SCAN step over keys matching `pattern`: the next cursor (0 at the
    /// end) and the keys.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn scan(&self, cursor: u64, pattern: &str) -> Result<(u64, Vec<String>), RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await
    }

    /// The order each id's lookup key names (`None`: no key), in order.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn lookups(&self, ids: &[&LifecycleId]) -> Result<Vec<Option<String>>, RedisError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys();
        let names: Vec<String> = ids.iter().map(|id| keys.lookup(id)).collect();
        let mut conn = self.conn.clone();
        redis::cmd("MGET").arg(names).query_async(&mut conn).await
    }

    /// Each order's active-id hash as `(field, value)` pairs (empty: no
    /// hash), in order.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn active_hashes(
        &self,
        orders: &[&OrderId],
    ) -> Result<Vec<std::collections::BTreeMap<String, String>>, RedisError> {
        let keys = self.keys();
        let mut pipe = redis::pipe();
        for order in orders {
            pipe.hgetall(keys.active(order));
        }
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await
    }

    /// Sets lookups and replaces active-id hashes like
    /// [`RedisProjection::write`], without moving the projected position (a
    /// repair of some orders).
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn put(
        &self,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
    ) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_key_writes(&mut pipe, lookups, orders);
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await
    }

    fn add_key_writes(
        &self,
        pipe: &mut redis::Pipeline,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
    ) {
        let keys = self.keys();
        for (id, order) in lookups {
            pipe.set(keys.lookup(id), order.as_str()).ignore();
        }
        for (order, active) in orders {
            let key = keys.active(order);
            pipe.del(&key).ignore();
            if !active.is_empty() {
                let fields: Vec<(&str, &str)> = active
                    .iter()
                    .map(|(t, id)| (t.as_str(), id.as_str()))
                    .collect();
                pipe.hset_multiple(&key, &fields).ignore();
            }
        }
    }

    /// Deletes keys; returns how many existed.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn delete(&self, keys: &[&String]) -> Result<u64, RedisError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        redis::cmd("DEL").arg(keys).query_async(&mut conn).await
    }
}
