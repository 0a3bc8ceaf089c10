"""A ctypes binding of the few libbpf.so.1 calls kvmtrace reads maps and events with.

libbpf links neither LLVM nor clang (unlike libbcc), so a long-running reader that
uses only this stays small. libbpf 1.x convention: 0 or a count on success, -errno
(and errno set) on failure. Loaded on demand: importing this module loads nothing.
"""

from __future__ import annotations

import ctypes as ct
import os

from kvmtrace.contract import MapInfo

# Callback types of ring_buffer__new and perf_buffer__new.
SAMPLE_RB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
SAMPLE_PB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_void_p, ct.c_uint32)
LOST_PB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_uint64)


class BpfMapInfo(ct.Structure):
    """The head of struct bpf_map_info (include/uapi/linux/bpf.h); the kernel fills
    what fits in the buffer it is given and reports the length."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16)]


def load() -> ct.CDLL:
    """libbpf.so.1 with the prototypes used here."""
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    vp, u32p = ct.c_void_p, ct.POINTER(ct.c_uint32)
    for name, args in (("bpf_map_lookup_elem", [ct.c_int, vp, vp]),
                       ("bpf_map_get_next_key", [ct.c_int, vp, vp]),
                       ("bpf_map_delete_elem", [ct.c_int, vp]),
                       ("bpf_map_lookup_batch", [ct.c_int, vp, vp, vp, vp, u32p, vp]),
                       ("bpf_map_delete_batch", [ct.c_int, vp, u32p, vp]),
                       ("bpf_obj_get_info_by_fd", [ct.c_int, vp, u32p]),
                       ("libbpf_num_possible_cpus", []),
                       ("ring_buffer__poll", [vp, ct.c_int]),
                       ("ring_buffer__consume", [vp]),
                       ("perf_buffer__poll", [vp, ct.c_int])):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ct.c_int
    lib.ring_buffer__new.argtypes = [ct.c_int, SAMPLE_RB, vp, vp]
    lib.ring_buffer__new.restype = vp
    lib.perf_buffer__new.argtypes = [ct.c_int, ct.c_size_t, SAMPLE_PB, LOST_PB, vp, vp]
    lib.perf_buffer__new.restype = vp
    lib.ring_buffer__free.argtypes = [vp]
    lib.perf_buffer__free.argtypes = [vp]
    return lib


def map_info(lib: ct.CDLL, fd: int) -> MapInfo:
    """What the kernel says of the map behind ``fd``; OSError when it says nothing."""
    info = BpfMapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        err = ct.get_errno()
        raise OSError(err, f"BPF_OBJ_GET_INFO_BY_FD on fd {fd}: {os.strerror(err)}")
    return MapInfo(info.type, info.key_size, info.value_size, info.max_entries)
