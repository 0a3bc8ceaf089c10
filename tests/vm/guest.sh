#!/bin/bash
# Runs INSIDE a stock-kernel guest booted by tests/vm/kernel_tier.py (virtme-ng, TCG):
#   guest.sh RUNDIR REPO SEEDSIM_KO PYTEST_TIMEOUT MARKERS PATH...
# MARKERS and PATHs: the pytest -m expression and the test paths for this guest
# (tests/vm/kernels.py GUEST_TESTS, by the kernels.txt line's tests=).
# RUNDIR is the guest-writable results directory (vng --rwdir); everything this script
# learns goes there, because the exit code of a vng --exec script does not reach the host
# on a machine without udev. The host driver reads:
#   booted       written first: the kernel booted and ran this script
#   userland.txt the guest root's Debian release, Python and bcc versions
#   failure      one line: why the guest could not run the tests (then no pytest.rc)
#   pytest.rc    pytest's exit code; junit.xml its per-test results
#   facts.json   `kvmtrace doctor --dump-facts` of this stock kernel (seedsim unloaded)
#   done         the script reached its end
set -u
RUN=$1 REPO=$2 SEEDSIM_KO=$3 PYTEST_TIMEOUT=$4 MARKERS=${5:-}
shift 5 || true
TESTS=("$@")
# The console goes to the host's log too (vng -v), so echo there as well.
exec > >(tee -a "$RUN/guest.log") 2>&1

uname -r > "$RUN/booted"
. /etc/os-release
{ echo "os=$PRETTY_NAME"; echo "python=$(python3 -V 2>&1)"
  echo "bcc=$(dpkg-query -W -f='${Version}' python3-bpfcc 2>/dev/null)"; } > "$RUN/userland.txt"
echo "guest: $(uname -r) booted on a $PRETTY_NAME userland; python $(python3 -V 2>&1); cpu flags: $(grep -o -w -E 'svm|vmx|npt' /proc/cpuinfo | sort -u | tr '\n' ' ')"

fail() {
    echo "guest: FAILURE: $*"
    echo "$*" > "$RUN/failure"
    echo done > "$RUN/done"
    exit 1
}

# The privileged tests scrape kvmtrace over 127.0.0.1 (virtme-ng's init brings lo up with
# the root's `ip`; flags bit 0 is IFF_UP).
(( $(cat /sys/class/net/lo/flags) & 1 )) \
    || fail "the guest's loopback is down (no iproute2 in the guest root?)"
modprobe kvm_amd || fail "modprobe kvm_amd failed on $(uname -r) (is svm in the guest's cpu flags?)"
[ -c /dev/kvm ] || fail "/dev/kvm missing after modprobe kvm_amd"
# What udev does on a Debian host (50-udev-default.rules: KERNEL=="kvm", GROUP="kvm",
# MODE="0660"); the guest runs no udev, so /dev/kvm is devtmpfs's 0600 root:root and the
# service tier's unprivileged exporter (the kvm group, no CAP_DAC_OVERRIDE) could not
# open it. The root's kvm group was made by scripts/setup-host.sh --test (this root is
# read-only here: the same script can only chgrp/chmod, and fails if it must groupadd).
/usr/bin/python3 "$REPO/scripts/kvm_device.py" 2>&1 || fail "cannot give /dev/kvm Debian's 0660 root:kvm"
# CPUID through /dev/cpu/N/cpuid, as an operator would load it for doctor (its SEV
# checks read leaf 0x8000001F there; without it they are SKIP with the reason).
modprobe cpuid || echo "guest: modprobe cpuid failed (doctor's CPUID checks will SKIP)"
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing \
    || fail "cannot mount tracefs"
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug \
    || fail "cannot mount debugfs"
# A cgroup v2 hierarchy, as on a Debian host (systemd mounts it): the attribution tests
# make libvirt-, service- and pod-shaped cgroups in it (virtme-ng's init mounts it at
# /sys/fs/cgroup unless told to mimic v1; then a hierarchy of our own).
if ! awk '$3 == "cgroup2" { found = 1 } END { exit !found }' /proc/mounts; then
    mkdir -p /run/kvmtrace-cgroup2 && mount -t cgroup2 none /run/kvmtrace-cgroup2 \
        || fail "cannot mount a cgroup v2 hierarchy"
fi
[ -e /sys/bus/event_source/devices/kprobe ] || fail "no kprobe PMU on $(uname -r)"
[ -e "/lib/modules/$(uname -r)/build/include/config/kernel.release" ] \
    || fail "no kernel headers at /lib/modules/$(uname -r)/build (unpacked tree not linked?)"
[ -n "$MARKERS" ] || fail "no pytest -m expression given (guest.sh's fifth argument)"
[ -f "$SEEDSIM_KO" ] || fail "seedsim module $SEEDSIM_KO missing"
[ -x "$REPO/.venv/bin/python" ] || fail "$REPO/.venv missing (make setup-test)"

cd "$REPO" || fail "cannot cd $REPO"
# The host root is read-only here: no bytecode, no pytest cache.
export PYTHONDONTWRITEBYTECODE=1
# Test this checkout's kvmtrace, whatever the venv's editable install points at.
export PYTHONPATH="$REPO"
export KVMTRACE_SEEDSIM_KO="$SEEDSIM_KO"
# Under emulation a bcc compile takes a minute (the first also pages clang/LLVM in over
# 9p); tests/privileged/ gives kvmtrace 60 s to attach unless told otherwise:
export KVMTRACE_TEST_START_TIMEOUT=420
# (No warm-up read of libbcc/libclang/libLLVM: over 9p, with the other guest's TCG thread
# on the other CPU, reading them whole took 265 s in a dry run; the first compile pages in
# only what it uses.)
# kvmtrace's privileged tier (tests/privileged/) and the guest-only tests, as the host
# chose them. Named explicitly: other privileged tests (benchmarks) do not belong under
# emulation.
(( ${#TESTS[@]} )) || fail "no test paths given (guest.sh's sixth argument on)"
# The simulation of the 2023 patch's call chain (tests/vm/guest_kprobes.py), loaded before
# pytest: the session's shared kvmtrace processes plan their points once, at their start,
# and the guest-only tests read the same ones as the privileged tier.
lsmod | grep -q '^seedsim ' && rmmod seedsim
insmod "$SEEDSIM_KO" || fail "insmod $SEEDSIM_KO failed on $(uname -r)"
tests=("${TESTS[@]}")
echo "guest: running ${tests[*]} -m '$MARKERS'"
timeout -k 10 "$PYTEST_TIMEOUT" "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider -v \
    -o console_output_style=times --durations=10 -m "$MARKERS" --junitxml="$RUN/junit.xml" \
    "${tests[@]}"
echo $? > "$RUN/pytest.rc"

lsmod | grep -q '^seedsim ' && rmmod seedsim
timeout 120 "$REPO/.venv/bin/python" -m kvmtrace doctor --dump-facts > "$RUN/facts.json" \
    || echo "guest: doctor --dump-facts failed"
echo "guest: done (pytest rc $(cat "$RUN/pytest.rc"))"
echo done > "$RUN/done"
