//! The Redis read model on a Redis Cluster (`--redis-cluster-nodes`): the
//! same key names as on one server, written without any transaction that
//! spans hash slots (the legacy names cannot take hash tags).
//!
//! # Where the projection's position lives, and why no entry is skipped
//!
//! - **A fence per hash slot.** The keys of one slot are written by one
//!   Lua script (atomic on its master, replicated as one unit) together with
//!   that slot's fence, `order_lifecycle:fence:{tag}` (a key whose hash tag
//!   puts it in the slot): the log position up to which the slot holds every
//!   write, and the log's identity. A script for an older position than the
//!   fence's writes nothing, so a slot's keys only ever move forward in the
//!   log, even while two writers overlap (a leader handover; on one server
//!   the WATCH on the record does this). A slot's keys and its fence can
//!   only be lost together: a failover that loses a master's last writes
//!   loses their fences' advance with them, and a flushed master loses its
//!   fences.
//! - **A copy of the record on every master.** The projection record (log
//!   identity, position, event id; see [`super::redis_projection`]) is
//!   written, after every slot of a round, to one key on each master
//!   (`order_lifecycle:projection:{tag}`, tagged into a slot the master
//!   serves), with the node ids of the masters the round started under.
//!   The follower resumes from the record only when every master has it,
//!   all copies agree, and they name the masters there are now. A master
//!   that lost writes holds an older copy or none (a restart without
//!   persistence, a FLUSHALL), or is a replica promoted since the copies
//!   were written (a failover, which may have lost the last writes of its
//!   slots: the client may even have retried a copy's write on the new
//!   master); resharding moves copies away from the masters that now serve
//!   their slots. Each of these makes the follower re-project from the
//!   start of the log. The fences keep that to reading the log: every slot
//!   skips what it already holds, and only slots that lost writes are
//!   written again.
//! - A re-projection because Redis followed another log or another history
//!   of this one (see `projection::redis_follower`) first removes every
//!   fence ([`Cluster::forget_fences`]), since positions of another history
//!   say nothing about this one.
//! - **A generation.** `rebuild --target redis` and `verify --repair` must
//!   rewrite every key, yet a follower round already in flight when they
//!   reset Redis would complete (on one server its WATCH makes it fail) and
//!   leave fences that make the rewrite skip its slots. So a reset first
//!   raises a generation kept in MySQL (`projection_checkpoints`, name
//!   `redis_generation`); the follower reads it before each round of the
//!   log; fences and record copies carry it. A fence of a later generation
//!   turns an older writer away, one of an earlier generation is
//!   overwritten, and copies of another generation do not count.
//!
//! MOVED and ASK redirections and failovers are handled by the client
//! (it refreshes the slot map and retries). SCAN walks every master.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};

use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;

use super::redis_projection::{
    key_writes, ActiveIds, KeyWrite, Projected, RedisError, CONNECT_TIMEOUT, PROJECTION_FIELDS,
    RESPONSE_TIMEOUT,
};
use crate::config::RedisConfig;
use crate::domain::{LifecycleId, OrderId};

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// Masters a SCAN cursor can name (the node's index goes in the cursor's
/// top byte).
const MAX_MASTERS: usize = 255;

/// Bits of a SCAN cursor left to the node's own cursor.
const NODE_CURSOR_BITS: u32 = 56;

/// The hash slot of `key`, as Redis computes it: CRC16 (XMODEM) of the
/// key's hash tag (the text between the first `{` and the next `}`, when
/// not empty) or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A short hash tag for every slot (`tags()[s]` hashes to slot `s`),
/// found once by trying numbers in turn (about 160,000 tries, a few ms).
fn tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = n.to_string();
            let s = usize::from(crc16_xmodem(tag.as_bytes()) % SLOTS);
            if tags[s].is_empty() {
                tags[s] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// A master of the cluster: its address and the first slot it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Master {
    host: String,
    port: u16,
    /// The node's id (a promoted replica has another).
    id: String,
    first_slot: u16,
}

/// The projection's generation and the masters, by node id, as one text:
/// a record copy names those it was written under (see the module docs).
fn signature(generation: i64, masters: &[Master]) -> String {
    let mut ids: Vec<&str> = masters.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    format!("{generation}/{}", ids.join(","))
}

/// Field of a record copy naming the masters it was written under.
const MASTERS_FIELD: &str = "masters";

impl Master {
    fn route(&self) -> RoutingInfo {
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: self.host.clone(),
            port: self.port,
        })
    }
}

