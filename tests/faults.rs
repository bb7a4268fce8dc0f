//! Failures a production consumer meets, injected for real: SIGKILL at random
//! moments, several instances sharing partitions (one leader projecting
//! and publishing, its SIGKILL handed over, restarts with static
//! membership), SIGTERM mid-stream, Redis
//! and the database going away (test-owned instances, never the shared
//! ones), confirmations overtaking their requests. After each: every event
//! applied exactly once, per-order sequences without gaps, and MySQL and
//! Redis equal to what the log alone gives (rules R7, R8, R9).

use order_lifecycle_testkit as common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{assert_projections_match_log, stream, wait_until, Env};
use order_lifecycle::domain::OrderEvent;
use order_lifecycle::store::redis_projection::RedisProjection;
use order_lifecycle::testing::EventScript;
use order_lifecycle::wire::Encoding;

/// Fault tests run one at a time: each starts consumers, servers and
/// streams of thousands of events, and timing matters to what they prove.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The three checks: exactly once by event id, no sequence gaps, read
/// models equal to the log's.
async fn assert_exactly_once(env: &Env, events: &[(OrderEvent, Encoding)]) {
    let expected: BTreeSet<String> = events.iter().map(|(e, _)| e.event_id.to_string()).collect();
    let logged: Vec<String> =
        sqlx::query_scalar("SELECT CAST(event_id AS CHAR) FROM lifecycle_events")
            .fetch_all(env.db.store.pool())
            .await
            .unwrap();
    assert_eq!(logged.len(), expected.len(), "one log entry per event");
    assert_eq!(
        logged.into_iter().collect::<BTreeSet<_>>(),
        expected,
        "the same event ids"
    );
    assert_eq!(
        env.db.count("SELECT COUNT(*) FROM parked_events").await,
        0,
        "nothing left parked"
    );
    assert_eq!(
        env.db.count("SELECT COUNT(*) FROM dead_letters").await,
        0,
        "nothing dead-lettered"
    );
    env.db.assert_sequences_gap_free().await;
    env.db.assert_one_active_per_type().await;
    env.wait_for_redis().await;
    assert_projections_match_log(&env.db, &env.redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_with_sigkill_applies_every_event_exactly_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::with_partitions(4).await;
    // Long enough that five kills land mid-stream (a faster consumer ended
    // a 20,000-event stream before the fifth).
    let events = stream(4_000, 11);
    assert!(events.len() >= 30_000, "{} events", events.len());
    env.send_many(&events).await;
    let config = ["--batch-size", "300"];

    let mut kills = 0;
    let mut last = 0;
    while kills < 5 {
        let consumer = env.spawn_binary(&config, &format!("crash{kills}"));
        // Let it make some progress (a random share of a twentieth of the
        // stream, so that five kills land mid-stream however fast it
        // consumes), then kill it at a random moment (a batch takes tens of
        // milliseconds: the kill lands anywhere in one).
        let step = fastrand::i64(1..=events.len() as i64 / 20);
        wait_until(
            "progress before the kill",
            Duration::from_secs(60),
            || async { env.logged().await >= last + step },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..200))).await;
        consumer.kill();
        kills += 1;
        last = env.logged().await;
        assert!(
            last < events.len() as i64,
            "the stream ended before kill {kills}; make it longer"
        );
    }
    let redis_behind =
        finish_with_binary(env, &config, "final", &events, Duration::from_secs(240)).await;
    // Rule R12: the rolled-back batches of five SIGKILLs left no hole for
    // the Redis follower to wait on.
    assert!(
        redis_behind < Duration::from_secs(2),
        "Redis reached the log head {redis_behind:?} after MySQL"
    );
}

