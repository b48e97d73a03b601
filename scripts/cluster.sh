#!/usr/bin/env bash
# A local 3-node kvnode cluster for trying things out.
#   scripts/cluster.sh start    build (release) and start nodes 1..3 on 127.0.0.1:7001..7003
#   scripts/cluster.sh status   show each node's process and the cluster as kvctl sees it
#   scripts/cluster.sh stop     SIGTERM every node (clean shutdown) and wait for them
# Data and logs live in ${KVNODE_CLUSTER_DIR:-data/cluster}; remove it to start afresh.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${KVNODE_CLUSTER_DIR:-data/cluster}
PEERS="1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"
BIN="${CARGO_TARGET_DIR:-target}/release"

pid_of() { cat "$DIR/node-$1.pid" 2>/dev/null || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

start() {
  cargo build --release --quiet --bin kvnode --bin kvctl
  mkdir -p "$DIR"
  for id in 1 2 3; do
    if alive "$id"; then echo "node $id already running (pid $(pid_of "$id"))"; continue; fi
    "$BIN/kvnode" --id "$id" --peers "$PEERS" --data-dir "$DIR/node-$id" \
      >"$DIR/node-$id.log" 2>&1 &
    echo $! >"$DIR/node-$id.pid"
    echo "node $id started (pid $!, log $DIR/node-$id.log)"
  done
  for _ in $(seq 1 50); do
    if "$BIN/kvctl" --endpoints 127.0.0.1:7001 status >/dev/null 2>&1; then
      echo "cluster is up: $BIN/kvctl --endpoints 127.0.0.1:7001 status"; return 0
    fi
    sleep 0.2
  done
  echo "nodes started but not answering yet; see $DIR/node-*.log" >&2
}

status() {
  for id in 1 2 3; do
    if alive "$id"; then echo "node $id: running (pid $(pid_of "$id"))"; else echo "node $id: stopped"; fi
  done
  "$BIN/kvctl" --endpoints 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 status || true
}

stop() {
  for id in 1 2 3; do
    if alive "$id"; then kill -TERM "$(pid_of "$id")"; fi
  done
  for id in 1 2 3; do
    for _ in $(seq 1 100); do alive "$id" || break; sleep 0.1; done
    if alive "$id"; then echo "node $id did not stop; killing" >&2; kill -KILL "$(pid_of "$id")"; fi
    rm -f "$DIR/node-$id.pid"
  done
  echo "stopped"
}

case "${1:-}" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
