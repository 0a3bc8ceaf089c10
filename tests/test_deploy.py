"""deploy/: the manifests against the Kubernetes schemas (kubernetes-validate, pinned,
offline), the Prometheus examples with promtool, the systemd unit with systemd-analyze,
and each of them against what kvmtrace itself documents (capabilities, port, path)."""

from __future__ import annotations

import copy
import dataclasses
import errno
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kvmtrace import cli, privileges
from tests.conftest import HERE

DEPLOY = HERE.parent / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "kvmtrace.service"
ENV = DEPLOY / "systemd" / "kvmtrace.env"
VENV_KVMTRACE = HERE.parent / ".venv" / "bin" / "kvmtrace"
# The oldest Kubernetes still supported upstream when this was written, and the newest
# this validator knows: the manifests must hold on both.
K8S_VERSIONS = ("1.31.0", "1.35.0")
MAX_EXPOSURE = 3.3  # systemd-analyze security --offline=true: 3.2 when measured (2.6
# before CAP_SYS_ADMIN joined the set, 2.9 before CAP_SYSLOG and /dev/kmsg: the kernel's
# lines of a failed start)


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def manifest(kind: str) -> dict:
    found = [d for f in sorted(K8S.glob("*.yaml")) for d in docs(f.name) if d["kind"] == kind]
    assert len(found) == 1, (kind, found)
    return found[0]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/setup-host.sh --test installs it)")
    return path


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", ["Namespace", "DaemonSet", "Service"])
def test_manifests_pass_the_kubernetes_schema(kind, version):
    kubernetes_validate.validate(manifest(kind), version, strict=True)


@pytest.mark.parametrize(("path", "value"), [
    (("spec", "template", "spec", "containers", 0, "securityContext", "privilegd"), False),
    (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "9929"),
    (("spec", "template", "spec", "hostPID"), "yes"),
])
def test_the_validator_refuses_a_broken_daemonset(path, value):
    broken = copy.deepcopy(manifest("DaemonSet"))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_podmonitor_has_no_crd_schema_offline():
    """No Prometheus Operator CRD schema ships in a registry package this project can
    use without side effects (docs/service.md): the PodMonitor is checked by hand against the
    fields of monitoring.coreos.com/v1 it uses, and against the exporter."""
    pm = manifest("PodMonitor")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(pm, K8S_VERSIONS[0], strict=True)
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    assert re.fullmatch(r"\d+[smh]", ep["interval"]) and re.fullmatch(r"\d+[smh]",
                                                                      ep["scrapeTimeout"])
    for r in ep["relabelings"]:
        assert set(r) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement"}


