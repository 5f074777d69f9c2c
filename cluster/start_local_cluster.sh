#!/usr/bin/env bash
# Start a multi-node Ray cluster on ONE machine: a head node plus N worker nodes, each its own raylet
# with its own CPU count and a custom resource naming it, so tests can check where work was placed.
#
#   cluster/start_local_cluster.sh                      # head + 1 worker, 2 logical CPUs each
#   cluster/start_local_cluster.sh --workers 2 --port auto --dashboard-port auto --with-mlflow
#   source "$(cluster/start_local_cluster.sh --print-env-file)"   # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, ...
#   ray job submit --working-dir . -- python pipelines/train.py ...
#   cluster/stop_local_cluster.sh                       # same --port / --state-dir as here
#
# Custom resources (for placement checks):
#   node_0 (head), node_1 .. node_N (workers): 1 each   -> resources={"node_1": 0.01} pins a task there
#   node_slot: 1 on every node                          -> Train workers asking for {"node_slot": 1}
#                                                          land on distinct nodes
#
# How several raylets share one host (Ray 2.60):
#   * every node: --min-worker-port=0 --max-worker-port=0 (OS-assigned worker ports instead of the shared
#     10002-19999 range) and --dashboard-agent-listen-port=0 (the default 52365 is fixed and would collide);
#     node-manager, object-manager, metrics-export, dashboard-agent gRPC and runtime-env-agent ports are
#     OS-assigned by default already;
#   * a --temp-dir per node (the head's state dir, and w<k>/ inside it for worker k), as separate machines
#     would have: with one shared session directory, a worker node's runtime-env agent garbage-collects the
#     job's unpacked --working-dir (same path) while the driver on the head still runs in it;
#   * all nodes register with the host's IP (`ray start` turns 127.0.0.1 into it) and the GCS listens on
#     all interfaces: on a machine others can reach, use token auth (below) or a firewall;
#   * a private --temp-dir also keeps this cluster out of /tmp/ray, so another user's plain ray.init()
#     does not attach to it and `ray stop` is never needed (it would kill every Ray on the machine);
#   * --num-gpus is explicit (default 0): each raylet would otherwise claim every GPU of the host;
#   * RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 (ADASTREAM_RAY_DRAIN_TIMEOUT_S): on SIGTERM a node would
#     otherwise wait up to 30 s for its actors to drain before stopping.
# Each node is `ray start --block` under setsid, so stop_local_cluster.sh ends exactly these processes
# (by pid / process group) and nothing else on a shared machine.
#
# Token auth: RAY_AUTH_MODE is passed through from the environment to every node and written into the
# env file. Unset, it follows `ray start --head` in Ray 2.60: `token` if a token is available
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), else `disabled`. Local tests and
# `make` use RAY_AUTH_MODE=disabled.
#
# Settings (flag, or environment variable; defaults in brackets):
#   --workers N            ADASTREAM_RAY_WORKERS          [1]
#   --head-cpus N          ADASTREAM_RAY_HEAD_CPUS        [2]   logical CPUs (may exceed physical cores)
#   --worker-cpus N        ADASTREAM_RAY_WORKER_CPUS      [2]
#   --head-gpus N          ADASTREAM_RAY_HEAD_GPUS        [0]
#   --worker-gpus N        ADASTREAM_RAY_WORKER_GPUS      [0]
#   --object-store-mb N    ADASTREAM_RAY_OBJECT_STORE_MB  [512] per node
#   --port P|auto          ADASTREAM_RAY_PORT             [6379] GCS port (auto: a free port)
#   --dashboard-port P|auto ADASTREAM_RAY_DASHBOARD_PORT  [8265] job submission API + dashboard
#   --client-port P|auto   ADASTREAM_RAY_CLIENT_PORT      [auto] Ray Client server (ray://)
#   --state-dir DIR        ADASTREAM_RAY_STATE_DIR        [/tmp/adastream-ray-<port>]  pids, logs, env
#                                                          file; also Ray's --temp-dir (keep it short:
#                                                          Unix socket paths are limited to 107 bytes)
#   --with-mlflow          ADASTREAM_RAY_WITH_MLFLOW=1    also start cluster/mlflow_server.sh (state in
#   --mlflow-port P|auto   ADASTREAM_MLFLOW_PORT [auto]    <state-dir>/mlflow) and export its URI
#   --timeout S            ADASTREAM_RAY_START_TIMEOUT    [120] seconds to wait for all nodes
#   --print-env-file       print the env file path for these settings and exit
#   RAY / PYTHON           the ray CLI and python to use  [<repo>/.venv/bin/..., else from PATH]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

