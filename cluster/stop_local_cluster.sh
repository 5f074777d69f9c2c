#!/usr/bin/env bash
# Stop a cluster started by cluster/start_local_cluster.sh, and only that cluster: never `ray stop`,
# which would kill every Ray process of this user on the machine.
#
#   cluster/stop_local_cluster.sh                    # the cluster on the default port 6379
#   cluster/stop_local_cluster.sh --port 6390        # the one started with --port 6390
#   cluster/stop_local_cluster.sh --state-dir DIR    # the one started with --state-dir DIR (or --port auto)
#   cluster/stop_local_cluster.sh --clean            # ... and delete its state dir (logs, Ray session)
#
# Each node was started as `ray start --block` in its own session. SIGTERM to that process makes Ray
# shut the node's processes down; whatever of its process tree is left after a grace period gets
# SIGKILL, by pid. The MLflow server started by --with-mlflow is stopped by cluster/mlflow_server.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${ADASTREAM_RAY_PORT:-6379}"
state_dir="${ADASTREAM_RAY_STATE_DIR:-}"
grace_s="${ADASTREAM_RAY_STOP_GRACE:-45}"
clean=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --state-dir) state_dir="$2"; shift 2 ;;
        --grace) grace_s="$2"; shift 2 ;;
        --clean) clean=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop_local_cluster: unknown argument: $1" >&2; exit 2 ;;
    esac
done
state_dir="${state_dir:-/tmp/adastream-ray-$port}"
ctl="$state_dir/local_cluster"

if [[ ! -d "$ctl" ]]; then
    echo "stop_local_cluster: nothing to stop ($ctl does not exist)"
    exit 0
fi

# MLflow first (it may still be receiving writes from the job).
if [[ -f "$state_dir/mlflow/mlflow.pid" ]]; then
    MLFLOW_SERVER_DIR="$state_dir/mlflow" "$here/mlflow_server.sh" stop || true
fi

# The processes to end: each node's `ray start --block` process and everything descended from it.
# Ray's worker processes (tasks, actors) sit in process groups of their own, so the process group
# alone would miss them; the descendant list is taken before anything is signalled.
indices=()
for f in "$ctl"/node_*.pid; do
    [[ -f "$f" ]] || continue
    k="${f##*/node_}"; indices+=("${k%.pid}")
done
mapfile -t indices < <(printf '%s\n' "${indices[@]}" | sort -n -r)  # workers first, head (0) last
roots=()
for k in "${indices[@]}"; do
    [[ -n "$k" ]] || continue
    pid="$(cat "$ctl/node_$k.pid")"
    # Only a live `ray start` process (a stale pid file may name a recycled pid).
    [[ "$pid" =~ ^[0-9]+$ ]] && grep -qa "ray" "/proc/$pid/cmdline" 2>/dev/null && roots+=("$pid")
done
table="$(ps -eo pid=,ppid=,stat=)"
mapfile -t tree < <(awk -v roots="${roots[*]}" '
    { ppid[$1] = $2; stat[$1] = $3; pids[NR] = $1 }
    END {
        n = split(roots, r, " ")
        for (i = 1; i <= n; i++) if (r[i] in ppid) mine[r[i]] = 1
        do {
            added = 0
            for (i = 1; i <= NR; i++) { p = pids[i]; if (!(p in mine) && (ppid[p] in mine)) { mine[p] = 1; added = 1 } }
        } while (added)
        for (p in mine) if (stat[p] !~ /^Z/) print p
    }' <<<"$table")

alive() {  # prints the pids of "$@" that still exist and are not zombies (nothing reaps orphans here)
    local p st
    for p in "$@"; do
        st="$(ps -o stat= -p "$p" 2>/dev/null || true)"
        [[ -n "$st" && "$st" != Z* ]] && echo "$p"
    done
    return 0
}

# Workers before the head, so they do not spend the grace period reconnecting to a dead GCS.
stopped=0
for pid in "${roots[@]}"; do
    if [[ -n "$(alive "$pid")" ]]; then kill -TERM "$pid" 2>/dev/null || true; stopped=$((stopped + 1)); fi
done
deadline=$((SECONDS + grace_s))
while [[ -n "$(alive "${tree[@]}")" ]] && (( SECONDS < deadline )); do sleep 0.5; done
mapfile -t left < <(alive "${tree[@]}")
if (( ${#left[@]} > 0 )); then
    echo "stop_local_cluster: ${#left[@]} process(es) still alive after ${grace_s}s; sending SIGKILL" >&2
    kill -KILL "${left[@]}" 2>/dev/null || true
fi

rm -f "$ctl"/node_*.pid "$ctl/env.sh" "$state_dir/ray_current_cluster"
echo "stop_local_cluster: stopped $stopped node(s) of the cluster in $state_dir"
if [[ "$clean" == 1 ]]; then
    rm -rf "$state_dir"
    echo "stop_local_cluster: removed $state_dir"
fi
