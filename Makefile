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