/// Writes one slot's keys unless its fence is ahead (see the module docs):
/// of the same log, a later generation, or the same generation and a later
/// position. KEYS: the fence, then the keys. ARGV: log id, position,
/// generation, then per key `S value` (a lookup) or `H n field value ...`
/// (an active-id hash, replaced; `n` = 0 deletes it).
const SLOT_WRITE: &str = r"
local fence = redis.call('HMGET', KEYS[1], 'log_id', 'position', 'generation')
if fence[1] == ARGV[1] then
  local fgen = tonumber(fence[3]) or 0
  local gen = tonumber(ARGV[3])
  if fgen > gen then
    return 0
  end
  if fgen == gen and tonumber(fence[2]) and tonumber(fence[2]) > tonumber(ARGV[2]) then
    return 0
  end
end
local a = 4
for i = 2, #KEYS do
  local kind = ARGV[a]
  if kind == 'S' then
    redis.call('SET', KEYS[i], ARGV[a + 1])
    a = a + 2
  else
    redis.call('DEL', KEYS[i])
    local n = tonumber(ARGV[a + 1])
    a = a + 2
    for j = 1, n do
      redis.call('HSET', KEYS[i], ARGV[a], ARGV[a + 1])
      a = a + 2
    end
  end
end
redis.call('HSET', KEYS[1], 'log_id', ARGV[1], 'position', ARGV[2], 'generation', ARGV[3])
return 1
";

/// Deletes KEYS[1] if it is still as ARGV[1] (its DUMP) says and its
/// slot's fence, KEYS[2], as ARGV[2] (its DUMP, empty: none). The fence
/// catches what the key's value cannot: the follower writing the very value
/// the key held (a stray key made live again by the same binding, after a
/// restore) moves the fence.
const DELETE_UNCHANGED: &str = r"
local now = redis.call('DUMP', KEYS[1])
if not now or now ~= ARGV[1] then
  return 0
end
if (redis.call('DUMP', KEYS[2]) or '') ~= ARGV[2] then
  return 0
end
return redis.call('DEL', KEYS[1])
";

/// KEYS[1]'s and KEYS[2]'s DUMP (empty: no such key; a DUMP is never
/// empty). Not Lua's `false`, which RESP3 would answer as a boolean.
const DUMP_BOTH: &str = r"
return {redis.call('DUMP', KEYS[1]) or '', redis.call('DUMP', KEYS[2]) or ''}
";

/// A key as [`Cluster::watch_keys`] saw it: its DUMP and its slot's
/// fence's (empty: no fence).
struct WatchedKey {
    dump: Vec<u8>,
    fence_dump: Vec<u8>,
}

/// Each master's record copy (`None`: missing or partial) with the
/// masters it names.
type SignedCopies = Vec<Option<(Projected, String)>>;

/// One slot's share of a write: its keys and the script's arguments.
#[derive(Default)]
struct SlotWrite {
    keys: Vec<String>,
    args: Vec<String>,
}

/// A connection to a Redis Cluster and the key names under a prefix.
#[derive(Clone)]
pub struct Cluster {
    conn: ClusterConnection,
    prefix: String,
    /// Keys as [`Cluster::watch_keys`] saw them (their and their fences'
    /// DUMP), for
    /// [`Cluster::delete_watched`]. A std mutex: held for a swap, never
    /// across an await.
    watched: std::sync::Arc<Mutex<HashMap<String, WatchedKey>>>,
    /// The generation this handle writes under (see the module docs), as
    /// the follower last read it from MySQL.
    generation: std::sync::Arc<AtomicI64>,
}

