//! The integration tests' harness, against the real services of this
//! machine (MariaDB, Redis, a Kafka-protocol broker): each test gets a
//! database, Redis key prefix and topics of its own, so tests run in
//! parallel and never see each other's data. A missing service fails the
//! test with a message saying which one; nothing is skipped.
//!
//! A library of its own (a dev-dependency of the service), so that each
//! test binary uses what it needs without dead code in the others.

mod basics;
pub mod database;
pub mod env;
pub mod http;
pub mod kafka;
pub mod process;
pub mod redis;
pub mod servers;
pub mod tls;

pub use basics::{brokers, redis_cluster_nodes, redis_url, wait_until, MYSQL_ROOT};
pub use database::TestDb;
pub use env::{assert_projections_match_log, stream, Env, RunningConsumer};
pub use http::{free_addr, http_request, HttpResponse};
pub use kafka::{inbound_messages, kafka_config, TestTopics};
pub use process::BinaryConsumer;
pub use redis::TestRedis;
pub use servers::{free_port, port_answers, OwnMariaDb, OwnRedis, OwnRedisCluster};
pub use tls::TestCerts;
