#!/bin/bash
# The README's `make run`, checked the way a user would: start it, scrape /metrics once,
# stop it with SIGTERM.   make_run_check.sh PORT [SECONDS]
# Run from tests/vm/kernel_tier.py in a chroot of a userland root (tests/vm/userland.py).
# Prints make run's output, then "### /metrics" and the body; exit 0 when the body has
# kvmtrace's metrics and the exporter stopped on SIGTERM.
set -u
PORT=$1 WAIT=${2:-300}
cd "$(dirname "$0")/../.." || exit 1
log=$(mktemp) body=$(mktemp)
setsid make run PORT="$PORT" > "$log" 2>&1 &
pid=$!
got=1
for _ in $(seq 1 "$WAIT"); do
    if .venv/bin/python - "$PORT" > "$body" 2>/dev/null <<'PY'
import sys
import urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
sys.stdout.write(urllib.request.urlopen(url, timeout=5).read().decode())
PY
    then got=0; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
done
kill -TERM -- "-$pid" 2>/dev/null
stopped=1
for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || { stopped=0; break; }
    sleep 1
done
[ "$stopped" = 0 ] || { echo "make run did not stop on SIGTERM"; kill -KILL -- "-$pid"; }
cat "$log"
echo "### /metrics"
cat "$body"
[ "$got" = 0 ] && [ "$stopped" = 0 ] && grep -q '^kvmtrace_build_info{' "$body"
