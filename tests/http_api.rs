//! The HTTP side against the real services: the /v1 read API after a known
//! stream, authentication, limits, the OpenAPI description checked against
//! the server, readiness with a Redis that goes away, exact metric counts,
//! and logs that never show a password.

use order_lifecycle_testkit as common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{free_addr, http_request, wait_until, Env, HttpResponse, OwnRedis, TestDb, TestRedis};
use order_lifecycle::config::{HttpConfig, RedisConfig, SecretUrl};
use order_lifecycle::domain::OrderEvent;
use order_lifecycle::http::{self, ApiState};
use order_lifecycle::ingest::{process_batch, PipelineConfig};
use order_lifecycle::shutdown::Shutdown;
use order_lifecycle::testing::EventScript;
use order_lifecycle::wire::{self, Encoding};
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789abcdef";

/// The known stream: an order whose stop-loss is replaced twice (A by B, B
/// by C), then executed late under its first id; a take-profit; a second
/// order.
fn known_stream() -> (Vec<OrderEvent>, Vec<OrderEvent>) {
    let mut o = EventScript::new("API1");
    let first = vec![
        o.place(),
        o.sl("API1-SL-A"),
        o.sl("API1-SL-B"),
        o.sl("API1-SL-C"),
        o.tp("API1-TP-1"),
    ];
    let mut p = EventScript::new("API2");
    let mut second = vec![p.place()];
    second.push(o.confirm("API1-SL-A", "EXECUTED"));
    (first, second)
}

fn resolved(
    id: &str,
    id_type: &str,
    status: &str,
    by: Option<&str>,
    active: Option<&str>,
    created: i64,
    updated: i64,
) -> Value {
    json!({
        "lifecycle_id": id,
        "order_id": "API1",
        "id_type": id_type,
        "status": status,
        "replaced_by": by,
        "target_id": null,
        "active_id": active,
        "created_at_ms": created,
        "updated_at_ms": updated,
    })
}

