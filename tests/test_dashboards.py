"""Grafana dashboards: every query parses (real promtool) and names only real metrics."""

import json
import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARDS = sorted((Path(__file__).parent.parent / "dashboards").glob("*.json"))


def exprs(path: Path) -> list[str]:
    dash = json.loads(path.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_there_is_a_dashboard():
    assert DASHBOARDS


def test_every_query_parses_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing ('make test' installs Debian's prometheus)"
    for path in DASHBOARDS:
        rules = [{"record": f"kvmtrace:panel{i}", "expr": e.replace("$__rate_interval", "5m")
                  .replace("$__range", "1h").replace("$instance", ".*")}
                 for i, e in enumerate(exprs(path))]
        f = tmp_path / "rules.json"  # YAML is a superset of JSON
        f.write_text(json.dumps({"groups": [{"name": path.stem, "rules": rules}]}))
        out = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True,
                             text=True, check=False)
        assert out.returncode == 0, out.stdout + out.stderr


def test_queries_name_only_metrics_the_exporter_serves(recorded_collector):
    reg, _, _ = recorded_collector()
    served = set()
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        served |= {s.name for s in fam.samples}
    for path in DASHBOARDS:
        for e in exprs(path):
            for name in re.findall(r"\bkvmtrace_[a-z_]+", e):
                assert name in served, (path.name, name)
