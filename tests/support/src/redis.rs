//! A Redis key prefix of each test's own, on one server or on the local
//! Redis Cluster.

use std::collections::BTreeMap;

use order_lifecycle::config::{RedisConfig, SecretUrl};
use order_lifecycle::store::redis_projection::RedisProjection;

use crate::basics::{redis_cluster_nodes, redis_url, unique_suffix};

/// A Redis key prefix of its own.
pub struct TestRedis {
    pub prefix: String,
    pub url: String,
    pub client: redis::Client,
    /// The cluster's seed nodes (comma-separated) in cluster mode.
    pub cluster_nodes: Option<String>,
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
            cluster_nodes: None,
        }
    }

    /// A prefix of its own on the shared local Redis Cluster.
    pub fn cluster() -> TestRedis {
        TestRedis::on_cluster(&redis_cluster_nodes())
    }

    /// A prefix of its own on the Redis Cluster of `nodes` (comma-separated).
    pub fn on_cluster(nodes: &str) -> TestRedis {
        let first = nodes.split(',').next().unwrap_or_default().to_owned();
        TestRedis {
            cluster_nodes: Some(nodes.to_owned()),
            ..TestRedis::at(&first)
        }
    }

    /// The product's Redis settings for this prefix.
    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            url: SecretUrl::new(self.url.clone()),
            cluster_nodes: self
                .cluster_nodes
                .iter()
                .flat_map(|n| n.split(','))
                .map(SecretUrl::new)
                .collect(),
            key_prefix: self.prefix.clone(),
            tls: Default::default(),
        }
    }

    /// The `run` arguments that point at this Redis.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--redis-url".to_owned(),
            self.url.clone(),
            "--redis-key-prefix".to_owned(),
            self.prefix.clone(),
        ];
        if let Some(nodes) = &self.cluster_nodes {
            args.extend(["--redis-cluster-nodes".to_owned(), nodes.clone()]);
        }
        args
    }

    /// A connection that reaches any key (a cluster connection in cluster
    /// mode).
    async fn conn(&self) -> Conn {
        match &self.cluster_nodes {
            Some(nodes) => {
                let connected = match redis::cluster::ClusterClient::new(nodes.split(',')) {
                    Ok(client) => client.get_async_connection().await,
                    Err(e) => Err(e),
                };
                Conn::Cluster(
                    connected.unwrap_or_else(|e| {
                        panic!("the Redis Cluster at {nodes} is required: {e}")
                    }),
                )
            }
            None => Conn::Single(
                self.client
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap_or_else(|e| panic!("Redis at {} is required: {e}", self.url)),
            ),
        }
    }

    /// Every key under the prefix (prefix stripped) with its value; hashes
    /// as sorted `field=value` lists.
    pub async fn snapshot(&self) -> BTreeMap<String, String> {
        let keys = self.keys().await;
        let mut conn = self.conn().await;
        let mut out = BTreeMap::new();
        for key in keys {
            let kind: String = conn.query(redis::cmd("TYPE").arg(&key)).await;
            let value = if kind == "hash" {
                let h: BTreeMap<String, String> = conn.query(redis::cmd("HGETALL").arg(&key)).await;
                h.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                conn.query(redis::cmd("GET").arg(&key)).await
            };
            out.insert(key[self.prefix.len()..].to_owned(), value);
        }
        out
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut conn = self.conn().await;
        conn.query(redis::cmd("GET").arg(format!("{}{key}", self.prefix)))
            .await
    }

    /// The product's projection on this prefix.
    pub async fn projection(&self) -> RedisProjection {
        RedisProjection::connect_to(&self.config())
            .await
            .unwrap_or_else(|e| panic!("Redis at {} is required: {e}", self.url))
    }

    /// Every key under the prefix, by SCAN over every master (KEYS would
    /// block a shared Redis holding other tests' hundreds of thousands of
    /// keys).
    async fn keys(&self) -> Vec<String> {
        let projection = self.projection().await;
        let pattern = format!("{}*", self.prefix);
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch) = projection.scan(cursor, &pattern).await.expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                return keys;
            }
        }
    }

    pub async fn cleanup(&self) {
        let keys = self.keys().await;
        let projection = self.projection().await;
        for chunk in keys.chunks(5_000) {
            projection
                .delete(&chunk.iter().collect::<Vec<_>>())
                .await
                .expect("DEL");
        }
    }
}

/// A connection to one server or to a cluster.
enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }
}