/// Every /v1 endpoint against a real database fed through Kafka: exact
/// bodies, including an id replaced twice and a late executed one; 404s and
/// 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_api_answers_exactly_after_a_known_stream() {
    let env = Env::new().await;
    let addr = free_addr();
    let listen = addr.to_string();
    let consumer = env.start(env.run_config_with(&["--http-listen", &listen]));
    let (first, second) = known_stream();
    env.send(&first, Encoding::Protobuf).await;
    env.wait_for_log(5, 0).await;
    env.send(&second, Encoding::Json).await;
    env.wait_for_log(7, 0).await;
    let t = |e: &OrderEvent| e.occurred_at_ms;
    let (placed, sl_a, sl_b, sl_c, tp) = (
        t(&first[0]),
        t(&first[1]),
        t(&first[2]),
        t(&first[3]),
        t(&first[4]),
    );
    let executed = t(&second[1]);

    // Resolve: the first stop-loss, replaced twice along the chain, then executed late.
    let r = http_request(addr, "GET", "/v1/ids/API1-SL-A", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        resolved(
            "API1-SL-A",
            "stoploss_id",
            "executed",
            Some("API1-SL-B"),
            Some("API1-SL-C"),
            sl_a,
            executed
        )
    );
    let r = http_request(addr, "GET", "/v1/ids/API1-SL-B", None, None).await;
    assert_eq!(
        r.json(),
        resolved(
            "API1-SL-B",
            "stoploss_id",
            "replaced",
            Some("API1-SL-C"),
            Some("API1-SL-C"),
            sl_b,
            sl_c
        )
    );

    // The order's ids.
    let r = http_request(addr, "GET", "/v1/orders/API1/ids", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = |lid: &str,
              ty: &str,
              status: &str,
              by: Option<&str>,
              replaces: Option<&str>,
              created: i64,
              updated: i64,
              iseq: u64,
              useq: u64| {
        json!({
            "lifecycle_id": lid, "id_type": ty, "status": status, "replaced_by": by,
            "replaces": replaces, "target_id": null, "created_at_ms": created,
            "updated_at_ms": updated, "issued_seq": iseq, "updated_seq": useq,
        })
    };
    assert_eq!(
        r.json(),
        json!({
            "order_id": "API1",
            "ids": [
                id("API1", "order_id", "active", None, None, placed, placed, 1, 1),
                id("API1-SL-A", "stoploss_id", "executed", Some("API1-SL-B"), None, sl_a, executed, 2, 6),
                id("API1-SL-B", "stoploss_id", "replaced", Some("API1-SL-C"), Some("API1-SL-A"), sl_b, sl_c, 3, 4),
                id("API1-SL-C", "stoploss_id", "active", None, Some("API1-SL-B"), sl_c, sl_c, 4, 4),
                id("API1-TP-1", "takeprofit_id", "active", None, None, tp, tp, 5, 5),
            ],
            "active": {"order_id": "API1", "stoploss_id": "API1-SL-C", "takeprofit_id": "API1-TP-1"},
            "next_after_seq": null,
        })
    );
    // Two ids a page: pages chained by next_after_seq give the same ids,
    // each once, and every page the whole order's active ids.
    let all = r.json()["ids"].as_array().unwrap().clone();
    let mut paged = Vec::new();
    let mut path = "/v1/orders/API1/ids?limit=2".to_owned();
    loop {
        let page = http_request(addr, "GET", &path, None, None).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        assert_eq!(page["active"], r.json()["active"]);
        let ids = page["ids"].as_array().unwrap();
        assert!(ids.len() <= 2, "{page}");
        paged.extend(ids.iter().cloned());
        match page["next_after_seq"].as_u64() {
            Some(after) => path = format!("/v1/orders/API1/ids?limit=2&after_seq={after}"),
            None => break,
        }
    }
    assert_eq!(paged, all);
    for bad in [
        "limit=0",
        "limit=1001",
        "after_seq=-1",
        "after_seq=9223372036854775808",
        "page=2",
    ] {
        let r = http_request(
            addr,
            "GET",
            &format!("/v1/orders/API1/ids?{bad}"),
            None,
            None,
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_query", "{bad}");
    }

    // The order's events, two pages.
    let page = http_request(addr, "GET", "/v1/orders/API1/events?limit=4", None, None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let page = page.json();
    assert_eq!(page["next_after_seq"], 4);
    let events: Vec<&OrderEvent> = first.iter().chain([&second[1]]).collect();
    let seqs: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    for (entry, event) in page["events"].as_array().unwrap().iter().zip(&events) {
        assert_eq!(entry["event_id"], event.event_id.to_string());
        assert_eq!(entry["kind"], event.kind.name());
        assert_eq!(entry["outcome"], "applied");
        assert_eq!(entry["occurred_at_ms"], event.occurred_at_ms);
        let payload: Value = serde_json::from_str(&wire::json::encode(event)).unwrap();
        assert_eq!(entry["event"], payload);
        assert_eq!(entry["source"]["topic"], env.topics.orders.as_str());
    }
    assert_eq!(
        page["events"][2]["transitions"],
        json!([
            {"op": "replaced", "lifecycle_id": "API1-SL-A", "by": "API1-SL-B"},
            {"op": "issued", "lifecycle_id": "API1-SL-B", "id_type": "stoploss_id"},
        ])
    );
    let rest = http_request(
        addr,
        "GET",
        "/v1/orders/API1/events?after_seq=4",
        None,
        None,
    )
    .await
    .json();
    assert_eq!(rest["next_after_seq"], Value::Null);
    let seqs: Vec<u64> = rest["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![5, 6]);
    assert_eq!(
        rest["events"][1]["transitions"],
        json!([{"op": "status_changed", "lifecycle_id": "API1-SL-A", "from": "replaced", "to": "executed"}])
    );
    assert_eq!(
        rest["events"][1]["source"]["topic"],
        env.topics.confirmations.as_str()
    );

    // Batch resolution, in request order, with the failures in place.
    let r = http_request(
        addr,
        "POST",
        "/v1/ids/resolve",
        None,
        Some(r#"{"ids": ["API1-SL-C", "NOPE", "bad id", "API1-SL-A"]}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"results": [
            resolved("API1-SL-C", "stoploss_id", "active", None, Some("API1-SL-C"), sl_c, sl_c),
            {"lifecycle_id": "NOPE", "error": {"code": "unknown_id", "message": "no order has the id NOPE"}},
            {"lifecycle_id": "bad id", "error": {"code": "invalid_id", "message": "not a lifecycle id: contains whitespace at character 3"}},
            resolved("API1-SL-A", "stoploss_id", "executed", Some("API1-SL-B"), Some("API1-SL-C"), sl_a, executed),
        ]})
    );

    // 404 and 400.
    let r = http_request(addr, "GET", "/v1/ids/NOPE", None, None).await;
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"error": {"code": "unknown_id", "message": "no order has the id NOPE"}})
        )
    );
    let r = http_request(addr, "GET", "/v1/orders/NOPE/ids", None, None).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("unknown_order"))
    );
    let r = http_request(addr, "GET", "/v1/ids/bad%20id", None, None).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("invalid_id"))
    );
    let long = "L".repeat(80);
    let r = http_request(addr, "GET", &format!("/v1/ids/{long}"), None, None).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("invalid_id"))
    );
    let many: Vec<String> = (0..501).map(|i| format!("ID{i}")).collect();
    let r = http_request(
        addr,
        "POST",
        "/v1/ids/resolve",
        None,
        Some(&json!({"ids": many}).to_string()),
    )
    .await;
    assert_eq!(
        (r.status, r.json()),
        (
            400,
            json!({"error": {"code": "batch_too_large", "message": "501 ids asked; at most 500 per request"}})
        )
    );
    let r = http_request(
        addr,
        "POST",
        "/v1/ids/resolve",
        None,
        Some(r#"{"ids": "SL1"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("invalid_body"))
    );
    let huge = format!(r#"{{"ids": ["{}"]}}"#, "x".repeat(300 * 1024));
    let r = http_request(addr, "POST", "/v1/ids/resolve", None, Some(&huge)).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("body_too_large"))
    );
    let r = http_request(addr, "GET", "/v1/orders/API1/events?limit=0", None, None).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("invalid_query"))
    );
    // Negative, and past the largest sequence the log can hold (it would
    // wrap to a negative number and page from the start).
    for after in ["-1", "9223372036854775808", "18446744073709551615"] {
        let path = format!("/v1/orders/API1/events?after_seq={after}");
        let r = http_request(addr, "GET", &path, None, None).await;
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (400, json!("invalid_query")),
            "after_seq={after}: {}",
            r.body
        );
    }
    let r = http_request(addr, "GET", "/v2/anything", None, None).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("no_such_route"))
    );

    consumer.stop().await;
    env.cleanup().await;
}