workers="${ADASTREAM_RAY_WORKERS:-1}"
head_cpus="${ADASTREAM_RAY_HEAD_CPUS:-2}"
worker_cpus="${ADASTREAM_RAY_WORKER_CPUS:-2}"
head_gpus="${ADASTREAM_RAY_HEAD_GPUS:-0}"
worker_gpus="${ADASTREAM_RAY_WORKER_GPUS:-0}"
object_store_mb="${ADASTREAM_RAY_OBJECT_STORE_MB:-512}"
port="${ADASTREAM_RAY_PORT:-6379}"
dashboard_port="${ADASTREAM_RAY_DASHBOARD_PORT:-8265}"
client_port="${ADASTREAM_RAY_CLIENT_PORT:-auto}"
state_dir="${ADASTREAM_RAY_STATE_DIR:-}"
with_mlflow="${ADASTREAM_RAY_WITH_MLFLOW:-0}"
mlflow_port="${ADASTREAM_MLFLOW_PORT:-auto}"
timeout_s="${ADASTREAM_RAY_START_TIMEOUT:-120}"
drain_timeout_s="${ADASTREAM_RAY_DRAIN_TIMEOUT_S:-0}"
print_env_file=0

die() { echo "start_local_cluster: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) workers="$2"; shift 2 ;;
        --head-cpus) head_cpus="$2"; shift 2 ;;
        --worker-cpus) worker_cpus="$2"; shift 2 ;;
        --head-gpus) head_gpus="$2"; shift 2 ;;
        --worker-gpus) worker_gpus="$2"; shift 2 ;;
        --object-store-mb) object_store_mb="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --dashboard-port) dashboard_port="$2"; shift 2 ;;
        --client-port) client_port="$2"; shift 2 ;;
        --state-dir) state_dir="$2"; shift 2 ;;
        --with-mlflow) with_mlflow=1; shift ;;
        --mlflow-port) mlflow_port="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --print-env-file) print_env_file=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

for v in workers head_cpus worker_cpus head_gpus worker_gpus object_store_mb timeout_s; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done

# --- tools -----------------------------------------------------------------------------------------
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$repo/.venv/bin/ray" ]]; then RAY="$repo/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
[[ -n "$RAY" && -x "$RAY" ]] || die "no ray CLI found (set RAY=/path/to/ray or run 'make setup')"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$(dirname "$RAY")/python" ]]; then PYTHON="$(dirname "$RAY")/python"; else PYTHON="$(command -v python3)"; fi
fi

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
port_in_use() {  # true if something accepts connections on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The state dir is keyed by the GCS port, so a fixed --port finds its cluster again (stop script too).
# With --port auto the state dir must be given (or printed env file used) to find it later.
if [[ "$port" == auto ]]; then
    [[ "$print_env_file" == 0 ]] || [[ -n "$state_dir" ]] || die "--print-env-file needs --state-dir with --port auto"
    port="$(free_port)"
fi
state_dir="${state_dir:-/tmp/adastream-ray-$port}"
ctl="$state_dir/local_cluster"
env_file="$ctl/env.sh"
if [[ "$print_env_file" == 1 ]]; then echo "$env_file"; exit 0; fi

# --- already running? (idempotent) ------------------------------------------------------------------
if [[ -f "$ctl/node_0.pid" ]] && grep -qa "ray" "/proc/$(cat "$ctl/node_0.pid")/cmdline" 2>/dev/null; then
    echo "start_local_cluster: already running (state dir $state_dir); env file: $env_file"
    cat "$env_file" 2>/dev/null || true
    exit 0
fi

[[ "$dashboard_port" == auto ]] && dashboard_port="$(free_port)"
[[ "$client_port" == auto ]] && client_port="$(free_port)"
for p in "$port" "$dashboard_port" "$client_port"; do
    ! port_in_use "$p" || die "port $p is in use on 127.0.0.1 (another Ray cluster?); pick others or use 'auto'"
done

# --- token auth --------------------------------------------------------------------------------------
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -s "$HOME/.ray/auth_token" ]]; then
        RAY_AUTH_MODE=token
    else
        RAY_AUTH_MODE=disabled
    fi
    echo "start_local_cluster: RAY_AUTH_MODE unset; using '$RAY_AUTH_MODE' (set it to choose)"
fi
export RAY_AUTH_MODE
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    die "RAY_AUTH_MODE=token but no token: run '$RAY get-auth-token --generate' (or set RAY_AUTH_TOKEN)"
fi
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# Job entrypoints (`ray job submit -- python ...`) inherit the nodes' PATH: put this Ray's python first.
ray_bin="$(dirname "$RAY")"
export PATH="$ray_bin:$PATH"

