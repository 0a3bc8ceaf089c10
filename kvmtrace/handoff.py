"""Compile and attach in a short-lived child process; keep only file descriptors here.

libbcc links LLVM and clang. A process that loads it keeps ~10 MiB of their relocated
pages (private, dirty: no swap can take them) and the heap the compile leaves, for as
long as it lives. A long-running exporter needs none of that once the programs are
attached: an attachment lives as long as its perf-event or BPF-link fd is open, and a
map is read with the bpf(2) commands libbpf wraps (libbpf.so.1, which bcc itself uses,
links neither LLVM nor clang).

So :func:`start` runs ``python -m kvmtrace.handoff`` (the *loader child*), which
gathers the host facts, loads the plan with bcc (:func:`kvmtrace.loader.load`), sends
the maps this side reads and every attachment fd it holds over a Unix socket
(SCM_RIGHTS) with a JSON description, and exits without detaching. This side rebuilds
the plan from the facts (a pure function), and :class:`FdSession` reads the maps and
the event buffer. Closing it closes the fds: that detaches. (``FdSession.over()`` reads
a program loaded in this process the same way: doctor's and the tests' one-shot loads.)

A compile error that makes bcc end the child (bcc 0.26 calls exit(1)) becomes a one-line
error here instead of the end of the exporter.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmtrace import facts as factsmod
from kvmtrace import plan as planmod
from kvmtrace.loader import Attachment, LoadError, Options, RawCount

# The maps this side reads, by their name in bpf/kvmtrace.bpf.c.
MAPS = ("counts", "health", "create_latency", "create_latency_sum", "events")
# What keeps an attachment alive: kprobe/tracepoint perf events, fentry/fexit links.
ATTACHMENT_FDS = ("anon_inode:[perf_event]", "anon_inode:bpf_link")
SCM_MAX_FD = 253  # include/net/scm.h: fds per SCM_RIGHTS message
_LEN = struct.Struct("<I")
HEALTH = ("counts_dropped", "events_lost", "calls_dropped", "events_throttled")


class HandoffError(Exception):
    """The loader child could not deliver a loaded program; one line for the user."""


class CountKey(ct.Structure):
    """struct count_key in bpf/kvmtrace.bpf.c."""

    _fields_ = [("tgid", ct.c_uint32), ("probe", ct.c_uint32), ("vm_type", ct.c_uint64),
                ("result", ct.c_int64), ("verdicts", ct.c_uint32), ("pad", ct.c_uint32),
                ("comm", ct.c_char * 16)]


_COUNT_KEY = struct.Struct("<IIQqII16s")  # CountKey, for reading a batch buffer


# ---- the child ----------------------------------------------------------------

def _send(sock: socket.socket, payload: dict, fds: Sequence[int] = ()) -> None:
    data = json.dumps(payload).encode()
    sock.sendall(_LEN.pack(len(data)) + data)
    for i in range(0, len(fds), SCM_MAX_FD):
        socket.send_fds(sock, [b"F"], list(fds[i:i + SCM_MAX_FD]))


def _attachment_fds() -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") in ATTACHMENT_FDS:
                out.append(int(name))
    return sorted(out)


def child(sock: socket.socket) -> int:
    """The loader child: read the request, load, send the fds. Never detaches."""
    from kvmtrace import loader

    size = _LEN.unpack(sock.recv(_LEN.size, socket.MSG_WAITALL))[0]
    req = json.loads(sock.recv(size, socket.MSG_WAITALL))
    facts = factsmod.gather()
    problem = loader.preflight(facts)
    if problem:
        _send(sock, {"error": problem, "facts": facts.to_json()})
        return 0
    plan = planmod.make_plan(facts)
    opts = Options(self_tgid=req["self_tgid"], filter_tgid=req["filter_tgid"],
                   use_ringbuf=facts.ringbuf, use_task_storage=facts.task_storage)
    try:
        session = loader.load(plan, opts)
    except LoadError as exc:
        _send(sock, {"error": str(exc), "facts": facts.to_json()})
        return 0
    maps = session.map_fds(MAPS)
    fds = [m["fd"] for m in maps.values()]
    for i, m in enumerate(maps.values()):
        m["fd"] = i  # sent as the i-th fd
    keep = _attachment_fds()
    _send(sock, {"facts": facts.to_json(), "maps": maps, "ringbuf": session.ringbuf,
                 "attachments": [[a.attached, a.error] for a in session.attachments],
                 "keep": len(keep)}, fds + keep)
    return 0


# ---- this side: libbpf ----------------------------------------------------------

_SAMPLE_RB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_SAMPLE_PB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_void_p, ct.c_uint32)
_LOST_PB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_uint64)


def libbpf() -> ct.CDLL:
    """libbpf.so.1 with the prototypes used here (libbpf 1.x: -errno on failure)."""
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    vp, u32p = ct.c_void_p, ct.POINTER(ct.c_uint32)
    for name, args in (("bpf_map_lookup_elem", [ct.c_int, vp, vp]),
                       ("bpf_map_get_next_key", [ct.c_int, vp, vp]),
                       ("bpf_map_delete_elem", [ct.c_int, vp]),
                       ("bpf_map_lookup_batch", [ct.c_int, vp, vp, vp, vp, u32p, vp]),
                       ("bpf_map_delete_batch", [ct.c_int, vp, u32p, vp]),
                       ("libbpf_num_possible_cpus", []),
                       ("ring_buffer__poll", [vp, ct.c_int]),
                       ("ring_buffer__consume", [vp]),
                       ("perf_buffer__poll", [vp, ct.c_int])):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ct.c_int
    lib.ring_buffer__new.argtypes = [ct.c_int, _SAMPLE_RB, vp, vp]
    lib.ring_buffer__new.restype = vp
    lib.perf_buffer__new.argtypes = [ct.c_int, ct.c_size_t, _SAMPLE_PB, _LOST_PB, vp, vp]
    lib.perf_buffer__new.restype = vp
    lib.ring_buffer__free.argtypes = [vp]
    lib.perf_buffer__free.argtypes = [vp]
    return lib


@dataclass
class FdSession:
    """A loaded program, through its map fds and the attachment fds that keep it
    attached: counts, latency, health and the event stream via libbpf."""

    plan: planmod.Plan
    attachments: list[Attachment]
    maps: dict[str, dict]
    keep: list[int]  # attachment fds: open as long as the session
    ringbuf: bool
    lib: ct.CDLL = field(default_factory=libbpf, repr=False)
    perf_lost: int = 0
    _buffer: int | None = None
    _batch: tuple | None = field(default=None, repr=False)
    _callbacks: list = field(default_factory=list, repr=False)

    owner: object = field(default=None, repr=False)  # closed with this session

    @classmethod
    def over(cls, session) -> FdSession:
        """Read an in-process kvmtrace.loader.Session's maps (duplicated fds; closing
        this closes them and then the bcc session)."""
        maps = session.map_fds(MAPS)
        for m in maps.values():
            m["fd"] = os.dup(m["fd"])
        return cls(session.plan, session.attachments, maps, [], session.ringbuf,
                   owner=session)

    def __post_init__(self) -> None:
        self.ncpus = self.lib.libbpf_num_possible_cpus()
        if self.ncpus <= 0:
            raise HandoffError(f"libbpf cannot count the possible CPUs: "
                               f"{os.strerror(-self.ncpus)}")
        if (self.maps["counts"]["key_size"], self.maps["counts"]["value_size"]) != (
                ct.sizeof(CountKey), 8):
            raise HandoffError("the counts map's key is not kvmtrace.handoff.CountKey "
                               "(bpf/kvmtrace.bpf.c and this module disagree)")

    def _fd(self, name: str) -> int:
        return self.maps[name]["fd"]

    def _lookup(self, name: str, index: int, per_cpu: bool = False) -> list[int]:
        n = self.ncpus if per_cpu else 1
        key, value = ct.c_uint32(index), (ct.c_uint64 * n)()
        if self.lib.bpf_map_lookup_elem(self._fd(name), ct.byref(key), value) != 0:
            return [0]
        return list(value)

    def read_counts(self) -> list[RawCount]:
        fd, n = self._fd("counts"), self.maps["counts"]["max_entries"]
        if self._batch is None:  # allocated once: no 0.5 MB malloc/free per scrape
            self._batch = ((CountKey * n)(), (ct.c_uint64 * n)())
        keys, values = self._batch
        token_in, token_out, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        ksize, total = ct.sizeof(CountKey), 0
        # BPF_MAP_LOOKUP_BATCH (5.6+): the whole map in a few syscalls.
        while True:
            count.value = n - total
            res = self.lib.bpf_map_lookup_batch(
                fd, ct.byref(token_in) if total else None, ct.byref(token_out),
                ct.byref(keys, ksize * total), ct.byref(values, 8 * total), ct.byref(count),
                None)
            err = ct.get_errno()
            if res != 0 and err != errno.ENOENT:  # EINVAL (before 5.6), ENOSPC
                return [(k.tgid, k.probe, k.vm_type, k.result, k.verdicts, k.comm, v)
                        for k, v in self._iterate(fd)]
            total += count.value
            if res != 0 or total >= n or count.value == 0:  # ENOENT: all read
                break
            token_in.value = token_out.value
        # Straight from the buffers: no ctypes object per entry.
        counts = memoryview(values).cast("B")[:8 * total].cast("Q")
        return [(tgid, probe, vm_type, result, verdicts, comm.split(b"\0", 1)[0], c)
                for (tgid, probe, vm_type, result, verdicts, _, comm), c in zip(
                    _COUNT_KEY.iter_unpack(ct.string_at(keys, ksize * total)), counts,
                    strict=True)]

    def _iterate(self, fd: int) -> list[tuple[CountKey, int]]:
        out, prev, key = [], None, CountKey()
        value = ct.c_uint64()
        while self.lib.bpf_map_get_next_key(fd, prev, ct.byref(key)) == 0:
            if self.lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value)) == 0:
                out.append((CountKey.from_buffer_copy(key), value.value))
            prev = ct.byref(CountKey.from_buffer_copy(key))
        return out

    def delete_counts(self, raws: list[RawCount]) -> None:
        if not raws:
            return
        fd = self._fd("counts")
        keys = (CountKey * len(raws))()
        for key, (tgid, probe, vm_type, result, verdicts, comm, _) in zip(keys, raws,
                                                                            strict=True):
            key.tgid, key.probe, key.vm_type, key.result = tgid, probe, vm_type, result
            key.verdicts, key.comm = verdicts, comm
        # BPF_MAP_DELETE_BATCH stops at a key that is gone (ENOENT): skip it, go on.
        ksize, count, done = ct.sizeof(CountKey), ct.c_uint32(0), 0
        while done < len(raws):
            count.value = len(raws) - done
            res = self.lib.bpf_map_delete_batch(fd, ct.byref(keys, ksize * done),
                                                ct.byref(count), None)
            if res == 0:
                return
            if ct.get_errno() != errno.ENOENT:
                break  # no batch deletes here (count is not reliable): one at a time
            done += count.value + 1
        for key in keys[done:]:
            self.lib.bpf_map_delete_elem(fd, ct.byref(key))  # ENOENT: already gone

    def read_latency(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        """KVM_CREATE_VM latency: [(outcome, log2 slot, count)], and ns sums per outcome."""
        slots = []
        for i in range(self.maps["create_latency"]["max_entries"]):
            n = self._lookup("create_latency", i)[0]
            if n:
                slots.append((i // 64, i % 64, n))
        return slots, [self._lookup("create_latency_sum", i)[0] for i in range(2)]

    def health(self) -> dict[str, int]:
        total = [sum(self._lookup("health", i, per_cpu=True)) for i in range(len(HEALTH))]
        out = dict(zip(HEALTH, total, strict=True))
        out["events_lost"] += self.perf_lost
        return out

    def open_events(self, callback: Callable[[bytes], None]) -> None:
        fd = self._fd("events")
        if self.ringbuf:
            def sample_rb(_ctx, data, size):
                callback(ct.string_at(data, size))
                return 0

            cb = _SAMPLE_RB(sample_rb)
            buf = self.lib.ring_buffer__new(fd, cb, None, None)
            self._callbacks.append(cb)
        else:
            def sample_pb(_ctx, _cpu, data, size):
                callback(ct.string_at(data, size))

            def lost_pb(_ctx, _cpu, n):
                self.perf_lost += n

            cbs = (_SAMPLE_PB(sample_pb), _LOST_PB(lost_pb))
            buf = self.lib.perf_buffer__new(fd, 64, *cbs, None, None)
            self._callbacks.extend(cbs)  # keep the ctypes callbacks alive
        if not buf:
            raise HandoffError(f"cannot open the event {'ring' if self.ringbuf else 'perf'} "
                               f"buffer: {os.strerror(ct.get_errno())}")
        self._buffer = buf

    def poll(self, timeout_ms: int) -> None:
        if self._buffer is None:
            return
        if self.ringbuf:
            # The BPF side writes with BPF_RB_NO_WAKEUP: epoll is never told, so the
            # wait is a timer and what arrived meanwhile is consumed after it.
            self.lib.ring_buffer__poll(self._buffer, timeout_ms)  # -EINTR: caller loops
            self.lib.ring_buffer__consume(self._buffer)
        else:
            self.lib.perf_buffer__poll(self._buffer, timeout_ms)

    def close(self) -> None:
        if self._buffer is not None:
            (self.lib.ring_buffer__free if self.ringbuf else self.lib.perf_buffer__free)(
                self._buffer)
            self._buffer = None
        for fd in [*self.keep, *(m["fd"] for m in self.maps.values())]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.keep, self.maps = [], {}
        if self.owner is not None:
            self.owner.close()
            self.owner = None


# ---- this side: start the child ---------------------------------------------------

def _recv(sock: socket.socket) -> tuple[dict, list[int]]:
    head = sock.recv(_LEN.size, socket.MSG_WAITALL)
    if len(head) < _LEN.size:
        raise EOFError
    data = sock.recv(_LEN.unpack(head)[0], socket.MSG_WAITALL)
    payload = json.loads(data)
    want = len(payload.get("maps", {})) + payload.get("keep", 0)
    fds: list[int] = []
    while len(fds) < want:
        _, got, _, _ = socket.recv_fds(sock, 1, min(SCM_MAX_FD, want - len(fds)))
        if not got:
            raise EOFError
        fds.extend(got)
    return payload, fds


def _child_failure(proc: subprocess.Popen, stderr) -> str:
    rc = proc.wait()
    stderr.seek(0)
    lines = [ln.strip() for ln in stderr.read().decode(errors="replace").splitlines()
             if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    tail = f": {errors[-1]}" if errors else ""
    return f"the BPF loader process exited with status {rc} before attaching{tail}"


def start(filter_tgid: int = 0, python: str = sys.executable
          ) -> tuple[factsmod.HostFacts, FdSession]:
    """Run the loader child; returns the facts it gathered and the attached session.

    Raises HandoffError with one line (the child's preflight or load error, or how it
    died). Calls of this process are not counted (SELF_TGID is this pid)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, tempfile.TemporaryFile() as stderr:
        with theirs:
            proc = subprocess.Popen([python, "-m", "kvmtrace.handoff", str(theirs.fileno())],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        req = json.dumps({"self_tgid": os.getpid(), "filter_tgid": filter_tgid}).encode()
        try:
            ours.sendall(_LEN.pack(len(req)) + req)
            payload, fds = _recv(ours)
        except (EOFError, OSError, ValueError):
            raise HandoffError(_child_failure(proc, stderr)) from None
        proc.wait()
    facts = factsmod.HostFacts.from_json(payload["facts"])
    if "error" in payload:
        raise HandoffError(payload["error"])
    plan = planmod.make_plan(facts)
    maps = {name: {**info, "fd": fds[info["fd"]]} for name, info in payload["maps"].items()}
    keep = fds[len(maps):]
    attachments = [Attachment(p, attached, error)
                   for p, (attached, error) in zip(plan.points, payload["attachments"],
                                                   strict=True)]
    try:
        session = FdSession(plan, attachments, maps, keep, payload["ringbuf"])
    except (OSError, HandoffError) as exc:
        for fd in fds:
            os.close(fd)
        raise HandoffError(str(exc)) from None
    return facts, session


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m kvmtrace.handoff FD (run by kvmtrace itself)", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[0])) as sock:
        child(sock)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip bcc's atexit cleanup: it would detach what this side now holds.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