/// A store fed through the pipeline (no broker needed) and an API server on
/// it, optionally with a token.
async fn api_on_store(token: Option<&str>) -> (TestDb, std::net::SocketAddr) {
    let mut config = HttpConfig::off();
    config.api_token = token.map(|t| t.parse().expect("token"));
    api_on_store_with(config).await
}

/// [`api_on_store`] with the HTTP settings given.
async fn api_on_store_with(config: HttpConfig) -> (TestDb, std::net::SocketAddr) {
    let db = TestDb::new().await;
    let (first, second) = known_stream();
    let messages = common::inbound_messages(
        "order-events",
        0,
        first.iter().chain(&second).map(|e| (e, Encoding::Protobuf)),
    );
    let pipeline = PipelineConfig {
        offsets_group: Some("api-test".into()),
        park_timeout: Duration::from_secs(60),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    };
    process_batch(&db.store, &pipeline, &messages)
        .await
        .expect("known stream");
    let redis = RedisConfig {
        url: SecretUrl::new(common::redis_url()),
        cluster_nodes: Vec::new(),
        key_prefix: String::new(),
        tls: Default::default(),
    };
    let state = ApiState::new(&config, redis, None);
    let _ = state.store.set(db.store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("bound address");
    http::serve(listener, state, Shutdown::never());
    (db, addr)
}

/// Reads what the server sends on `stream` until it closes the
/// connection, or `within` has passed (`None` then).
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut received)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&received).into_owned()),
        Err(_) => None,
    }
}

