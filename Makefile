# kvmtrace: the two commands of the README's Quick start, and helpers.
# Each target installs what it needs first (idempotent; run as root).
PORT ?= 9929
VENV := .venv

.PHONY: run test test-pure lint setup setup-test clean

run: setup
	$(VENV)/bin/kvmtrace serve --web.listen-address :$(PORT)

test: setup-test
	$(VENV)/bin/ruff check kvmtrace tests
	$(VENV)/bin/python -m pytest -v

test-pure: setup-test
	$(VENV)/bin/python -m pytest -v -m "not privileged"

lint: setup-test
	$(VENV)/bin/ruff check kvmtrace tests

setup:
	scripts/setup-host.sh

setup-test:
	scripts/setup-host.sh --test

clean:
	rm -rf $(VENV) build *.egg-info

# Benchmarks (bench/run.py; see bench/README.md): tracing overhead side by side
# (none, empty-program floor, kvmtrace serve, bpftrace, strace), storm exactness,
# cold start, scrape latency and RSS at 10,000 series. Results: bench/results/.
# Not tests: targets are reported met / not met, never asserted.
.PHONY: bench bench-quick
bench: setup
	bench/setup.sh
	$(VENV)/bin/python bench/run.py

bench-quick: setup
	bench/setup.sh
	$(VENV)/bin/python bench/run.py --quick

# Kernel tier (tests/vm/, see tests/vm/README.md): resolves each line of
# tests/vm/kernels.txt (a Debian suite + kernel metapackage) to the build the mirror serves
# now, boots it under QEMU/TCG with virtme-ng (on the host root shared read-only, or on a
# debootstrapped Debian 13 root set up by scripts/setup-host.sh) and runs kvmtrace's
# privileged tests plus tests/vm/guest_kprobes.py inside it: real kprobes
# on kvm_dev_ioctl and kvm_arch_init_vm, and on seedsim, a test-only SIMULATION of the
# 2023 TDX v12 vm_type dispatch. Every guest is bounded (its tests= class's bound, and
# the tier's deadline, KVMTRACE_TIER_DEADLINE); the guests and the Debian 13 root's
# README job run side by side, one per CPU (KVMTRACE_VM_PARALLEL); results in
# build/vm/<kernel>/. On Debian 13's root it also runs `make test` and
# `make run` (chroot, this kernel). Fails, never skips.
.PHONY: test-kernels prepare-kernels
test-kernels: setup-test
	tests/vm/setup.sh
	$(VENV)/bin/python -m pytest -v -s --durations=0 tests/vm/kernel_tier.py

# What the kernel tier fetches and sets up before it boots anything (the kernels, the
# Debian 13 root): downloads and dpkg, minutes. CI runs it beside `make test` (.ci/run),
# so the tier finds them cached and its guests have the CPUs to themselves. Run as root
# after `make setup-test`.
prepare-kernels:
	tests/vm/setup.sh
	/usr/bin/python3 tests/vm/kernels.py fetch
	/usr/bin/python3 -m tests.vm.userland prepare trixie