impl Cluster {
    /// Connects to the cluster `config` names.
    ///
    /// # Errors
    /// [`RedisError`]: a key prefix with a brace (it would put every key
    /// in one slot), an unreadable TLS file, or no seed node answering.
    pub async fn connect(config: &RedisConfig) -> Result<Cluster, RedisError> {
        if config.key_prefix.contains(['{', '}']) {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster key prefix cannot hold '{' or '}'",
            )));
        }
        if config.tls.ca_file.is_some() || config.tls.cert_file.is_some() {
            // The cluster client takes certificate files only when built
            // with rustls; this build's TLS is OpenSSL's (native-tls).
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster is reached with the system's CAs only: rediss:// seed nodes \
                 work, --redis-ca-file and --redis-client-cert do not",
            )));
        }
        let nodes: Vec<&str> = config.cluster_nodes.iter().map(|n| n.expose()).collect();
        let conn = redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()?
            .get_async_connection()
            .await?;
        Ok(Cluster {
            conn,
            prefix: config.key_prefix.clone(),
            watched: Default::default(),
            generation: Default::default(),
        })
    }

    /// Writes from now on under `generation`.
    pub fn set_generation(&self, generation: i64) {
        self.generation.store(generation, Ordering::Relaxed);
    }

    fn generation(&self) -> i64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn conn(&self) -> ClusterConnection {
        self.conn.clone()
    }

    /// Every master answers PING.
    pub async fn ping(&self) -> Result<(), RedisError> {
        for master in self.masters().await? {
            self.conn()
                .route_command(redis::cmd("PING"), master.route())
                .await?;
        }
        Ok(())
    }

    /// The masters and the first slot each serves, from CLUSTER SLOTS.
    async fn masters(&self) -> Result<Vec<Master>, RedisError> {
        let ranges: Vec<Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.conn())
            .await?;
        let mut masters: BTreeMap<(String, u16), (String, u16)> = BTreeMap::new();
        for range in ranges {
            let Value::Array(fields) = range else {
                continue;
            };
            let (Some(Value::Int(start)), Some(Value::Array(node))) =
                (fields.first(), fields.get(2))
            else {
                continue;
            };
            let host = match node.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = node.get(1) else {
                continue;
            };
            let (Ok(start), Ok(port)) = (u16::try_from(*start), u16::try_from(*port)) else {
                continue;
            };
            let id = match node.get(2) {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => format!("{host}:{port}"),
            };
            let (_, first) = masters.entry((host, port)).or_insert((id, start));
            *first = (*first).min(start);
        }
        if masters.is_empty() || masters.len() > MAX_MASTERS {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "CLUSTER SLOTS named no master, or more than 255",
            )));
        }
        Ok(masters
            .into_iter()
            .map(|((host, port), (id, first_slot))| Master {
                host,
                port,
                id,
                first_slot,
            })
            .collect())
    }

    fn record_key(&self, slot: u16) -> String {
        format!(
            "{}order_lifecycle:projection:{{{}}}",
            self.prefix,
            tags()[usize::from(slot)]
        )
    }

    fn fence_key(&self, slot: u16) -> String {
        format!(
            "{}order_lifecycle:fence:{{{}}}",
            self.prefix,
            tags()[usize::from(slot)]
        )
    }

    /// The record's copy on each master (`None`: missing or partial).
    pub async fn record_copies(&self) -> Result<Vec<Option<Projected>>, RedisError> {
        let (copies, _) = self.signed_copies().await?;
        Ok(copies.into_iter().map(|c| c.map(|(p, _)| p)).collect())
    }

    /// Each master's copy with the masters it was written under, and the
    /// masters now.
    async fn signed_copies(&self) -> Result<(SignedCopies, String), RedisError> {
        let masters = self.masters().await?;
        let reads = masters.iter().map(|m| {
            let mut conn = self.conn();
            let key = self.record_key(m.first_slot);
            async move {
                let mut fields: Vec<Option<String>> = redis::cmd("HMGET")
                    .arg(key)
                    .arg(&PROJECTION_FIELDS[..])
                    .arg(MASTERS_FIELD)
                    .query_async(&mut conn)
                    .await?;
                let signature = fields.pop().flatten();
                let copy = super::redis_projection::projected(fields);
                Ok::<_, RedisError>(copy.zip(signature))
            }
        });
        let copies = join_all(reads)
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok((copies, signature(self.generation(), &masters)))
    }

    /// The record, when every master holds the same copy, written under the
    /// masters there are now. A failover since (a master that may have lost
    /// writes its copy does not show) makes the follower re-project.
    pub async fn projected(&self) -> Result<Option<Projected>, RedisError> {
        let (copies, now) = self.signed_copies().await?;
        let first = copies.first().cloned().flatten();
        Ok(first
            .filter(|f| f.1 == now && copies.iter().all(|c| c.as_ref() == Some(f)))
            .map(|(p, _)| p))
    }

    /// Writes the keys slot by slot behind the slots' fences, then the
    /// record's copy on every master. Always `true`: a slot whose fence is
    /// ahead keeps its newer keys, which is what a rewrite would give.
    pub async fn write(
        &self,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
        at: &Projected,
        keys: &super::redis_projection::RedisKeys,
    ) -> Result<bool, RedisError> {
        // The masters before any key is written: a failover during the
        // round leaves copies naming masters that are no more.
        let masters = self.masters().await?;
        let generation = self.generation();
        let signature = signature(generation, &masters);
        let mut slots: BTreeMap<u16, SlotWrite> = BTreeMap::new();
        for (key, write) in key_writes(keys, lookups, orders) {
            let w = slots.entry(slot(key.as_bytes())).or_default();
            w.keys.push(key);
            match write {
                KeyWrite::Lookup(order) => w.args.extend(["S".to_owned(), order.to_owned()]),
                KeyWrite::Active(fields) => {
                    w.args.extend(["H".to_owned(), fields.len().to_string()]);
                    for (t, id) in fields {
                        w.args.extend([t.to_owned(), id.to_owned()]);
                    }
                }
            }
        }
        let script = redis::Script::new(SLOT_WRITE);
        let position = at.position.to_string();
        let writes = slots.into_iter().map(|(s, w)| {
            let mut conn = self.conn();
            let mut call = script.key(self.fence_key(s));
            call.key(w.keys)
                .arg(&at.log_id)
                .arg(&position)
                .arg(generation)
                .arg(w.args);
            async move { call.invoke_async::<i64>(&mut conn).await }
        });
        for result in join_all(writes).await {
            result?;
        }
        let signature = &signature;
        let records = masters.iter().map(|m| {
            let mut conn = self.conn();
            let key = self.record_key(m.first_slot);
            async move {
                redis::cmd("HSET")
                    .arg(key)
                    .arg(PROJECTION_FIELDS[0])
                    .arg(&at.log_id)
                    .arg(PROJECTION_FIELDS[1])
                    .arg(at.position)
                    .arg(PROJECTION_FIELDS[2])
                    .arg(&at.event_id)
                    .arg(MASTERS_FIELD)
                    .arg(signature)
                    .query_async::<()>(&mut conn)
                    .await
            }
        });
        for result in join_all(records).await {
            result?;
        }
        Ok(true)
    }

    /// Writes keys without fences or record (a repair of some orders), one
    /// MULTI/EXEC per slot.
    pub async fn put(
        &self,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
        keys: &super::redis_projection::RedisKeys,
    ) -> Result<(), RedisError> {
        fn pipe_for<'p>(
            slots: &'p mut BTreeMap<u16, redis::Pipeline>,
            key: &str,
        ) -> &'p mut redis::Pipeline {
            slots.entry(slot(key.as_bytes())).or_insert_with(|| {
                let mut p = redis::pipe();
                p.atomic();
                p
            })
        }
        let mut slots: BTreeMap<u16, redis::Pipeline> = BTreeMap::new();
        for (key, write) in key_writes(keys, lookups, orders) {
            write.add_to(&key, pipe_for(&mut slots, &key));
        }
        let writes = slots.into_values().map(|pipe| {
            let mut conn = self.conn();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        join_all(writes).await.into_iter().collect()
    }

    /// Removes every fence, then the record's copies: the next round
    /// re-projects the whole log and rewrites every key. (In this order: a
    /// reset that fails half-way leaves copies that still agree, never a
    /// fence without its record.)
    pub async fn reset(&self) -> Result<(), RedisError> {
        self.forget_fences().await?;
        self.delete_matching(&format!("{}order_lifecycle:projection:*", self.prefix))
            .await
    }

    /// Removes every fence (see the module docs), by name, slot by slot:
    /// a SCAN could miss a master that fails over meanwhile.
    pub async fn forget_fences(&self) -> Result<(), RedisError> {
        let names: Vec<String> = (0..SLOTS).map(|s| self.fence_key(s)).collect();
        for chunk in names.chunks(1024) {
            self.delete(&chunk.iter().collect::<Vec<_>>()).await?;
        }
        Ok(())
    }

    async fn delete_matching(&self, pattern: &str) -> Result<(), RedisError> {
        let mut cursor = 0;
        loop {
            let (next, keys) = self.scan(cursor, pattern).await?;
            let refs: Vec<&String> = keys.iter().collect();
            self.delete(&refs).await?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// One SCAN step over every master in turn: the cursor carries the
    /// master's index in its top byte. A scan spanning a change of the
    /// cluster's masters may miss keys (as SCAN may on one server for keys
    /// moved meanwhile); `rebuild` and `verify` look again next time.
    pub async fn scan(&self, cursor: u64, pattern: &str) -> Result<(u64, Vec<String>), RedisError> {
        let masters = self.masters().await?;
        let index = usize::try_from(cursor >> NODE_CURSOR_BITS).unwrap_or(usize::MAX);
        let Some(master) = masters.get(index) else {
            return Ok((0, Vec::new()));
        };
        let mut command = redis::cmd("SCAN");
        command
            .arg(cursor & ((1 << NODE_CURSOR_BITS) - 1))
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500);
        let reply = self.conn().route_command(command, master.route()).await?;
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
        if next >> NODE_CURSOR_BITS != 0 {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "a SCAN cursor too large to carry the master's index",
            )));
        }
        let next = match next {
            0 if index + 1 < masters.len() => ((index as u64) + 1) << NODE_CURSOR_BITS,
            0 => 0,
            n => ((index as u64) << NODE_CURSOR_BITS) | n,
        };
        Ok((next, keys))
    }

    /// Each order's active-id hash, one HGETALL each (they span slots).
    pub async fn active_hashes(
        &self,
        names: Vec<String>,
    ) -> Result<Vec<BTreeMap<String, String>>, RedisError> {
        let reads = names.into_iter().map(|key| {
            let mut conn = self.conn();
            async move { redis::cmd("HGETALL").arg(key).query_async(&mut conn).await }
        });
        join_all(reads).await.into_iter().collect()
    }

    /// Keys' values by name (MGET, split by slot by the client).
    pub async fn mget(&self, names: Vec<String>) -> Result<Vec<Option<String>>, RedisError> {
        redis::cmd("MGET")
            .arg(names)
            .query_async(&mut self.conn())
            .await
    }

    /// Deletes keys (split by slot by the client); how many existed.
    pub async fn delete(&self, keys: &[&String]) -> Result<u64, RedisError> {
        if keys.is_empty() {
            return Ok(0);
        }
        redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut self.conn())
            .await
    }

    /// Notes how `keys` and their slots' fences are now (their DUMP), for
    /// [`Cluster::delete_watched`]; a WATCH cannot span slots.
    pub async fn watch_keys(&self, keys: &[&String]) -> Result<(), RedisError> {
        // A key and its fence share a slot: one script reads both at once.
        let script = redis::Script::new(DUMP_BOTH);
        let reads = keys.iter().map(|key| {
            let mut conn = self.conn();
            let key = (*key).clone();
            let fence = self.fence_key(slot(key.as_bytes()));
            let mut call = script.key(&key);
            call.key(&fence);
            async move {
                let (dump, fence_dump): (Vec<u8>, Vec<u8>) = call.invoke_async(&mut conn).await?;
                Ok::<_, RedisError>((key, dump, fence_dump))
            }
        });
        let mut seen = HashMap::new();
        for result in join_all(reads).await {
            let (key, dump, fence_dump) = result?;
            if !dump.is_empty() {
                seen.insert(key, WatchedKey { dump, fence_dump });
            }
        }
        if let Ok(mut watched) = self.watched.lock() {
            *watched = seen;
        }
        Ok(())
    }

    /// Deletes each of `keys` that is still as [`Cluster::watch_keys`] saw
    /// it (one script per key: slots differ); a key changed meanwhile is
    /// kept. How many were deleted.
    pub async fn delete_watched(&self, keys: &[&String]) -> Result<u64, RedisError> {
        let seen = self
            .watched
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        let script = redis::Script::new(DELETE_UNCHANGED);
        let deletes = keys.iter().filter_map(|key| {
            let seen = seen.get(*key)?;
            let mut conn = self.conn();
            let mut call = script.key(*key);
            call.key(self.fence_key(slot(key.as_bytes())))
                .arg(&seen.dump[..])
                .arg(&seen.fence_dump[..]);
            Some(async move { call.invoke_async::<u64>(&mut conn).await })
        });
        let mut deleted = 0;
        for result in join_all(deletes).await {
            deleted += result?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_slots() {
        // Values from Redis's CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"), "an empty tag is no tag");
        for key in [&b"global_order_lookup:SL-1"[..], b"x{a}y", b"{}"] {
            assert_eq!(
                redis::cluster_routing::Slot::new(slot(key)),
                Some(redis::cluster_routing::Slot::for_key(key)),
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        let tags = tags();
        assert_eq!(tags.len(), usize::from(SLOTS));
        for (s, tag) in tags.iter().enumerate() {
            assert_eq!(usize::from(slot(format!("p:x:{{{tag}}}").as_bytes())), s);
        }
    }
}