/// A client sending its headers slowly is cut off after the request
/// timeout; past `--http-max-concurrent` requests a /v1 request is answered
/// 503 `overloaded` at once (health still answers); a request whose body
/// never comes is answered 503 `timeout` and frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_and_bursts_are_cut_off_not_queued() {
    use tokio::io::AsyncWriteExt;
    let mut config = HttpConfig::off();
    config.max_concurrent = 1;
    config.request_timeout = Duration::from_secs(1);
    let (db, addr) = api_on_store_with(config).await;

    // Slowloris: half the headers, then nothing.
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        .await
        .expect("write");
    let closed = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "a connection without complete headers was still open after 5 s"
    );

    // A request holding the only place: its body never comes.
    let mut holder = tokio::net::TcpStream::connect(addr).await.expect("connect");
    holder
        .write_all(
            b"POST /v1/ids/resolve HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"ids\": [",
        )
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = http_request(addr, "GET", "/v1/ids/API1-SL-A", None, None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "overloaded");
    assert!(
        r.headers.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        r.headers
    );
    let r = http_request(addr, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "health is not limited: {}", r.body);

    // The held request is given up after the timeout...
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), holder.read(&mut answer))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"timeout\""), "{answer}");
    // ...and its place is free again.
    let r = http_request(addr, "GET", "/v1/ids/API1-SL-A", None, None).await;
    assert_eq!(
        (r.status, r.json()["order_id"].clone()),
        (200, json!("API1"))
    );
    db.drop().await;
}

/// With a token configured, /v1 wants it; health stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required_by_the_api() {
    let (db, addr) = api_on_store(Some(TOKEN)).await;
    for token in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
        let r = http_request(addr, "GET", "/v1/ids/API1-SL-A", token, None).await;
        assert_eq!(r.status, 401, "token {token:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "unauthorized");
        assert!(
            r.headers
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{}",
            r.headers
        );
        let r = http_request(
            addr,
            "POST",
            "/v1/ids/resolve",
            token,
            Some(r#"{"ids": []}"#),
        )
        .await;
        assert_eq!(r.status, 401);
    }
    let r = http_request(addr, "GET", "/v1/ids/API1-SL-A", Some(TOKEN), None).await;
    assert_eq!(
        (r.status, r.json()["order_id"].clone()),
        (200, json!("API1"))
    );
    let r = http_request(addr, "GET", "/healthz", None, None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    db.drop().await;
}

/// `openapi.json` lists exactly the server's routes, and every documented
/// operation answers with a documented status and the documented fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_matches_the_server() {
    let spec: Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is JSON");
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = http::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "openapi.json and the router differ");

    let (db, addr) = api_on_store(None).await;
    for (method, template) in &documented {
        let op = &spec["paths"][template][method];
        let mut path = template.clone();
        for p in op["parameters"].as_array().into_iter().flatten() {
            if p["in"] == "path" {
                let example = match p["name"].as_str().unwrap() {
                    "lifecycle_id" => "API1-SL-A",
                    _ => "API1",
                };
                path = path.replace(&format!("{{{}}}", p["name"].as_str().unwrap()), example);
            }
        }
        let body = op["requestBody"]["content"]["application/json"]["example"].to_string();
        let r: HttpResponse = http_request(
            addr,
            &method.to_uppercase(),
            &path,
            None,
            (method == "post").then_some(body.as_str()),
        )
        .await;
        let documented = &op["responses"][r.status.to_string()];
        assert!(
            documented.is_object(),
            "{method} {path} answered {} which openapi.json does not document: {}",
            r.status,
            r.body
        );
        let content = &documented["content"];
        if let Some(schema) = content["application/json"]["schema"].as_object() {
            let schema = match schema.get("$ref").and_then(Value::as_str) {
                Some(reference) => {
                    &spec["components"]["schemas"][reference.rsplit('/').next().unwrap()]
                }
                None => &content["application/json"]["schema"],
            };
            let body = r.json();
            for field in schema["required"].as_array().into_iter().flatten() {
                assert!(
                    body.get(field.as_str().unwrap()).is_some(),
                    "{method} {path}: {field} missing in {body}"
                );
            }
        }
    }
    db.drop().await;
}

