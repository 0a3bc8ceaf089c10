"""Decode: raw map keys and event bytes into typed records.

Pure: takes the plan (probe ids) and the architecture (VM type names) as
parameters. Values it does not know render as ``unknown:N``, never raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvmtrace import plan as planmod
from kvmtrace import tables
from kvmtrace.contract import (
    EVENT,
    PROBE_PROCESS_END,
    PROBE_VM_TYPES_QUERY,
    VM_TYPE_OTHER,
    RawCount,
    RawTotal,
)

_MEMO_MAX = 4096  # entries of each Decoder memo before it is cleared


# The bucket of VM types above contract.VM_TYPE_BUCKET_MAX in the totals (its label).
OTHER_TYPE = "other"


def vm_type_label(vm_type: int) -> str:
    """A VM type as a label value: the number, or "other" for the totals' bucket of
    types above VM_TYPE_BUCKET_MAX (their raw values are in the count keys and events)."""
    return OTHER_TYPE if vm_type == VM_TYPE_OTHER else str(vm_type)


class DecodeError(ValueError):
    pass


@dataclass(frozen=True)
class Verdict:
    """What one call's result means: did the kernel say no, and with which errno."""

    rejected: bool
    errno: str | None  # "EINVAL"; None when the call did not fail with an errno


class Key(NamedTuple):
    """One decoded count key: the labels of a live map entry (``pid`` set) or of a
    series folded over processes (``pid`` None). A NamedTuple (immutable, compared by
    value): hashing it is C-speed, and a scrape looks up each folded series by it."""

    pid: int | None
    comm: str
    probe: str
    layer: str
    vm_type: int
    vm_type_name: str
    result: int
    rejected: bool
    errno: str | None
    verdicts: int
    detail: int  # count_key.detail: a firmware status, or the last signal


class CountRecord(NamedTuple("CountRecord", [*Key.__annotations__.items(), ("count", int)])):
    """A live map entry: its decoded Key's fields, in Key's order, then its count."""

    __slots__ = ()

    def key(self, with_pid: bool = True) -> Key:
        """The decoded key; ``with_pid`` False: the series folded over processes."""
        return Key(self.pid if with_pid else None, *self[1:len(Key._fields)])


class Event(NamedTuple("Event", [*Key.__annotations__.items(), ("tid", int), ("ts_ns", int),
                                  ("duration_ns", int), ("fd", int), ("status", int)])):
    """One completed call from the live stream: its decoded Key's fields (in Key's
    order), then the thread, the return time, the call's duration (0: entry not seen;
    a process end: its time since first seen), the fd (KVM_MEMORY_ENCRYPT_OP; -1 not
    known) and the whole firmware status word (KVM_MEMORY_ENCRYPT_OP)."""

    __slots__ = ()

    def to_json(self) -> dict:
        return self._asdict()


class Decoder:
    """Decodes with one plan and one architecture's VM-type table."""

    def __init__(self, plan: planmod.Plan, arch: str):
        self._points = plan.by_id()
        self._arch = arch
        # count_labels() memos (pure functions of their keys; cleared when large).
        self._comms: dict[bytes, str] = {}
        self._results: dict[tuple[int, int], tuple[str, str, bool, str | None]] = {}

    def point(self, probe_id: int) -> tuple[str, str, str]:
        """(name, layer, returns) of a probe id; unknown ids stay visible."""
        p = self._points.get(probe_id)
        if p is None:
            return tables.unknown(probe_id), "unknown", planmod.RETURNS_INT
        return p.name, p.layer, p.returns

    def verdict(self, returns: str, result: int) -> Verdict:
        if returns == planmod.RETURNS_BOOL:
            return Verdict(result == 0, None)
        if returns in (planmod.RETURNS_EXIT, planmod.RETURNS_NONE):
            return Verdict(False, None)
        if result < 0:
            return Verdict(True, tables.errno_name(-result))
        return Verdict(False, None)

    def vm_type_name(self, vm_type: int) -> str:
        if vm_type == VM_TYPE_OTHER:
            return OTHER_TYPE
        return tables.vm_type_name(vm_type, self._arch)

    def total(self, raw: RawTotal) -> tuple[tuple[str, str, str, str], int]:
        """A host-wide total's labels (probe, vm_type, vm_type_name, result) and count;
        result: "ok", an errno name, or "true"/"false" for a bool point."""
        probe_id, vm_type, result, n = raw
        name, _, returns = self.point(probe_id)
        if returns == planmod.RETURNS_BOOL:
            text = "true" if result else "false"
        elif returns in (planmod.RETURNS_EXIT, planmod.RETURNS_NONE) or result >= 0:
            text = "ok"
        else:
            text = tables.errno_name(-result)
        if probe_id in (PROBE_VM_TYPES_QUERY, PROBE_PROCESS_END):
            return (name, "", "", text), n  # no VM type (a process end's is its mask)
        return (name, vm_type_label(vm_type), self.vm_type_name(vm_type), text), n

    def count(self, raw: RawCount) -> CountRecord:
        tgid, probe_id, vm_type, result, verdicts, detail, comm, value = raw
        name, layer, returns = self.point(probe_id)
        v = self.verdict(returns, result)
        return CountRecord(
            pid=tgid, comm=tables.escape_comm(comm), probe=name, layer=layer,
            vm_type=vm_type, vm_type_name=self.vm_type_name(vm_type), result=result,
            rejected=v.rejected, errno=v.errno, verdicts=verdicts, detail=detail, count=value,
        )

    def count_labels(self, key: tuple[int, int, int, int, int, int, bytes]) -> Key:
        """count() of a raw map key without its value: its Key (what a per-key cache
        keeps). Same values as count(); the comm and verdict decodings are memoized."""
        tgid, probe_id, vm_type, result, verdicts, detail, comm = key
        decoded = self._results.get((probe_id, result))
        if decoded is None:
            if len(self._results) >= _MEMO_MAX:
                self._results.clear()
            name, layer, returns = self.point(probe_id)
            v = self.verdict(returns, result)
            decoded = self._results[probe_id, result] = (name, layer, v.rejected, v.errno)
        text = self._comms.get(comm)
        if text is None:
            if len(self._comms) >= _MEMO_MAX:
                self._comms.clear()
            text = self._comms[comm] = tables.escape_comm(comm)
        name, layer, rejected, errno = decoded
        return Key(tgid, text, name, layer, vm_type, self.vm_type_name(vm_type), result,
                   rejected, errno, verdicts, detail)

    def event(self, data: bytes) -> Event:
        if len(data) < EVENT.size:
            raise DecodeError(f"event of {len(data)} bytes, expected {EVENT.size}")
        ts, dur, vm_type, result, tgid, tid, probe_id, verdicts, detail, fd, status, comm = \
            EVENT.unpack_from(data)
        name, layer, returns = self.point(probe_id)
        v = self.verdict(returns, result)
        return Event(
            ts_ns=ts, duration_ns=dur, pid=tgid, tid=tid, comm=tables.escape_comm(comm),
            probe=name, layer=layer, vm_type=vm_type, vm_type_name=self.vm_type_name(vm_type),
            result=result, rejected=v.rejected, errno=v.errno, verdicts=verdicts,
            detail=detail, fd=fd - (1 << 32) if fd >= 1 << 31 else fd, status=status,
        )
