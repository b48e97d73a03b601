#!/usr/bin/env bash
# The idle cost of a cluster: CPU used by each of 3 kvnode processes with no client at all.
#   scripts/idle-cpu.sh [SHARDS] [SECONDS] [-- extra kvnode flags]
# Starts 3 nodes on 127.0.0.1:23201..23203 with SHARDS shards (default 256), waits until every
# shard has a leader and a further settle time (hibernation's idle threshold plus margin), then
# reads utime+stime from /proc/<pid>/stat over SECONDS (default 30) and prints the share of one
# core each node used, plus how many of its replicas hibernate. Set KVNODE_BIN to measure
# another build. Example, hibernation off for comparison:
#   scripts/idle-cpu.sh 256 30 -- --hibernate-after-ms 0
set -euo pipefail
cd "$(dirname "$0")/.."

SHARDS=${1:-256}
SECONDS_=${2:-30}
shift $(( $# >= 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
EXTRA=("$@")

TARGET="${CARGO_TARGET_DIR:-target}"
if [ -z "${KVNODE_BIN:-}" ]; then
  cargo build --release --quiet --bin kvnode --bin kvctl
  KVNODE_BIN="$TARGET/release/kvnode"
fi
KVCTL="$TARGET/release/kvctl"
[ -x "$KVCTL" ] || cargo build --release --quiet --bin kvctl

DIR=$(mktemp -d /tmp/kvnode-idle.XXXXXX)
PEERS="1=127.0.0.1:23201,2=127.0.0.1:23202,3=127.0.0.1:23203"
ENDPOINTS="127.0.0.1:23201,127.0.0.1:23202,127.0.0.1:23203"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

for id in 1 2 3; do
  "$KVNODE_BIN" --id "$id" --peers "$PEERS" --data-dir "$DIR/node-$id" --shards "$SHARDS" \
    "${EXTRA[@]}" >"$DIR/node-$id.log" 2>&1 &
  PIDS+=("$!")
done

echo "waiting for all $SHARDS shards to elect a leader..."
for _ in $(seq 1 240); do
  led=$("$KVCTL" --endpoints "$ENDPOINTS" status 2>/dev/null | grep -c '/[0-9]*\*' || true)
  [ "$led" -ge "$SHARDS" ] && break
  sleep 0.5
done
echo "settling 10 s..."
sleep 10

ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A before
for p in "${PIDS[@]}"; do before[$p]=$(cpu "$p"); done
echo "measuring ${SECONDS_} s..."
sleep "$SECONDS_"
echo
STATUS=$("$KVCTL" --endpoints "$ENDPOINTS" status 2>/dev/null || true)
echo "| node | CPU (% of one core) | replicas hibernating |"
echo "|---|---:|---|"
id=1
for p in "${PIDS[@]}"; do
  used=$(( $(cpu "$p") - before[$p] ))
  pct=$(awk -v u="$used" -v t="$ticks" -v s="$SECONDS_" 'BEGIN { printf "%.1f", 100 * u / t / s }')
  sleeping=$(echo "$STATUS" | sed -n "s/^  n$id .* up, \(.*\) replicas hibernating$/\1/p")
  echo "| $id | $pct | ${sleeping:-?} |"
  id=$((id + 1))
done
