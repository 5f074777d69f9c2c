#!/usr/bin/env bash
# Run the MLflow tracking server that training jobs log to (MLFLOW_TRACKING_URI=http://<host>:<port>).
#
#   cluster/mlflow_server.sh [start]   start in the background; does nothing if it is already running
#   cluster/mlflow_server.sh stop      stop the server this script started (by its pid / process group)
#   cluster/mlflow_server.sh status    exit 0 if the server answers /health
#   cluster/mlflow_server.sh run       run in the foreground (containers, systemd)
#
# Artifacts are proxied by the server (--serve-artifacts): clients upload through HTTP to
# MLFLOW_ARTIFACTS_DESTINATION, so only this host needs credentials for the artifact store.
#
# Settings (environment; MLFLOW_* are also the variables `mlflow server` itself reads):
#   MLFLOW_SERVER_DIR              [~/.adastream/mlflow]  pid file, log, and the default stores below
#   MLFLOW_HOST                    [0.0.0.0]    interface to bind; 127.0.0.1 for this machine only
#   MLFLOW_PORT                    [5000]
#   MLFLOW_WORKERS                 [2]          server worker processes
#   MLFLOW_BACKEND_STORE_URI       [sqlite:///$MLFLOW_SERVER_DIR/mlflow.db]  runs, params, metrics,
#                                  model registry; e.g. postgresql://user:pw@host:5432/mlflow (needs
#                                  psycopg2-binary installed)
#   MLFLOW_ARTIFACTS_DESTINATION   [$MLFLOW_SERVER_DIR/artifacts]  e.g. s3://bucket/mlflow (needs boto3
#                                  and AWS credentials on this host), gs://..., or a shared filesystem
#   MLFLOW_SERVER_ALLOWED_HOSTS    [unset: mlflow's default, localhost + private IPs]  Host headers the
#                                  server accepts; set it when clients use a DNS name (Kubernetes service)
#   MLFLOW_START_TIMEOUT           [90]         seconds to wait for /health on start
#   PYTHON                         python with mlflow installed [$VIRTUAL_ENV/bin/python, <repo>/.venv,
#                                  else python3 from PATH]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
action="${1:-start}"

export MLFLOW_SERVER_DIR="${MLFLOW_SERVER_DIR:-$HOME/.adastream/mlflow}"
export MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export MLFLOW_WORKERS="${MLFLOW_WORKERS:-2}"
# sqlite:/// + an absolute path = sqlite:////abs/path (four slashes).
export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_SERVER_DIR/mlflow.db}"
export MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_SERVER_DIR/artifacts}"
timeout_s="${MLFLOW_START_TIMEOUT:-90}"
pid_file="$MLFLOW_SERVER_DIR/mlflow.pid"
log_file="$MLFLOW_SERVER_DIR/mlflow.log"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
    elif [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"
    else PYTHON="$(command -v python3 || command -v python)"; fi
fi

say() { echo "mlflow_server: $*"; }

# The address to probe: the bound interface, or loopback when bound to all interfaces.
probe_host="$MLFLOW_HOST"
[[ "$probe_host" == 0.0.0.0 || "$probe_host" == "::" ]] && probe_host=127.0.0.1
healthy() {
    "$PYTHON" - "http://$probe_host:$MLFLOW_PORT/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}
our_pid() {  # prints the pid from the pid file if that process is alive
    [[ -f "$pid_file" ]] || return 1
    local pid; pid="$(cat "$pid_file")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && grep -qa mlflow "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

group_alive() {  # any non-zombie process left in process group $1?
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

server_args=(-m mlflow server
    --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS"
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION")

prepare() {
    "$PYTHON" -c 'import mlflow' 2>/dev/null || { echo "mlflow_server: $PYTHON cannot import mlflow" >&2; exit 1; }
    mkdir -p "$MLFLOW_SERVER_DIR"
    case "$MLFLOW_ARTIFACTS_DESTINATION" in
        *://*) ;;                                     # s3://, gs://, file://, ...
        *) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;; # a local or shared-filesystem path
    esac
}

case "$action" in
    start)
        if pid="$(our_pid)"; then
            say "already running (pid $pid) on $MLFLOW_HOST:$MLFLOW_PORT"; exit 0
        fi
        if healthy; then
            say "a server already answers on $probe_host:$MLFLOW_PORT (not started by this script); leaving it"
            exit 0
        fi
        prepare
        # Own session: `stop` can end the server and its worker processes as one process group.
        setsid "$PYTHON" "${server_args[@]}" >>"$log_file" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$pid_file"
        deadline=$((SECONDS + timeout_s))
        until healthy; do
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "mlflow_server: server exited during start-up; last lines of $log_file:" >&2
                tail -n 30 "$log_file" >&2
                rm -f "$pid_file"; exit 1
            fi
            if (( SECONDS >= deadline )); then
                echo "mlflow_server: no /health answer after ${timeout_s}s; see $log_file" >&2
                kill -TERM -- "-$pid" 2>/dev/null || true
                rm -f "$pid_file"; exit 1
            fi
            sleep 1
        done
        say "running (pid $pid) at http://$probe_host:$MLFLOW_PORT"
        say "  backend store:  $MLFLOW_BACKEND_STORE_URI"
        say "  artifacts:      $MLFLOW_ARTIFACTS_DESTINATION (proxied, --serve-artifacts)"
        say "  log:            $log_file"
        ;;
    stop)
        if ! pid="$(our_pid)"; then
            say "not running (no live pid in $pid_file)"; rm -f "$pid_file"; exit 0
        fi
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do
            group_alive "$pid" || break
            sleep 0.5
        done
        if group_alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        rm -f "$pid_file"
        say "stopped (pid $pid)"
        ;;
    status)
        if healthy; then say "healthy at http://$probe_host:$MLFLOW_PORT"; exit 0; fi
        say "not answering at http://$probe_host:$MLFLOW_PORT"; exit 1
        ;;
    run)
        prepare
        exec "$PYTHON" "${server_args[@]}"
        ;;
    *)
        echo "usage: $0 [start|stop|status|run]" >&2; exit 2
        ;;
esac