mkdir -p "$ctl"
rm -f "$ctl"/node_*.pid "$env_file"
object_store_bytes=$((object_store_mb * 1024 * 1024))
address="127.0.0.1:$port"

# Common flags of every node (see the header for why).
common=(--block
        --object-store-memory="$object_store_bytes"
        --min-worker-port=0 --max-worker-port=0 --dashboard-agent-listen-port=0
        --disable-usage-stats)

launch() {  # launch NAME ARGS...: `ray start --block ...` in its own session; pid file = process group
    local name="$1"; shift
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="$drain_timeout_s" \
        setsid "$RAY" start "$@" >"$ctl/$name.log" 2>&1 </dev/null &
    echo $! >"$ctl/$name.pid"
}

fail_with_logs() {
    echo "start_local_cluster: $*" >&2
    for f in "$ctl"/node_*.log; do [[ -f "$f" ]] && { echo "--- $f (tail)" >&2; tail -n 25 "$f" >&2; }; done
    "$here/stop_local_cluster.sh" --state-dir "$state_dir" >&2 || true
    exit 1
}

# --- head ----------------------------------------------------------------------------------------------
launch node_0 --head --port="$port" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
    --ray-client-server-port="$client_port" \
    --num-cpus="$head_cpus" --num-gpus="$head_gpus" \
    --resources="{\"node_0\": 1, \"node_slot\": 1}" \
    --temp-dir="$state_dir" \
    "${common[@]}"

deadline=$((SECONDS + timeout_s))
until port_in_use "$port" && [[ -s "$state_dir/ray_current_cluster" ]]; do
    kill -0 "$(cat "$ctl/node_0.pid")" 2>/dev/null || fail_with_logs "head node exited during start-up"
    (( SECONDS < deadline )) || fail_with_logs "head node not up after ${timeout_s}s"
    sleep 0.5
done

# --- workers -------------------------------------------------------------------------------------------
for ((k = 1; k <= workers; k++)); do
    launch "node_$k" --address="$address" \
        --num-cpus="$worker_cpus" --num-gpus="$worker_gpus" \
        --resources="{\"node_$k\": 1, \"node_slot\": 1}" \
        --temp-dir="$state_dir/w$k" \
        "${common[@]}"
done

# --- wait until every node is alive in the GCS -------------------------------------------------------------
expected=$((workers + 1))
while true; do
    for ((k = 0; k <= workers; k++)); do
        kill -0 "$(cat "$ctl/node_$k.pid")" 2>/dev/null || fail_with_logs "node_$k exited during start-up"
    done
    alive="$("$PYTHON" - "$address" <<'EOF' 2>/dev/null || echo 0
import sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)"
    [[ "$alive" == "$expected" ]] && break
    (( SECONDS < deadline )) || fail_with_logs "only ${alive:-0}/$expected nodes alive after ${timeout_s}s"
    sleep 1
done

# --- optional MLflow tracking server -------------------------------------------------------------------------
mlflow_uri=""
if [[ "$with_mlflow" == 1 ]]; then
    [[ "$mlflow_port" == auto ]] && mlflow_port="$(free_port)"
    MLFLOW_SERVER_DIR="$state_dir/mlflow" MLFLOW_HOST=127.0.0.1 MLFLOW_PORT="$mlflow_port" \
        MLFLOW_WORKERS="${MLFLOW_WORKERS:-1}" PYTHON="$PYTHON" \
        "$here/mlflow_server.sh" start || fail_with_logs "MLflow server did not start"
    mlflow_uri="http://127.0.0.1:$mlflow_port"
fi

# --- env file: everything a client (or a test) needs ----------------------------------------------------------
{
    echo "# written by cluster/start_local_cluster.sh; source it to talk to this cluster"
    echo "export RAY_ADDRESS=$address"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    echo "export ADASTREAM_RAY_STATE_DIR=$state_dir"
    echo "export ADASTREAM_RAY_CLIENT_ADDRESS=ray://127.0.0.1:$client_port"
    echo "export ADASTREAM_RAY_NUM_NODES=$expected"
    if [[ -n "$mlflow_uri" ]]; then echo "export MLFLOW_TRACKING_URI=$mlflow_uri"; fi
} >"$env_file"

echo "start_local_cluster: $expected nodes alive (head + $workers workers), state dir $state_dir"
echo "  Ray address (ray.init, ray status):    $address"
echo "  Job submission API (ray job submit):   http://127.0.0.1:$dashboard_port"
[[ -z "$mlflow_uri" ]] || echo "  MLflow tracking URI:                   $mlflow_uri"
echo "  RAY_AUTH_MODE:                         $RAY_AUTH_MODE"
echo "  env file:                              source $env_file"
echo "  stop:                                  $here/stop_local_cluster.sh --state-dir $state_dir"
