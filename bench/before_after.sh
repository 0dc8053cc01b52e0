#!/usr/bin/env bash
# Two checkouts of ISS (say, before and after a refactor) measured in one run, taking turns.
#
#   bash bench/before_after.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]
#
# Each checkout's gunicorn (2 workers, as documented) runs on its own data directory; then
# bench.small_get (ISS against nginx on the same blob file) and bench.upload (512 MiB PUT
# and multipart against hashlib + cp&&sync) run against old, new, old, new... ROUNDS times
# (default 2). Each line is a ratio to a limit measured in the same minute, so lines of old and
# new compare even when the machine's speed drifts. Both checkouts use this checkout's .venv.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
old="$(cd "$1" && pwd)"
new="$(cd "$2" && pwd)"
rounds="${3:-2}"
cd "$here"  # NOTE: the bench scripts run as modules of this checkout: python -m bench.NAME
python="$here/.venv/bin/python"
work="$(mktemp -d)"
chmod 755 "$work"  # NOTE: nginx's workers (another user) read the blob files below it
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "-$pid" 2>/dev/null || true; done
    sleep 1
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {  # start NAME CHECKOUT: sets ports[NAME]
    local name=$1 checkout=$2 port
    port="$(free_port)"
    mkdir -p "$work/$name"
    (cd "$checkout" && ISS_DATA="$work/$name" ISS_PORT="$port" ISS_LOG_LEVEL=warning \
        exec setsid "$python" -m gunicorn iss:app) </dev/null >"$work/$name.log" 2>&1 &
    echo $! >"$work/$name.pid"
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:$port/health" >/dev/null && break
        sleep 0.1
    done
    ports[$name]=$port
}

declare -A ports
start old "$old"; pids+=("$(cat "$work/old.pid")")
start new "$new"; pids+=("$(cat "$work/new.pid")")

for round in $(seq "$rounds"); do
    for side in old new; do
        port="${ports[$side]}"
        echo "== round $round: $side ($([ "$side" = old ] && echo "$old" || echo "$new"))"
        "$python" -m bench.small_get --url "http://127.0.0.1:$port" --data-dir "$work/$side" --rounds 3
        "$python" -m bench.upload --url "http://127.0.0.1:$port" --mib 256 --rounds 2 \
            --server-pid "$(cat "$work/$side.pid")"
    done
done
