"""The loader child's hand-over, where it can be checked without root."""

import ctypes
import sys

import pytest

from kvmtrace import handoff


def test_a_loader_child_that_dies_is_one_line_with_its_status(tmp_path):
    # What bcc 0.26 does on a BPF compile error: print it and exit(1).
    script = tmp_path / "dies.py"
    script.write_text("import sys\nprint('error: use of undeclared identifier x', "
                      "file=sys.stderr)\nsys.exit(1)\n")
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    fake_python.chmod(0o755)
    with pytest.raises(handoff.HandoffError) as exc:
        handoff.start(python=str(fake_python))
    msg = str(exc.value)
    assert "\n" not in msg
    assert "exited with status 1" in msg
    assert "use of undeclared identifier x" in msg


def test_the_child_entry_point_refuses_bad_arguments(capsys):
    assert handoff.main(["not-a-fd"]) == 2
    assert "usage" in capsys.readouterr().err


def test_count_key_matches_the_bpf_struct():
    # struct count_key: u32 tgid, u32 probe, u64 vm_type, s64 result, u32 verdicts,
    # u32 pad, char comm[16] -- the loader child checks bcc's size against this too.
    assert handoff.CountKey.comm.offset == 32
    assert ctypes.sizeof(handoff.CountKey) == 48


def test_batch_buffers_decode_like_the_struct():
    key = handoff.CountKey(tgid=7, probe=3, vm_type=2**32 + 1, result=-22, verdicts=5,
                           comm=b"qemu\x07x")
    fields = handoff._COUNT_KEY.unpack(bytes(key))
    assert handoff._COUNT_KEY.size == ctypes.sizeof(handoff.CountKey)
    assert fields[:5] == (7, 3, 2**32 + 1, -22, 5)
    assert fields[6].split(b"\0", 1)[0] == key.comm == b"qemu\x07x"
