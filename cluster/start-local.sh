#!/usr/bin/env bash
# Start a local multi-process Ray cluster for olrec: one head node and, with
# --workers N, N more nodes on this machine (`ray start --address`). Each node
# runs as `ray start --block` in its own session; their pids go to
# <temp-dir>/olrec-local.pids so cluster/stop-local.sh stops exactly these
# nodes (other Ray clusters on the machine, e.g. a test session's, are left alone).
#
#   cluster/start-local.sh [--workers N] [--num-cpus N] [--worker-cpus N]
#                          [--port P] [--dashboard-port P] [--metrics-port P] [--agent-port P]
#                          [--temp-dir DIR]
#
# Logical CPUs are overcommitted on purpose (default head 8): Ray Train workers
# and Serve replicas each ask for 1 CPU, and a full loop must fit on a 2-core box.
# Token authentication is on (Ray 2.60): a token is generated into
# ~/.ray/auth_token if none exists, and clients need RAY_AUTH_MODE=token.
# Custom metrics (olrec.telemetry) are served at http://127.0.0.1:<metrics-port>/metrics
# (head) and <metrics-port>+i (worker node i); export RAY_metrics_report_interval_ms
# before starting to change how often workers report (Ray's default 10000).
# Nodes on one machine need their own ports: worker node i uses metrics port
# <metrics-port>+i and agent ports <agent-port>+2i, +2i+1; a busy port fails the start.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -n "${RAY:-}" ]]; then ray_bin="$RAY"
elif [[ -x "$repo/.venv/bin/ray" ]]; then ray_bin="$repo/.venv/bin/ray"
else ray_bin="$(command -v ray || true)"; fi
[[ -n "$ray_bin" && -x "$ray_bin" ]] || { echo "start-local.sh: no ray executable (make install, or set RAY=/path/to/ray)" >&2; exit 2; }

workers=0
num_cpus=8
worker_cpus=4
port=6379
dashboard_port=8265
metrics_port=8080
agent_port=52365
temp_dir="${OLREC_RAY_TEMP_DIR:-/tmp/olrec-ray}"
start_timeout=120

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "start-local.sh: $1 needs a value" >&2; exit 2; }; }
int() { [[ "$2" =~ ^[0-9]+$ ]] || { echo "start-local.sh: $1 must be a non-negative integer, got '$2'" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) need "$@"; int "$1" "$2"; workers="$2"; shift 2 ;;
    --num-cpus) need "$@"; int "$1" "$2"; num_cpus="$2"; shift 2 ;;
    --worker-cpus) need "$@"; int "$1" "$2"; worker_cpus="$2"; shift 2 ;;
    --port) need "$@"; int "$1" "$2"; port="$2"; shift 2 ;;
    --dashboard-port) need "$@"; int "$1" "$2"; dashboard_port="$2"; shift 2 ;;
    --metrics-port) need "$@"; int "$1" "$2"; metrics_port="$2"; shift 2 ;;
    --agent-port) need "$@"; int "$1" "$2"; agent_port="$2"; shift 2 ;;
    --temp-dir) need "$@"; temp_dir="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start-local.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# A busy port would make a node's agent give up its HTTP server (then `ray job submit`
# answers "No available agent"), so check them all before starting anything.
py="$(dirname "$ray_bin")/python"; [[ -x "$py" ]] || py=python3
check_port() {
  "$py" - "$1" <<'PY' || { echo "start-local.sh: port $1 ($2) is in use; pick another with $2" >&2; exit 1; }
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}
check_port "$port" --port
check_port "$dashboard_port" --dashboard-port
check_port "$metrics_port" --metrics-port
check_port "$agent_port" --agent-port
for ((i = 1; i <= workers; i++)); do
  check_port $((metrics_port + i)) --metrics-port
  check_port $((agent_port + 2 * i)) --agent-port
  check_port $((agent_port + 2 * i + 1)) --agent-port
done

temp_dir="$(mkdir -p "$temp_dir" && cd "$temp_dir" && pwd)"
pids="$temp_dir/olrec-local.pids"
if [[ -s "$pids" ]]; then
  while read -r _ pid; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "start-local.sh: a cluster started from $temp_dir is running (pid $pid); run cluster/stop-local.sh --temp-dir $temp_dir first" >&2
      exit 1
    fi
  done < "$pids"
fi
: > "$pids"