/// Starts one more binary, lets it consume the rest, stops it with SIGTERM
/// (exit 0), and checks the store holds every event exactly once.
async fn finish_with_binary(
    env: Env,
    config: &[&str],
    name: &str,
    events: &[(OrderEvent, Encoding)],
    within: Duration,
) -> Duration {
    let consumer = env.spawn_binary(config, name);
    env.wait_until_logged(events.len(), within).await;
    let logged = Instant::now();
    env.wait_for_redis().await;
    let redis_behind = logged.elapsed();
    let (code, log) = consumer.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{log}");
    // Rule R12: after SIGTERM, Redis is at the log head.
    let head = order_lifecycle::store::event_log::head(env.db.store.pool())
        .await
        .unwrap();
    let at = env.redis.projection().await.projected().await.unwrap();
    assert_eq!(at.map(|p| p.position), Some(head), "Redis at the log head");
    assert_exactly_once(&env, events).await;
    env.cleanup().await;
    redis_behind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_partitions_as_they_come_and_go() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::with_partitions(4).await;
    let events = stream(800, 12);
    env.send_many(&events).await;
    let config = ["--batch-size", "100"];
    let a = env.spawn_binary(&config, "a");
    let b = env.spawn_binary(&config, "b");
    let n = events.len() as i64;
    wait_until(
        "a quarter of the stream",
        Duration::from_secs(90),
        || async { env.logged().await >= n / 4 },
    )
    .await;
    let c = env.spawn_binary(&config, "c");
    // Stop b only once c has its share. (Stopping a member while another is
    // still joining can wedge the local test broker's group for good; Apache
    // Kafka handles it.)
    wait_until("c to get partitions", Duration::from_secs(60), || async {
        c.logged("partitions assigned")
    })
    .await;
    wait_until("half of the stream", Duration::from_secs(90), || async {
        env.logged().await >= n / 2
    })
    .await;
    let (code, log) = b.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{log}");
    // Keep the stream flowing while the group settles.
    let more = stream(200, 13);
    env.send_many(&more).await;
    let all: Vec<_> = events.iter().chain(&more).cloned().collect();
    env.wait_until_logged(all.len(), Duration::from_secs(180))
        .await;
    env.wait_for_redis().await;
    for (name, consumer) in [("a", a), ("c", c)] {
        let (code, log) = consumer.terminate(Duration::from_secs(15)).await;
        assert_eq!(code, Some(0), "instance {name}: {log}");
    }
    assert_exactly_once(&env, &all).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_zero_and_nothing_is_lost_on_restart() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::with_partitions(2).await;
    let events = stream(1_000, 14);
    env.send_many(&events).await;
    let config = ["--batch-size", "20"];
    let consumer = env.spawn_binary(&config, "first");
    wait_until("some progress", Duration::from_secs(60), || async {
        env.logged().await > 200
    })
    .await;
    let started = Instant::now();
    let (code, log) = consumer.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped within the bound"
    );
    assert!(log.contains("order-lifecycle consumer stopped"), "{log}");
    assert!(
        env.logged().await < events.len() as i64,
        "stopped mid-stream"
    );
    finish_with_binary(env, &config, "second", &events, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_confirmations_wait_for_their_id_and_unknown_ones_expire() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::new().await;
    let config = env.run_config_with(&["--park-timeout", "2s"]);
    let consumer = env.start(config);
    let mut s = EventScript::new("EARLY1");
    let place = s.place();
    let sl = s.sl("SL-LATE");
    let confirmation = s.confirm("SL-LATE", "EXECUTED");
    let orphan = s.confirm("SL-NEVER", "EXECUTED");
    // The confirmation overtakes its stop-loss (another topic).
    env.send(&[place, confirmation, orphan], Encoding::Protobuf)
        .await;
    wait_until(
        "the confirmations to be parked",
        Duration::from_secs(30),
        || async { env.db.count("SELECT COUNT(*) FROM parked_events").await == 2 },
    )
    .await;
    assert_eq!(env.logged().await, 1);
    env.send(&[sl], Encoding::Protobuf).await;
    env.wait_for_log(3, 1).await;
    let rows = env.db.rows().await;
    assert_eq!(rows["SL-LATE"].2, "executed");
    let letters = env.db.dead_letters().await;
    assert_eq!(letters[0].0, "unknown_lifecycle_id");
    assert!(letters[0].2.contains("SL-NEVER"), "{}", letters[0].2);
    let topic = env.read_dead_letter_topic(1);
    assert_eq!(topic[0]["dead-letter-reason"], "unknown_lifecycle_id");
    assert_eq!(topic[0]["source-topic"], env.topics.confirmations);
    assert_eq!(env.db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_and_a_flush_are_repaired_from_the_log() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut own = common::OwnRedis::start().await;
    let env = Env::with_services(
        2,
        common::TestDb::new().await,
        common::TestRedis::at(&own.url()),
    )
    .await;
    let consumer = env.start(env.run_config());
    let first = stream(40, 21);
    env.send_many(&first).await;
    env.wait_until_logged(first.len(), Duration::from_secs(60))
        .await;
    env.wait_for_redis().await;

    // Redis goes away: ingestion goes on.
    own.stop();
    let second = stream(40, 22);
    env.send_many(&second).await;
    env.wait_until_logged(first.len() + second.len(), Duration::from_secs(60))
        .await;

    // It comes back empty (a flush, as far as the keys go): the follower
    // re-projects from the log.
    tokio::time::sleep(Duration::from_secs(1)).await;
    own.restart().await;
    env.wait_for_redis().await;
    assert_projections_match_log(&env.db, &env.redis).await;

    // Flushed while running, then more events.
    let mut conn = env
        .redis
        .client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let third = stream(20, 23);
    env.send_many(&third).await;
    let all: Vec<_> = first.iter().chain(&second).chain(&third).cloned().collect();
    env.wait_until_logged(all.len(), Duration::from_secs(60))
        .await;
    wait_until(
        "Redis to converge after the flush",
        Duration::from_secs(30),
        || async { env.redis.snapshot().await.len() > all.len() / 2 },
    )
    .await;
    env.wait_for_redis().await;
    consumer.stop().await;
    assert_exactly_once(&env, &all).await;
    env.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_mid_stream_loses_and_doubles_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut own = common::OwnMariaDb::start().await;
    let db = common::TestDb::on(&own.root_url()).await;
    let env = Env::with_services(4, db, common::TestRedis::new()).await;
    let events = stream(400, 31);
    env.send_many(&events).await;
    let config = env.run_config_with(&["--batch-size", "50"]);
    let consumer = env.start(config);
    wait_until("some progress", Duration::from_secs(60), || async {
        env.logged().await > 300
    })
    .await;
    own.crash();
    tokio::time::sleep(Duration::from_secs(2)).await;
    own.restart().await;
    env.wait_until_logged(events.len(), Duration::from_secs(120))
        .await;
    env.wait_for_redis().await;
    consumer.stop().await;
    assert_exactly_once(&env, &events).await;
    env.redis.cleanup().await;
}

/// The binary with `args` and `env`, logs off; its exit code and stderr.
fn one_shot(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(common::process::binary())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run order-lifecycle");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// MySQL over TLS: a private MariaDB with certificates made by the test.
/// A connection verified against the right CA (and the server's name)
/// works and is encrypted; the wrong CA, or TLS required of a server
/// without it, is refused at once: a configuration error, exit 2 with one
/// line naming the database, not an endless retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_over_tls_is_verified_and_a_wrong_ca_is_refused() {
    use order_lifecycle::config::SecretUrl;
    use order_lifecycle::store::Store;
    let certs = common::TestCerts::generate();
    let server = common::OwnMariaDb::start_tls(&certs).await;
    let url = |mode: &str, ca: &str| {
        format!(
            "{}/olt_tls?ssl-mode={mode}&ssl-ca={}",
            server.root_url(),
            certs.file(ca)
        )
    };
    for mode in ["VERIFY_CA", "VERIFY_IDENTITY"] {
        let store = Store::connect(&SecretUrl::new(url(mode, "ca.pem")), 2)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let cipher: (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(!cipher.1.is_empty(), "{mode}: not encrypted");
        store.migrate().await.expect("migrations over TLS");
    }

    let wrong = url("VERIFY_CA", "other-ca.pem");
    let err = match Store::connect(&SecretUrl::new(wrong.clone()), 2).await {
        Ok(_) => panic!("a certificate of another CA was accepted"),
        Err(e) => e,
    };
    assert!(err.is_refused(), "{err}");
    assert!(!err.is_transient(), "{err}");

    let started = Instant::now();
    let (code, stderr) = one_shot(&["migrate"], &[("OL_DATABASE_URL", &wrong)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&format!(
            "the database at mysql://root@127.0.0.1:{}",
            server.port
        )),
        "{stderr}"
    );
    assert!(stderr.contains("ssl-ca"), "{stderr}");
    // `run` stops too, instead of retrying for ever.
    let (code, stderr) = one_shot(
        &["run", "--http-listen", "off"],
        &[("OL_DATABASE_URL", &wrong)],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    // TLS required of a server without it (the shared one).
    let plain = format!("{}/olt_tls_plain?ssl-mode=REQUIRED", common::MYSQL_ROOT);
    let (code, stderr) = one_shot(&["migrate"], &[("OL_DATABASE_URL", &plain)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("refused the connection"), "{stderr}");
}

/// Redis over TLS (`rediss://`): a private `redis-server --tls-port` asking
/// for client certificates. With the CA and a client certificate the
/// projection works; the wrong CA is refused as a configuration error,
/// and `run` stops with one line naming Redis (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_is_verified_and_a_wrong_ca_is_refused() {
    use order_lifecycle::config::{RedisConfig, RedisTls, SecretUrl};
    use order_lifecycle::store::redis_projection::RedisProjection;
    let certs = common::TestCerts::generate();
    let server = common::OwnRedis::start_tls(&certs, true).await;
    let url = format!("rediss://127.0.0.1:{}/0", server.port);
    let config = |ca: &str, client: bool| RedisConfig {
        url: SecretUrl::new(url.clone()),
        cluster_nodes: Vec::new(),
        key_prefix: "olt-tls:".into(),
        tls: RedisTls {
            ca_file: Some(certs.path(ca)),
            cert_file: client.then(|| certs.path("client.pem")),
            key_file: client.then(|| certs.path("client.key")),
        },
    };
    let redis = RedisProjection::connect_to(&config("ca.pem", true))
        .await
        .expect("verified TLS with a client certificate");
    redis.ping().await.unwrap();
    let id = order_lifecycle::domain::LifecycleId::parse("TLS-SL").unwrap();
    let order = order_lifecycle::domain::OrderId::parse("TLS-1").unwrap();
    redis
        .put(&[(id.clone(), order.clone())], &[])
        .await
        .unwrap();
    assert_eq!(
        redis.lookups(&[&id]).await.unwrap(),
        vec![Some(order.to_string())]
    );

    // Without a client certificate the server refuses.
    let no_client = RedisProjection::connect_to(&config("ca.pem", false)).await;
    assert!(
        no_client.is_err() || no_client.unwrap().ping().await.is_err(),
        "a client without a certificate was served"
    );
    let wrong = match RedisProjection::connect_to(&config("other-ca.pem", true)).await {
        Ok(_) => panic!("a server certificate of another CA was accepted"),
        Err(e) => e,
    };
    assert!(RedisProjection::is_refusal(&wrong), "{wrong}");

    let db = common::TestDb::new().await;
    let (code, stderr) = one_shot(
        &["run", "--http-listen", "off"],
        &[
            ("OL_DATABASE_URL", db.url.expose()),
            ("OL_REDIS_URL", &url),
            ("OL_REDIS_CA_FILE", &certs.file("other-ca.pem")),
            ("OL_REDIS_CLIENT_CERT", &certs.file("client.pem")),
            ("OL_REDIS_CLIENT_KEY", &certs.file("client.key")),
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("Redis refused the connection"), "{stderr}");
    assert!(stderr.contains("--redis-ca-file"), "{stderr}");
    db.drop().await;
}

/// What an instance logs when it takes the leader lease.
const LEADS: &str = "this instance leads";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_projects_and_a_sigkilled_leader_is_replaced_within_seconds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::with_partitions(4).await;
    let events = stream(600, 21);
    let (first, rest) = events.split_at(events.len() / 2);
    env.send_many(first).await;
    let config = ["--batch-size", "100"];
    let mut instances: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| env.spawn_binary(&config, name))
        .collect();
    env.wait_until_logged(first.len(), Duration::from_secs(120))
        .await;
    env.wait_for_redis().await;
    let leaders: Vec<usize> = (0..instances.len())
        .filter(|&i| instances[i].logged(LEADS))
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one instance leads");
    for (i, instance) in instances.iter().enumerate() {
        assert_eq!(
            instance.logged("redis follower connected"),
            i == leaders[0],
            "only the leader follows the log into Redis"
        );
    }
    instances.remove(leaders[0]).kill();
    let killed = Instant::now();
    wait_until(
        "another instance to lead",
        Duration::from_secs(15),
        || async { instances.iter().any(|c| c.logged(LEADS)) },
    )
    .await;
    eprintln!(
        "leader handover after SIGKILL: {} ms",
        killed.elapsed().as_millis()
    );
    env.send_many(rest).await;
    env.wait_until_logged(events.len(), Duration::from_secs(180))
        .await;
    env.wait_for_redis().await;
    for consumer in instances {
        let (code, log) = consumer.terminate(Duration::from_secs(15)).await;
        assert_eq!(code, Some(0), "{log}");
    }
    assert_exactly_once(&env, &events).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_published_once_each_with_three_instances() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::with_partitions(4).await;
    let instances: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| env.spawn_binary(&["--batch-size", "50"], name))
        .collect();
    let events = stream(300, 22);
    let broken = 40;
    for (round, quarter) in events.chunks(events.len().div_ceil(4)).enumerate() {
        env.send_many(quarter).await;
        for i in 0..broken / 4 {
            // Keys spread the broken messages over the partitions, so
            // every instance dead-letters some.
            let key = format!("BROKEN-{round}-{i}");
            env.send_raw(&env.topics.orders, &key, b"\xff\x00 not an event", None)
                .await;
        }
    }
    env.wait_until_logged(events.len(), Duration::from_secs(180))
        .await;
    wait_until(
        "every dead letter published",
        Duration::from_secs(60),
        || async {
            env.db
                .count("SELECT COUNT(*) FROM dead_letters WHERE published_at IS NOT NULL")
                .await
                == broken as i64
        },
    )
    .await;
    // Periodic rounds of every instance have run a few times since.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut published: Vec<String> = env
        .read_all_dead_letters()
        .iter()
        .map(|f| format!("{}/{}", f["source-partition"], f["source-offset"]))
        .collect();
    published.sort();
    let mut recorded: Vec<String> =
        sqlx::query_scalar("SELECT CONCAT(source_partition, '/', source_offset) FROM dead_letters")
            .fetch_all(env.db.store.pool())
            .await
            .unwrap();
    recorded.sort();
    assert_eq!(recorded.len(), broken);
    assert_eq!(published, recorded, "each dead letter on the topic once");
    let leaders = instances.iter().filter(|c| c.logged(LEADS)).count();
    assert_eq!(leaders, 1, "one instance leads");
    for consumer in instances {
        let (code, log) = consumer.terminate(Duration::from_secs(15)).await;
        assert_eq!(code, Some(0), "{log}");
    }
    env.db.assert_sequences_gap_free().await;
    env.cleanup().await;
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// "partitions assigned" lines in an instance's log: its rebalances.
fn assignments(consumer: &common::process::BinaryConsumer) -> usize {
    consumer.logged_lines("partitions assigned").len()
}

/// The partitions an instance was last assigned, as its log says.
fn assignment(consumer: &common::process::BinaryConsumer) -> String {
    consumer
        .logged_lines("partitions assigned")
        .last()
        .and_then(|l| l.split_once("partitions="))
        .map(|(_, parts)| parts.to_owned())
        .unwrap_or_default()
}

/// What one restart did to the group.
#[derive(Debug)]
struct Restart {
    /// Rebalances the other instances went through.
    rebalances: usize,
    /// Instances whose partitions differ afterwards.
    moved: usize,
}

/// 4 instances over topics of 16 partitions, each restarted in turn
/// (SIGTERM, start) while `orders` lifecycles flow; every event applied
/// exactly once, Redis at the log head.
async fn rolling_restart(static_membership: bool, orders: usize, seed: u64) -> Vec<Restart> {
    let env = Env::with_partitions(16).await;
    let names = ["a", "b", "c", "d"];
    let args = |name: &str| {
        let mut args = vec!["--batch-size".to_owned(), "500".to_owned()];
        if static_membership {
            args.extend([
                "--group-instance-id".to_owned(),
                format!("{}-{name}", env.group_id),
            ]);
        }
        args
    };
    let mut instances: Vec<_> = names
        .iter()
        .map(|name| env.spawn_binary(&as_strs(&args(name)), name))
        .collect();
    wait_until(
        "4 members with partitions",
        Duration::from_secs(90),
        || async { instances.iter().all(|c| c.logged("partitions assigned")) },
    )
    .await;
    let events = stream(orders, seed);
    let send = async {
        for chunk in events.chunks(events.len().div_ceil(20)) {
            env.send_many(chunk).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let restart = async {
        let mut rebalances = Vec::new();
        for i in 0..names.len() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let others = |instances: &[common::BinaryConsumer]| -> usize {
                (0..instances.len())
                    .filter(|&j| j != i)
                    .map(|j| assignments(&instances[j]))
                    .sum()
            };
            let before = others(&instances);
            let assigned: Vec<String> = instances.iter().map(assignment).collect();
            let name = names[i];
            let stopped = instances.remove(i);
            let (code, log) = stopped.terminate(Duration::from_secs(20)).await;
            assert_eq!(code, Some(0), "instance {name}: {log}");
            let again = env.spawn_binary(&as_strs(&args(name)), &format!("{name}-again"));
            instances.insert(i, again);
            wait_until("the restarted member", Duration::from_secs(90), || async {
                instances[i].logged("partitions assigned")
            })
            .await;
            // Let the group settle before counting.
            tokio::time::sleep(Duration::from_secs(3)).await;
            rebalances.push(Restart {
                rebalances: others(&instances) - before,
                moved: (0..instances.len())
                    .filter(|&j| assignment(&instances[j]) != assigned[j])
                    .count(),
            });
        }
        rebalances
    };
    let ((), rebalances) = tokio::join!(send, restart);
    env.wait_until_logged(events.len(), Duration::from_secs(900))
        .await;
    let caught_up = Instant::now();
    env.wait_for_redis().await;
    eprintln!(
        "{} events, static membership {static_membership}: Redis at the log head {} ms \
         after the last entry was logged; per restart: {rebalances:?}",
        events.len(),
        caught_up.elapsed().as_millis()
    );
    for consumer in instances {
        let (code, log) = consumer.terminate(Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "{log}");
    }
    assert_exactly_once(&env, &events).await;
    env.cleanup().await;
    rebalances
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_restarted_in_turn_apply_every_event_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // About 100,000 events with static membership; a smaller stream
    // without, to compare.
    let fixed = rolling_restart(true, 11_700, 51).await;
    let dynamic = rolling_restart(false, 1_200, 52).await;
    // A static member gets its own partitions back, and the others keep
    // theirs: the range assignor orders static members by their instance
    // ids. Whether the broker rebalances the others at all on a restart
    // within the session timeout is its call (Apache Kafka does not; the
    // local test broker sometimes does): reported, not asserted.
    assert!(
        fixed.iter().all(|r| r.moved == 0),
        "static members keep their partitions: {fixed:?}"
    );
    assert!(
        dynamic.iter().all(|r| r.rebalances >= 1),
        "every restart of a dynamic member rebalances the others: {dynamic:?}"
    );
}

/// Waits until every master of the cluster holds the projection record at
/// the log's head (the follower re-projected what a master lost).
async fn wait_for_cluster_record(env: &Env) {
    let projection = env.redis.projection().await;
    wait_until(
        "every master's record at the log's head",
        Duration::from_secs(90),
        || async {
            let head = env
                .db
                .count("SELECT COALESCE(MAX(position), 0) FROM lifecycle_events")
                .await;
            projection.record_copies().await.is_ok_and(|copies| {
                copies
                    .iter()
                    .all(|c| c.as_ref().is_some_and(|c| c.position == head))
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_or_flushed_mid_stream_loses_no_key() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = common::OwnRedisCluster::start().await;
    let redis = common::TestRedis::on_cluster(&cluster.nodes());
    let env = Env::with_services(4, common::TestDb::new().await, redis).await;
    let consumer = env.spawn_binary(&[], "cluster");
    let events = stream(600, 41);
    let (first, rest) = events.split_at(events.len() / 2);
    env.send_many(first).await;
    env.wait_until_logged(first.len(), Duration::from_secs(120))
        .await;

    // A master dies mid-stream; its replica takes over.
    let master = cluster.masters()[0];
    cluster.kill(master);
    env.send_many(rest).await;
    env.wait_until_logged(events.len(), Duration::from_secs(180))
        .await;
    cluster.wait_until_ok().await;
    wait_for_cluster_record(&env).await;
    assert_exactly_once(&env, &events).await;

    // A master flushed in place: its copy of the record goes with its
    // keys, and the follower re-projects what it lost.
    let flushed = cluster.masters()[0];
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &flushed.to_string(), "FLUSHALL"])
        .output()
        .expect("redis-cli");
    assert!(out.status.success());
    wait_for_cluster_record(&env).await;
    assert_projections_match_log(&env.db, &env.redis).await;
    let (code, log) = consumer.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{log}");

    // rebuild and verify reach every master.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::process::binary())
            .args(args)
            .args(env.redis.args())
            .args(["--database-url", env.db.url.expose()])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run order-lifecycle");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = cli(&["rebuild", "--target", "redis"]);
    assert_eq!(code, Some(0), "{text}");
    assert_projections_match_log(&env.db, &env.redis).await;
    let (code, text) = cli(&["verify"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("healthy"), "{text}");
    env.cleanup().await;
}

/// Every client connection of the Redis at `url` but the one asking is
/// cut; then `projection` is used (a readiness probe's PING) until its
/// reconnecting connection is back.
async fn cut_redis_connections(url: &str, projection: &RedisProjection) {
    let mut admin = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cut: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(cut > 0, "no connection to cut");
    wait_until(
        "the projection's connection to come back",
        Duration::from_secs(10),
        || async { projection.ping().await.is_ok() },
    )
    .await;
}

/// A connection lost between a WATCH and its EXEC fails the EXEC: on a
/// connection that reconnects by itself the WATCH would be gone and the
/// EXEC would run unguarded (a stray key deleted although it was written
/// meanwhile, a follower's write past a flush). The next try works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_connection_lost_between_watch_and_exec_writes_and_deletes_nothing() {
    use order_lifecycle::domain::{LifecycleId, OrderId};
    use order_lifecycle::store::redis_projection::Projected;
    let own = common::OwnRedis::start().await;
    let redis = common::TestRedis::at(&own.url());
    let projection = redis.projection().await;
    let keys = projection.keys();
    let id = |s: &str| LifecycleId::parse(s).unwrap();
    let order = |s: &str| OrderId::parse(s).unwrap();
    projection
        .put(&[(id("SL-1"), order("OLD1"))], &[])
        .await
        .unwrap();
    let key = [keys.lookup(&id("SL-1"))];
    let key: Vec<&String> = key.iter().collect();

    // The key is rewritten after the watch, on another connection, while
    // the watching one is cut.
    projection.watch_keys(&key).await.unwrap();
    cut_redis_connections(&own.url(), &projection).await;
    let other = redis.projection().await;
    other
        .put(&[(id("SL-1"), order("NEW1"))], &[])
        .await
        .unwrap();
    assert!(
        projection.delete_watched(&key).await.is_err(),
        "the deletion fails with its connection"
    );
    assert_eq!(
        redis.get("global_order_lookup:SL-1").await.as_deref(),
        Some("NEW1")
    );
    // Watched again, nothing changing: deleted.
    projection.watch_keys(&key).await.unwrap();
    assert_eq!(projection.delete_watched(&key).await.unwrap(), Some(1));
    assert_eq!(redis.get("global_order_lookup:SL-1").await, None);

    // The follower's write: its connection cut after reading the record.
    let at = Projected {
        log_id: "log-a".to_owned(),
        position: 1,
        event_id: "e-1".to_owned(),
    };
    assert_eq!(projection.watch_projected().await.unwrap(), None);
    cut_redis_connections(&own.url(), &projection).await;
    assert!(
        projection
            .write(&[(id("SL-2"), order("O2"))], &[], &at)
            .await
            .is_err(),
        "the write fails with its connection"
    );
    assert_eq!(redis.get("global_order_lookup:SL-2").await, None);
    let fresh = redis.projection().await;
    assert_eq!(fresh.position().await.unwrap(), 0);
    // The next round writes.
    assert_eq!(projection.watch_projected().await.unwrap(), None);
    assert!(projection
        .write(&[(id("SL-2"), order("O2"))], &[], &at)
        .await
        .unwrap());
    assert_eq!(
        redis.get("global_order_lookup:SL-2").await.as_deref(),
        Some("O2")
    );
    assert_eq!(fresh.position().await.unwrap(), 1);
}