/// /readyz names Redis while a test-owned Redis is down, and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_redis_while_it_is_down() {
    let mut own = OwnRedis::start().await;
    let env = Env::with_services(2, TestDb::new().await, TestRedis::at(&own.url())).await;
    let addr = free_addr();
    let listen = addr.to_string();
    let consumer = env.start(env.run_config_with(&["--http-listen", &listen]));
    let ready = || async { http_request(addr, "GET", "/readyz", None, None).await };
    wait_until("the HTTP server", Duration::from_secs(10), || async {
        common::port_answers(addr.port())
    })
    .await;
    wait_until("ready", Duration::from_secs(30), || async {
        ready().await.status == 200
    })
    .await;
    assert_eq!(
        ready().await.json(),
        json!({"status": "ok", "checks": {"consumer": "ok", "database": "ok", "kafka": "ok", "redis": "ok"}})
    );
    // Probes reuse one connection: 20 of them open none.
    let client = redis::Client::open(own.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let accepted = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("the connection count")
    };
    let before: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..20 {
        assert_eq!(ready().await.status, 200);
    }
    let after: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        accepted(after) - accepted(before) <= 1,
        "readiness probes opened Redis connections"
    );

    own.stop();
    let r = ready().await;
    assert_eq!(r.status, 503, "{}", r.body);
    let body = r.json();
    assert_eq!(body["status"], "unavailable");
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(
        http_request(addr, "GET", "/healthz", None, None)
            .await
            .status,
        200
    );

    own.restart().await;
    wait_until("ready again", Duration::from_secs(15), || async {
        ready().await.status == 200
    })
    .await;
    consumer.stop().await;
    env.cleanup().await;
}

/// The value of a sample line `name{labels} value` in the exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// After a known stream, /metrics counts exactly what was consumed,
/// applied, ignored as duplicate and dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_known_stream_exactly() {
    let env = Env::new().await;
    let addr = free_addr();
    let listen = addr.to_string();
    let binary = env.spawn_binary(&["--http-listen", &listen], "metrics");
    let (first, second) = known_stream();
    env.send(&first, Encoding::Protobuf).await;
    env.wait_for_log(5, 0).await;
    env.send(&second, Encoding::Json).await;
    // The same events again (a producer retry), and one undecodable message.
    env.send(&first[..2], Encoding::Protobuf).await;
    let orders = env.topics.orders.clone();
    env.send_raw(&orders, "API1", b"\xff\xff garbage", None)
        .await;
    env.wait_for_log(7, 1).await;
    let scrape = || async { http_request(addr, "GET", "/metrics", None, None).await };
    wait_until("the counters", Duration::from_secs(20), || async {
        sample(
            &scrape().await.body,
            "order_lifecycle_events_consumed_total",
        ) == Some(10.0)
    })
    .await;
    let m = scrape().await;
    assert_eq!(m.status, 200);
    assert!(m.headers.contains("text/plain"), "{}", m.headers);
    let body = m.body;
    assert_eq!(
        sample(&body, "order_lifecycle_events_consumed_total"),
        Some(10.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "order_lifecycle_events_recorded_total{outcome=\"applied\"}"
        ),
        Some(7.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "order_lifecycle_events_duplicate_total"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "order_lifecycle_dead_letters_total{reason=\"undecodable_protobuf\"}"
        ),
        Some(1.0),
        "{body}"
    );
    for series in [
        "order_lifecycle_batch_duration_seconds_bucket",
        "order_lifecycle_batch_messages_bucket",
        "order_lifecycle_assigned_partitions",
        "order_lifecycle_http_requests_total",
    ] {
        assert!(body.contains(series), "{series} missing:\n{body}");
    }
    // Lag gauges: the consumer's per partition (librdkafka statistics, every
    // 5 s) and the Redis projection's.
    wait_until("lag gauges", Duration::from_secs(20), || async {
        let b = scrape().await.body;
        b.contains("order_lifecycle_consumer_lag_messages{")
            && b.contains("order_lifecycle_redis_projection_lag_entries 0")
    })
    .await;
    let (code, _) = binary.terminate(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    env.cleanup().await;
}

