"""The kernel's BTF (/sys/kernel/btf/vmlinux): byte offsets of struct members.

A host fact (kvmtrace.facts reads the file): where a VMM's stderr is, the kernel finds by
following task_struct -> files -> fdt -> fd[2] -> file, and the BPF C reads each hop at
the offsets this module finds, passed to it as #defines (kvmtrace.contract) -- no kernel
header is compiled for it (they would cost every load seconds; see docs/benchmarks.md).

The format is the kernel's (Documentation/bpf/btf.rst): a header, then the type section
(each type a struct btf_type and its kind's data, ids from 1), then the strings. Only
what an offset needs is decoded: structs and unions with their members (an anonymous
member's members are looked into), and the kinds' sizes to step over the rest. Pure.
"""

from __future__ import annotations

import struct

from kvmtrace import contract

MAGIC = 0xEB9F
VMLINUX = "/sys/kernel/btf/vmlinux"
KIND_STRUCT, KIND_UNION = 4, 5
# The bytes each kind's data takes after its struct btf_type, per vlen or flat.
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # members, enums, params, vars
_FLAT = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
_ALIASES = frozenset((8, 9, 10, 11, 18))  # TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
_TYPE = struct.Struct("<III")  # struct btf_type: name_off, info, size or type


class BtfError(Exception):
    """Not BTF, or a member kvmtrace needs is not there; one line."""


class Btf:
    """The structs and unions of one BTF blob: name -> type id, and each one's members
    as (name, type id, bit offset), decoded on demand."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("shorter than a BTF header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"magic {magic:#x}, not BTF (or not this byte order)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types = hdr_len + type_off
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self._data = data
        self._raw: dict[int, tuple[int, int, int]] = {}  # struct/union -> its members' bytes
        self._members: dict[int, list[tuple[str, int, int]]] = {}
        self.by_name: dict[str, int] = {}
        self._alias: dict[int, int] = {}  # typedef/const/volatile -> the type
        # One pass over every type (a kernel has ~100,000): locals only, and a struct's
        # name decoded as one slice, since under emulation this loop is seconds of a start.
        unpack, strings = _TYPE.unpack_from, self._strings
        raw, by_name, alias = self._raw, self.by_name, self._alias
        per_vlen = [_PER_VLEN.get(k, 0) for k in range(32)]  # by kind: a list index is
        flat = [_FLAT.get(k, 0) for k in range(32)]  # cheaper than a dict's get
        pos, end, tid = types, types + type_len, 1
        while pos < end:
            name_off, info, size_or_type = unpack(data, pos)
            kind, vlen = info >> 24 & 0x1F, info & 0xFFFF
            pos += 12
            if kind == KIND_STRUCT or kind == KIND_UNION:
                raw[tid] = (pos, vlen, info >> 31)
                if name_off and kind == KIND_STRUCT:
                    stop = strings.find(b"\0", name_off)
                    name = strings[name_off:stop if stop >= 0 else None].decode(
                        errors="replace")
                    if name not in by_name:
                        by_name[name] = tid
            elif kind in _ALIASES:
                alias[tid] = size_or_type
            pos += per_vlen[kind] * vlen + flat[kind]
            tid += 1

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end if end >= 0 else None].decode(errors="replace")

    def members(self, tid: int) -> list[tuple[str, int, int]]:
        """The members of struct or union ``tid`` (decoded when first asked for: a
        kernel has tens of thousands, an offset needs a few)."""
        if tid not in self._members:
            pos, vlen, kind_flag = self._raw.get(tid, (0, 0, 0))
            mems = []
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", self._data, pos + 12 * i)
                mems.append((self._str(m_name), m_type, m_off & 0xFFFFFF if kind_flag else m_off))
            self._members[tid] = mems
        return self._members[tid]

    def _resolve(self, tid: int) -> int:
        for _ in range(16):
            if tid not in self._alias:
                break
            tid = self._alias[tid]
        return tid

    def _member(self, tid: int, name: str) -> tuple[int, int] | None:
        """(type id, bit offset) of member ``name`` of ``tid``, anonymous members'
        members included."""
        for m_name, m_type, m_off in self.members(self._resolve(tid)):
            if m_name == name:
                return m_type, m_off
            if not m_name:
                inner = self._member(m_type, name)
                if inner is not None:
                    return inner[0], m_off + inner[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """The byte offset of ``path`` (members joined by dots) in struct
        ``struct_name``."""
        tid = self.by_name.get(struct_name)
        if tid is None:
            raise BtfError(f"struct {struct_name} is not in the kernel's BTF")
        bits = 0
        for part in path.split("."):
            found = self._member(tid, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            tid, off = found
            bits += off
        if bits % 8:
            raise BtfError(f"{struct_name}.{path} is a bit field")
        return bits // 8


def stderr_offsets(data: bytes) -> dict[str, int]:
    """contract.STDERR_FIELDS' byte offsets in the kernel that ``data`` (its BTF)
    describes; BtfError when one is missing."""
    btf = Btf(data)
    return {key: btf.offset(s, path) for key, (s, path) in contract.STDERR_FIELDS.items()}
