"""kvmtrace top: the table from the APIs' rows (BUILT BY HAND here, in the shape
/api/processes and /api/rejections give; the privileged tier reads a real exporter),
and the command's --once and error paths against a local HTTP server."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading

import pytest

from kvmtrace import top

POD = "1e597579-417e-482f-bf65-5fe170c3aebd"
PROCESSES = [
    {"pid": 10, "comm": "qemu-system-x86", "vm_create_attempts": 3, "vm_create_rejected": 2,
     "types": {"SNP": {"accepted": 0, "rejected": 2}, "DEFAULT": {"accepted": 1, "rejected": 0}},
     "owner": {"vm": "web01", "unit": "machine-qemu-2-web01.scope"}},
    {"pid": 11, "comm": "virt-launcher", "vm_create_attempts": 1, "vm_create_rejected": 0,
     "types": {"DEFAULT": {"accepted": 1, "rejected": 0}},
     "owner": {"pod_uid": POD, "unit": "cri-containerd-ab.scope", "namespace": "default",
               "vm": "testvm"}},
    {"pid": 12, "comm": "vmmaker", "vm_create_attempts": 5, "vm_create_rejected": 5,
     "types": {"TDX": {"accepted": 0, "rejected": 5}}, "owner": {}},
]
REJECTIONS = [  # newest first
    {"kind": "start", "outcome": "failed", "pid": 20, "comm": "qemu-system-x86",
     "cause": "firmware_error", "owner": {"vm": "web01", "unit": "machine-qemu-3-web01.scope"}},
    {"kind": "start", "outcome": "failed", "pid": 19, "comm": "qemu-system-x86",
     "cause": "type_not_offered", "owner": {"vm": "web01"}},
    {"kind": "attempt", "pid": 12, "comm": "vmmaker"},
    {"kind": "start", "outcome": "failed", "pid": 30, "comm": "kvm-unit", "cause": "vmm_config",
     "owner": {"unit": "vm-runner.service"}},
]


def test_one_row_per_vm_or_workload_with_its_last_cause():
    rows = {r.key: r for r in top.rows(PROCESSES, REJECTIONS)}
    assert set(rows) == {"web01", "default/testvm", "pid 12", "vm-runner.service"}
    web = rows["web01"]
    assert (web.pid, web.accepted, web.rejected, web.failed, web.last_cause) == \
        (10, 1, 2, 2, "firmware_error")
    assert web.by_type() == "DEFAULT:1/0 SNP:0/2"
    assert rows["default/testvm"].unit == "cri-containerd-ab.scope"
    assert (rows["vm-runner.service"].failed, rows["vm-runner.service"].pid) == (1, 30)


def test_sorting_filtering_and_rates():
    rows = top.rows(PROCESSES, REJECTIONS)
    assert [r.key for r in top.arrange(rows, "f")][:2] == ["web01", "vm-runner.service"]
    assert next(r.key for r in top.arrange(rows, "r")) == "pid 12"
    assert next(r.key for r in top.arrange(rows, "p")) == "web01"
    assert [r.key for r in top.arrange(rows, "n")] == sorted(r.key for r in rows)
    assert [r.key for r in top.arrange(rows, "f", "launcher")] == ["default/testvm"]
    later = [dict(p, vm_create_rejected=p["vm_create_rejected"] + 4) for p in PROCESSES]
    rates = top.with_rates(top.rows(later, []), {r.key: r.rejected for r in rows}, 2.0)
    assert {r.key: r.rate for r in rates}["pid 12"] == 2.0


def test_lines_are_a_header_and_one_line_per_row_within_the_width():
    out = top.lines(top.rows(PROCESSES, REJECTIONS), "f", "", 80)
    assert out[0].startswith("VM/WORKLOAD") and len(out) == 5
    assert all(len(line) <= 80 for line in out)
    assert out[1].startswith("web01 ")
    assert "sort rejected, filter 'x'" in top.status("r", "x", "here")


class _Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/api/processes": PROCESSES, "/api/rejections": REJECTIONS,
                "/odd/api/processes": [1, 2], "/odd/api/rejections": []}.get(self.path)
        self.send_response(404 if self.path.startswith("/gone") else 200)
        self.end_headers()
        self.wfile.write(json.dumps(body if body is not None else {"no": 1}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmtrace", "top", *args],
                          capture_output=True, text=True, timeout=60)


def test_once_prints_the_table_from_an_exporter(api):
    p = _top("--from", api, "--once", "--sort", "r")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"kvmtrace top -- {api} -- sort rejected")
    assert lines[2].startswith("pid 12 ") and "TDX:0/5" in lines[2]


def test_what_cannot_be_read_is_one_error_line(api):
    p = _top("--from", "http://127.0.0.1:1", "--once")
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("ERROR: cannot read http://127.0.0.1:1/api/processes")
    p = _top("--from", api + "/nothere", "--once")
    assert p.returncode == 1 and "not a kvmtrace API" in p.stderr and "Traceback" not in p.stderr
    p = _top("--from", api + "/odd", "--once")
    assert p.returncode == 1 and "not a kvmtrace API" in p.stderr and "Traceback" not in p.stderr
    p = _top("--from", api + "/gone", "--once")
    assert p.returncode == 1 and p.stderr.endswith("/gone/api/processes: Not Found\n")
    p = _top("--from", api)  # no terminal here
    assert p.returncode == 1 and "use --once" in p.stderr
