"""The loader child's hand-over, where it can be checked without root."""

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
