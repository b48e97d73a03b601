#!/usr/bin/env bash
# kvnode vs etcd on this machine, side by side: the same closed-loop load generator
# (`kvctl bench`, src/loadgen/) against a 3-node kvnode cluster and a 3-member etcd cluster, both
# on loopback, one workload and one system at a time; then `kvctl bench report` prints the table
# with kvnode/etcd ratios and writes bench.md and bench.svg (the picture for the README).
#
#   scripts/bench.sh [--duration 10s] [--warmup 1s] [--concurrency 64] [--keys 1000]
#                    [--value-bytes 256] [--shards 16] [--workloads put,get,get-local,mix]
#
# The same settings can come from the environment: DURATION, WARMUP, CONCURRENCY, KEYS,
# VALUE_BYTES, SHARDS, WORKLOADS (flags win). The workloads, each run on both systems:
#   put        100% writes
#   get        100% reads, linearizable on both
#   get-local  100% reads served from a replica's own state: kvnode eventual (spread over all
#              nodes) vs etcd serializable (round-robin over all members)
#   mix        90% linearizable reads, 10% writes
# With the defaults a run takes about 2 minutes after the build. Everything lands in
# target/bench/run-<time>/: one JSON result per run, machine.txt, cpu.txt (the servers' CPU use
# per run), bench.md, bench.svg and the servers' logs (the data directories are deleted at the
# end unless KEEP_DATA=1).
# KVNODE_BIN_DIR=DIR measures the kvnode and kvctl binaries in DIR instead of building this
# checkout, to compare two builds back to back.
#
# Installs Debian's etcd-server with apt-get if `etcd` is missing (needs root). Ports: kvnode
# 23101-23103, etcd clients 23791-23793, etcd peers 23801-23803. Both clusters are stopped on
# exit, whatever happens. Exit status: 0 every run succeeded, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
CONCURRENCY=${CONCURRENCY:-64}
KEYS=${KEYS:-1000}
VALUE_BYTES=${VALUE_BYTES:-256}
SHARDS=${SHARDS:-16}
WORKLOADS=${WORKLOADS:-put,get,get-local,mix}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --keys) KEYS=$2; shift 2 ;;
    --value-bytes) VALUE_BYTES=$2; shift 2 ;;
    --shards) SHARDS=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "bench.sh: unknown argument $1" >&2; usage ;;
  esac
done

# --- etcd ---------------------------------------------------------------------------------
if ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench.sh: installing etcd-server with apt-get" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    # The package may enable a system service; this script runs its own members only.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop etcd >/dev/null 2>&1 || true; fi
  else
    echo "bench.sh: etcd is not installed (Debian: apt-get install etcd-server, as root)" >&2
    exit 1
  fi
fi
ETCD_VERSION=$(etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p')

# --- build --------------------------------------------------------------------------------
. scripts/lib/measure.sh
kvnode_binaries

STAMP=$(date +%Y%m%d-%H%M%S)
RUN=target/bench/run-$STAMP
mkdir -p "$RUN/logs"

CPU_MODEL=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
MACHINE="$(nproc) CPUs (${CPU_MODEL:-unknown CPU}), Linux $(uname -r), etcd ${ETCD_VERSION:-?}, kvnode $BUILD"
echo "$MACHINE" >"$RUN/machine.txt"
echo "machine: $MACHINE"
echo "run folder: $RUN"

# --- clusters -----------------------------------------------------------------------------
PIDS=()
ETCD_PIDS=()
KV_PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "${KEEP_DATA:-0}" != 1 ]; then rm -rf "$RUN"/etcd-? "$RUN"/kvnode-?; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in 23101 23102 23103 23791 23792 23793 23801 23802 23803; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "bench.sh: port $port is already in use (a leftover cluster?)" >&2
    exit 1
  fi
done

ETCD_EPS=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
ETCD_CLUSTER=etcd-1=http://127.0.0.1:23801,etcd-2=http://127.0.0.1:23802,etcd-3=http://127.0.0.1:23803
for i in 1 2 3; do
  etcd --name "etcd-$i" --data-dir "$RUN/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$ETCD_CLUSTER" --initial-cluster-state new \
    --initial-cluster-token "bench-$STAMP" --logger zap --log-level warn \
    >"$RUN/logs/etcd-$i.log" 2>&1 &
  PIDS+=($!)
  ETCD_PIDS+=($!)
done

KV_EPS=127.0.0.1:23101,127.0.0.1:23102,127.0.0.1:23103
KV_PEERS=1=127.0.0.1:23101,2=127.0.0.1:23102,3=127.0.0.1:23103
for i in 1 2 3; do
  "$KVNODE" --id "$i" --peers "$KV_PEERS" --data-dir "$RUN/kvnode-$i" --shards "$SHARDS" \
    >"$RUN/logs/kvnode-$i.log" 2>&1 &
  PIDS+=($!)
  KV_PIDS+=($!)
