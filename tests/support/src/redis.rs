//! A Redis key prefix of each test's own.

use std::collections::BTreeMap;

use crate::basics::{redis_url, unique_suffix};

/// A Redis key prefix of its own.
pub struct TestRedis {
    pub prefix: String,
    pub url: String,
    pub client: redis::Client,
}

/// A fresh prefix, on the shared Redis.
impl Default for TestRedis {
    fn default() -> TestRedis {
        TestRedis::new()
    }
}

impl TestRedis {
    pub fn new() -> TestRedis {
        TestRedis::at(&redis_url())
    }

    /// A prefix of its own on the Redis at `url`.
    pub fn at(url: &str) -> TestRedis {
        TestRedis {
            prefix: format!("olt:{}:", unique_suffix()),
            url: url.to_owned(),
            client: redis::Client::open(url).expect("redis url"),
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("Redis at {} is required: {e}", self.url))
    }

    /// Every key under the prefix (prefix stripped) with its value; hashes
    /// as sorted `field=value` lists.
    pub async fn snapshot(&self) -> BTreeMap<String, String> {
        let mut conn = self.conn().await;
        let keys = self.keys(&mut conn).await;
        let mut out = BTreeMap::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let value = if kind == "hash" {
                let h: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                h.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap()
            };
            out.insert(key[self.prefix.len()..].to_owned(), value);
        }
        out
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut conn = self.conn().await;
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// The product's projection on this prefix.
    pub async fn projection(&self) -> order_lifecycle::store::redis_projection::RedisProjection {
        order_lifecycle::store::redis_projection::RedisProjection::connect(&self.url, &self.prefix)
            .await
            .unwrap_or_else(|e| panic!("Redis at {} is required: {e}", self.url))
    }

    /// Every key under the prefix, by SCAN (KEYS would block a shared
    /// Redis holding other tests' hundreds of thousands of keys).
    async fn keys(&self, conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(10_000)
                .query_async(conn)
                .await
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                return keys;
            }
        }
    }

    pub async fn cleanup(&self) {
        let mut conn = self.conn().await;
        let keys = self.keys(&mut conn).await;
        for chunk in keys.chunks(5_000) {
            let _: () = redis::cmd("UNLINK")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .expect("UNLINK");
        }
    }
}
