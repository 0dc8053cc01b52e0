#!/usr/bin/env bash
# Benchmark ISS in its documented configurations, each against nginx and the hash+disk
# limit in the same run. Needs wrk, curl and nginx (apt-get install -y wrk curl nginx) and
# the project's venv (the README's first command). Results: bench/results/<date>/.
#
#   bash bench/run.sh [--skip-large]
set -euo pipefail
cd "$(dirname "$0")/.."
out="bench/results/$(date +%F)"
mkdir -p "$out"
extra=("$@")
# A --skip-large run keeps its own files beside the full run's.
suffix=""
[[ " $* " == *" --skip-large "* ]] && suffix="-small"
port=8800
nginx_port=8801
# NOTE: data directories are removed at the end, not between configurations: on ext4 without a
# journal, inodes freed in the last half minute slow every new file, which would burden the
# configuration measured next.
scratch=()
trap 'rm -rf "${scratch[@]}"' EXIT

start_iss() {  # $1: label, then env assignments
    local label=$1; shift
    data=$(mktemp -d /tmp/iss-bench-XXXX)
    scratch+=("$data")
    chmod 755 "$data"
    env ISS_DATA="$data/data" ISS_PORT=$port ISS_LOG_LEVEL=warning "$@" \
        .venv/bin/gunicorn iss:app --access-logfile /dev/null > "$out/$label.gunicorn.log" 2>&1 &
    iss_pid=$!
    for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && return; sleep 0.2; done
    echo "ISS did not start: see $out/$label.gunicorn.log" >&2; exit 1
}

stop_iss() { kill "$iss_pid"; wait "$iss_pid" 2>/dev/null || true; }

bench() {  # $1: label, $2: url
    # NOTE: each configuration starts with nothing left to write back from the one before.
    sync
    python3 bench/iss_bench.py --url "$2" --server-pid "$iss_pid" --label "$1" \
        --json "$out/$1$suffix.json" "${extra[@]}" | tee "$out/$1$suffix.txt"
    # A rate of error answers is no result: every answer must have been a success.
    python3 - "$out/$1$suffix.json" <<'CHECK'
import json, sys
phases = json.load(open(sys.argv[1]))['server']
failed = {name: phase for name, phase in phases.items() if isinstance(phase, dict) and (
    phase.get('non_2xx_3xx') or phase.get('socket_errors') or phase.get('status', 200) != 200
    or phase.get('complete') is False or phase.get('http_code', 201) not in (200, 201))}
if failed:
    sys.exit(f'INVALID RUN, phases with failed requests: {sorted(failed)}')
CHECK
    # The limit of "small POST distinct": the same durable file operations without HTTP.
    python3 -m bench.durable_limit --dir "$data" | head -1 | tee -a "$out/$1$suffix.txt"
    # Small GETs against nginx sending the same blob file, taking turns.
    python3 -m bench.small_get --url "$2" --data-dir "$data/data" | tee -a "$out/$1$suffix.txt"
    if [[ " ${extra[*]} " != *" --skip-large "* ]]; then
        python3 -m bench.upload --url "$2" --server-pid "$iss_pid" | tee -a "$out/$1$suffix.txt"
        python3 -m bench.download --url "$2" --data-dir "$data/data" | tee -a "$out/$1$suffix.txt"
    fi
}

# 1. gunicorn alone, the default worker model (gthread, 2 x 16).
start_iss gthread
bench gthread "http://127.0.0.1:$port"
stop_iss

# 2. gunicorn alone, sync workers (one request per process at a time), for comparison.
start_iss sync GUNICORN_CMD_ARGS="--worker-class sync --workers 4"
bench sync "http://127.0.0.1:$port"
stop_iss

# 3. Behind nginx, the production setup: deploy/nginx/iss.conf.template with X-Accel-Redirect.
start_iss nginx ISS_ACCEL_REDIRECT=/_internal/blobs/
conf=$(mktemp -d /tmp/iss-nginx-XXXX)
# NOTE: nginx's workers run as nobody and keep their cache under here (mktemp makes it 0700:
# every cached GET was then a 500).
chmod 755 "$conf"
sed -e "s|\${ISS_UPSTREAM}|127.0.0.1:$port|; s|\${ISS_DATA}|$data/data|; s|\${NGINX_PORT}|127.0.0.1:$nginx_port|" \
    -e "s|\${NGINX_CACHE_DIR}|$conf/cache|; s|\${NGINX_CACHE_VALID}|1m|" \
    -e "s|\${ISS_MAX_UPLOAD_BYTES}|2147483648|g" deploy/nginx/iss.conf.template > "$conf/site.conf"
cat > "$conf/nginx.conf" <<NGINX
$( [ "$(id -u)" = 0 ] && echo 'user nobody nogroup;' )
worker_processes 1;
pid $conf/nginx.pid;
error_log $conf/error.log warn;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    access_log off;
    client_body_temp_path $conf/body;
    proxy_temp_path $conf/proxy;
    include $conf/site.conf;
}
NGINX
nginx -p "$conf" -c "$conf/nginx.conf"
bench nginx "http://127.0.0.1:$nginx_port"
kill "$(cat "$conf/nginx.pid")"
stop_iss
scratch+=("$conf")
echo "results in $out"
