"""Alerting rules (alerts/kvmtrace.rules.yml): real promtool checks them and runs their unit
tests; each alert is monitoring-mixin shaped and tested firing and not firing; every metric
they read is in the exporter's exposition (parsed) and in the metric catalogue
(kvmtrace.catalogue)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.test_dashboards import (
    PROMETHEUS_OWN,
    catalogued_names,
    metric_names,
    recorded_exposition,
    served_names,
)

ALERTS = Path(__file__).parent.parent / "alerts"
RULES = ALERTS / "kvmtrace.rules.yml"
TESTS = ALERTS / "kvmtrace.rules.test.yml"
SEVERITIES = {"critical", "warning", "info"}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool missing ('make test' installs Debian's prometheus)"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False,
                          cwd=ALERTS)


def test_promtool_check_rules_is_clean():
    out = promtool("check", "rules", RULES.name)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    assert "WARNING" not in out.stdout + out.stderr


def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", TESTS.name)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """The unit tests really compare: expecting an alert a steady count cannot raise fails."""
    (tmp_path / RULES.name).write_text(RULES.read_text())
    case = {"rule_files": [RULES.name], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": 'kvmtrace_vm_create_rejected_total{job="kvmtrace",'
                                    'instance="h1",comm="q",vm_type_name="SEV",errno="EINVAL",'
                                    'reason="type_unsupported"}', "values": "3+0x30"}],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "KvmtraceVMCreateRejected",
                             "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]}]}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(case))
    out = subprocess.run([shutil.which("promtool"), "test", "rules", "t.yml"],
                         capture_output=True, text=True, check=False, cwd=tmp_path)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr, out.stdout


def test_alerts_are_mixin_shaped():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) >= 9 and len(names) == len(set(names))
    for r in rules:
        assert re.fullmatch(r"Kvmtrace([A-Z][A-Za-z0-9]*)+", r["alert"]), r["alert"]
        assert r["labels"]["severity"] in SEVERITIES, r["alert"]
        assert set(r["annotations"]) >= {"summary", "description"}, r["alert"]
        assert r["annotations"]["summary"].endswith("."), r["alert"]
        assert re.fullmatch(r"\d+[mh]", r["for"]), r["alert"]
        assert "{{ $labels.instance }}" in r["annotations"]["description"] \
            or r["alert"] == "KvmtraceExporterAbsent", r["alert"]


def test_the_alerts_the_issue_asks_for_are_there():
    names = {r["alert"] for r in alert_rules()}
    assert {"KvmtraceVMCreateRejected", "KvmtraceVMStartFailed",
            "KvmtraceVMTypeNoLongerOffered", "KvmtraceProbeDetached",
            "KvmtraceCreateVMNotTraced", "KvmtraceEventsLost", "KvmtraceCountsDropped",
            "KvmtraceExporterDown", "KvmtraceScrapeFailing"} <= names


def test_every_alert_is_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for case in yaml.safe_load(TESTS.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names and firing and quiet, (names, firing, quiet)
    assert names - firing == set(), "never tested firing"
    assert names - quiet == set(), "never tested not firing"


def test_rules_read_only_metrics_the_exporter_serves(recorded_collector):
    served = served_names(recorded_exposition(recorded_collector))
    rules = alert_rules()
    assert served and len(rules) >= 9, (len(served), len(rules))
    for r in rules:
        names = metric_names(r["expr"])
        assert names, r["alert"]
        assert names - PROMETHEUS_OWN <= served, (r["alert"], names - served)


def test_rules_read_only_catalogued_metrics():
    catalogued = catalogued_names()
    rules = alert_rules()
    assert len(catalogued) >= 30 and len(rules) >= 9, (len(catalogued), len(rules))
    read = set()
    for r in rules:
        names = metric_names(r["expr"])
        assert names, r["alert"]
        assert names - PROMETHEUS_OWN <= catalogued, (r["alert"], names - catalogued)
        read |= names - PROMETHEUS_OWN
    assert len(read) >= 5, read