def _container() -> dict:
    (c,) = manifest("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


def test_daemonset_is_least_privilege_and_matches_kvmtrace():
    ds = manifest("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = _container()
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # uid 0 in the container (no ambient capabilities in Kubernetes): CAP_BPF,
    # CAP_PERFMON and CAP_SYS_ADMIN (Debian's perf_event_paranoid=3) and nothing else;
    # privileges.requirements agrees that is enough on a Debian 6.1 node, and that
    # CAP_SYS_ADMIN is what a Debian node refuses without.
    added = {f"CAP_{c}" for c in sc["capabilities"]["add"]}
    assert added == {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    mask = privileges.mask_of(added)
    root = privileges.Access(kernel=(6, 1), euid=sc["runAsUser"], effective=mask,
                             bounding=mask, tracefs=(("/sys/kernel/tracing", None),),
                             headers_path="/lib/modules/x/build", perf_event_paranoid=3,
                             perf_open_errno=0)
    assert privileges.missing(root) == []
    narrower = privileges.mask_of(added - {"CAP_SYS_ADMIN"})
    refused = dataclasses.replace(root, effective=narrower, bounding=narrower,
                                  perf_open_errno=errno.EACCES)
    (line,) = privileges.missing(refused)
    assert line.startswith("kernel.perf_event_paranoid is 3") and "CAP_SYS_ADMIN" in line
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["hostPID"] is True and pod.get("hostNetwork") is False
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    host = {v["name"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {"tracefs", "debugfs", "modules", "usr-src"}
    assert all(mounts[n].get("readOnly") is True for n in host)
    # the flags are kvmtrace's own, and the PodMonitor and Service scrape what they say
    args = cli.build_parser().parse_args(c["args"])
    port = int(args.listen.rpartition(":")[2])
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    (ep,) = manifest("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert (ep["port"], ep["path"]) == ("metrics", args.telemetry_path)
    svc = manifest("Service")["spec"]
    assert svc["ports"][0]["targetPort"] == "metrics" and svc["ports"][0]["port"] == port
    labels = ds["spec"]["template"]["metadata"]["labels"]
    for selector in (svc["selector"], ds["spec"]["selector"]["matchLabels"],
                     manifest("PodMonitor")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def test_prometheus_file_sd_passes_promtool():
    proc = subprocess.run([tool("promtool"), "check", "config",
                           str(K8S / "prometheus-file-sd.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    targets = yaml.safe_load((K8S / "kvmtrace-targets.json").read_text())
    assert all(t.endswith(":9929") for group in targets for t in group["targets"])


def test_prometheus_kubernetes_sd_fields():
    """Debian's promtool is built without the Kubernetes service discovery ("field
    kubernetes_sd_configs not found"), so the fields are checked here against the
    Prometheus configuration reference."""
    (job,) = yaml.safe_load((K8S / "prometheus-kubernetes-sd.yml").read_text())[
        "scrape_configs"]
    assert set(job) == {"job_name", "metrics_path", "kubernetes_sd_configs",
                        "relabel_configs"}
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [
        manifest("DaemonSet")["metadata"]["namespace"]]
    for sel in sd["selectors"]:
        assert set(sel) <= {"role", "label", "field"} and sel["role"] == "pod"
        key, _, value = sel["label"].partition("=")
        assert manifest("DaemonSet")["spec"]["template"]["metadata"]["labels"][key] == value
    actions = {"replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod",
               "lowercase", "uppercase", "keepequal", "dropequal"}
    for r in job["relabel_configs"]:
        assert set(r) <= {"source_labels", "separator", "regex", "modulus", "target_label",
                          "replacement", "action"}
        assert r.get("action", "replace") in actions
        assert all(s.startswith("__meta_kubernetes_pod_") for s in r["source_labels"])


# ---- systemd ----------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def unit_here(tmp_path_factory) -> Path:
    """The unit with ExecStart pointing at this checkout's venv (verify checks it)."""
    if not VENV_KVMTRACE.exists():
        pytest.fail(f"{VENV_KVMTRACE} missing: run make setup")
    path = tmp_path_factory.mktemp("unit") / "kvmtrace.service"
    path.write_text(UNIT.read_text().replace("/opt/kvmtrace/.venv/bin/kvmtrace",
                                             str(VENV_KVMTRACE)))
    return path


def test_systemd_analyze_verify_is_clean(unit_here):
    proc = subprocess.run([tool("systemd-analyze"), "verify", str(unit_here)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_systemd_exposure(unit_here):
    proc = subprocess.run([tool("systemd-analyze"), "security", "--offline=true",
                           "--no-pager", str(unit_here)],
                          capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_unit_grants_the_documented_set_and_leaves_out_what_breaks_bcc():
    s = unit_settings(UNIT.read_text())
    documented = " ".join(privileges.SERVICE_CAPS)
    assert s["AmbientCapabilities"] == [documented]
    assert s["CapabilityBoundingSet"] == [documented]
    assert s["SupplementaryGroups"] == [f"{privileges.SERVICE_GROUP} systemd-journal"]
    assert s["Type"] == ["notify"] and s["NoNewPrivileges"] == ["yes"]
    assert s["DeviceAllow"] == ["/dev/kvm rw", "/dev/kmsg r"]
    calls = " ".join(s["SystemCallFilter"])
    assert "bpf" in calls.split() and "perf_event_open" in calls.split()
    for breaks in ("ProtectKernelTunables", "ProtectKernelModules", "PrivateUsers",
                   "ProtectProc", "ProcSubset", "PrivateDevices", "PrivateNetwork",
                   "ProtectKernelLogs"):
        assert breaks not in s, breaks


def test_env_file_flags_are_kvmtrace_serve_flags():
    """The flags shipped in kvmtrace.env and the unit's default parse as serve flags."""
    env = unit_settings(ENV.read_text())["KVMTRACE_ARGS"][0]
    args = cli.build_parser().parse_args(["serve", *shlex.split(env)])
    assert args.listen == ":9929" and args.telemetry_path == "/metrics" and args.quiet
    (default,) = unit_settings(UNIT.read_text())["Environment"]
    key, _, value = default.strip('"').partition("=")
    assert key == "KVMTRACE_ARGS"
    cli.build_parser().parse_args(["serve", *shlex.split(value)])
