"""The benchmark harness (bench/run.py --quick, what `make bench-quick` runs) end to end.

Checks that the harness works and its JSON is complete and well formed, and that
the storm counts are exact. Never asserts a timing: benchmarks are not tests.
Privileged: real bcc, bpftrace, strace, gcc and /dev/kvm. bench/setup.sh
installs the Debian packages the harness needs (idempotent), as `make bench` does.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import HERE

pytestmark = pytest.mark.privileged

BENCH = HERE.parent / "bench"
WORKLOADS = {"fionread", "getppid", "create_rejected", "create_accepted", "check_ext"}
CONFIGS = {"none", "floor", "kvmtrace", "bpftrace", "strace"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the benchmark harness needs root (BPF, /dev/kvm)")
    setup = subprocess.run([str(BENCH / "setup.sh")], capture_output=True, text=True,
                           timeout=900, check=False)
    assert setup.returncode == 0, setup.stderr
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "quick.json").read_text())
    md = (out / "quick.md").read_text()
    return data, md, proc


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_machine_is_described(quick):
    data, md, _ = quick
    m = data["machine"]
    assert m["nproc"] >= 1 and m["kernel"] and m["cpu_model"]
    assert m["kernel"] in md and "nproc" in md


def test_every_workload_under_every_configuration(quick):
    data, _, _ = quick
    runs = data["overhead"]["runs"]
    assert {(r["workload"], r["config"]) for r in runs} == {
        (w, c) for w in WORKLOADS for c in CONFIGS}
    for r in runs:
        assert finite(r["ns_per_op"]) and r["ns_per_op"] > 0 and r["ops"] > 0, r
    summary = data["overhead"]["summary"]
    assert set(summary) == WORKLOADS
    for wl, row in summary.items():
        assert CONFIGS <= set(row), wl
        for c in CONFIGS:
            cell = row[c]
            assert cell["min"] <= cell["median"] <= cell["max"], (wl, c)
            if c != "none":
                assert finite(cell["added_ns"]), (wl, c)
        assert finite(row["ratio_kvmtrace_to_floor"])
        assert finite(row["ratio_kvmtrace_to_bpftrace"])


def test_tracers_were_attached_and_counted_every_call(quick):
    """kvmtrace and bpftrace counted exactly the calls each driver made: they were
    attached for the whole measurement (not merely started)."""
    data, _, _ = quick
    checked = [r for r in data["overhead"]["runs"] if r["verified"] is not None]
    assert {(r["config"], r["workload"]) for r in checked} >= {
        ("kvmtrace", "create_rejected"), ("kvmtrace", "create_accepted"),
        ("kvmtrace", "check_ext"), ("bpftrace", "create_rejected"),
        ("bpftrace", "create_accepted")}
    assert all(r["verified"] for r in checked), [r for r in checked if not r["verified"]]


def test_storm_counts_are_exact(quick):
    data, _, _ = quick
    st = data["storm"]
    assert st["exact"] is True
    assert st["issued_total"] == st["exported_total"] == 2 * st["per_process"]
    for c in st["comms"]:
        assert st["exported"][c] == st["per_process"] == st["exported_rejected_einval"][c]
    assert st["scrape_errors"] == 0 and st["scrapes_during_storm"] >= 1
    assert isinstance(st["events_lost_total"], int)


def test_cold_start_scale_and_targets_reported(quick):
    data, md, _ = quick
    assert data["cold_start"]["samples_s"] and finite(data["cold_start"]["median_s"])
    sc = data["scale"]
    assert sc["live"]["series"] == {"attempts": sc["vm_types"], "rejected": sc["vm_types"]}
    assert sc["folded"]["series"] == sc["live"]["series"]
    for state in ("empty", "live", "folded"):
        assert sc[state]["rss_kib"]["VmRSS"] > 0 and finite(sc[state]["median_ms"])
        # the exporter with every owner label, side by side: the same series, by owner
        owned = sc["owner_labels"][state]
        assert owned["series"] == sc[state]["series"] and finite(owned["median_ms"])
    assert "With `--metrics.labels vm,unit,pod,namespace`" in md
    names = " ".join(t["name"] for t in data["targets"])
    for word in ("FIONREAD", "getppid", "rejected KVM_CREATE_VM", "storm", "cold start",
                 "scrape", "RSS"):
        assert word in names
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    assert "| workload |" in md and "## Storm" in md and "## Targets" in md


def test_concurrent_scrapes_were_all_answered(quick):
    """200 scrapes at once, idle and during a storm, with and without the request cap:
    every one answered (a 200, or a 503 past the cap): none timed out or was refused.
    The latencies are reported, not asserted."""
    data, md, _ = quick
    sp = data["scrapes"]
    assert sp["clients"] == 200 and set(sp["runs"]) == {"default_cap", "no_cap"}
    for label, run in sp["runs"].items():
        for cond in ("idle", "storm"):
            w = run[cond]
            assert w["requests"] == 200 * sp["waves"] == w["answered"], (label, cond, w)
            assert finite(w["p99_ms"]) and w["p50_ms"] <= w["p99_ms"] <= w["max_ms"]
            assert w["complete_bodies"] == w["statuses"].get("200", 0) > 0, (label, cond)
        assert run["storm"]["storm_ran_throughout"] is True, label
    assert run["idle"]["statuses"] == {"200": 200 * sp["waves"]}  # no cap: no 503
    assert "## Concurrent scrapes" in md


def test_hostile_names_leave_totals_exact_and_series_bounded(quick):
    """Renames through thousands of names while another process creates, then bursts of
    short-lived names: the host totals equal what the drivers issued after every step,
    the other process's 300 creates are all exported under its own name, the series
    stay within --max-series (10,000 series; a few more for comm="other")."""
    data, md, _ = quick
    nm = data["names"]
    assert len(nm["steps"]) >= 5 and nm["steps"][0]["issued_total"] == 0
    for step in nm["steps"]:
        assert step["host_total"] == step["issued_total"], step
        assert step["series"] <= 10_000 + 10, step
        assert step["rss_kib"]["VmRSS"] > 0
        if "other_process" in step:
            assert step["other_process"]["exported"] == 300, step
            assert step["other_process"]["exact"] is True, step
    assert nm["totals_exact"] is True and nm["other_process_exact"] is True
    assert nm["steps"][-1]["issued_total"] > 0 and "## Hostile names" in md