done

etcd_ready() {
  local i
  for i in 1 2 3; do
    curl -fsS "http://127.0.0.1:2379$i/health" 2>/dev/null | grep -q '"health":"true"' || return 1
  done
}
kvnode_up() { kvnode_ready "$KV_EPS"; }
wait_for() {
  local what=$1 check=$2
  for _ in $(seq 1 300); do
    if "$check"; then echo "$what is up"; return 0; fi
    sleep 0.2
  done
  echo "bench.sh: $what did not come up within 60 s; logs in $RUN/logs/" >&2
  tail -n 5 "$RUN"/logs/*.log >&2 || true
  exit 1
}
wait_for "etcd (3 members, $ETCD_EPS)" etcd_ready
wait_for "kvnode (3 nodes, $SHARDS shards, $KV_EPS)" kvnode_up
if [ "$SHARDS" = 16 ]; then SHARD_NOTE="16 shards (kvnode's default)"; else SHARD_NOTE="$SHARDS shards (kvnode's default is 16)"; fi
echo "kvnode: 3 nodes, $SHARD_NOTE, replication factor 3, release build; etcd ${ETCD_VERSION:-?}: 3 members, default settings"
echo "both on loopback on this machine, fsync before every acknowledged write in both, data under $RUN/;"
echo "the idle cluster keeps running (heartbeats only) while the other is measured"
echo "workloads: $WORKLOADS; $CONCURRENCY in flight, $KEYS keys, $VALUE_BYTES-byte values, $WARMUP warmup + $DURATION per run"

# --- runs ---------------------------------------------------------------------------------
TICKS=$(getconf CLK_TCK)
CPUS=$(nproc)
SEQ=0
FAILED=0
run() { # system workload read-percent level label
  local system=$1 workload=$2 read_percent=$3 level=$4 label=$5 eps file pids t0 c0 c1 t1 ok
  SEQ=$((SEQ + 1))
  file=$(printf '%s/%02d-%s-%s.json' "$RUN" "$SEQ" "$workload" "$system")
  if [ "$system" = kvnode ]; then eps=$KV_EPS; pids=("${KV_PIDS[@]}"); else eps=$ETCD_EPS; pids=("${ETCD_PIDS[@]}"); fi
  echo "== $system $workload: $label" >&2
  t0=$(date +%s%N); c0=$(cpu_ticks "${pids[@]}")
  ok=1
  "$KVCTL" -e "$eps" bench --system "$system" --workload "$workload" --label "$label" \
    --read-percent "$read_percent" --level "$level" --concurrency "$CONCURRENCY" \
    --keys "$KEYS" --value-bytes "$VALUE_BYTES" --duration "$DURATION" --warmup "$WARMUP" \
    --json "$file" || ok=0
  c1=$(cpu_ticks "${pids[@]}"); t1=$(date +%s%N)
  # The servers' CPU use over the whole invocation (load phase and warmup included), as a
  # share of all CPUs: near 100% means the machine, not the protocol, was the limit.
  awk -v c=$((c1 - c0)) -v hz="$TICKS" -v ns=$((t1 - t0)) -v n="$CPUS" -v s="$system" -v w="$workload" \
    'BEGIN { printf "%-6s %-10s servers used %.1f CPU-s in %.1f s = %.0f%% of %d CPUs\n", s, w, c / hz, ns / 1e9, 100 * c / hz / (ns / 1e9) / n, n }' \
    | tee -a "$RUN/cpu.txt" >&2
  if [ "$ok" = 0 ]; then
    echo "bench.sh: $system $workload failed" >&2
    FAILED=1
  fi
}

IFS=',' read -r -a LIST <<<"$WORKLOADS"
for workload in "${LIST[@]}"; do
  case "$workload" in
    put)
      run kvnode put 0 linearizable "100% writes"
      run etcd put 0 linearizable "100% writes" ;;
    get)
      run kvnode get 100 linearizable "100% reads, linearizable"
      run etcd get 100 linearizable "100% reads, linearizable" ;;
    get-local)
      run kvnode get-local 100 eventual "100% local reads: kvnode eventual / etcd serializable"
      run etcd get-local 100 serializable "100% local reads: kvnode eventual / etcd serializable" ;;
    mix)
      run kvnode mix 90 linearizable "90% linearizable reads, 10% writes"
      run etcd mix 90 linearizable "90% linearizable reads, 10% writes" ;;
    *) echo "bench.sh: unknown workload $workload (put, get, get-local, mix)" >&2; FAILED=1 ;;
  esac
done

# --- report -------------------------------------------------------------------------------
echo
"$KVCTL" bench report "$RUN" || FAILED=1
echo "server CPU per run (load generator excluded; $RUN/cpu.txt):"
cat "$RUN/cpu.txt"
echo "run folder: $RUN"
exit "$FAILED"