/// Start-up logs name the database but never its password, in either
/// format; JSON logs are one object per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_logs_never_show_the_password() {
    let secret = "Pa55w0rdNeverLogged";
    let unreachable = common::free_port();
    for format in ["json", "text"] {
        let log = std::env::temp_dir().join(format!("olt-redaction-{format}-{unreachable}.log"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_order-lifecycle"))
            .args(["--log-format", format, "run"])
            .env(
                "OL_DATABASE_URL",
                format!("mysql://app:{secret}@127.0.0.1:{unreachable}/ol"),
            )
            .env(
                "OL_REDIS_URL",
                format!("redis://:{secret}@127.0.0.1:{unreachable}/0"),
            )
            .env("OL_API_TOKEN", format!("{secret}-token"))
            .env("OL_HTTP_LISTEN", "off")
            .env("RUST_LOG", "debug")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start run");
        // After a few retries the log says ERROR, with what to check.
        wait_until("the database ERROR", Duration::from_secs(30), || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("the database does not answer; is it running, and is --database-url")
        })
        .await;
        let _ = child.kill();
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains(secret),
            "{format} log shows the password:\n{text}"
        );
        assert!(
            text.contains(&format!("mysql://app:***@127.0.0.1:{unreachable}/ol")),
            "{text}"
        );
        if format == "json" {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    v.get("level").is_some() && v.get("timestamp").is_some(),
                    "{line}"
                );
            }
        }
        let _ = std::fs::remove_file(&log);
    }
}

/// A broker that does not answer is named, with a hint, once as an ERROR
/// and in `/readyz` (`"kafka"`), while `run` waits for it; a one-shot
/// command (`simulate`) fails fast with the same words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_named_in_the_log_and_in_readiness() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let listen = free_addr();
    let log = tempfile_path("olt-broker-down");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_order-lifecycle"))
        .arg("run")
        .env("OL_DATABASE_URL", db.url.expose())
        .env("OL_REDIS_URL", &redis.url)
        .env("OL_REDIS_KEY_PREFIX", &redis.prefix)
        .env("OL_KAFKA_BROKERS", &nobody)
        .env("OL_HTTP_LISTEN", listen.to_string())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start run");
    // Killed when dropped, also when the test fails half-way.
    let run = common::BinaryConsumer {
        child,
        log: log.clone(),
    };
    let expected = format!("no broker reachable at {nobody}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        if tokio::net::TcpStream::connect(listen).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "run never listened");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let r = http_request(listen, "GET", "/readyz", None, None).await;
        let body = r.json();
        let kafka = body["checks"]["kafka"].as_str().unwrap_or_default();
        if r.status == 503 && kafka.starts_with(&expected) {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never named the broker: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body["checks"]["database"], "ok", "{body}");
    let (code, text) = run.terminate(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{text}");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(&expected))
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR naming the broker:\n{text}");
    assert!(errors[0].contains("--brokers (OL_KAFKA_BROKERS)"), "{text}");
    assert!(
        !text.contains("not ready") && !text.contains("request failed"),
        "readiness polls are not logged as warnings:\n{text}"
    );
    let _ = std::fs::remove_file(&log);

    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_order-lifecycle"))
        .args(["simulate", "--brokers", &nobody, "--orders", "1"])
        .output()
        .expect("run simulate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    redis.cleanup().await;
    db.drop().await;
}

/// A fresh path in the temporary directory (removed by the test).
fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "{name}-{}-{}.log",
        std::process::id(),
        fastrand::u32(..)
    ))
}

