"""sd_notify(3) without libsystemd: tell systemd (Type=notify) how the start goes.

The protocol is one datagram of newline-separated VAR=value lines to the AF_UNIX socket
named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading "@"); see
systemd's sd_notify(3) and its "Notify socket" protocol description. Without
$NOTIFY_SOCKET (not run by systemd, or Type= is not notify) every call does nothing.
A failure to send is returned, never raised: the exporter must not die of its manager.
"""

from __future__ import annotations

import os
import socket


def _address(name: str) -> str | bytes:
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def send(*lines: str, environ: dict[str, str] | None = None) -> str | None:
    """Send ``lines`` (e.g. "READY=1", "STATUS=...") in one datagram.

    Returns None when sent or when there is nobody to tell, else why it failed."""
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET")
    if not name:
        return None
    if not name.startswith(("/", "@")):
        return f"NOTIFY_SOCKET={name!r} is neither a path nor an abstract name"
    # a status with a newline would be read as two assignments
    data = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_address(name))
            s.sendall(data)
    except OSError as exc:
        return f"cannot notify {name}: {exc.strerror or exc}"
    return None


def status(text: str, **kw) -> str | None:
    return send(f"STATUS={text}", **kw)


def ready(text: str, **kw) -> str | None:
    return send("READY=1", f"STATUS={text}", f"MAINPID={os.getpid()}", **kw)


def stopping(text: str = "stopping: detaching the BPF programs", **kw) -> str | None:
    return send("STOPPING=1", f"STATUS={text}", **kw)
