"""kvmtrace.btf: struct member offsets from the kernel's BTF.

This host's own /sys/kernel/btf/vmlinux, checked against pahole (dwarves, the tool
kbuild makes BTF with; `scripts/setup-host.sh --test` installs it), and a blob BUILT BY
HAND here for the corners a real kernel does not show on demand (anonymous members
nested in each other, a bit field, a typedef, kinds to step over)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmtrace import btf, contract

VMLINUX = Path(btf.VMLINUX)
# The struct a dotted path's first member is, to look its second member up in pahole.
INNER = {"f_path": "path", "d_name": "qstr"}


def _pahole_offset(struct_name: str, member: str) -> int:
    out = subprocess.run(["pahole", "-C", struct_name, str(VMLINUX)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    m = re.search(rf"[\s*]{re.escape(member)}(\[\d*\])*;\s+/\*\s+(\d+)", out)
    assert m, f"pahole shows no {struct_name}.{member}:\n{out}"
    return int(m.group(2))


def test_this_kernels_stderr_offsets_are_paholes():
    assert shutil.which("pahole"), "pahole (dwarves) is missing: scripts/setup-host.sh --test"
    got = btf.stderr_offsets(VMLINUX.read_bytes())
    assert set(got) == set(contract.STDERR_FIELDS)
    for key, (s, path) in contract.STDERR_FIELDS.items():
        first, _, second = path.partition(".")
        want = _pahole_offset(s, first)
        if second:
            want += _pahole_offset(INNER[first], second)
        assert got[key] == want, (key, s, path, got[key], want)


class _Blob:
    """Builds a little-endian BTF blob: types appended in order (ids from 1)."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, size_or_type: int, data: bytes = b"",
            kind_flag: int = 0) -> None:
        info = kind_flag << 31 | kind << 24 | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + data

    def members(self, *mems: tuple[str, int, int]) -> bytes:
        return b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in mems)

    def bytes(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def _hand_built() -> bytes:
    b = _Blob()
    b.add(1, "int", 0, 4, struct.pack("<I", 32))                       # 1 INT
    b.add(6, "an_enum", 2, 4, struct.pack("<iiii", 0, 0, 0, 1))        # 2 ENUM, 2 values
    b.add(3, "", 0, 0, struct.pack("<III", 1, 1, 4))                   # 3 ARRAY
    inner = b.members(("deep", 1, 32))
    b.add(4, "", 1, 8, inner)                                          # 4 anon struct
    anon = b.members(("y", 1, 0), ("", 4, 0))
    b.add(5, "", 2, 8, anon)                                           # 5 anon union
    b.add(8, "named_t", 0, 5)                                          # 6 typedef -> 5
    outer = b.members(("x", 1, 0), ("", 5, 64), ("t", 6, 192))
    b.add(4, "outer", 3, 32, outer)                                    # 7 struct outer
    bits = b.members(("flag", 1, 1 << 24 | 3))                         # bitfield at bit 3
    b.add(4, "bits", 1, 4, bits, kind_flag=1)                          # 8
    return b.bytes()


def test_offsets_through_anonymous_members_typedefs_and_other_kinds():
    t = btf.Btf(_hand_built())
    assert t.offset("outer", "x") == 0
    assert t.offset("outer", "y") == 8
    assert t.offset("outer", "deep") == 12  # anon union at 8, anon struct in it, +4
    assert t.offset("outer", "t.deep") == 24 + 4  # through the typedef


@pytest.mark.parametrize(("struct_name", "path", "error"), [
    ("nothere", "x", "struct nothere is not in the kernel's BTF"),
    ("outer", "z", "struct outer has no member z"),
    ("outer", "x.y", "struct outer has no member x.y"),
    ("bits", "flag", "bits.flag is a bit field"),
])
def test_what_is_not_there_is_one_line(struct_name, path, error):
    with pytest.raises(btf.BtfError, match=re.escape(error)):
        btf.Btf(_hand_built()).offset(struct_name, path)


def test_not_btf_is_refused():
    with pytest.raises(btf.BtfError, match="shorter than a BTF header"):
        btf.Btf(b"\x9f\xeb")
    with pytest.raises(btf.BtfError, match="not BTF"):
        btf.Btf(b"\0" * 64)
    with pytest.raises(btf.BtfError, match="struct task_struct is not in the kernel's BTF"):
        btf.stderr_offsets(_hand_built())
