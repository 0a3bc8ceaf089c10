"""Runtime: ties a loaded session to decode and aggregate, under one lock.

Views (collector, serve, trace) read through this object only. It is
constructed with everything it uses, so tests hand it a recorded source.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from kvmtrace.aggregate import Aggregator, per_process
from kvmtrace.contract import RawCount
from kvmtrace.decode import CountRecord, DecodeError, Decoder, Event, Key

log = logging.getLogger(__name__)

class Source(Protocol):
    """What a loaded program offers (kvmtrace.reader.Reader)."""

    def read_counts(self) -> list[RawCount]: ...
    def delete_counts(self, raws: list[RawCount]) -> None: ...
    def health(self) -> dict[str, int]: ...
    def read_latency(self) -> tuple[list[tuple[int, int, int]], list[int]]: ...


def proc_pids(proc: str = "/proc") -> set[int]:
    return {int(n) for n in os.listdir(proc) if n.isdigit()}


class Runtime:
    def __init__(self, source: Source, decoder: Decoder,
                 aggregator: Aggregator | None = None,
                 live_pids: Callable[[], set[int]] = proc_pids,
                 series_ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.source = source
        self.decoder = decoder
        self.aggregator = aggregator or Aggregator()
        self._live_pids = live_pids
        self._series_ttl = series_ttl  # exited names unseen this long fold into "other"
        self._clock = clock
        self._lock = threading.Lock()
        self.decode_errors = 0
        self.retire_errors = 0  # retirement passes skipped: /proc could not be listed

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
            read = self.source.read_counts()
            raws = [raw for raw in read if raw[0] not in live]
            pairs = [(raw, self.decoder.count(raw)) for raw in raws]
            dead = self.aggregator.retire([r for _, r in pairs], live, now)
            dead_ids = {id(r) for r in dead}
            self.source.delete_counts([raw for raw, r in pairs if id(r) in dead_ids])
            live_comms = {self.decoder.count_labels(raw[:6]).comm for raw in read
                          if raw[0] in live}
            self.aggregator.expire(now, self._series_ttl, live_comms)
            return len(dead)

    def totals(self, with_pid: bool = False) -> Counter[Key]:
        with self._lock:
            return self.aggregator.totals([r for _, r in self._records()], with_pid)

    def raw_counts(self) -> tuple[list[RawCount], list[Key], list[int]]:
        """The live map's raw counts (undecoded: Decoder.count_labels() decodes a
        key), and the exited residual's series and counts as two parallel lists.
        What a scrape reads, with no per-entry work (see the collector's caches)."""
        with self._lock:
            raws = self.source.read_counts()
            exited, counts = self.aggregator.exited()
        return raws, exited, counts

    def processes(self) -> list[dict]:
        with self._lock:
            return per_process(r for _, r in self._records())

    def latency(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        return self.source.read_latency()

    def health(self) -> dict[str, int]:
        h = dict(self.source.health())
        h["decode_errors"] = self.decode_errors
        h["retire_errors"] = self.retire_errors
        h["exited_processes"] = self.aggregator.exited_processes
        h["names_folded"] = self.aggregator.budget.folded
        return h

    def decode_event(self, data: bytes) -> Event | None:
        try:
            return self.decoder.event(data)
        except DecodeError:
            self.decode_errors += 1
            return None
