"""The Grafana dashboard as code: `python3 dashboards/build.py` writes dashboards/kvmtrace.json
(`--check`: exit 1 if the committed file differs). Pure Python, no dependency: the panels are
plain dicts in Grafana's dashboard JSON model (schemaVersion 39; Grafana migrates it on load).

Every query selects `job=~"$job", instance=~"$instance"`; tests/test_dashboards.py checks each
with promtool and against the exporter's metric names, and tests/privileged/
test_privileged_prometheus.py evaluates each against a real Prometheus scraping two exporters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("kvmtrace.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
S = 'job=~"$job", instance=~"$instance"'  # every selector's filter


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
           fmt: str = "table") -> dict:
    """One query; ``instant``: evaluated at the end of the range only, as a table (``fmt``
    "table") or as series (``fmt`` "time_series", for a bar gauge)."""
    t = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        t.update(instant=True, range=False, format=fmt)
    else:
        t.update(instant=False, range=True)
    return t


def _refs(targets: list[dict]) -> list[dict]:
    return [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]


def timeseries(title: str, desc: str, targets: list[dict], unit: str = "ops",
               w: int = 12, h: int = 8, stack: bool = False) -> dict:
    return {"type": "timeseries", "title": title, "description": desc, "datasource": DS,
            "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "auto",
                "stacking": {"mode": "normal" if stack else "none", "group": "A"}}},
                "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["max", "lastNotNull"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": _refs(targets)}


def stat(title: str, desc: str, targets: list[dict], unit: str = "short", w: int = 4,
         thresholds: list[tuple[float | None, str]] | None = None) -> dict:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {"type": "stat", "title": title, "description": desc, "datasource": DS,
            "gridPos": {"w": w, "h": 4},
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {
                "mode": "absolute", "steps": steps}}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "background", "graphMode": "none",
                        "textMode": "value_and_name", "justifyMode": "auto"},
            "targets": _refs(targets)}


def table(title: str, desc: str, targets: list[dict], w: int = 12, h: int = 8,
          rename: dict[str, str] | None = None, yes_no: list[str] = (),
          sort: str | None = None, no_value: str | None = None) -> dict:
    """``no_value``: the text Grafana shows instead of "No data" when no query has rows."""
    overrides = [{"matcher": {"id": "byName", "options": name}, "properties": [
        {"id": "mappings", "value": [{"type": "value", "options": {
            "1": {"text": "yes", "color": "green", "index": 0},
            "0": {"text": "NO", "color": "red", "index": 1}}}]},
        {"id": "custom.cellOptions", "value": {"type": "color-background"}}]}
        for name in yes_no]
    transformations = [{"id": "merge", "options": {}}] if len(targets) > 1 else []
    transformations.append({"id": "organize", "options": {
        "excludeByName": {"Time": True}, "renameByName": rename or {}}})
    if sort:
        transformations.append({"id": "sortBy", "options": {
            "sort": [{"field": sort, "desc": True}]}})
    return {"type": "table", "title": title, "description": desc, "datasource": DS,
            "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": {"custom": {"align": "auto"},
                                         **({"noValue": no_value} if no_value else {})},
                            "overrides": overrides},
            "options": {"showHeader": True, "cellHeight": "sm"},
            "transformations": transformations,
            "targets": _refs(targets)}


def bargauge(title: str, desc: str, targets: list[dict], w: int = 12, h: int = 8) -> dict:
    return {"type": "bargauge", "title": title, "description": desc, "datasource": DS,
            "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": "short", "min": 0, "thresholds": {
                "mode": "absolute", "steps": [{"value": None, "color": "orange"}]}},
                "overrides": []},
            "options": {"orientation": "horizontal", "displayMode": "gradient",
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False}},
            "targets": _refs(targets)}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"w": 24, "h": 1}}


def inc(metric: str, by: str, window: str = "$__rate_interval", match: str = "") -> str:
    """``match``: one more label matcher, after the job and instance filter."""
    sel = f"{S}, {match}" if match else S
    return f"sum by ({by}) (increase({metric}{{{sel}}}[{window}]))"


OWNER_LABELS = "vm, unit, pod, namespace"  # serve --metrics.labels: off by default
OWNED = ("vm", "unit", "pod")  # a series with one of these non-empty has an owner


def owned(metric: str, by: str) -> str:
    """increase() over the range of the series that name an owner, summed ``by``: one
    selector per owner label (PromQL has no "or" inside a selector); a series with two owner
    labels is in two operands with the same labels and value, and ``or`` keeps it once."""
    return " or ".join(inc(metric, f"instance, {OWNER_LABELS}, {by}", "$__range",
                           f'{label}!=""') for label in OWNED)


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{S}}}[$__rate_interval]))"


RED = [(None, "green"), (1, "red")]
OWNERS_HELP = ("No series with vm, unit or pod labels: start kvmtrace serve with "
               "--metrics.labels=vm,unit,pod,namespace (or no VM ran in a libvirt, systemd "
               "or Kubernetes cgroup in this range).")


def panels() -> list[dict]:
    rej = "kvmtrace_vm_create_rejected_total"
    fail = "kvmtrace_vm_start_failures_total"
    return [
        row("Overview"),
        stat("Exporters up", "Targets of the selected jobs whose last scrape succeeded "
             "(up), out of those Prometheus scrapes.",
             [target(f"sum(up{{{S}}})", "up"), target(f"count(up{{{S}}})", "scraped")],
             thresholds=[(None, "red"), (1, "green")]),
        stat("Rejected KVM_CREATE_VM", "KVM_CREATE_VM calls that failed in the dashboard's "
             "time range, all selected hosts.",
             [target(f"sum(increase({rej}{{{S}}}[$__range]))", "rejected")], thresholds=RED),
        stat("Failed VM starts", "Followed VMM processes whose start failed (before, at or "
             "after KVM_CREATE_VM) in the time range.",
             [target(f"sum(increase({fail}{{{S}}}[$__range]))", "failed")], thresholds=RED),
        stat("Probe points without a mechanism", "Planned probe points not attached, per "
             "host (a kernel without kprobes has its function points here; /api/plan says "
             "why).", [target(f"sum by (instance) (1 - kvmtrace_probe_attached{{{S}}})",
                              "{{instance}}")], thresholds=[(None, "green"), (1, "orange")]),
        stat("Counts lost", "Count updates lost (map full) and calls not tracked, in the "
             "time range: non-zero means the counters are no longer exact.",
             [target(f"sum(increase(kvmtrace_counts_dropped_total{{{S}}}[$__range]))",
                     "counts dropped"),
              target(f"sum(increase(kvmtrace_calls_dropped_total{{{S}}}[$__range]))",
                     "calls dropped"),
              target(f"sum(increase(kvmtrace_totals_dropped_total{{{S}}}[$__range]))",
                     "totals dropped")], w=8, thresholds=RED),

        row("VM starts"),
        timeseries("Failed VM starts by cause, stage and requested type",
                   "kvmtrace_vm_start_failures_total: the cause (kvmtrace's fixed table: "
                   "type_not_offered, feature_disabled_at_bringup, firmware_error, "
                   "memory_setup, first_run_failed, vmm_config, ...) and the stage: "
                   "before_create (the VMM refused the type or exited first), at_create "
                   "(KVM_CREATE_VM failed), during_launch (the launch or another setup ioctl "
                   "failed, or the VMM exited after creating), at_first_run.",
                   [target(rate(fail, "cause, stage, requested_type"),
                           "{{cause}} {{stage}} {{requested_type}}")]),
        timeseries("Rejected KVM_CREATE_VM by VM type, reason and errno",
                   "kvmtrace_vm_create_rejected_total; reason as kvmtrace explain gives it.",
                   [target(rate(rej, "vm_type_name, reason, errno"),
                           "{{vm_type_name}} {{reason}} {{errno}}")]),
        table("Rejections by host and process", "KVM_CREATE_VM rejections in the time range "
              "per host and process name (comm). VM names are metric labels only with "
              "serve --metrics.labels (see Failed starts and rejections by VM, unit and "
              "pod); each host's landing page and /api/rejections list them.",
              [target(inc(rej, "instance, comm, vm_type_name, reason", "$__range"),
                      instant=True)],
              rename={"Value": "rejected"}, sort="rejected"),
        table("Failed VM starts by host and process", "Failed starts in the time range per "
              "host, process name, stage, reason and the VM type the command line asked for "
              "(not_known when it does not say).",
              [target(inc(fail, "instance, comm, stage, reason, requested_type", "$__range"),
                      instant=True)],
              rename={"Value": "failed"}, sort="failed"),
        table("Failed starts and rejections by VM, unit and pod", "Failed VM starts (by "
              "cause) and rejected KVM_CREATE_VM (by reason) in the time range per host and "
              "owner (serve --metrics.labels): vm (libvirt domain or KubeVirt VM, else the "
              "VM name on the VMM's command line), unit (innermost systemd service or scope), "
              "pod (Kubernetes pod UID), namespace (a KubeVirt VM's). Only series with a vm, "
              "unit or pod show; without any the panel says: " + OWNERS_HELP,
              [target(owned(fail, "cause"), instant=True),
               target(owned(rej, "reason"), instant=True)],
              w=24, rename={"Value #A": "failed starts", "Value #B": "rejected creates"},
              no_value=OWNERS_HELP),
        bargauge("Top rejecting processes", "The ten process names with the most rejected "
                 "KVM_CREATE_VM calls in the time range, all selected hosts.",
                 [target(f"topk(10, {inc(rej, 'comm', '$__range')})", "{{comm}}",
                         instant=True, fmt="time_series")]),
        timeseries("KVM_CAP_VM_TYPES queries by process", "KVM_CHECK_EXTENSION("
                   "KVM_CAP_VM_TYPES) calls: VMMs read the mask before creating a VM.",
                   [target(rate("kvmtrace_vm_types_queries_total", "comm"), "{{comm}}")]),

        row("Host readiness"),
        table("Hosts by VM type: offered and ready", "offered: the bit in the host's "
              "KVM_CAP_VM_TYPES; ready: doctor's chain for the type (verdict, and the check "
              "that failed where not ready). `kvmtrace doctor --type NAME` on the host shows "
              "the whole chain.",
              [target(f"max by (instance, vm_type, vm_type_name) "
                      f"(kvmtrace_host_vm_type_supported{{{S}}})", instant=True),
               target(f"max by (instance, vm_type, vm_type_name, verdict, failed_check) "
                      f"(kvmtrace_vm_type_ready{{{S}}})", instant=True)],
              w=16, rename={"Value #A": "offered", "Value #B": "ready"},
              yes_no=["offered", "ready"]),
        stat("/dev/kvm answering", "1 when the exporter's own KVM_CAP_VM_TYPES query "
             "succeeded on the host.",
             [target(f"max by (instance) (kvmtrace_host_kvm_up{{{S}}})", "{{instance}}")],
             w=8, thresholds=[(None, "red"), (1, "green")]),
        table("Encryption IDs (ASIDs, TDX KeyIDs)", "The misc cgroup's capacity and use per "
              "resource (sev, sev_es: SNP uses SEV-ES's; tdx). Empty on hosts without them.",
              [target(f"max by (instance, resource) (kvmtrace_host_encryption_ids{{{S}}})",
                      instant=True),
               target(f"max by (instance, resource) "
                      f"(kvmtrace_host_encryption_ids_used{{{S}}})", instant=True)],
              rename={"Value #A": "capacity", "Value #B": "used"}),
        table("Firmware and TDX module versions", "Versions the host's kernel log states "
              "(SEV, SEV-SNP firmware; TDX module). Empty on hosts without them.",
              [target(f"max by (instance, component, version) "
                      f"(kvmtrace_host_firmware_info{{{S}}})", instant=True)],
              rename={"Value": "stated"}),

        row("Confidential launch"),
        timeseries("KVM_MEMORY_ENCRYPT_OP by command and result", "Launch commands of "
                   "followed processes (SEV/SNP/TDX command by name; errno none on success; "
                   "the firmware's status where it gave one).",
                   [target(rate("kvmtrace_encrypt_ops_total",
                                "vm_type_name, command, errno, firmware_status"),
                           "{{vm_type_name}} {{command}} {{errno}} fw={{firmware_status}}")],
                   w=24),

        row("Create latency"),
        timeseries("KVM_CREATE_VM latency by outcome", "p50 and p99 from the in-kernel log2 "
                   "histogram (bucket bounds are powers of two of ns: a quantile is exact to "
                   "a factor of 2).",
                   [target(f"histogram_quantile(0.99, sum by (le, outcome) (rate("
                           f"kvmtrace_vm_create_duration_seconds_bucket{{{S}}}"
                           f"[$__rate_interval])))", "p99 {{outcome}}"),
                    target(f"histogram_quantile(0.5, sum by (le, outcome) (rate("
                           f"kvmtrace_vm_create_duration_seconds_bucket{{{S}}}"
                           f"[$__rate_interval])))", "p50 {{outcome}}")], unit="s"),
        timeseries("KVM_CREATE_VM calls by outcome", "Accepted and rejected creates per "
                   "second, all selected hosts.",
                   [target(rate("kvmtrace_vm_create_duration_seconds_count", "outcome"),
                           "{{outcome}}")]),

        row("Probe health"),
        table("Probe plan per host", "Every planned point with the mechanism that attached "
              "it (none: not attached; /api/plan and the landing page say why).",
              [target(f"max by (instance, probe, mechanism) "
                      f"(kvmtrace_probe_attached{{{S}}})", instant=True)],
              rename={"Value": "attached"}, yes_no=["attached"]),
        timeseries("Calls at each probe point (host-wide)", "kvmtrace_probe_calls_total: "
                   "exact whatever processes do (names folded or not), by result.",
                   [target(rate("kvmtrace_probe_calls_total", "instance, probe, result"),
                           "{{instance}} {{probe}} {{result}}")]),
        timeseries("Type checks by function probes", "kvm_arch_init_vm and "
                   "*_is_vm_type_supported calls and those that said no: only on kernels "
                   "where function probes (kprobes, fentry) attach.",
                   [target(rate("kvmtrace_vm_type_checks_total", "probe, vm_type_name"),
                           "{{probe}} {{vm_type_name}}"),
                    target(rate("kvmtrace_vm_type_check_rejected_total",
                                "probe, vm_type_name"), "said no: {{probe}} {{vm_type_name}}")],
                   w=24),

        row("Exporter health"),
        timeseries("Events lost and throttled, counts dropped", "Per host, per interval. "
                   "Events lost/throttled only thin the live stream and /api/rejections; "
                   "counts, calls and totals dropped make counters inexact; processes not "
                   "followed lose their VM start.",
                   [target(inc(f"kvmtrace_{m}_total", "instance"), f"{{{{instance}}}} {m}")
                    for m in ("events_lost", "events_throttled", "counts_dropped",
                              "calls_dropped", "totals_dropped", "procs_dropped",
                              "decode_errors", "live_lines_dropped")], unit="short"),
        timeseries("Series folded, shares exceeded", "Per-process attribution given up to "
                   "bound memory (sums stay exact): names folded into comm=\"other\" "
                   "(--max-series, --series-ttl), calls past a process's share of the counts "
                   "map, live entries folded early, retirement passes skipped.",
                   [target(inc(f"kvmtrace_{m}_total", "instance"), f"{{{{instance}}}} {m}")
                    for m in ("names_folded", "counts_over_share", "live_entries_folded",
                              "retire_errors")], unit="short"),
        timeseries("Scrape health", "up and scrape duration from Prometheus; "
                   "kvmtrace_collect_success 0 when the BPF maps could not be read (partial "
                   "output); scrape errors by kind (none on a healthy host).",
                   [target(f"up{{{S}}}", "{{instance}} up"),
                    target(f"kvmtrace_collect_success{{{S}}}", "{{instance}} maps read"),
                    target(f"scrape_duration_seconds{{{S}}}", "{{instance}} scrape seconds"),
                    target(inc("kvmtrace_scrape_errors_total", "instance, kind"),
                           "{{instance}} errors {{kind}}")], unit="short"),
        table("Build info", "kvmtrace version, bcc version and kernel per host.",
              [target(f"max by (instance, version, bcc_version, kernel) "
                      f"(kvmtrace_build_info{{{S}}})", instant=True)],
              rename={"Value": "info"}),
    ]


def layout(items: list[dict]) -> list[dict]:
    """Ids and positions: left to right in a 24-column grid, a new line when full."""
    x = y = line_h = 0
    out = []
    for i, p in enumerate(items, 1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            y, x, line_h = y + line_h, 0, 0
        out.append({**p, "id": i, "gridPos": {"x": x, "y": y, "w": w, "h": h}})
        x, line_h = x + w, max(line_h, h)
        if p["type"] == "row":
            y, x, line_h = y + h, 0, 0
    return out


def variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query,
            "includeAll": True, "multi": True, "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def dashboard() -> dict:
    return {
        "title": "kvmtrace: KVM VM starts and VM-type dispatch",
        "uid": "kvmtrace-vm-types",
        "description": "kvmtrace serve: rejected VM starts, host readiness "
                       "per VM type, confidential launch, probe and exporter health.",
        "tags": ["kvm", "ebpf", "kvmtrace"],
        "schemaVersion": 39, "version": 2, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}},
            variable("job", "Job", "label_values(kvmtrace_build_info, job)"),
            variable("instance", "Host",
                     'label_values(kvmtrace_build_info{job=~"$job"}, instance)'),
        ]},
        "annotations": {"list": []},
        "links": [],
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"ERROR: {OUT} is not what dashboards/build.py makes: run it", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print("usage: dashboards/build.py [--check]", file=sys.stderr)
        return 2
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
