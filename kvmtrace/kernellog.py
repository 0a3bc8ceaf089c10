"""The kernel's own explanation: /dev/kmsg, read as it comes, kept where it explains VM
starts.

Each read(2) of /dev/kmsg returns one record, ``PRI,SEQ,TS_USEC,FLAGS;TEXT`` (then
dictionary lines that start with a space; Documentation/ABI/testing/dev-kmsg). The
sequence numbers say what was missed: a gap -- the kernel's ring overwrote records
before they were read (read(2) then fails once with EPIPE) -- is counted, never
skipped silently, and no record is read twice. Only the lines of the subsystems that
decide VM starts are kept (:func:`subsystem`: kvm, kvm_amd, kvm_intel, the SEV firmware
driver ccp and SEV/SNP, TDX and its SEAMCALLs, and WARN splats whose call trace names
kvm), at most ``keep`` of them; what that bound pushes out is counted too.

A failed start is given the lines logged in its window (:meth:`KernelLog.between`: by
sequence number, from the last record read when the process was first seen to the last
one read when its start is judged -- never by timestamp: the log's clock is
sched_clock, which drifts from CLOCK_MONOTONIC as NTP slews the latter); doctor the
bring-up lines. Parsing is pure; :class:`KernelLog` is handed an open fd (opened while
the process may: kernel.dmesg_restrict asks CAP_SYSLOG at open, not at read).
"""

from __future__ import annotations

import bisect
import errno
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

KMSG = "/dev/kmsg"
KEEP = 512  # relevant lines kept
LINE_MAX = 300  # characters of one kept line
MARKS = 256  # (time, position) marks kept: when each position was reached
RECORD_MAX = 8192  # bytes of one read (a record is at most 1 KiB of text plus its dictionary)

# The subsystems that decide VM starts, by the prefix the kernel gives their lines
# (pr_fmt), tried in order; a WARN splat is judged by its call trace (_Splat).
_SUBSYSTEMS = (
    ("kvm_amd", re.compile(r"^(?:kvm_amd: |SVM: |AMD-Vi: .*SNP)")),
    ("kvm_intel", re.compile(r"^(?:kvm_intel: |VMX: |kvm: .*(?:VMX|EPT))")),
    ("tdx", re.compile(r"^(?:virt/tdx: |tdx: |TDX: )|SEAMCALL|\bTDX module\b")),
    ("sev", re.compile(r"^(?:ccp \S+: |ccp: |SEV: |SEV-SNP: |SEV-ES: |SNP: |psp: )|"
                       r"\bSEV(?:-ES|-SNP)?\b.*(?:firmware|INIT|failed|enabled|disabled)|"
                       r"\bRMP\b")),
    ("kvm", re.compile(r"^(?:kvm: |KVM: |kvm\[\d+\]: |kvm \d+: |kvm_\w+: )")),
)
_WARNING = re.compile(r"^WARNING: CPU: \d+ PID: \d+ at (\S+)")
_KVM_FRAME = re.compile(r"\[kvm(?:_amd|_intel)?\]|\bkvm_\w+\+0x|/kvm/")
_SPLAT_MAX = 64  # records of one WARN splat looked at


@dataclass(frozen=True)
class Record:
    seq: int
    ts_us: int  # CLOCK_MONOTONIC-based, microseconds since boot
    level: int  # syslog(2) level, 0 emergency .. 7 debug
    text: str

    def line(self) -> str:
        return f"[{self.ts_us / 1e6:12.6f}] {self.text}"[:LINE_MAX]


def parse(raw: bytes) -> Record | None:
    """One /dev/kmsg record; None for what is not one."""
    head, sep, rest = raw.partition(b";")
    if not sep:
        return None
    fields = head.split(b",")
    if len(fields) < 3 or not all(f.isdigit() for f in fields[:3]):
        return None
    text = rest.split(b"\n", 1)[0].decode("utf-8", "replace")
    return Record(int(fields[1]), int(fields[2]), int(fields[0]) & 7, text)


def subsystem(text: str) -> str | None:
    """Which start-deciding subsystem a line is from (None: another one)."""
    for name, pattern in _SUBSYSTEMS:
        if pattern.search(text):
            return name
    return None


@dataclass(frozen=True)
class Line:
    """A kept line: its record, and the subsystem that made it relevant."""

    seq: int
    ts_us: int
    subsystem: str
    text: str  # Record.line(): "[seconds] text"


