#!/usr/bin/env bash
# Jepsen-style fault campaigns against a release build of kvnode (see README, "Fault testing").
#
#   scripts/jepsen.sh smoke              3 nodes, 90 s, partition+kill+pause, every read level
#                                        (what CI runs; fixed seed unless SEED is set)
#   scripts/jepsen.sh partition|kill|pause
#                                        5 nodes, 300 s, one fault family, random seed
#   scripts/jepsen.sh combined           5 nodes, 300 s, all families overlapping, random seed
#   scripts/jepsen.sh all                partition, kill, pause and combined in turn
#   scripts/jepsen.sh check RUN_DIR      re-check a saved run offline
#
# Extra arguments go to `kvctl jepsen run` (e.g. --time 600s --seed 42 --nodes 3). Runs land in
# target/jepsen/run-<time>-seed-<seed>/ with report.txt and timeline.html. Exit status: 0 no
# violation, 1 violations, 2 the run could not be carried out.
#
# Partitions use iptables in a private network namespace when run as root; the script installs
# iptables with apt-get if it is missing. Without root, nodes talk through a fault-injecting
# TCP proxy instead (the report says which was used).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-smoke}
shift || true

if [ "$(id -u)" = 0 ] && ! command -v iptables >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  echo "jepsen.sh: installing iptables (for partitions in a private network namespace)" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null
fi

cargo build --release --locked --bins --quiet
kvctl="${CARGO_TARGET_DIR:-target}/release/kvctl"

campaign() {
  echo "== jepsen: $*" >&2
  "$kvctl" jepsen run "$@"
}

case "$mode" in
  smoke)
    campaign --nodes 3 --time 90s --interval 8s --nemesis partition,kill,pause \
      --levels lin,lease,session,bst:500,ev --seed "${SEED:-20261123}" "$@"
    ;;
  partition|kill|pause)
    campaign --nodes 5 --time 300s --nemesis "$mode" "$@"
    ;;
  combined)
    campaign --nodes 5 --time 300s --nemesis partition,kill,pause "$@"
    ;;
  all)
    status=0
    for m in partition kill pause combined; do
      "$0" "$m" "$@" || status=$?
    done
    exit "$status"
    ;;
  check)
    exec "$kvctl" jepsen check "$@"
    ;;
  *)
    sed -n '2,18p' "$0" >&2
    exit 2
    ;;
esac
