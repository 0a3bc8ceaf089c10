"""Runtime: ties a loaded session to decode and aggregate, under one lock.

Views (collector, serve, trace) read through this object only. It is
constructed with everything it uses, so tests hand it a recorded source.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from typing import Protocol

from kvmtrace import cgroups, vmm, vmmwords
from kvmtrace import owners as ownersmod
from kvmtrace import starts as startsmod
from kvmtrace.aggregate import OTHER, Aggregator, OwnerKey, folded, per_process, series_name
from kvmtrace.contract import (
    PROBE_CREATE_VM,
    PROBE_PROCESS_END,
    PROBE_VM_TYPES_QUERY,
    RAW_KEY_LEN,
    RawCount,
)
from kvmtrace.decode import CountRecord, DecodeError, Decoder, Event, Key
from kvmtrace.kernellog import KernelLog
from kvmtrace.plan import PROCESS_END as PROCESS_END_NAME
from kvmtrace.starts import Start

log = logging.getLogger(__name__)

class Source(Protocol):
    """What a loaded program offers (kvmtrace.reader.Reader)."""

    def read_counts(self) -> list[RawCount]: ...
    def delete_counts(self, raws: list[RawCount]) -> None: ...
    def health(self) -> dict[str, int]: ...
    def read_latency(self) -> tuple[list[tuple[int, int, int]], list[int]]: ...


def proc_pids(proc: str = "/proc") -> set[int]:
    return {int(n) for n in os.listdir(proc) if n.isdigit()}


# Probe ids whose first record makes a process "seen": what its command line asked
# for is looked up then (kvmtrace.vmm).
_FOLLOWED = (PROBE_CREATE_VM, PROBE_VM_TYPES_QUERY, PROBE_PROCESS_END)
RECENT_STARTS = 100  # failed starts kept for /api/rejections (serve: --rejections)
WINDOWS_MAX = 4096  # followed processes whose stderr and log position are kept
FILES_HELD_MAX = 256  # of those, whose stderr file is held open (the rest: by name)
START_KERNEL_LINES = 20  # kernel log lines given to one failed start


def request_of(source: object, pid: int) -> vmm.VmmRequest:
    """What process ``pid`` asked for: its /proc command line while it lives, else the
    one the kernel kept at its execve (source.exec_args), else not known."""
    raw = vmm.read_cmdline(pid)
    via = "/proc/PID/cmdline"
    if not raw:
        exec_args = getattr(source, "exec_args", None)
        raw = exec_args(pid) if exec_args is not None else None
        via = "argv at execve"
    if not raw:
        return vmm.NOT_KNOWN
    req = vmm.parse_cmdline(raw)
    return vmm.VmmRequest(req.kind, req.name, req.requested_type,
                          f"{req.evidence} ({via})")


class Runtime:
    def __init__(self, source: Source, decoder: Decoder,
                 aggregator: Aggregator | None = None,
                 live_pids: Callable[[], set[int]] = proc_pids,
                 series_ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 request: Callable[[int], vmm.VmmRequest] | None = None,
                 arch: str = "x86_64", vendor_modules: tuple[str, ...] = (),
                 recent_starts: int = RECENT_STARTS, fold_live_at: float = 0.5,
                 params: dict[str, str] | None = None,
                 kernel_log: KernelLog | None = None, kernel_log_error: str | None = None,
                 resolve_stderr: Callable[..., vmmwords.Stderr | str] = vmmwords.resolve,
                 read_words: Callable[..., tuple[str | None, str]] = vmmwords.words,
                 cgroup_of: Callable[[int, int | None], str | None] | None = None,
                 owner_labels: tuple[str, ...] = ()):
        self.source = source
        self.decoder = decoder
        self._request = request or (lambda pid: request_of(source, pid))
        self._fold_live_at = fold_live_at  # fraction of the counts map: fold live entries
        self._arch = arch
        self._vendor_modules = vendor_modules
        self._params = params or {}  # vendor module parameters (kvmtrace.causes)
        # The kernel's log (kvmtrace.kernellog), or why it cannot be read, and where it
        # stood when each followed process was first seen (the start of its window).
        self.kernel_log = kernel_log
        self._kernel_log_error = kernel_log_error
        self._first_seq: dict[int, int | None] = {}
        # Where each followed process's stderr goes, resolved when first seen alive.
        self._resolve_stderr, self._read_words = resolve_stderr, read_words
        self._stderr: dict[int, vmmwords.Stderr | str] = {}
        # And its cgroup v2 path, read then (who owns it: kvmtrace.owners).
        self._cgroup_of = cgroup_of or cgroups.Locator.of_host()
        self._cgroups: dict[int, tuple[int | None, str | None]] = {}  # pid -> (id, path)
        # The owner labels its series are exported with (serve --metrics.labels), their
        # values fixed when first asked for (so a series never moves between label sets).
        self.owner_labels = owner_labels
        self._owner_keys: dict[int, OwnerKey] = {}
        # pid -> (cgroup path, owner) as first seen (_owner); the label values made of it
        self._owners: dict[int, tuple[str | None, dict]] = {}
        self._requests: dict[int, vmm.VmmRequest] = {}  # followed pids seen so far
        self._failures: Counter[tuple[str, ...]] = Counter()
        self.recent_starts: deque[Start] = deque(maxlen=recent_starts)
        self.on_start: Callable[[Start], None] | None = None  # every stitched start
        self.aggregator = aggregator or Aggregator()
        self._live_pids = live_pids
        self._series_ttl = series_ttl  # exited names unseen this long fold into "other"
        self._clock = clock
        self._lock = threading.Lock()
        self.decode_errors = 0
        self.retire_errors = 0  # retirement passes skipped: /proc could not be listed
        # The kernel counts its inserts into the counts map (health counts_inserted);
        # inserts less this are the map's fill, re-based at every pass (filling()).
        self._not_in_map = 0

    def _records(self) -> list[tuple[tuple, CountRecord]]:
        return [(raw, self.decoder.count(raw)) for raw in self.source.read_counts()]

    def retire_exited(self) -> int:
        """Fold the counts of exited processes out of the kernel map; returns how many."""
        with self._lock:
            # Processes first, counts second: a process already gone from /proc
            # can no longer add to its entries, so what is read below is final.
            # (Read first, and a process that exits between the read and the
            # listing would lose the calls it made after the read.)
            try:
                live = self._live_pids()
            except OSError as exc:  # EMFILE, ENFILE, ENOMEM: skip this pass, lose nothing
                if not self.retire_errors:
                    log.warning("cannot list processes (%s): exited processes are folded "
                                "at a later pass (kvmtrace_retire_errors_total counts "
                                "skipped passes)", exc)
                self.retire_errors += 1
                return 0
            now = self._clock()
            inserted = self.source.health().get("counts_inserted")
            read = self.source.read_counts()
            self._see(read)
            # A map filling up (a storm of names or processes): fold the entries of live
            # processes too, so there is room for everybody's next calls. Their sums stay
            # exact (the folded residual plus their new entries); their pid is lost.
            capacity = getattr(self.source, "counts_capacity", 0)
            fold_live = bool(capacity) and len(read) >= capacity * self._fold_live_at
            raws = read if fold_live else [raw for raw in read if raw[0] not in live]
            pairs = [(raw, self.decoder.count(raw)) for raw in raws]
            owners = {pid: self._owner_key(pid) for pid in {r.pid for _, r in pairs}}
            self._stitch([r for _, r in pairs if r.pid not in live], owners)
            dead = self.aggregator.retire([r for _, r in pairs], live, now, fold_live,
                                          owners.__getitem__)
            dead_ids = {id(r) for r in dead}
            gone = [raw for raw, r in pairs if id(r) in dead_ids]
            self.source.delete_counts(gone)
            if inserted is not None:  # what stays in the map: the read less what went
                self._not_in_map = inserted - (len(read) - len(gone))
            live_names = {series_name(self.decoder.count_labels(raw[:RAW_KEY_LEN]).comm,
                                      self._owner_key(raw[0])) for raw in read if raw[0] in live}
            self.aggregator.expire(now, self._series_ttl, live_names)
            return len(dead)

    def filling(self) -> bool:
        """The counts map is as full as the point where a pass folds live entries too
        (the kernel's inserts less what passes took out): time for a pass before the
        next one is due, so a burst of short-lived processes does not fill it."""
        capacity = getattr(self.source, "counts_capacity", 0)
        inserted = self.source.health().get("counts_inserted")
        if not capacity or inserted is None:
            return False
        return inserted - self._not_in_map >= capacity * self._fold_live_at

    def _see(self, read: list[RawCount]) -> None:
        """Look up what each newly seen followed process asked for (once per pid)."""
        known = self._requests
        for pid in {raw[0] for raw in read if raw[1] in _FOLLOWED} - known.keys():
            known[pid] = self._request(pid)
            self._first_sight(pid)

    def _first_sight(self, pid: int) -> None:
        """Where a newly seen followed process's stderr goes, while it (perhaps) lives
        (its file held open while fewer than FILES_HELD_MAX are), and its cgroup."""
        if pid not in self._stderr:
            if len(self._stderr) >= WINDOWS_MAX:
                vmmwords.release(self._stderr.pop(next(iter(self._stderr))))
            held = sum(1 for w in self._stderr.values()
                       if isinstance(w, vmmwords.Stderr) and w.fd is not None)
            self._stderr[pid] = self._resolve_stderr(pid, hold=held < FILES_HELD_MAX)
        if pid not in self._cgroups:
            if len(self._cgroups) >= WINDOWS_MAX:
                self._cgroups.pop(next(iter(self._cgroups)))
            read = getattr(self.source, "cgroup_id", None)
            cid = read(pid) if read is not None else None
            self._cgroups[pid] = (cid, self._cgroup_of(pid, cid))

    def _settled_cgroup(self, pid: int, cid: int | None, path: str | None
                        ) -> tuple[int | None, str | None]:
        """A process's (cgroup id, path) as first seen, with the id asked for again where
        the kernel had not kept it yet: on kprobe hosts the type checks' events of its
        first KVM_CREATE_VM reach the reader before that ioctl returns, where the kernel
        starts following it (and stores the id)."""
        if cid is None:
            read = getattr(self.source, "cgroup_id", None)
            cid = read(pid) if read is not None else None
            if cid is not None and path is None:
                path = self._cgroup_of(pid, cid)
        return cid, path

    def release(self) -> None:
        """Close the VMMs' stderr files still held (the session ends)."""
        with self._lock:
            for where in self._stderr.values():
                vmmwords.release(where)
            self._stderr.clear()

    def owner_keys(self, pids: list[int]) -> list[OwnerKey]:
        """Each process's owner labels' values (serve --metrics.labels; all () when none
        are exported): what the collector exports a live map entry under."""
        if not self.owner_labels:
            return [()] * len(pids)
        with self._lock:
            return list(map(self._owner_key, pids))

    def _owner_key(self, pid: int) -> OwnerKey:
        """A process's owner labels' values, from its owner as first seen (_owner),
        kept so that each scrape costs one lookup per entry."""
        if not self.owner_labels:
            return ()
        key = self._owner_keys.get(pid)
        if key is None:
            owner = self._owner(pid)[1]
            if len(self._owner_keys) >= WINDOWS_MAX:
                self._owner_keys.pop(next(iter(self._owner_keys)))
            key = self._owner_keys[pid] = ownersmod.metric_label_values(
                owner, self._requests.get(pid, vmm.NOT_KNOWN).name, self.owner_labels)
        return key

    def owner(self, pid: int) -> tuple[str | None, dict]:
        """A followed process's cgroup path as first seen and who owns it (with its
        command line's VM name: a KubeVirt VM), for its attempts; (None, {}) unknown."""
        with self._lock:
            return self._owner(pid)

    def _owner(self, pid: int) -> tuple[str | None, dict]:
        """A process's cgroup path and owner from its cgroup and command line as first
        seen (seen now if it was not yet; the kernel's id asked for again where no path
        was found), then fixed: decoded once per process."""
        known = self._owners.get(pid)
        if known is None:
            if pid not in self._requests:
                self._requests[pid] = self._request(pid)
                self._first_sight(pid)
            cid, path = self._cgroups.get(pid, (None, None))
            if path is None:
                path = self._settled_cgroup(pid, cid, path)[1]
            if len(self._owners) >= WINDOWS_MAX:
                self._owners.pop(next(iter(self._owners)))
            known = self._owners[pid] = (path, startsmod.owner_of(
                path, self._requests[pid].name))
        return known

    def _stitch(self, dead: list[CountRecord], owners: dict[int, OwnerKey]) -> None:
        """Stitch the records of exited processes into starts; count the failures (under
        their process's owner labels, ``owners``)."""
        by_pid: dict[int, list[CountRecord]] = defaultdict(list)
        for r in dead:
            by_pid[r.pid].append(r)
        name_of = self.aggregator.budget.name
        for pid, records in by_pid.items():
            owner = owners.get(pid, ())
            self._owner_keys.pop(pid, None)
            self._owners.pop(pid, None)
            request = self._requests.pop(pid, vmm.NOT_KNOWN)
            after = self._first_seq.pop(pid, -1)
            where = self._kernel_stderr(pid, self._stderr.pop(pid, None))
            cgroup_id, cgroup = self._settled_cgroup(pid, *self._cgroups.pop(pid, (None, None)))
            for start in startsmod.stitch(records, request, self._arch, self._vendor_modules,
                                          self._params):
                start = startsmod.with_owner(start, cgroup, cgroup_id)
                if start.failed:
                    start = self._with_kernel_lines(start, after)
                    start = self._with_words(start, where)
                    if name_of(series_name(start.comm, owner), cost=1) == OTHER:
                        comm, owner = OTHER, folded(owner)
                    else:
                        comm = start.comm
                    labels = startsmod.failure_labels(start, comm)
                    self._failures[(labels[0], *owner, *labels[1:])] += 1
                    self.recent_starts.append(start)
                if self.on_start is not None:
                    self.on_start(start)
            vmmwords.release(where)

    def _kernel_stderr(self, pid: int, where: vmmwords.Stderr | str | None
                       ) -> vmmwords.Stderr | str | None:
        """Where /proc said its stderr went, with what the kernel read of its fd 2 when
        it was first followed (the reader's vmm_stderr; kvmtrace.vmmwords.combine)."""
        read = getattr(self.source, "vmm_stderr", None)
        return vmmwords.combine(where, read(pid) if read is not None else None)

    def _with_kernel_lines(self, start: Start, after: int | None) -> Start:
        """A failed start with the kernel's lines of its window (or why none): from where
        the log stood when the process was first seen to now (its end, and the moments
        after it, before this pass judged it)."""
        if self.kernel_log is None:
            note = f"kernel log not read: {self._kernel_log_error or 'not opened'}"
            return dataclasses.replace(start, kernel_log_note=note)
        if after == -1:
            return dataclasses.replace(start, kernel_log_note=(
                "its window is not known (none of its calls' events was seen: events lost "
                "or throttled)"))
        self.kernel_log.poll()
        lines = self.kernel_log.between(after, None)
        note = None if lines else "no line of kvm, kvm_amd, kvm_intel, SEV or TDX in its window"
        return dataclasses.replace(start, kernel_log=lines[-START_KERNEL_LINES:],
                                   kernel_log_note=note)

    def _with_words(self, start: Start, where: vmmwords.Stderr | str | None) -> Start:
        """A failed start with the VMM's own last words (or where they went and why
        they cannot be had); a cause of vmm_config says them."""
        text, note = self._read_words(where, start.pid, start.vm_name)
        out = dataclasses.replace(start, vmm_words=text, vmm_words_note=note)
        last = next((ln for ln in (text or "").splitlines()[::-1] if ln.strip()), None)
        if last and start.cause == "vmm_config":
            out = dataclasses.replace(out, cause_evidence=f"{start.cause_evidence}; it said: "
                                                          f"{last[:300]}")
        return out

    def poll_kernel_log(self) -> None:
        """Read what the kernel logged since the last poll (the live loop's tick)."""
        if self.kernel_log is not None:
            with self._lock:
                self.kernel_log.poll()

    def start_failures(self) -> dict[tuple[str, ...], int]:
        """kvmtrace_vm_start_failures_total: (comm, owner labels' values, stage, reason,
        cause, requested type) -> failed starts (names past the series budget as
        comm="other")."""
        with self._lock:
            return dict(self._failures)

    def totals(self, with_pid: bool = False) -> Counter[Key]:
        with self._lock:
            return self.aggregator.totals([r for _, r in self._records()], with_pid)

    def raw_counts(self) -> tuple[list[RawCount], list[tuple[Key, OwnerKey]], list[int]]:
        """The live map's raw counts (undecoded: Decoder.count_labels() decodes a
        key), and the exited residual's series and counts as two parallel lists.
        What a scrape reads, with no per-entry work (see the collector's caches)."""
        with self._lock:
            raws = self.source.read_counts()
            exited, counts = self.aggregator.exited()
        return raws, exited, counts

    def totals_by_labels(self) -> dict[tuple[str, str, str, str], int]:
        """kvmtrace_probe_calls_total: host-wide, exact, whatever processes do."""
        read = getattr(self.source, "read_totals", None)
        out: Counter[tuple[str, str, str, str]] = Counter()
        for raw in read() if read is not None else ():
            labels, n = self.decoder.total(raw)
            out[labels] += n
        return dict(out)

    def processes(self) -> list[dict]:
        """Live processes' counts (kvmtrace.aggregate.per_process), each with its cgroup
        and owner where known (as a start has them: kvmtrace.starts.owner_of)."""
        with self._lock:
            rows = per_process(r for _, r in self._records())
            for p in rows:
                path = self._cgroups.get(p["pid"], (None, None))[1]
                request = self._requests.get(p["pid"])
                p["cgroup"] = path
                p["owner"] = startsmod.owner_of(path, request.name if request else None)
            return rows

    def latency(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        return self.source.read_latency()

    def health(self) -> dict[str, int]:
        h = dict(self.source.health())
        h["decode_errors"] = self.decode_errors
        h["retire_errors"] = self.retire_errors
        h["exited_processes"] = self.aggregator.exited_processes
        h["live_entries_folded"] = self.aggregator.live_folded
        h["names_folded"] = self.aggregator.budget.folded
        h["kernel_log_missed"] = self.kernel_log.missed if self.kernel_log else 0
        h["kernel_log_evicted"] = self.kernel_log.evicted if self.kernel_log else 0
        return h

    def decode_event(self, data: bytes) -> Event | None:
        try:
            ev = self.decoder.event(data)
        except DecodeError:
            self.decode_errors += 1
            return None
        if ev.probe != PROCESS_END_NAME and ev.pid not in self._first_seq:
            # First seen (the kernel woke us for its first KVM call): where its stderr
            # goes, while it perhaps lives, and where the kernel's log stood at that call
            # (its window's start, however late this event is read).
            self._first_sight(ev.pid)
            if len(self._first_seq) >= WINDOWS_MAX:
                self._first_seq.pop(next(iter(self._first_seq)))
            self.poll_kernel_log()
            self._first_seq[ev.pid] = (self.kernel_log.position_at(ev.ts_ns)
                                       if self.kernel_log else None)
        return ev
