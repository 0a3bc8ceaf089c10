"""Reader: counts, latency, health and the event stream of a loaded program, via libbpf.

The runtime's source. It holds the map fds (and the attachment fds that keep the
programs attached) of a program loaded by the loader child (kvmtrace.handoff) or in
this process (:meth:`Reader.over`), checks each map against kvmtrace.contract as the
kernel reports it before reading it, and reads with the bpf(2) commands libbpf wraps:
no libbcc, LLVM or clang in this process. Closing it closes the fds: that detaches.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmtrace import contract
from kvmtrace import libbpf as libbpfmod
from kvmtrace import plan as planmod
from kvmtrace.contract import COUNT_KEY, COUNT_VALUE_SIZE, HEALTH, CountKey, RawCount


class ReadError(Exception):
    """The maps cannot be read as kvmtrace.contract describes them; one line."""


@dataclass
class Reader:
    """A loaded program, through its map fds and the attachment fds that keep it
    attached. ``counts_max`` and ``ringbuf_pages`` are the sizes it was loaded with
    (kvmtrace.loader.Options): the maps are checked against them."""

    plan: planmod.Plan
    attachments: list[planmod.Attachment]
    maps: dict[str, int]  # map name -> fd, every name in contract.READ_MAPS
    keep: list[int]  # attachment fds: open as long as the reader
    ringbuf: bool
    counts_max: int
    ringbuf_pages: int
    lib: ct.CDLL = field(default_factory=libbpfmod.load, repr=False)
    perf_lost: int = 0
    _buffer: int | None = None
    _batch: tuple | None = field(default=None, repr=False)
    _callbacks: list = field(default_factory=list, repr=False)

    owner: object = field(default=None, repr=False)  # closed with this session

    @classmethod
    def over(cls, session) -> Reader:
        """Read an in-process kvmtrace.loader.Session's maps (duplicated fds; closing
        this closes them and then the bcc session)."""
        maps = {name: os.dup(fd) for name, fd in session.map_fds().items()}
        try:
            return cls(session.plan, session.attachments, maps, [], session.ringbuf,
                       session.opts.counts_max, session.opts.ringbuf_pages, owner=session)
        except (OSError, ReadError):
            for fd in maps.values():
                os.close(fd)
            raise

    def __post_init__(self) -> None:
        self.ncpus = self.lib.libbpf_num_possible_cpus()
        if self.ncpus <= 0:
            raise ReadError(f"libbpf cannot count the possible CPUs: "
                            f"{os.strerror(-self.ncpus)}")
        missing = [name for name in contract.READ_MAPS
                   if name not in self.maps and name not in contract.OPTIONAL_MAPS]
        if missing:
            raise ReadError(f"maps {missing} were not handed over")
        self.entries: dict[str, int] = {}
        for name, fd in self.maps.items():
            info = libbpfmod.map_info(self.lib, fd)
            problem = contract.check_map(name, info, self.counts_max, self.ringbuf,
                                         self.ringbuf_pages)
            if problem:
                raise ReadError(f"{problem} (bpf/kvmtrace.bpf.c and kvmtrace/contract.py "
                                f"disagree)")
            self.entries[name] = info.max_entries

    @property
    def counts_capacity(self) -> int:
        """max_entries of the counts map."""
        return self.entries[contract.COUNTS_MAP]

    def _fd(self, name: str) -> int:
        return self.maps[name]

    def _lookup(self, name: str, index: int, per_cpu: bool = False) -> list[int]:
        n = self.ncpus if per_cpu else 1
        key, value = ct.c_uint32(index), (ct.c_uint64 * n)()
        if self.lib.bpf_map_lookup_elem(self._fd(name), ct.byref(key), value) != 0:
            return [0]
        return list(value)

    def read_counts(self) -> list[RawCount]:
        fd, n = self._fd(contract.COUNTS_MAP), self.entries[contract.COUNTS_MAP]
        if self._batch is None:  # allocated once: no 0.5 MB malloc/free per scrape
            self._batch = ((CountKey * n)(), (ct.c_uint64 * n)())
        keys, values = self._batch
        token_in, token_out, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        ksize, total = COUNT_KEY.size, 0
        # BPF_MAP_LOOKUP_BATCH (5.6+): the whole map in a few syscalls.
        while True:
            count.value = n - total
            res = self.lib.bpf_map_lookup_batch(
                fd, ct.byref(token_in) if total else None, ct.byref(token_out),
                ct.byref(keys, ksize * total), ct.byref(values, COUNT_VALUE_SIZE * total),
                ct.byref(count),
                None)
            err = ct.get_errno()
            if res != 0 and err != errno.ENOENT:  # EINVAL (before 5.6), ENOSPC
                return [(k.tgid, k.probe, k.vm_type, k.result, k.verdicts, k.detail, k.comm, v)
                        for k, v in self._iterate(fd)]
            total += count.value
            if res != 0 or total >= n or count.value == 0:  # ENOENT: all read
                break
            token_in.value = token_out.value
        # Straight from the buffers: no ctypes object per entry.
        counts = memoryview(values).cast("B")[:COUNT_VALUE_SIZE * total].cast("Q")
        return [(tgid, probe, vm_type, result, verdicts, detail, comm.split(b"\0", 1)[0], c)
                for (tgid, probe, vm_type, result, verdicts, detail, comm), c in zip(
                    COUNT_KEY.iter_unpack(ct.string_at(keys, ksize * total)), counts,
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
        fd = self._fd(contract.COUNTS_MAP)
        keys = (CountKey * len(raws))()
        for key, (tgid, probe, vm_type, result, verdicts, detail, comm, _) in zip(
                keys, raws, strict=True):
            key.tgid, key.probe, key.vm_type, key.result = tgid, probe, vm_type, result
            key.verdicts, key.detail, key.comm = verdicts, detail, comm
        # BPF_MAP_DELETE_BATCH stops at a key that is gone (ENOENT): skip it, go on.
        ksize, count, done = COUNT_KEY.size, ct.c_uint32(0), 0
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
        self._reset_shares({raw[0] for raw in raws})

    def _reset_shares(self, tgids: set[int]) -> None:
        """The processes whose keys were folded out of the map get their whole share
        of it back (bpf: proc_keys). A key inserted meanwhile costs one key of slack."""
        fd = self._fd(contract.PROC_KEYS_MAP)
        key = ct.c_uint32()
        for tgid in tgids:
            key.value = tgid
            self.lib.bpf_map_delete_elem(fd, ct.byref(key))  # ENOENT: no share taken

    def read_totals(self) -> list[contract.RawTotal]:
        """The host-wide totals: (probe, vm_type, result, count), the per-CPU values
        summed."""
        fd = self.maps.get(contract.TOTALS_MAP)
        if fd is None:
            return []
        fmt = contract.TOTAL_KEY
        key, nxt = ct.create_string_buffer(fmt.size), ct.create_string_buffer(fmt.size)
        values = (ct.c_uint64 * self.ncpus)()
        out, prev = [], None
        # A few keys (bounded by the kernel's answers, not by processes): one by one.
        while self.lib.bpf_map_get_next_key(fd, prev, nxt) == 0:
            ct.memmove(key, nxt, fmt.size)
            prev = key
            if self.lib.bpf_map_lookup_elem(fd, key, values) == 0:
                probe, _, vm_type, result = fmt.unpack(key.raw)
                out.append((probe, vm_type, result, sum(values)))
        return out

    def exec_args(self, tgid: int) -> bytes | None:
        """The command line the kernel kept for process ``tgid`` at its execve (NUL-
        separated, as /proc/PID/cmdline), or None: none kept (not planned here, evicted,
        or exec'd before kvmtrace started)."""
        fd = self.maps.get(contract.EXEC_ARGS_MAP)
        if fd is None:
            return None
        head = contract.EXEC_ARGS_HEAD
        value = ct.create_string_buffer(head.size + contract.EXEC_ARGS_BYTES)
        key = ct.c_uint32(tgid)
        if self.lib.bpf_map_lookup_elem(fd, ct.byref(key), value) != 0:
            return None
        length, _flags = head.unpack_from(value.raw)
        return value.raw[head.size:head.size + min(length, contract.EXEC_ARGS_BYTES)]

    def cgroup_id(self, tgid: int) -> int | None:
        """The cgroup v2 id process ``tgid`` was in at its first KVM call, or None:
        none kept (processes not followed here, evicted, or followed before)."""
        fd = self.maps.get(contract.PROC_CGROUP_MAP)
        if fd is None:
            return None
        value = ct.c_uint64()
        key = ct.c_uint32(tgid)
        if self.lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value)) != 0:
            return None
        return value.value

    def vmm_stderr(self, tgid: int) -> bytes | None:
        """What the kernel read of process ``tgid``'s fd 2 when it was first followed (a
        struct vmm_stderr, contract.VMM_STDERR), or None: none kept (not planned here,
        evicted, or followed before kvmtrace started)."""
        fd = self.maps.get(contract.VMM_STDERR_MAP)
        if fd is None:
            return None
        value = ct.create_string_buffer(contract.VMM_STDERR.size)
        key = ct.c_uint32(tgid)
        if self.lib.bpf_map_lookup_elem(fd, ct.byref(key), value) != 0:
            return None
        return value.raw

    def read_latency(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        """KVM_CREATE_VM latency: [(outcome, log2 slot, count)], and ns sums per outcome."""
        slots = []
        for i in range(contract.LATENCY_ENTRIES):
            n = self._lookup(contract.LATENCY_MAP, i)[0]
            if n:
                slots.append((*contract.latency_slot(i), n))
        return slots, [self._lookup(contract.LATENCY_SUM_MAP, i)[0]
                       for i in range(contract.LATENCY_SUM_ENTRIES)]

    def health(self) -> dict[str, int]:
        total = [sum(self._lookup(contract.HEALTH_MAP, i, per_cpu=True))
                 for i in range(len(HEALTH))]
        out = dict(zip(HEALTH, total, strict=True))
        out["events_lost"] += self.perf_lost
        return out

    def open_events(self, callback: Callable[[bytes], None]) -> None:
        fd = self._fd(contract.EVENTS_MAP)
        if self.ringbuf:
            def sample_rb(_ctx, data, size):
                callback(ct.string_at(data, size))
                return 0

            cb = libbpfmod.SAMPLE_RB(sample_rb)
            buf = self.lib.ring_buffer__new(fd, cb, None, None)
            self._callbacks.append(cb)
        else:
            def sample_pb(_ctx, _cpu, data, size):
                callback(ct.string_at(data, size))

            def lost_pb(_ctx, _cpu, n):
                self.perf_lost += n

            cbs = (libbpfmod.SAMPLE_PB(sample_pb), libbpfmod.LOST_PB(lost_pb))
            buf = self.lib.perf_buffer__new(fd, 64, *cbs, None, None)
            self._callbacks.extend(cbs)  # keep the ctypes callbacks alive
        if not buf:
            raise ReadError(f"cannot open the event {'ring' if self.ringbuf else 'perf'} "
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
        for fd in [*self.keep, *self.maps.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.keep, self.maps = [], {}
        if self.owner is not None:
            self.owner.close()
            self.owner = None
