"""Aggregate: fold per-process counts into series. Pure.

The kernel keeps exact counts per (pid, comm, probe, vm type, result). When a
process exits its entries are folded here into an "exited" residual (keyed
without pid) and deleted from the map, so the map does not grow with every
short-lived process while no count is lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable

from kvmtrace.decode import CountRecord, Key
from kvmtrace.plan import CREATE_VM, Layer

OTHER = "other"  # the comm of every series folded past the series budget

# A process's owner labels (serve --metrics.labels: kvmtrace.owners.METRIC_LABELS), their
# values in that order; () when none are exported.
OwnerKey = tuple[str, ...]


def series_name(comm: str, owner: OwnerKey) -> Hashable:
    """What the series budget admits or folds: the process name, with its owner labels'
    values when they are exported (a VM's or pod's series is then its own)."""
    return (comm, owner) if owner else comm


def folded(owner: OwnerKey) -> OwnerKey:
    """The owner labels of a series folded into comm="other": all empty."""
    return ("",) * len(owner)


class NameBudget:
    """Which process names get series of their own: every name first seen while fewer
    than ``max_series`` samples are exported, and no other. Later names are exported as
    ``comm="other"`` (their counts summed there, so every sum stays monotonic): no
    process can grow the exported series, or the exporter's memory, without bound. A
    name is a comm, or a (comm, owner labels' values) pair (:func:`series_name`)."""

    def __init__(self, max_series: int = 10_000, remember: int = 16_384):
        self.max_series = max_series
        self.exported = 0  # samples exported now (the collector keeps it up to date)
        self._admitted: set[Hashable] = set()
        self._folded: set[Hashable] = set()  # names already counted as folded (bounded)
        self._remember = remember
        self.folded = 0  # names folded into "other" (kvmtrace_names_folded_total)

    def name(self, comm: Hashable, exported: int | None = None, cost: int = 2) -> Hashable:
        """The name to export ``comm`` (a name) under, itself or OTHER, with ``exported``
        samples exported now (default: as the collector last said, plus what names
        admitted since cost)."""
        if comm in self._admitted or comm == OTHER:
            return comm
        if (self.exported if exported is None else exported) < self.max_series:
            self._admitted.add(comm)
            if exported is None:  # admitted between scrapes (an exited process's name):
                self.exported += cost  # the samples its records will make
            return comm
        self._count_fold(comm)
        return OTHER

    def expire(self, comm: Hashable) -> None:
        """``comm`` has not been seen for long: fold its series into "other"."""
        self._admitted.discard(comm)
        self._count_fold(comm)

    def _count_fold(self, comm: Hashable) -> None:
        if comm not in self._folded:
            if len(self._folded) >= self._remember:
                self._folded.clear()  # a name may then be counted twice; memory stays bounded
            self._folded.add(comm)
            self.folded += 1


class Aggregator:
    """Holds the counts of exited processes; everything else is passed in."""

    def __init__(self, budget: NameBudget | None = None) -> None:
        # Keys folded over processes (pid None), with their owner labels' values.
        self._exited: Counter[tuple[Key, OwnerKey]] = Counter()
        self.exited_processes = 0
        self.live_folded = 0  # entries of live processes folded early (map filling up)
        self.budget = budget or NameBudget()
        self._last_exit: dict[Hashable, float] = {}  # name -> when its last process exited

    def retire(self, records: Iterable[CountRecord], live_pids: set[int],
               now: float = 0.0, fold_live: bool = False,
               owner_of: Callable[[int], OwnerKey] = lambda pid: ()) -> list[CountRecord]:
        """Fold the records of processes not in ``live_pids`` (``fold_live``: of every
        process: the map is filling up), each under its process's owner labels
        (``owner_of``); return them for deletion. A name without series of its own (past
        the budget) is folded as "other"."""
        records = list(records)
        dead = records if fold_live else [r for r in records if r.pid not in live_pids]
        if fold_live:
            self.live_folded += sum(1 for r in dead if r.pid in live_pids)
        owners = {pid: owner_of(pid) for pid in {r.pid for r in dead}}
        # What each name's records will cost in samples (a rejected call: 2, else 1).
        cost: Counter[Hashable] = Counter()
        for r in dead:
            cost[series_name(r.comm, owners[r.pid])] += 2 if r.rejected else 1
        name_of, last = self.budget.name, self._last_exit
        for r in dead:
            key, owner = r.key(with_pid=False), owners[r.pid]
            name = series_name(key.comm, owner)
            if name_of(name, cost=cost[name]) == OTHER:
                key, owner = key._replace(comm=OTHER), folded(owner)
            else:
                last[name] = now
            self._exited[key, owner] += r.count
        self.exited_processes += len({r.pid for r in dead if r.pid not in live_pids})
        return dead

    def expire(self, now: float, ttl: float, live_names: set[Hashable]) -> int:
        """Fold into "other" the exited residual of names (:func:`series_name`) whose last
        process exited more than ``ttl`` seconds ago and that no live process has.
        Returns how many."""
        old = {c for c, t in self._last_exit.items() if now - t > ttl and c not in live_names}
        if not old:
            return 0
        merged: Counter[tuple[Key, OwnerKey]] = Counter()
        for (key, owner), n in self._exited.items():
            if series_name(key.comm, owner) in old:
                key, owner = key._replace(comm=OTHER), folded(owner)
            merged[key, owner] += n
        self._exited = merged
        for c in old:
            del self._last_exit[c]
            self.budget.expire(c)
        return len(old)

    def exited(self) -> tuple[list[tuple[Key, OwnerKey]], list[int]]:
        """The exited residual: its series (each a key and its owner labels' values) and
        their counts, as two parallel lists."""
        return list(self._exited), list(self._exited.values())

    def totals(self, live: Iterable[CountRecord], with_pid: bool = False) -> Counter[Key]:
        """Live map records plus the exited residual, summed per series (over owners)."""
        out: Counter[Key] = Counter()
        for (key, _), n in self._exited.items():
            out[key] += n
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
        elif r.layer in (Layer.PROCESS, Layer.START):
            continue  # a process's end and its start's failed calls: its start record
        else:
            p["type_checks"] += r.count
            if r.rejected:
                p["type_check_rejected"] += r.count
    return sorted(procs.values(), key=lambda p: (p["pid"], p["comm"]))


class SlotSums:
    """The scrape path's aggregation: every count read, summed into the slots its key
    maps to, incrementally.

    A key (a live map entry's raw key, or a folded Key: the two never compare equal) is
    mapped to its slots once, by the caller's ``slots_of`` (the collector: the exported
    samples it adds to, one per label set); then each read costs one dict lookup per key.
    After :meth:`sum`, ``value[i]`` is slot i's total at that read and ``active`` the
    slots it set, in the order first set. Several keys can add to one slot (e.g. two
    verdict sets, or the folded residual and a live process of the same comm)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.slots: dict[Hashable, tuple[int, ...]] = {}
        self.gen: list[int] = []  # the read that last set the value
        self.value: list[int] = []
        self._read = 0

    def sum(self, batches: Iterable[tuple[Iterable[Hashable], Iterable[int],
                                          Callable[[list[Hashable]], list[tuple[int, ...]]]]],
            most: int) -> tuple[list[int], bool]:
        """Sum (keys, counts, slots_of) batches; ``most``: an upper bound of the slots
        that can exist after this read. Returns the slots set by this read and whether
        one of them was not set by the previous read (so the caller's order changes)."""
        g = self._read = self._read + 1
        self._room(most)
        active: list[int] = []
        moved = False
        for keys, counts, slots_of in batches:
            new, moved_ = self._add(keys, counts, g, active)
            moved |= moved_
            if new:  # keys seen for the first time: their slots, all at once
                new_keys, new_counts = new
                self.slots.update(zip(new_keys, slots_of(new_keys), strict=True))
                self._add(new_keys, new_counts, g, active)
                moved = True
        return active, moved

    def forget(self, read: int, keep: Callable[[], Iterable[Hashable]], floor: int) -> None:
        """Once more than ``floor`` keys beyond the ``read`` ones just read have slots,
        keep only those of ``keep()`` (the keys read)."""
        if len(self.slots) > read + floor:
            self.slots = {key: self.slots[key] for key in keep()}

    def trim(self, n: int) -> None:
        """Only slots below ``n`` exist."""
        del self.gen[n:]
        del self.value[n:]

    def _room(self, most: int) -> None:
        self.gen.extend([-1] * (most - len(self.gen)))
        self.value.extend([0] * (most - len(self.value)))

    def _add(self, keys: Iterable[Hashable], counts: Iterable[int], g: int, active: list[int]
             ) -> tuple[tuple[list[Hashable], list[int]] | None, bool]:
        """Add each key's count to its slots (set at read ``g``, listed in ``active``).
        Returns the keys without slots yet with their counts (None when there are none),
        and whether a slot not set by the previous read is now."""
        slots, gen, value = self.slots, self.gen, self.value
        moved = False
        new_keys: list[Hashable] = []
        new_counts: list[int] = []
        for key, n in zip(keys, counts, strict=True):
            e = slots.get(key)
            if e is None:
                new_keys.append(key)
                new_counts.append(n)
                continue
            for i in e:
                if gen[i] == g:
                    value[i] += n
                else:
                    if gen[i] != g - 1:
                        moved = True
                    gen[i] = g
                    value[i] = n
                    active.append(i)
        return ((new_keys, new_counts) if new_keys else None), moved
