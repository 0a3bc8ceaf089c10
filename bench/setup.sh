#!/usr/bin/env bash
# Install what the benchmarks need beyond `make setup`, idempotently (run as root):
# gcc (the C workload drivers), bpftrace and strace (the configurations compared),
# bpftool (to notice foreign tracing programs during a run), curl (200 scrapes at once).
# Debian packages only.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "ERROR: bench/setup.sh installs Debian packages: run as root" >&2
    exit 1
fi
missing=()
for p in gcc libc6-dev linux-libc-dev bpftrace strace bpftool curl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
