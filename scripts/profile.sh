#!/usr/bin/env bash
# Where a kvnode cluster's CPU goes under one workload: starts a 3-node cluster on loopback,
# drives it with `kvctl bench` (the load generator bench.sh uses), samples the three nodes with
# `perf record` in the middle of the run, and prints a table of the nodes' CPU time per
# operation by component (gRPC, openraft, tokio, sled, the WAL, allocator, kernel scheduling,
# kernel network, kernel storage, ...), the task switches, socket writes, WAL writes and WAL
# syncs per operation (`perf stat` over the same window), then the hottest symbols. Issue 7's
# notes use it to say where the time goes for the targets bench.sh shows missed.
#
#   scripts/profile.sh [--workload put|get|get-local|mix] [--shards 16] [--concurrency 64]
#                      [--duration 14s] [--record 8]
#
# Components are assigned by each sample's own symbol (self time, no call stacks): a
# `memmove` counts as "memcpy" whoever called it, and a tonic future that polls openraft
# counts where the instruction was. That is enough to compare two runs (say 1 shard against
# 16) and to see which layer grows with them.
# KVNODE_BIN_DIR=DIR profiles the kvnode and kvctl binaries in DIR instead of building this
# checkout. Output: the table on stdout and target/profile/run-<time>/ (profile.md, perf.data,
# the bench result and the nodes' logs). Installs Debian's linux-perf with apt-get if `perf` is
# missing (needs root). Ports 23201-23203. The cluster is stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKLOAD=put
SHARDS=16
CONCURRENCY=64
DURATION=14s
RECORD=8
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --workload) WORKLOAD=$2; shift 2 ;;
    --shards) SHARDS=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --record) RECORD=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "profile.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$WORKLOAD" in
  put) READ_PERCENT=0 LEVEL=linearizable ;;
  get) READ_PERCENT=100 LEVEL=linearizable ;;
  get-local) READ_PERCENT=100 LEVEL=eventual ;;
  mix) READ_PERCENT=90 LEVEL=linearizable ;;
  *) echo "profile.sh: unknown workload $WORKLOAD (put, get, get-local, mix)" >&2; exit 2 ;;
esac

if ! command -v perf >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "profile.sh: installing linux-perf with apt-get" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
  else
    echo "profile.sh: perf is not installed (Debian: apt-get install linux-perf, as root)" >&2
    exit 1
  fi
fi

. scripts/lib/measure.sh
kvnode_binaries

RUN=target/profile/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN/logs"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"/kvnode-?
}
trap cleanup EXIT
trap 'exit 130' INT TERM

EPS=127.0.0.1:23201,127.0.0.1:23202,127.0.0.1:23203
PEERS=1=127.0.0.1:23201,2=127.0.0.1:23202,3=127.0.0.1:23203
for i in 1 2 3; do
  "$KVNODE" --id "$i" --peers "$PEERS" --data-dir "$RUN/kvnode-$i" --shards "$SHARDS" \
    >"$RUN/logs/kvnode-$i.log" 2>&1 &
  PIDS+=($!)
done
NODES=$(IFS=,; echo "${PIDS[*]}")
for _ in $(seq 1 300); do kvnode_ready "$EPS" && break; sleep 0.2; done
kvnode_ready "$EPS" || { echo "profile.sh: the cluster did not come up; logs in $RUN/logs/" >&2; exit 1; }

echo "kvnode $BUILD: 3 nodes, $SHARDS shards; $WORKLOAD ($READ_PERCENT% reads, $LEVEL), $CONCURRENCY in flight, $DURATION"
"$KVCTL" -e "$EPS" bench --system kvnode --workload "$WORKLOAD" --read-percent "$READ_PERCENT" \
  --level "$LEVEL" --concurrency "$CONCURRENCY" --duration "$DURATION" --quiet \
  --json "$RUN/bench.json" >"$RUN/bench.txt" 2>&1 &
