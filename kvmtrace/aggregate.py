"""Aggregate: fold per-process counts into series. Pure.

The kernel keeps exact counts per (pid, comm, probe, vm type, result). When a
process exits its entries are folded here into an "exited" residual (keyed
without pid) and deleted from the map, so the map does not grow with every
short-lived process while no count is lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from kvmtrace.decode import CountRecord, Key
from kvmtrace.plan import CREATE_VM, Layer


class Aggregator:
    """Holds the counts of exited processes; everything else is passed in."""

    def __init__(self) -> None:
        self._exited: Counter[Key] = Counter()  # keys folded over processes (pid None)
        self.exited_processes = 0

    def retire(self, records: Iterable[CountRecord], live_pids: set[int]) -> list[CountRecord]:
        """Fold the records of processes not in ``live_pids``; return them for deletion."""
        dead = [r for r in records if r.pid not in live_pids]
        for r in dead:
            self._exited[r.key(with_pid=False)] += r.count
        self.exited_processes += len({r.pid for r in dead})
        return dead

    def exited(self) -> tuple[list[Key], list[int]]:
        """The exited residual: its series and their counts, as two parallel lists."""
        return list(self._exited), list(self._exited.values())

    def totals(self, live: Iterable[CountRecord], with_pid: bool = False) -> Counter[Key]:
        """Live map records plus the exited residual, summed per series."""
        out: Counter[Key] = Counter(self._exited)
        for r in live:
            out[r.key(with_pid)] += r.count
        return out


def per_process(live: Iterable[CountRecord]) -> list[dict]:
    """Per-process summary of the live map: attempts and rejections by type."""
    procs: dict[tuple[int, str], dict] = {}
    for r in live:
        p = procs.setdefault((r.pid, r.comm), {
            "pid": r.pid, "comm": r.comm, "vm_create_attempts": 0, "vm_create_rejected": 0,
            "vm_types_queries": 0, "type_checks": 0, "type_check_rejected": 0, "types": {},
        })
        if r.probe == CREATE_VM:
            p["vm_create_attempts"] += r.count
            t = p["types"].setdefault(r.vm_type_name, {"accepted": 0, "rejected": 0})
            if r.rejected:
                p["vm_create_rejected"] += r.count
                t["rejected"] += r.count
            else:
                t["accepted"] += r.count
        elif r.layer == Layer.IOCTL:
            p["vm_types_queries"] += r.count
        else:
            p["type_checks"] += r.count
            if r.rejected:
                p["type_check_rejected"] += r.count
    return sorted(procs.values(), key=lambda p: (p["pid"], p["comm"]))
