"""Privileged tier for the dashboard and the alerts: Debian's real `prometheus` on loopback
scrapes TWO `kvmtrace serve` instances (as two hosts would be: both see this host's events,
each is its own instance) every second and evaluates alerts/kvmtrace.rules.yml; the test makes
its own workload under comms of its own, then evaluates EVERY panel query of
dashboards/kvmtrace.json (variables substituted as Grafana would) and EVERY alert expression
through Prometheus's HTTP API. Headless Chromium (Debian's `chromium`) renders the landing
page and shows a rejection and a failed start this test caused; its screenshot is kept in
build/test-artifacts/. Never skips: see tests/privileged/conftest.py.

The first exporter keeps serve's defaults (no owner labels); the second has --max-series 100
and --metrics.labels=vm,unit,pod,namespace, so only its series carry owners and the panel of
failed starts and rejections by VM, unit and pod has rows from it alone.

The workload, in two rounds so that increase() sees counters move (a series' first sample is
no increase): a driver creating DEFAULT (accepted, then KVM_MEMORY_ENCRYPT_OP SEV INIT2 on it)
and asking for SEV and TDX (rejected), run in a cgroup shaped like a systemd service (under a
directory of this test's own in the cgroup v2 hierarchy: its owner is that unit); one that
creates and exits 3 (a failed start during launch); QEMU refusing an SNP guest before creating
(a failed start before create; its owner is its `-name guest=`). Between the rounds one process
renames itself 300 times (past its 256-key share of the counts map on both exporters; past the
second exporter's --max-series 100, which folds names). At the end the second exporter stops,
and KvmtraceExporterDown's expression must name it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from kvmtrace import cgroups
from tests.conftest import HERE, free_port
from tests.privileged.conftest import VMMAKER, Serve, samples
from tests.privileged.test_privileged_starts import BASE, CGS, OBJ, QEMU, qemu_major, run_as
from tests.test_alerts import RULES, alert_rules
from tests.test_dashboards import (
    OWNERS_PANEL,
    PROMETHEUS_OWN,
    load,
    metric_names,
    queries,
    served_names,
    substitute,
)

# host_only: a test of the exporter's consumers (Prometheus, a browser), not of the kernel: the
# kernel tier's emulated guests leave it out (tests/vm/guest.sh).
pytestmark = [pytest.mark.privileged, pytest.mark.host_only]

ROOT = HERE.parent
ARTEFACTS = ROOT / "build" / "test-artifacts"
JOB = "kvmtrace"
INIT2 = 22  # KVM_SEV_INIT2
RENAMES = 300  # > the 256-key share of one process, > the second exporter's --max-series
WAIT = 90.0  # seconds for Prometheus to show what the exporters counted
RATE_INTERVAL, RANGE = "1m", "10m"  # $__rate_interval and $__range: both rounds inside
OWNER_LABELS = "--metrics.labels=vm,unit,pod,namespace"  # the second exporter's only

# Panel queries that cannot have data from this test's workload on every host, and what
# decides it; the test checks that reason against the host (a claim that does not hold
# fails): function probes by the plan, the rest by the exporter's own samples of the metric.
FUNCTION_PROBES = "needs function probes (kprobes/fentry) on kvm_arch_init_vm"
HOST_FACT = "needs the host to have it (misc cgroup sev/sev_es/tdx, firmware lines in the log)"
ERRORS_ONLY = "only after a failed map read"
MAY_BE_EMPTY = {
    ("Type checks by function probes", "A"): (FUNCTION_PROBES, None),
    ("Type checks by function probes", "B"): (FUNCTION_PROBES, None),
    ("Encryption IDs (ASIDs, TDX KeyIDs)", "A"): (HOST_FACT, "kvmtrace_host_encryption_ids"),
    ("Encryption IDs (ASIDs, TDX KeyIDs)", "B"): (HOST_FACT,
                                                  "kvmtrace_host_encryption_ids_used"),
    ("Firmware and TDX module versions", "A"): (HOST_FACT, "kvmtrace_host_firmware_info"),
    ("Scrape health", "D"): (ERRORS_ONLY, "kvmtrace_scrape_errors_total"),
}
# Alerts this workload makes true at T0 (the rest must be quiet on a healthy host), and the
# exporter each must name ("both", or "b": only the second, with --max-series 100).
FIRING = {"KvmtraceVMCreateRejected": "both", "KvmtraceVMStartFailed": "both",
          "KvmtraceCountsOverShare": "both", "KvmtraceNamesFolded": "b"}
AFTER_STOP = "KvmtraceExporterDown"  # true once the second exporter is stopped


class Prometheus:
    def __init__(self, tmp: Path, targets: list[str]):
        prom = shutil.which("prometheus")
        if prom is None:
            pytest.fail("prometheus missing ('make test' installs Debian's prometheus)")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("w")  # closed in stop()
        self.proc = subprocess.Popen(
            [prom, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: self.get("/-/ready") is not None, "ready")

    def get(self, path: str, **params) -> dict | str | None:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited {self.proc.returncode}: "
                        f"{Path(self.log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read().decode()
        except OSError:
            return None
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        out = self.get("/api/v1/query", **params)
        assert out and out["status"] == "success", (expr, out)
        return out["data"]["result"]

    def query_range(self, expr: str, end: float) -> list[dict]:
        out = self.get("/api/v1/query_range", query=expr, start=f"{end - 120:.3f}",
                       end=f"{end:.3f}", step="5")
        assert out and out["status"] == "success", (expr, out)
        return out["data"]["result"]

    def wait(self, ok, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.5)
        pytest.fail(f"prometheus: not {what} within {WAIT:.0f} s")

    def per_instance(self, expr: str) -> dict[str, float]:
        return {r["metric"].get("instance", ""): float(r["value"][1])
                for r in self.query(expr)}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kw)


@pytest.fixture(scope="module")
def service_cgroup():
    """A cgroup shaped like a systemd service (system.slice/NAME.service) under a directory
    of this test's own in the host's cgroup v2 hierarchy (systemd's own slices untouched, as
    in test_privileged_owners.py); removed after `world` (its processes gone by then)."""
    mount = cgroups.v2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount, "no cgroup v2 hierarchy is mounted on this host"
    tag = f"kp{os.getpid() % 10000}{os.urandom(2).hex()}"
    where = Path(mount) / f"kvmtrace-test-{tag}" / "system.slice" / f"{tag}-drv.service"
    where.mkdir(parents=True)
    try:
        yield where
    finally:
        for d in (where, where.parent, where.parent.parent):
            try:
                d.rmdir()
            except OSError:
                pass


def workload_round(tag: str, link: Path, cgroup: Path) -> None:
    def enter():  # the driver runs in ``cgroup`` from its start
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    drv = run([*VMMAKER, "--name", f"{tag}-v", "--types", "0,2,5", "--queries", "1",
               "--sev-cmd", str(INIT2)], preexec_fn=enter)
    assert drv.returncode == 0, drv.stderr
    assert [json.loads(ln).get("errno") for ln in drv.stdout.splitlines()
            if "vm_type" in ln] == [0, 22, 22], drv.stdout
    ex = run([*VMMAKER, "--name", f"{tag}-x", "--types", "0", "--exit", "3"])
    assert ex.returncode == 3, ex.stderr
    snp = run_as(link, [*BASE, *CGS, "-object", f"sev-snp-guest,{OBJ}",
                        "-name", f"guest={tag}-vm-snp"])
    assert snp.wait(timeout=120) == 1, snp.communicate()[1]
    snp.communicate()


@pytest.fixture(scope="module")
def world(tmp_path_factory, service_cgroup):
    if QEMU is None or qemu_major() < 9:
        pytest.fail("needs qemu-system-x86_64 >= 9 (python3 tests/qemu.py install; "
                    "make setup-test does it)")
    tmp = tmp_path_factory.mktemp("prometheus")
    tag = f"kp{os.getpid() % 10000}{os.urandom(1).hex()}"
    link = tmp / f"{tag}-snp"
    link.symlink_to(QEMU)
    with ThreadPoolExecutor(2) as pool:  # both compile at once
        fa = pool.submit(Serve, "--retire-interval", "1", "-q")
        fb = pool.submit(Serve, "--retire-interval", "1", "-q", "--max-series", "100",
                         OWNER_LABELS)
        a, b = fa.result(), fb.result()
    inst = {"a": f"127.0.0.1:{a.port}", "b": f"127.0.0.1:{b.port}"}
    prom = Prometheus(tmp, list(inst.values()))
    w = {"tag": tag, "a": a, "b": b, "inst": inst, "prom": prom, "unit": service_cgroup.name}
    try:
        prom.wait(lambda: prom.per_instance(f'up{{job="{JOB}"}}') == {
            inst["a"]: 1.0, inst["b"]: 1.0}, "scraping both exporters")
        both = set(inst.values())

        def counted(metric: str, comm: str, n: int, where=both) -> bool:
            got = prom.per_instance(f'sum by (instance) ({metric}{{comm="{comm}"}})')
            return all(got.get(i) == n for i in where)

        for rnd in (1, 2):
            workload_round(tag, link, service_cgroup)
            prom.wait(lambda r=rnd: counted("kvmtrace_vm_create_rejected_total",
                                            f"{tag}-v", 2 * r)
                      and counted("kvmtrace_vm_start_failures_total", f"{tag}-snp", r)
                      and counted("kvmtrace_vm_start_failures_total", f"{tag}-x", r),
                      f"showing round {rnd} on both exporters")
            if rnd == 1:
                ren = run([*VMMAKER, "--name", f"{tag}-n", "--types", "1",
                           "--names", str(RENAMES)])
                assert ren.returncode == 0, ren.stderr
                prom.wait(lambda: all(v > 0 for v in prom.per_instance(
                    "kvmtrace_counts_over_share_total").values())
                    and prom.per_instance("kvmtrace_names_folded_total").get(inst["b"], 0) > 0,
                    "showing the renames over share and folded")
        w["t0"] = time.time()
        w["metrics"] = {k: s.metrics() for k, s in (("a", a), ("b", b))}
        w["plan"] = {r["probe"]: r for r in json.loads(a.get("/api/plan"))}
        code, _, err = b.stop()
        assert code == 0, err
        prom.wait(lambda: prom.per_instance(f'up{{job="{JOB}"}}').get(inst["b"]) == 0.0,
                  "seeing the second exporter down")
        w["t1"] = time.time()
        yield w
    finally:
        for s in (a, b):
            if s.proc.poll() is None:
                s.stop()
        prom.stop()


def grafana_instances(inst: dict[str, str]) -> str:
    """$instance with both hosts selected, as Grafana interpolates a multi-value variable
    into a regex matcher (values regex-escaped, in a PromQL string)."""
    return "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in inst.values()) + ")"


def expect_data(w: dict, why: tuple[str, str | None] | None) -> bool:
    if why is None:
        return True
    reason, metric = why
    if reason == FUNCTION_PROBES:
        return w["plan"]["kvm_arch_init_vm"]["attached"] == "yes"
    return bool(samples(w["metrics"]["a"], metric))


def test_every_name_in_the_dashboard_and_rules_is_in_the_exporters_output(world):
    used = {n for _, t in queries(load()) for n in metric_names(t["expr"])}
    used |= {n for r in alert_rules() for n in metric_names(r["expr"])}
    for which in ("a", "b"):
        assert used - PROMETHEUS_OWN <= served_names(world["metrics"][which]), \
            (which, used - served_names(world["metrics"][which]))


def test_every_panel_query_returns_data_from_two_instances(world):
    prom, t0 = world["prom"], world["t0"]
    results, empty = {}, []
    for panel, t in queries(load()):
        expr = substitute(t["expr"], job=JOB, instance=grafana_instances(world["inst"]),
                          rate_interval=RATE_INTERVAL, range_=RANGE)
        got = prom.query(expr, t0) if t["instant"] else prom.query_range(expr, t0)
        key = (panel["title"], t["refId"])
        results[key] = got
        why = MAY_BE_EMPTY.get(key)
        if expect_data(world, why):
            if not got:
                empty.append(key)
        else:
            assert got == [], (key, why, got)  # the reason it may be empty really holds
    assert not empty, f"panel queries without data: {empty}"
    tag, inst = world["tag"], world["inst"]
    rows = results[("Rejections by host and process", "A")]
    assert {r["metric"]["instance"] for r in rows if r["metric"]["comm"] == f"{tag}-v"} == \
        set(inst.values())
    rows = results[("Failed VM starts by host and process", "A")]
    mine = {(r["metric"]["instance"], r["metric"]["stage"], r["metric"]["reason"])
            for r in rows if r["metric"]["comm"].startswith(tag)}
    assert mine == {(i, s, r) for i in inst.values() for s, r in (
        ("before_create", "vmm_refused_type"), ("during_launch", "exited_after_create"))}, mine
    top = results[("Top rejecting processes", "A")]
    assert f"{tag}-v" in {r["metric"]["comm"] for r in top}
    offered = results[("Hosts by VM type: offered and ready", "A")]
    assert {(r["metric"]["instance"], r["value"][1]) for r in offered
            if r["metric"]["vm_type_name"] == "DEFAULT"} == {(i, "1") for i in inst.values()}
    ready = results[("Hosts by VM type: offered and ready", "B")]
    assert {r["metric"]["instance"] for r in ready if r["metric"]["vm_type_name"] == "DEFAULT"
            and r["metric"]["verdict"] == "ready"} == set(inst.values())
    enc = results[("KVM_MEMORY_ENCRYPT_OP by command and result", "A")]
    assert any(r["metric"].get("errno") == "ENOTTY" for r in enc), enc
    # Owners: only the second exporter has the labels (the first keeps the default, off):
    # the QEMU by its -name, the driver by its service's unit.
    fails, rejs = results[(OWNERS_PANEL, "A")], results[(OWNERS_PANEL, "B")]
    assert {r["metric"]["instance"] for r in fails + rejs} == {inst["b"]}, (fails, rejs)
    assert any(r["metric"].get("vm") == f"{tag}-vm-snp" for r in fails), fails
    assert any(r["metric"].get("unit") == world["unit"]
               and r["metric"]["reason"] == "type_unsupported" for r in rejs), rejs
    p99 = results[("KVM_CREATE_VM latency by outcome", "A")]
    assert {r["metric"]["outcome"] for r in p99
            if any(v != "NaN" for _, v in r["values"])} == {"accepted", "rejected"}


def test_every_alert_expression_is_evaluated(world):
    prom, inst = world["prom"], world["inst"]
    for rule in alert_rules():
        name = rule["alert"]
        at = world["t1"] if name == AFTER_STOP else world["t0"]
        got = prom.query(rule["expr"], at)
        named = {r["metric"].get("instance") for r in got}
        if name in FIRING:
            want = set(inst.values()) if FIRING[name] == "both" else {inst["b"]}
            assert want <= named, (name, got)
            if name in ("KvmtraceVMCreateRejected", "KvmtraceVMStartFailed"):
                assert any(r["metric"]["comm"].startswith(world["tag"]) for r in got), got
        elif name == AFTER_STOP:
            assert named == {inst["b"]}, (name, got)
        else:
            # Quiet on a healthy host, and not because a name is wrong: every metric it
            # reads has series from these exporters.
            assert got == [], (name, got)
            for metric in metric_names(rule["expr"]):
                assert prom.query(f'count({metric}{{job="{JOB}"}})', at), (name, metric)


def test_prometheus_loaded_every_rule_and_evaluates_them(world):
    prom = world["prom"]
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    for name, r in loaded.items():
        assert r["health"] == "ok", (name, r.get("lastError"))
    def states() -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"]
                for a in prom.get("/api/v1/alerts")["data"]["alerts"]}

    # The rules are evaluated every second: the last one to turn true (the second exporter's
    # down) may take one more evaluation.
    want = {*FIRING, AFTER_STOP}
    prom.wait(lambda: all(states().get(n) in ("pending", "firing") for n in want),
              f"showing {sorted(want)} pending or firing")
    assert set(states()) == want, states()  # and the quiet ones are not


def _chromium() -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium missing (scripts/setup-host.sh --test installs Debian's chromium)")
    return chromium


def _headless(profile: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: the tier runs as root, where Chromium's sandbox refuses to start.
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
                          f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_landing_page_in_headless_chromium_shows_what_this_test_caused(world, tmp_path):
    a, tag = world["a"], world["tag"]
    url = f"http://127.0.0.1:{a.port}/"
    # This test's rows only (?filter=): a busy host's other VM starts cannot push them off.
    dom = _headless(tmp_path, "--dump-dom", f"{url}?filter={tag}").stdout
    assert "<h2>Probe points</h2>" in dom and "VM types on this host" in dom
    assert f"owner containing <code>{tag}</code>" in dom  # the filter is said
    starts = dom.split("id=\"starts\"", 1)[1].split("</table>", 1)[0]
    assert f"{tag}-snp" in starts and "vmm_refused_type" in starts and f"{tag}-vm-snp" in starts
    attempts = dom.split("id=\"attempts\"", 1)[1].split("</table>", 1)[0]
    assert f"{tag}-v" in attempts and "type_unsupported" in attempts
    assert "asked for VM type 2" in attempts  # the explanation
    readiness = dom.split("id=\"readiness\"", 1)[1].split("</table>", 1)[0]
    assert "DEFAULT" in readiness and "ready" in readiness
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "landing-page.png"
    shot.unlink(missing_ok=True)
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=1400,1800", url)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (1400, 1800) and len(data) > 20_000, (width, height, len(data))
