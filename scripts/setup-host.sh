#!/usr/bin/env bash
# Install what kvmtrace needs on a Debian host, idempotently (run as root):
# Debian packages, kernel headers for bcc, tracefs/debugfs mounts, and the
# project venv at .venv (with --system-site-packages: bcc is not on PyPI).
#   scripts/setup-host.sh          runtime only
#   scripts/setup-host.sh --test   plus the test tools (promtool, pytest, ruff), and
#                                  /dev/kvm as Debian's udev rule makes it where no udev
#                                  runs (scripts/kvm_device.py)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

say() { echo "setup: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "ERROR: setup installs Debian packages and mounts tracefs: run as root" >&2
    exit 1
fi

release=$(uname -r)
# libbpf1 (a dependency of bcc anyway): the exporter reads maps through it.
pkgs=(python3-bpfcc libbpf1 python3-venv python3-pip)
# procps: the tests use pgrep (Debian 13 minimal roots lack it).
# openssl, curl: the TLS tests make certificates and use a real HTTPS client.
# systemd: systemd-analyze verifies deploy/systemd (the package only; nothing is started).
# chromium: headless, renders serve's landing page (Debian 12 and 13, without recommends).
[ "$want_test" = 1 ] && pkgs+=(prometheus procps openssl curl systemd chromium dwarves)
# Headers: the running kernel's own if Debian has them, else the default ones.
headers_pkg=linux-headers-amd64
case "$(uname -m)" in aarch64) headers_pkg=linux-headers-arm64 ;; esac

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
own_headers=0
if [ ! -e "/lib/modules/$release/build" ]; then
    if [ -z "${updated:-}" ]; then apt-get update -qq; updated=1; fi
    if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
        missing+=("linux-headers-$release"); own_headers=1
    else
        dpkg-query -W -f='${Status}' "$headers_pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$headers_pkg")
    fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    [ -n "${updated:-}" ] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e "/lib/modules/$release/build" ] && [ "$own_headers" = 0 ]; then
    build=$(ls -d /usr/src/linux-headers-*-"${headers_pkg#linux-headers-}" 2>/dev/null | sort -V | tail -n1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
    if [ -z "$build" ]; then
        echo "ERROR: no kernel headers found under /usr/src after installing $headers_pkg" >&2
        exit 1
    fi
    mkdir -p "/lib/modules/$release"
    ln -sfn "$build" "/lib/modules/$release/build"
    [ -n "$common" ] && ln -sfn "$common" "/lib/modules/$release/source"
    echo "WARNING: Debian has no headers for kernel $release; linked $(basename "$build") instead" \
         "(kvmtrace's BPF uses no kernel struct layouts, so this is safe for it)" >&2
fi

# The VM-start tests run a VMM that reads KVM_CAP_VM_TYPES: QEMU >= 9 (Debian 12: from
# bookworm-backports through a private apt configuration; the system's sources stay).
if [ "$want_test" = 1 ] && [ "$(uname -m)" = x86_64 ]; then
    /usr/bin/python3 tests/qemu.py install
fi

# The privileged tests run the exporter as the unit's user in group kvm: where no udev
# gave /dev/kvm Debian's 0660 root:kvm (containers, microVMs, CI runners: 0600 root:root
# and no kvm group), do what udev's rule would, and say so. Where udev runs: nothing.
if [ "$want_test" = 1 ]; then
    /usr/bin/python3 scripts/kvm_device.py
fi

mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing || say "could not mount tracefs"
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug || say "could not mount debugfs"

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    say "creating .venv (Debian python3 with system site packages, for bcc)"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
extra=""
[ "$want_test" = 1 ] && extra="[test]"
stamp=".venv/.installed$extra"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing kvmtrace$extra into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e ".$extra"
    touch "$stamp"
fi
.venv/bin/python -c 'import bcc, prometheus_client, kvmtrace' || {
    echo "ERROR: .venv cannot import bcc/prometheus_client/kvmtrace" >&2; exit 1; }
