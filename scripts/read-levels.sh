#!/usr/bin/env bash
# Read throughput and latency of each read level (linearizable, lease, session, bounded:500ms,
# eventual) on a local 3-node cluster of real kvnode processes, through the Rust client (to the
# leader) and through gRPC to a follower. Builds the release kvnode binary, then runs
# benches/read_levels.rs; extra arguments go to the bench:
#   scripts/read-levels.sh [--seconds 5] [--concurrency 64] [--shards 16] [--keys 1000]
#                          [--value-bytes 256] [--json PATH] [--dir PATH]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin kvnode
exec cargo bench --quiet --bench read_levels -- "$@"
