#!/usr/bin/env bash
# The main job on a local machine: starts MariaDB, Redis and a Kafka-protocol
# broker if needed, builds, runs the consumer (`order-lifecycle run`) against
# them and feeds it a realistic stream of order lifecycles
# (`order-lifecycle simulate`), printing what lands in MySQL and Redis.
#
#   ORDERS=500 RATE=200 bash scripts/demo.sh     # a bigger stream
#   KEEP_RUNNING=1 bash scripts/demo.sh          # keep consuming until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

ORDERS=${ORDERS:-200}
RATE=${RATE:-150}
DB=${DEMO_DATABASE:-order_lifecycle}
export OL_DATABASE_URL=${OL_DATABASE_URL:-mysql://root@127.0.0.1:3306/$DB}
export RUST_LOG=${RUST_LOG:-warn,order_lifecycle=info}
export OL_HTTP_LISTEN=${OL_HTTP_LISTEN:-127.0.0.1:18080}
API="http://$OL_HTTP_LISTEN"

bash scripts/services.sh
echo "demo: building (the first build takes a few minutes)"
cargo build --locked
BIN="${CARGO_TARGET_DIR:-target}/debug/order-lifecycle"

LOG=${TMPDIR:-/tmp}/order-lifecycle-demo.log
start_consumer() {
  "$BIN" run --create-topics >>"$LOG" 2>&1 &
  RUN_PID=$!
}
stop() {
  kill -TERM "$RUN_PID" 2>/dev/null || true
  wait "$RUN_PID" 2>/dev/null || true
  echo "demo: consumer stopped (log: $LOG)"
}
ready() { # seconds
  for _ in $(seq 1 "$1"); do
    curl -sf "$API/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$RUN_PID" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}
: >"$LOG"
start_consumer
trap stop EXIT
if ! ready 30; then
  # The local tansu broker can wedge a consumer group for good when a member
  # left it mid-join (Apache Kafka does not); a fresh group gets on with it.
  echo "demo: /readyz: $(curl -s "$API/readyz" || echo 'no answer')"
  WEDGED=${OL_GROUP_ID:-order-lifecycle}
  OL_GROUP_ID=order-lifecycle-demo-$(date +%s)
  echo "demo: the broker gave group $WEDGED no partitions within 30 s; going on with group $OL_GROUP_ID" >&2
  stop
  export OL_GROUP_ID
  start_consumer
  ready 30 || { echo "demo: the consumer is still not ready; see $LOG" >&2; exit 1; }
fi
echo "demo: ready: $(curl -s "$API/readyz")"

sql() { mysql -uroot -N -B "$DB" -e "$1" 2>/dev/null || echo "-"; }
progress() {
  local events ids active dead parked keys
  events=$(sql "SELECT COUNT(*) FROM lifecycle_events")
  ids=$(sql "SELECT COUNT(*) FROM order_lifecycle_ids")
  active=$(sql "SELECT COUNT(*) FROM order_lifecycle_ids WHERE status='active'")
  dead=$(sql "SELECT COUNT(*) FROM dead_letters")
  parked=$(sql "SELECT COUNT(*) FROM parked_events")
  keys=$(redis-cli --scan --pattern 'global_order_lookup:*' | wc -l)
  printf 'demo: log %6s events | %6s ids (%s active) | %s dead letters | %s parked | redis %s lookup keys\n' \
    "$events" "$ids" "$active" "$dead" "$parked" "$keys"
}

echo "demo: consumer started (pid $RUN_PID, log: $LOG); simulating $ORDERS orders at ~$RATE events/s"
"$BIN" simulate --orders "$ORDERS" --rate "$RATE" &
SIM_PID=$!
while kill -0 "$SIM_PID" 2>/dev/null; do
  sleep 2
  kill -0 "$RUN_PID" 2>/dev/null || { echo "demo: the consumer exited; see $LOG" >&2; exit 1; }
  progress
done
wait "$SIM_PID"
sleep 3
progress

echo
echo "demo: ids by type and status (the seed's verification query)"
mysql -uroot -t "$DB" -e "SELECT id_type, COUNT(*) AS count, SUM(status='active') AS active,
  SUM(status='replaced') AS replaced, SUM(status='cancelled') AS cancelled,
  SUM(status='executed') AS executed, SUM(status='rejected') AS rejected
  FROM order_lifecycle_ids GROUP BY id_type ORDER BY count DESC"
echo "demo: stop-losses executed after they were replaced (the ID-loss case), resolved"
mysql -uroot -t "$DB" -e "SELECT lifecycle_id, order_id, status, replaced_by FROM order_lifecycle_ids
  WHERE id_type='stoploss_id' AND status='executed' AND replaced_by IS NOT NULL ORDER BY updated_at DESC LIMIT 5"
late=$(sql "SELECT lifecycle_id FROM order_lifecycle_ids WHERE status='executed' AND replaced_by IS NOT NULL LIMIT 1")
if [ -n "$late" ] && [ "$late" != "-" ]; then
  echo "demo: redis-cli GET global_order_lookup:$late -> $(redis-cli GET "global_order_lookup:$late")"
  echo "demo: curl $API/v1/ids/$late"
  curl -s "$API/v1/ids/$late"; echo
fi
echo "demo: curl $API/readyz"
curl -s "$API/readyz"; echo
echo "demo: metrics (curl $API/metrics, excerpt)"
curl -s "$API/metrics" | grep -E '^order_lifecycle_(events_consumed_total|events_recorded_total|events_duplicate_total|dead_letters_total|redis_projection_lag_entries)[{ ]' || true
echo "demo: order-lifecycle verify"
"$BIN" verify || true
echo "demo: dead letters by reason"
mysql -uroot -t "$DB" -e "SELECT reason, COUNT(*) AS count FROM dead_letters GROUP BY reason"

if [ -n "${KEEP_RUNNING:-}" ]; then
  echo "demo: still consuming; Ctrl-C to stop"
  wait "$RUN_PID"
fi