BENCH=$!
# Sample the middle of the run: after connections, leaders and caches have settled.
sleep 3
t0=$(date +%s%N); c0=$(cpu_ticks "${PIDS[@]}")
# Over the same window: the calls that cost a node per operation whatever the code around them
# (a task switch, a socket write, a WAL write, a WAL sync).
EVENTS=context-switches,syscalls:sys_enter_writev,syscalls:sys_enter_pwrite64,syscalls:sys_enter_fdatasync
perf stat -x, -e "$EVENTS" -p "$NODES" -o "$RUN/stat.csv" -- sleep "$RECORD" >/dev/null 2>&1 &
STAT=$!
perf record -q -F 999 -p "$NODES" -o "$RUN/perf.data" -- sleep "$RECORD" >/dev/null 2>&1
wait "$STAT" || echo "profile.sh: perf stat failed (syscall tracepoints need root); counts left out" >&2
c1=$(cpu_ticks "${PIDS[@]}"); t1=$(date +%s%N)
wait "$BENCH" || { cat "$RUN/bench.txt" >&2; echo "profile.sh: the load generator failed" >&2; exit 1; }
cat "$RUN/bench.txt"
OPS=$(grep -o '[0-9,]* ops/s' "$RUN/bench.txt" | head -1 | tr -d ', ops/')
CPU_S=$(awk -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { print c / hz }')
# The CPU window is a little longer than the recording (perf starts and writes its file).
WINDOW_S=$(awk -v ns=$((t1 - t0)) 'BEGIN { print ns / 1e9 }')

# One line per symbol: "percent [k|.] symbol". Classified by the symbol's own name.
perf report -i "$RUN/perf.data" --no-children --sort sym --stdio -g none --percent-limit 0 2>/dev/null \
  | awk '/^ +[0-9.]+%/ { print }' >"$RUN/symbols.txt"
awk -v ops="$OPS" -v cpu="$CPU_S" -v win="$WINDOW_S" '
  function crate(s,   t) {
    t = s; sub(/^[<&*( ]+/, "", t); sub(/^dyn /, "", t); sub(/^mut /, "", t)
    sub(/[:<> ].*$/, "", t); return t
  }
  function component(kind, s,   c) {
    if (kind == "[k]") {
      if (s ~ /schedule|task_switch|spin_unlock_irq|irqentry|futex|wake|enqueue|dequeue|pick_next|switch_|exit_to_user|psi_|update_curr|update_load|idle|hrtimer|tick_/) return "kernel: scheduling, wakeups, futex"
      if (s ~ /tcp|^ip_|skb|sock|net|dev_|xmit|loopback|napi|inet|^sk_|softirq|copy_to_iter|copy_from_iter|epoll|poll/) return "kernel: network (loopback TCP), epoll"
      if (s ~ /ext4|jbd2|blk|bio|iowrite|virtio|vring|folio|filemap|fsync|writeback|block|nvme|sync_|mpage|find_get|bh_|submit/) return "kernel: storage (WAL writes, fdatasync)"
      return "kernel: other (syscall entry, memory)"
    }
    if (s ~ /^_?mi_|malloc|^free|cfree|_int_|unlink_chunk|realloc|calloc/) return "allocator (mimalloc)"
    if (s ~ /^__mem|memcpy|memmove|memset|memcmp/) return "memcpy, memcmp"
    c = crate(s)
    if (c ~ /^(tonic|tonic_prost|hyper|hyper_util|h2|prost|http|http_body|http_body_util|tower|bytes)$/) return "gRPC (tonic, hyper, h2, prost)"
    if (c == "openraft" || c == "openraft_multi") return "openraft"
    if (c == "tokio") return "tokio runtime"
    if (c == "sled") return "sled"
    if (s ~ /kvnode::storage::wal/) return "kvnode: WAL"
    if (c == "kvnode") return "kvnode: other"
    return "other (std, core, alloc, libc)"
  }
  {
    pct = $1; sub(/%/, "", pct); kind = $2
    sym = $0; sub(/^ +[0-9.]+% +\[[k.]\] +/, "", sym)
    comp = component(kind, sym); share[comp] += pct; total += pct
  }
  END {
    # CPU per operation: the nodes CPU over the sampled window, per operation at the run rate.
    per_op = ops > 0 ? cpu / (ops * win) * 1e6 : 0
    printf "nodes: %.2f CPU-s in %.1f s; %s ops/s; %.0f us of node CPU per operation\n\n", cpu, win, ops, per_op
    printf "| component | share of samples | us per operation |\n|---|---:|---:|\n"
    n = 0; for (c in share) names[n++] = c
    for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (share[names[j]] > share[names[i]]) { t = names[i]; names[i] = names[j]; names[j] = t }
    for (i = 0; i < n; i++) printf "| %s | %.1f%% | %.1f |\n", names[i], 100 * share[names[i]] / total, per_op * share[names[i]] / total
  }' "$RUN/symbols.txt" | tee "$RUN/profile.md"
if [ -s "$RUN/stat.csv" ]; then
  echo | tee -a "$RUN/profile.md"
  awk -F, -v ops="$OPS" -v rec="$RECORD" '
    BEGIN { printf "| per operation, all three nodes | count |\n|---|---:|\n" }
    $1 ~ /^[0-9]+$/ && ops > 0 { name = $3; sub(/^syscalls:sys_enter_/, "", name); printf "| %s | %.2f |\n", name, $1 / (ops * rec) }
  ' "$RUN/stat.csv" | tee -a "$RUN/profile.md"
fi
echo
echo "hottest symbols (self time):" | tee -a "$RUN/profile.md"
head -n 15 "$RUN/symbols.txt" | cut -c1-150 | tee -a "$RUN/profile.md"
echo "run folder: $RUN"