# `python` in a job's entrypoint is resolved on the nodes' PATH: make it this environment's.
export PATH="$(dirname "$ray_bin"):$PATH"
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
# On SIGTERM (stop-local.sh) a node first drains, waiting for its leases to end: Ray's
# default of up to 30 s per node is long for a laptop cluster; export it to change.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
# Objects up to 4 MiB travel inside Ray's calls, not through the object store: a batch's rows from
# the shards and its gradients back, and the log's chunks (olrec/rayenv.py CORE_ENV; bench/train.py).
export RAY_max_direct_call_object_size="${RAY_max_direct_call_object_size:-4194304}"
# Serve, as olrec sets it for a cluster of its own (olrec/rayenv.py SERVE_ENV): gRPC messages
# up to 4 MiB (larger: RESOURCE_EXHAUSTED), and routers that wait longer for a busy replica's
# queue length than Serve's 0.1 s before backing off (a loaded small machine answers later).
export RAY_SERVE_GRPC_MAX_MESSAGE_SIZE="${RAY_SERVE_GRPC_MAX_MESSAGE_SIZE:-4194304}"
export RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S="${RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S:-0.5}"
export RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S="${RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S:-2.0}"
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
  "$ray_bin" get-auth-token --generate >/dev/null
fi

# start_node NAME LOG ARGS...: `ray start --block` in the background, in its own session.
start_node() {
  local name="$1" log="$2"; shift 2
  setsid "$ray_bin" start --block --temp-dir="$temp_dir" --disable-usage-stats "$@" </dev/null >"$log" 2>&1 &
  local pid=$!
  echo "$name $pid" >> "$pids"
  local deadline=$((SECONDS + start_timeout))
  until grep -q "Ray runtime started" "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "start-local.sh: $name failed to start; its log ($log):" >&2; tail -n 40 "$log" >&2; exit 1
    fi
    if (( SECONDS >= deadline )); then
      echo "start-local.sh: $name not up after ${start_timeout}s; its log: $log" >&2; exit 1
    fi
    sleep 0.5
  done
}

head_log="$temp_dir/olrec-head.log"
start_node head "$head_log" --head --port="$port" --num-cpus="$num_cpus" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --metrics-export-port="$metrics_port" \
  --dashboard-agent-listen-port="$agent_port"
# The address Ray announces (node IP:port), and the dashboard where it really bound.
address="$(grep -o "ray start --address='[^']*'" "$head_log" | head -n1 | sed "s/.*='\(.*\)'/\1/")"
dashboard="$(grep -A1 "view the dashboard at" "$head_log" | grep -o '127\.0\.0\.1:[0-9]*' | head -n1 || true)"
dashboard="http://${dashboard:-127.0.0.1:$dashboard_port}"

for ((i = 1; i <= workers; i++)); do
  # Nodes on one machine need their own agent, metrics and node ports.
  start_node "worker$i" "$temp_dir/olrec-worker$i.log" --address="$address" --num-cpus="$worker_cpus" \
    --metrics-export-port=$((metrics_port + i)) \
    --dashboard-agent-listen-port=$((agent_port + 2 * i)) --dashboard-agent-grpc-port=$((agent_port + 2 * i + 1))
done

cat > "$temp_dir/olrec-local.env" <<EOF
export RAY_AUTH_MODE=token
export RAY_ADDRESS=$address
export RAY_API_SERVER_ADDRESS=$dashboard
EOF

cat <<EOF
Ray cluster up: head + $workers worker node(s), temp dir $temp_dir (logs: $temp_dir/session_latest/logs)
  address:    $address              (ray.init(address="$address"), ray start --address)
  dashboard:  $dashboard
  metrics:    http://127.0.0.1:$metrics_port/metrics$(if ((workers > 0)); then echo " (worker node i: port $metrics_port+i)"; fi)

Submit a training job (token auth needs RAY_AUTH_MODE=token on the client):
  RAY_AUTH_MODE=token ray job submit --address $dashboard --working-dir . -- \\
      python -m olrec train --config cluster/jobs/ml100k.yaml --data /abs/path/to/ml-100k
or load the client settings: source $temp_dir/olrec-local.env
Stop it: cluster/stop-local.sh$(if [[ "$temp_dir" != "/tmp/olrec-ray" ]]; then echo " --temp-dir $temp_dir"; fi)
EOF
