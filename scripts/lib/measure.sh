# shellcheck shell=bash
# What the measuring scripts (bench.sh, profile.sh) share: which kvnode build they measure, how
# they tell that a 3-node cluster is ready, and how much CPU a set of processes has used.
# Sourced, not run; expects to be in the repository's root.

# Sets KVNODE, KVCTL and BUILD (a description for the report): the binaries in
# $KVNODE_BIN_DIR if set (to compare two builds back to back), else a release build of this
# checkout.
kvnode_binaries() {
  if [ -n "${KVNODE_BIN_DIR:-}" ]; then
    KVCTL="$KVNODE_BIN_DIR/kvctl"
    KVNODE="$KVNODE_BIN_DIR/kvnode"
    BUILD="binaries from $KVNODE_BIN_DIR"
  else
    cargo build --release --locked --quiet --bin kvnode --bin kvctl
    KVCTL="${CARGO_TARGET_DIR:-target}/release/kvctl"
    KVNODE="${CARGO_TARGET_DIR:-target}/release/kvnode"
    BUILD=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
  fi
}

# kvnode_ready EPS: every node of the cluster at EPS is up and every shard has a leader (the
# status table's leader column is nN). Needs KVCTL.
kvnode_ready() {
  local out
  out=$("$KVCTL" -e "$1" --timeout 2s status 2>/dev/null) || return 1
  grep -q '(up 3)' <<<"$out" || return 1
  awk '$1 ~ /^[0-9]+$/ { n++; if ($3 !~ /^n[0-9]+$/) bad = 1 } END { exit !(n > 0 && !bad) }' <<<"$out"
}

# cpu_ticks PID...: CPU time (clock ticks) the processes used so far, utime + stime from /proc.
cpu_ticks() {
  local total=0 pid f
  for pid in "$@"; do
    read -r -a f <"/proc/$pid/stat" || continue
    total=$((total + f[13] + f[14]))
  done
  echo "$total"
}