/// The metrics the service exports: every `counter!`, `gauge!` and
/// `histogram!` name in its source, with the kind.
fn exported_metrics() -> std::collections::BTreeMap<String, &'static str> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut found = std::collections::BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for kind in ["counter", "gauge", "histogram"] {
            for (at, _) in text.match_indices(&format!("metrics::{kind}!(")) {
                let rest = text[at..]
                    .split_once('"')
                    .map(|(_, r)| r)
                    .unwrap_or_default();
                let name = rest.split('"').next().unwrap_or_default();
                if name.starts_with("order_lifecycle_") {
                    found.insert(name.to_owned(), kind);
                }
            }
        }
    }
    found
}

/// The `order_lifecycle_*` names in `text`, histogram series suffixes
/// (`_bucket`, `_sum`, `_count`) taken back to the histogram's name.
fn named_metrics(
    text: &str,
    exported: &std::collections::BTreeMap<String, &'static str>,
) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("order_lifecycle_") {
        if at > 0 && text.as_bytes()[at - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| exported.get(*b) == Some(&"histogram"))
            })
            .unwrap_or(&name);
        names.insert(base.to_owned());
    }
    names
}

/// The Grafana dashboard and the Prometheus alert rules under `deploy/`
/// name only metrics the service exports, the dashboard shows what an
/// operator watches, and the alerts cover what must wake someone.
#[test]
fn the_dashboard_and_alerts_name_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let exported = exported_metrics();
    assert!(exported.len() >= 18, "{exported:?}");

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/order-lifecycle.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets").clone())
        .map(|t| t["expr"].as_str().expect("an expr").to_owned())
        .collect();
    let on_dashboard = named_metrics(&exprs.join("\n"), &exported);
    let alerts = std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap();
    let expressions: String = alerts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let in_alerts = named_metrics(&expressions, &exported);
    for name in on_dashboard.iter().chain(&in_alerts) {
        assert!(exported.contains_key(name), "{name} is not exported");
    }
    for watched in [
        "order_lifecycle_consumer_lag_messages",
        "order_lifecycle_batch_messages",
        "order_lifecycle_batch_duration_seconds",
        "order_lifecycle_events_recorded_total",
        "order_lifecycle_dead_letters_total",
        "order_lifecycle_parked_total",
        "order_lifecycle_redis_projection_lag_entries",
        "order_lifecycle_http_requests_total",
        "order_lifecycle_http_request_duration_seconds",
    ] {
        assert!(
            on_dashboard.contains(watched),
            "the dashboard lacks {watched}"
        );
    }
    for alerting in [
        "order_lifecycle_consumer_lag_messages",
        "order_lifecycle_redis_projection_lag_entries",
        "order_lifecycle_dead_letters_total",
        "order_lifecycle_stream_time_lag_seconds",
        "order_lifecycle_partition_stalled",
        "order_lifecycle_database_retrying",
    ] {
        assert!(in_alerts.contains(alerting), "no alert on {alerting}");
    }
    let rules = alerts.matches("- alert: ").count();
    assert_eq!(
        alerts.matches("\n        expr: ").count(),
        rules,
        "every rule has an expr"
    );
    assert!(rules >= 8, "{rules} rules");
}
