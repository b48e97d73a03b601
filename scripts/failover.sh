#!/usr/bin/env bash
# Measures failover: a 3-process cluster on loopback, kill -9 the leader of a shard, time until
# the next write to that shard succeeds through another node; repeated (default 10 trials).
#   scripts/failover.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
KVNODE_FAILOVER_TRIALS=${1:-10} cargo test --release --test cluster -- \
  --ignored --nocapture --exact failover_time_over_ten_trials 2>&1 | grep -E "^(trial|failover)"