class _Splat:
    """A WARN splat in the making: kept (its WARNING line and the kvm frames of its
    call trace) when any of its lines names kvm."""

    def __init__(self, rec: Record, where: str) -> None:
        self.first = rec
        self.kvm = bool(_KVM_FRAME.search(where)) or "/kvm/" in where
        self.frames: list[str] = []
        self.records = 1

    def add(self, rec: Record) -> bool:
        """Take the next record; False when the splat has ended."""
        self.records += 1
        if rec.text.startswith("---[ end trace") or self.records > _SPLAT_MAX:
            return False
        if _KVM_FRAME.search(rec.text):
            self.kvm = True
            if len(self.frames) < 8:
                self.frames.append(rec.text.strip())
        return True

    def line(self) -> Line | None:
        if not self.kvm:
            return None
        text = self.first.line() + (f" (call trace: {'; '.join(self.frames)})"
                                    if self.frames else "")
        return Line(self.first.seq, self.first.ts_us, "warn", text[:LINE_MAX * 2])


class KernelLog:
    """Reads an open /dev/kmsg fd (O_NONBLOCK) to its end at every :meth:`poll`, keeping
    the relevant lines; ``missed`` counts records the kernel overwrote before they were
    read (sequence gaps), ``evicted`` relevant lines the ``keep`` bound pushed out.

    Each poll that moved the position marks when (``clock``: CLOCK_MONOTONIC, the clock
    of the BPF events' ts_ns): :meth:`position_at` turns an event's time into the
    position the log had then, whenever the event is read."""

    def __init__(self, fd: int, keep: int = KEEP,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._fd = fd
        self._clock = clock
        self._marks: deque[tuple[int, int]] = deque(maxlen=MARKS)
        self.lines: deque[Line] = deque(maxlen=keep)
        self.last_seq: int | None = None
        self.read = self.missed = self.evicted = 0
        self._splat: _Splat | None = None

    def _take(self, rec: Record) -> None:
        if self.last_seq is not None and rec.seq > self.last_seq + 1:
            self.missed += rec.seq - self.last_seq - 1
        if self.last_seq is not None and rec.seq <= self.last_seq:
            return  # read already (never twice)
        self.last_seq = rec.seq
        self.read += 1
        if self._splat is not None:
            if self._splat.add(rec):
                return
            done, self._splat = self._splat.line(), None
            if done is not None:
                self._keep(done)
            if rec.text.startswith("---[ end trace"):
                return
        m = _WARNING.match(rec.text)
        if m:
            self._splat = _Splat(rec, m.group(1))
            return
        name = subsystem(rec.text)
        if name is not None:
            self._keep(Line(rec.seq, rec.ts_us, name, rec.line()))

    def _keep(self, line: Line) -> None:
        if len(self.lines) == self.lines.maxlen:
            self.evicted += 1
        self.lines.append(line)

    def _records(self) -> Iterator[Record]:
        while True:
            try:
                raw = os.read(self._fd, RECORD_MAX)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # overwritten under us: the next read resumes (a seq gap)
                raise
            if not raw:
                return
            rec = parse(raw)
            if rec is not None:
                yield rec

    def poll(self) -> int:
        """Read every record written since the last poll; returns how many."""
        n = 0
        for rec in self._records():
            self._take(rec)
            n += 1
        if self.last_seq is not None and (not self._marks
                                          or self._marks[-1][1] != self.last_seq):
            # Every record up to last_seq was logged before now.
            self._marks.append((self._clock(), self.last_seq))
        return n

    def position_at(self, t_ns: int) -> int | None:
        """The position the log had reached by ``t_ns`` as far as the polls tell (every
        line after it was logged after the last poll before ``t_ns``: from a little
        before ``t_ns`` on, never later); None: before the oldest mark kept (from the
        first line)."""
        i = bisect.bisect_right([t for t, _ in self._marks], t_ns)
        return self._marks[i - 1][1] if i else None

    def between(self, after_seq: int | None, upto_seq: int | None) -> list[str]:
        """The kept lines with a sequence number after ``after_seq`` and up to
        ``upto_seq`` (None: from the first / to the last read): a start's kernel lines."""
        lo = -1 if after_seq is None else after_seq
        hi = self.last_seq if upto_seq is None else upto_seq
        return [ln.text for ln in self.lines if hi is not None and lo < ln.seq <= hi]

    def close(self) -> None:
        os.close(self._fd)


def open_log(path: str = KMSG, keep: int = KEEP) -> tuple[KernelLog | None, str | None]:
    """(the log, None), or (None, why it cannot be read: one line with the fix)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return None, (f"{path}: {exc.strerror}: kernel.dmesg_restrict asks CAP_SYSLOG "
                          "to open it (grant it, or run as root; it is opened before the "
                          "capabilities are dropped)")
        return None, f"{path}: {exc.strerror or exc}"
    log = KernelLog(fd, keep)
    log.poll()  # the ring as it stands: the first mark, so windows start from now on
    return log, None
