"""A live tracing session, shared by serve, trace and explain.

start (the loader child attaches; this process keeps only fds) -> runtime (decode and
aggregate over the reader) -> stitcher (events into attempts) -> the event stream ->
a poll loop until SIGINT/SIGTERM or a duration -> close (detach). Each command only
says what to do with an event and with a finished attempt.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable

from kvmtrace import facts as factsmod
from kvmtrace import handoff as handoffmod
from kvmtrace import kernellog
from kvmtrace import plan as planmod
from kvmtrace.aggregate import Aggregator
from kvmtrace.attempts import Attempt, Stitcher
from kvmtrace.decode import Decoder, Event
from kvmtrace.reader import Reader
from kvmtrace.runtime import Runtime


class LiveError(Exception):
    """The session cannot start; one line for the user."""


class Stop:
    """SIGINT/SIGTERM set a flag; the poll loop sees it within one poll."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())


def _no_words(pid: int, hold: bool = False) -> str:
    return "not read: serve --no-vmm-words"


class Live:
    def __init__(self, facts: factsmod.HostFacts, reader: Reader, stop: Stop,
                 aggregator: Aggregator | None = None, series_ttl: float = 3600.0,
                 recent_starts: int = 100,
                 kernel_log: tuple[kernellog.KernelLog | None, str | None] = (None, None),
                 words: bool = True, owner_labels: tuple[str, ...] = ()):
        self.facts = facts
        self.reader = reader
        self.plan: planmod.Plan = reader.plan
        self.attachments = reader.attachments
        self.runtime = Runtime(reader, Decoder(self.plan, facts.arch), aggregator,
                               series_ttl=series_ttl, arch=facts.arch,
                               vendor_modules=tuple(facts.vendor_modules),
                               recent_starts=recent_starts,
                               params=facts.evidence.params if facts.evidence else {},
                               kernel_log=kernel_log[0], kernel_log_error=kernel_log[1],
                               owner_labels=owner_labels,
                               **({} if words else {"resolve_stderr": _no_words}))
        self.stitcher = Stitcher(reader.attachments, facts.arch,
                                 host_mask=facts.kvm.vm_types_mask,
                                 vendor_modules=facts.vendor_modules)
        self.stop = stop

    @classmethod
    def start(cls, strict: bool, filter_pid: int = 0, stop: Stop | None = None,
              aggregator: Aggregator | None = None, series_ttl: float = 3600.0,
              recent_starts: int = 100, words: bool = True,
              owner_labels: tuple[str, ...] = ()) -> Live:
        """Gather, plan, compile and attach in the loader child (kvmtrace.handoff).

        Fails when no point attached, or with ``strict`` when any point that is not
        optional is missing;
        warns when /dev/kvm is absent. ``stop`` is made first when not given, so a
        signal during the (seconds-long) compile is not lost. ``words``: resolve and
        read back the VMMs' stderr (kvmtrace.vmmwords); ``owner_labels``: the metrics'
        owner labels (serve --metrics.labels)."""
        stop = stop or Stop()
        try:
            facts, reader = handoffmod.start(filter_pid)
        except handoffmod.HandoffError as exc:
            raise LiveError(str(exc)) from None
        if not facts.kvm.present:
            print(f"WARNING: {facts.kvm.error}: no VM can be created until KVM is loaded",
                  file=sys.stderr)
        attached = [a for a in reader.attachments if a.attached]
        missing = [a for a in reader.attachments if not a.attached]
        if not attached:
            reader.close()
            raise LiveError("no probe point could attach here: "
                            + "; ".join(f"{a.point.name}: {a.reason}" for a in missing[:3])
                            + " (run 'kvmtrace doctor')")
        required = [a for a in missing if not a.point.optional]
        if strict and required:
            reader.close()
            raise LiveError("--strict: not attached: "
                            + "; ".join(f"{a.point.name} ({a.reason})" for a in required))
        # The kernel's log, opened now: kernel.dmesg_restrict asks CAP_SYSLOG at open, and
        # serve drops its capabilities next. Read from its start (the oldest record the
        # ring holds), so the bring-up lines are there too.
        log, why = kernellog.open_log()
        if log is None:
            print(f"WARNING: {why}: failed starts will not carry the kernel's lines",
                  file=sys.stderr)
        return cls(facts, reader, stop, aggregator, series_ttl, recent_starts, (log, why),
                   words, owner_labels)

    def open_events(self, on_event: Callable[[Event, list[Attempt]], None]) -> None:
        """Decode each event, feed it to the stitcher, and hand both to ``on_event``
        (with the attempts it completed; a KVM_CREATE_VM's own attempt is the last)."""
        def handle(data: bytes) -> None:
            ev = self.runtime.decode_event(data)
            if ev is not None:
                on_event(ev, self._owned(self.stitcher.feed(ev)))

        self.reader.open_events(handle)

    def _owned(self, attempts: list[Attempt]) -> list[Attempt]:
        """The attempts with their process's cgroup and owner (kvmtrace.runtime)."""
        for a in attempts:
            a.cgroup, a.owner = self.runtime.owner(a.pid)
        return attempts

    def run(self, poll_ms: int, on_attempt: Callable[[Attempt], None],
            duration: float | None = None, tick: Callable[[], None] | None = None,
            drain: bool = True) -> None:
        """Poll until SIGINT/SIGTERM or ``duration``; hand chains no KVM_CREATE_VM
        claimed to ``on_attempt``; call ``tick`` after each poll. ``drain``: at the
        end, read what is already queued and flush every open chain."""
        deadline = time.monotonic() + duration if duration else None
        while not self.stop.event.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.reader.poll(poll_ms)
            for a in self._owned(self.stitcher.flush(time.monotonic_ns())):
                on_attempt(a)
            self.runtime.poll_kernel_log()
            if tick is not None:
                tick()
        if drain:
            self.reader.poll(0)
            for a in self._owned(self.stitcher.flush()):
                on_attempt(a)

    def lost_warning(self) -> None:
        lost = self.reader.health()["events_lost"]
        if lost:
            print(f"WARNING: {lost} events lost (buffer full)", file=sys.stderr)

    def close(self) -> None:
        self.reader.close()
        self.runtime.release()
        if self.runtime.kernel_log is not None:
            self.runtime.kernel_log.close()
