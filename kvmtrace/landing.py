"""The exporter's status page at /: one host's probe plan, VM type readiness, newest
failed starts and rejected creates, and live per-process counts, as HTML. Pure: the
rows come in as the exporter hands them to its JSON APIs; everything shown is
HTML-escaped."""

from __future__ import annotations

import html
from collections.abc import Sequence

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}"
    "th{background:#eee}.bad{background:#fdd}.good{background:#dfd}.na{color:#777}"
    "nav a{margin-right:1em}small{color:#555}")
# How many rejected starts and attempts the page shows (/api/rejections has all).
REJECTIONS_SHOWN = 20


def _table(head: list[str], rows: list[list], classes: list[str] | None = None,
           id_: str = "") -> str:
    esc = html.escape
    if not rows:
        return f"<p id='{id_}'><small>none</small></p>"
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join(
        f"<tr class='{c}'>" + "".join(f"<td>{esc(str(v))}</td>" for v in r) + "</tr>"
        for r, c in zip(rows, classes or [""] * len(rows), strict=True))
    return f"<table id='{id_}'><tr>{th}</tr>{trs}</table>"


def _readiness(readiness: Sequence[dict]) -> str:
    rows = [[t["vm_type"], t["name"], t["verdict"], t.get("failed_check") or "",
             t.get("reason") or ""] for t in readiness]
    classes = [{"ready": "good", "not_ready": "bad"}.get(t["verdict"], "na")
               for t in readiness]
    return _table(["vm_type", "name", "verdict", "failed check", "why"], rows, classes,
                  "readiness")


def _owner(owner: dict) -> str:
    """vm, unit and pod of a start's or an attempt's owner (kvmtrace.owners), where known."""
    keys = (("vm", "vm"), ("unit", "unit"), ("pod_uid", "pod"), ("namespace", "namespace"))
    return ", ".join(f"{label} {owner[k]}" for k, label in keys if owner.get(k))


def _matches(row: dict, text: str) -> bool:
    """A start, attempt or process row whose comm, VM name or owner contains ``text``."""
    return any(text in str(v) for v in (row.get("comm"), row.get("vm_name"),
                                         *(row.get("owner") or {}).values()) if v)


def _rejections(rejections: Sequence[dict]) -> tuple[str, str]:
    """The tables of the newest failed starts and rejected attempts."""
    shown = list(rejections)[:REJECTIONS_SHOWN]
    starts = [[r["pid"], r["comm"], r.get("vm_name") or "", _owner(r.get("owner") or {}),
               r["stage"], r["reason"],
               r.get("cause") or "", r["requested_type"], r.get("summary") or "",
               r.get("cause_hint") or r.get("hint") or ""]
              for r in shown if r.get("kind") == "start" and r.get("outcome") == "failed"]
    attempts = [[r["pid"], r["comm"], _owner(r.get("owner") or {}),
                 "not observed" if r.get("vm_type") is None
                 else f"{r['vm_type']} {r.get('vm_type_name') or ''}",
                 r.get("errno") or "", r.get("reason") or "", r.get("explanation") or "",
                 r.get("hint") or ""]
                for r in shown if r.get("kind") == "attempt"]
    return (_table(["pid", "comm", "VM name", "owner", "stage", "reason", "cause", "requested",
                    "summary", "fix"], starts, ["bad"] * len(starts), "starts"),
            _table(["pid", "comm", "owner", "VM type", "errno", "reason", "explanation", "hint"],
                   attempts, ["bad"] * len(attempts), "attempts"))


def _processes(processes: list[dict]) -> str:
    rows = [[p["pid"], p["comm"], p["vm_create_attempts"], p["vm_create_rejected"],
             ", ".join(f"{k}: {v['accepted']} ok / {v['rejected']} rejected"
                       for k, v in sorted(p["types"].items())),
             p["vm_types_queries"], p["type_checks"], p["type_check_rejected"]]
            for p in processes]
    return _table(["pid", "comm", "KVM_CREATE_VM", "rejected", "by VM type",
                   "VM_TYPES queries", "type checks", "checks said no"], rows,
                  id_="processes")


def page(title: str, plan_rows: list[list[str]], processes: list[dict],
         telemetry_path: str = "/metrics", readiness: Sequence[dict] = (),
         rejections: Sequence[dict] = (), filter_text: str = "") -> bytes:
    """The status page: links, the probe plan, per-type readiness (``readiness``:
    TypeReadiness.to_json(), the collector's chains, as doctor), the newest rejected
    starts and attempts with their explanation (``rejections``: Start.to_json() and
    Attempt.to_json(), newest first), and the live per-process counts; ``filter_text``
    (``/?filter=TEXT``): only the starts, attempts and processes whose comm, VM name or
    owner contains it."""
    esc = html.escape
    plan_cls = ["good" if r[2] == "yes" else "na" for r in plan_rows]
    if filter_text:
        rejections = [r for r in rejections if _matches(r, filter_text)]
        processes = [p for p in processes if _matches(p, filter_text)]
    starts, attempts = _rejections(rejections)
    body = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>"
        f"<nav><a href='{esc(telemetry_path)}'>Metrics ({esc(telemetry_path)})</a>"
        "<a href='/api/rejections'>/api/rejections</a><a href='/api/plan'>/api/plan</a>"
        "<a href='/api/processes'>/api/processes</a></nav>"
        "<h2>Probe points</h2>"
        + _table(["probe", "mechanism", "attached", "detail"], plan_rows, plan_cls, "plan")
        + "<h2>VM types on this host</h2>"
        "<p><small>The same chains as <code>kvmtrace doctor</code>: the verdict, and the "
        "check that decided it where the type is not ready.</small></p>"
        + _readiness(readiness)
        + f"<h2>Recent failed VM starts</h2><p><small>latest judged first, at most "
        f"{REJECTIONS_SHOWN} of the last kept (--rejections)"
        + (f"; comm, VM name or owner containing <code>{esc(filter_text)}</code> "
           "(<a href='/'>all</a>)" if filter_text else
           "; <code>/?filter=TEXT</code> shows those of a VM, unit, pod or process name")
        + "</small></p>"
        + starts
        + "<h2>Recent rejected KVM_CREATE_VM</h2>"
        + attempts
        + "<h2>Processes (live)</h2>"
        + _processes(processes)
        + "</body></html>"
    )
    return body.encode()
