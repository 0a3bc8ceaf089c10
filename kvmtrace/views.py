"""Text views shared by the commands: the probe-plan table and event lines."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from kvmtrace import plan as planmod
from kvmtrace import tables
from kvmtrace.decode import Event
from kvmtrace.loader import Attachment


def plan_rows(attachments: Sequence[Attachment]) -> list[list[str]]:
    return [[a.point.name, a.mechanism, "yes" if a.attached else "NO",
             (f"{a.point.target}: " if a.attached and a.point.target else "") + a.reason]
            for a in attachments]


def plan_table(attachments: Sequence[Attachment]) -> str:
    rows = [["PROBE", "MECHANISM", "ATTACHED", "DETAIL"], *plan_rows(attachments)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows)


def wall_time(ts_ns: int, now: float | None = None, mono_ns: int | None = None) -> float:
    """bpf_ktime_get_ns() (CLOCK_MONOTONIC) → seconds since the epoch."""
    now = time.time() if now is None else now
    mono_ns = time.monotonic_ns() if mono_ns is None else mono_ns
    return now - (mono_ns - ts_ns) / 1e9


def describe_result(ev: Event, arch: str) -> str:
    if ev.probe == planmod.CREATE_VM:
        return f"fd={ev.result}" if ev.result >= 0 else str(ev.result)
    if ev.probe == planmod.VM_TYPES_QUERY:
        if ev.result < 0:
            return str(ev.result)
        names = [tables.vm_type_name(t, arch) for t in tables.vm_types_in_mask(ev.result)]
        return f"{ev.result:#x}({'|'.join(names) or 'none'})"
    if ev.layer == "type_check":
        return "true" if ev.result else "false"
    return str(ev.result)


HEADER = ["PID", "COMM", "PROBE", "VMTYPE", "NAME", "OUTCOME", "RESULT", "ERRNO", "LAT(us)"]
_FMT = "{:<7} {:<16} {:<38} {:>6} {:<12} {:<8} {:<16} {:<7} {:>8}"


def event_header(show_time: bool) -> str:
    head = _FMT.format(*HEADER)
    return ("TIME     " + head) if show_time else head


def event_line(ev: Event, arch: str, show_time: bool) -> str:
    query = ev.probe == planmod.VM_TYPES_QUERY
    line = _FMT.format(
        ev.pid, ev.comm, ev.probe,
        "-" if query else ev.vm_type, "-" if query else ev.vm_type_name,
        "REJECTED" if ev.rejected else "ok", describe_result(ev, arch), ev.errno or "-",
        f"{ev.duration_ns / 1000:.1f}" if ev.duration_ns else "-")
    if show_time:
        line = time.strftime("%H:%M:%S ", time.localtime(wall_time(ev.ts_ns))) + line
    return line


def event_json(ev: Event, arch: str) -> str:
    data = ev.to_json()
    data["time"] = round(wall_time(ev.ts_ns), 6)
    data["result_text"] = describe_result(ev, arch)
    return json.dumps(data, sort_keys=True)
