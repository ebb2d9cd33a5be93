#!/usr/bin/env bash
# Stop the cluster cluster/start-local.sh started: SIGTERM to each node's
# `ray start --block` (worker nodes first, then the head), which stops that
# node's processes; SIGKILL to the node's process group after --timeout seconds.
# Other Ray clusters on this machine are left alone.
#
#   cluster/stop-local.sh [--temp-dir DIR] [--timeout S] [--all]
#
# --all runs `ray stop --force` afterwards instead: it kills EVERY Ray process on
# this machine (any cluster, any user session, a test run's), so use it only to
# clean up after a crash.
# Note: on SIGTERM a node drains first, waiting for running work up to
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S seconds (read when the node started;
# start-local.sh sets 5 unless exported, Ray's own default is 30).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
temp_dir="${OLREC_RAY_TEMP_DIR:-/tmp/olrec-ray}"
timeout=60
all=0
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --temp-dir) [[ $# -ge 2 ]] || { echo "stop-local.sh: --temp-dir needs a value" >&2; exit 2; }; temp_dir="$2"; shift 2 ;;
    --timeout) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || { echo "stop-local.sh: --timeout needs whole seconds" >&2; exit 2; }; timeout="$2"; shift 2 ;;
    --all) all=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "stop-local.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

pids="$temp_dir/olrec-local.pids"
stopped=0
if [[ -s "$pids" ]]; then
  # Worker nodes first (reverse start order), the head last.
  mapfile -t nodes < <(tac "$pids")
  for line in "${nodes[@]}"; do
    read -r name pid <<< "$line"
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name (pid $pid): not running"
      continue
    fi
    kill -TERM "$pid"
    deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name (pid $pid): still running after ${timeout}s; killing its process group" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
    else
      echo "$name (pid $pid): stopped"
    fi
    stopped=$((stopped + 1))
  done
  rm -f "$pids" "$temp_dir/olrec-local.env"
else
  echo "stop-local.sh: no cluster recorded in $pids"
fi

if (( all )); then
  if [[ -x "$repo/.venv/bin/ray" ]]; then ray_bin="$repo/.venv/bin/ray"; else ray_bin="ray"; fi
  echo "ray stop --force: stopping every Ray process on this machine"
  "$ray_bin" stop --force
fi
