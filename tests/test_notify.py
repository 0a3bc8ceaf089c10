"""sd_notify over $NOTIFY_SOCKET (kvmtrace.notify): real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket

import pytest

from kvmtrace import notify


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(5)
        yield path, s


def lines(s: socket.socket) -> list[str]:
    return s.recv(4096).decode().split("\n")


def test_no_socket_is_a_no_op():
    assert notify.send("READY=1", environ={}) is None
    assert notify.ready("x", environ={"NOTIFY_SOCKET": ""}) is None


def test_status_ready_stopping_reach_the_socket(listener):
    path, s = listener
    env = {"NOTIFY_SOCKET": path}
    assert notify.status("compiling", environ=env) is None
    assert lines(s) == ["STATUS=compiling"]
    assert notify.ready("8 points attached", environ=env) is None
    assert lines(s) == ["READY=1", "STATUS=8 points attached", f"MAINPID={os.getpid()}"]
    assert notify.stopping(environ=env) is None
    got = lines(s)
    assert got[0] == "STOPPING=1" and got[1].startswith("STATUS=")


def test_a_newline_cannot_forge_an_assignment(listener):
    path, s = listener
    notify.status("bad\nREADY=1", environ={"NOTIFY_SOCKET": path})
    assert lines(s) == ["STATUS=bad READY=1"]


def test_abstract_socket():
    name = f"kvmtrace-test-{os.getpid()}-{os.urandom(3).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        assert notify.send("READY=1", environ={"NOTIFY_SOCKET": "@" + name}) is None
        assert lines(s) == ["READY=1"]


def test_failures_are_returned_not_raised(tmp_path):
    gone = str(tmp_path / "nobody")
    assert "cannot notify" in notify.send("READY=1", environ={"NOTIFY_SOCKET": gone})
    assert "neither a path" in notify.send("READY=1", environ={"NOTIFY_SOCKET": "relative"})
