"""``kvmtrace top``'s table: one row per VM or workload, from what `serve` hands out.

The rows come from the two lists /api/processes and /api/rejections give (the same
dicts the runtime makes, so `top` on its own session and `top --from URL` see the same):
live processes with their creates per VM type, and failed starts with their cause. A
row is keyed by who owns it (kvmtrace.owners: the VM, else the pod, else the unit), else
by its process. Pure: sorting, filtering, rates against the previous refresh, and the
text lines; the terminal is kvmtrace.commands.top's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SORTS = {"f": "failures", "r": "rejected", "a": "accepted", "n": "name", "p": "pid"}
HEADER = ("VM/WORKLOAD", "UNIT", "PID", "COMM", "OK", "REJ", "REJ/S", "FAILED", "LAST CAUSE",
          "BY TYPE")
WIDTHS = (24, 28, 8, 16, 6, 6, 6, 6, 26, 0)


@dataclass
class Row:
    key: str  # the VM, pod or unit that owns it, or "pid N"
    unit: str = ""
    pid: int | None = None
    comm: str = ""
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    last_cause: str = ""
    types: dict[str, list[int]] = field(default_factory=dict)  # name -> [ok, rejected]
    rate: float = 0.0  # rejected creates per second since the last refresh

    def by_type(self) -> str:
        return " ".join(f"{t}:{ok}/{rej}" for t, (ok, rej) in sorted(self.types.items()))


def workload(owner: dict | None, pid: int | None) -> tuple[str, str]:
    """(the row's key, its unit) for a process or start's owner."""
    owner = owner or {}
    if owner.get("vm"):
        ns = owner.get("namespace")
        return (f"{ns}/{owner['vm']}" if ns else owner["vm"]), owner.get("unit", "")
    if owner.get("pod_uid"):
        return f"pod {owner['pod_uid']}", owner.get("unit", "")
    if owner.get("unit"):
        return owner["unit"], owner["unit"]
    return f"pid {pid}", ""


def rows(processes: list[dict], rejections: list[dict]) -> list[Row]:
    """The table's rows: live processes' creates, and failed starts (newest first in
    ``rejections``: the first seen per row is its last cause)."""
    out: dict[str, Row] = {}

    def row(owner: dict | None, pid: int, comm: str) -> Row:
        key, unit = workload(owner, pid)
        r = out.setdefault(key, Row(key, unit))
        r.pid, r.comm = r.pid or pid, r.comm or comm
        return r

    for p in processes:
        r = row(p.get("owner"), p["pid"], p["comm"])
        for name, t in p.get("types", {}).items():
            ok_rej = r.types.setdefault(name, [0, 0])
            ok_rej[0] += t["accepted"]
            ok_rej[1] += t["rejected"]
        r.accepted += p["vm_create_attempts"] - p["vm_create_rejected"]
        r.rejected += p["vm_create_rejected"]
    for s in rejections:
        if s.get("kind") != "start" or s.get("outcome") != "failed":
            continue
        r = row(s.get("owner"), s["pid"], s["comm"])
        r.failed += 1
        r.last_cause = r.last_cause or (s.get("cause") or "")
    return list(out.values())


def with_rates(now: list[Row], before: dict[str, int], seconds: float) -> list[Row]:
    """``now`` with each row's rejected creates per second since ``before`` (key ->
    rejected at the last refresh)."""
    for r in now:
        if seconds > 0 and r.key in before:
            r.rate = max(0, r.rejected - before[r.key]) / seconds
    return now


def arrange(table: list[Row], sort: str = "f", text: str = "") -> list[Row]:
    """Filtered on ``text`` (in key, unit or comm) and sorted by SORTS[sort]."""
    if text:
        table = [r for r in table if text in r.key or text in r.unit or text in r.comm]
    orders = {
        "f": lambda r: (-r.failed, -r.rejected, r.key),
        "r": lambda r: (-r.rejected, -r.failed, r.key),
        "a": lambda r: (-r.accepted, r.key),
        "n": lambda r: (r.key,),
        "p": lambda r: (r.pid or 0, r.key),
    }
    return sorted(table, key=orders.get(sort, orders["f"]))


def _cell(value: object, width: int) -> str:
    text = str(value)
    if not width:
        return text
    return (text if len(text) <= width else text[:width - 1] + "~").ljust(width)


def lines(table: list[Row], sort: str = "f", text: str = "", width: int = 200) -> list[str]:
    """The header and one line per row, cut to ``width`` columns."""
    head = " ".join(_cell(h, w) for h, w in zip(HEADER, WIDTHS, strict=True))
    out = [head[:width]]
    for r in arrange(table, sort, text):
        cells = (r.key, r.unit or "-", r.pid or "-", r.comm, r.accepted, r.rejected,
                 f"{r.rate:.1f}", r.failed, r.last_cause or "-", r.by_type() or "-")
        out.append(" ".join(_cell(c, w) for c, w in zip(cells, WIDTHS, strict=True))[:width])
    return out


def status(sort: str, text: str, source: str) -> str:
    """The line above the table: what it is sorted by, the filter, where it reads."""
    keys = " ".join(f"{k}:{v}" for k, v in SORTS.items())
    return (f"kvmtrace top -- {source} -- sort {SORTS.get(sort, 'failures')}"
            + (f", filter {text!r}" if text else "") + f" -- keys {keys} /:filter q:quit")
