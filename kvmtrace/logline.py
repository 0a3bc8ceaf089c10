"""One structured log line per failed VM start, the way Prometheus exporters log.

logfmt by default, JSON with ``--log.format=json`` (prometheus/common's promslog: ``time``,
``level``, ``source``, ``msg``, then the fields), one line on stderr. Under systemd,
where stderr is the journal (``$JOURNAL_STREAM`` names stderr's device and inode), the
same fields go to journald's native socket instead, as journal fields (``MESSAGE``,
``PRIORITY``, ``KVMTRACE_CAUSE``, ...; sd_journal_send(3)'s datagram protocol), so
``journalctl KVMTRACE_CAUSE=memory_setup`` finds them. Formatting is pure; the writer is
handed its streams and socket path.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from kvmtrace.starts import Start

FORMATS = ("logfmt", "json")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITY_WARNING = 4  # syslog(3) LOG_WARNING
WORDS_MAX = 200  # characters of the VMM's first line in a log line


def fields(s: Start) -> dict[str, object]:
    """What a failed start's log line carries: where it stopped, why, who asked for what,
    the deciding errno and firmware status, and the VMM's own first line (when had)."""
    errno = status = None
    if s.calls:
        errno = s.calls[0]["errno"]
    failed_ops = [op for op in s.launch if op["errno"] or op["firmware_status_code"]]
    if failed_ops:
        errno, status = failed_ops[-1]["errno"], failed_ops[-1]["firmware_status"]
    elif s.run is not None:
        errno = s.run["errno"] or f"exit {s.run['exit_reason']}"
    elif s.creates and s.creates[-1]["result"] != "ok":
        errno = s.creates[-1]["result"]
    first = next((ln for ln in (s.vmm_words or "").splitlines() if ln.strip()), None)
    out: dict[str, object] = {
        "stage": s.stage, "cause": s.cause, "reason": s.reason,
        "requested_type": s.requested_type, "vm": s.vm_name, "pid": s.pid, "comm": s.comm,
        "errno": errno, "status": status, "unit": s.owner.get("unit"),
        "pod": s.owner.get("pod_uid"), "namespace": s.owner.get("namespace"),
        "domain": s.owner.get("vm"),
        "vmm_words": first[:WORDS_MAX] if first else None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _logfmt_value(v: object) -> str:
    text = str(v)
    if text and all(c.isalnum() or c in "-_.:/+,@" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def line(s: Start, fmt: str = "logfmt", now: float | None = None) -> str:
    """The one line (no newline) for failed start ``s``."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + \
        f".{int(now * 1000) % 1000:03d}Z"
    head = {"time": stamp, "level": "WARN", "source": "starts", "msg": "VM start failed"}
    data = {**head, **fields(s)}
    if fmt == "json":
        return json.dumps(data, ensure_ascii=False)
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in data.items())


def journal_datagram(s: Start) -> bytes:
    """The native-protocol datagram: KEY=VALUE lines (a value with a newline is sent
    in the protocol's binary form: KEY, newline, little-endian u64 length, value)."""
    data = {"MESSAGE": f"VM start failed: {s.summary}", "PRIORITY": str(PRIORITY_WARNING),
            "SYSLOG_IDENTIFIER": "kvmtrace",
            **{f"KVMTRACE_{k.upper()}": str(v) for k, v in fields(s).items()}}
    out = bytearray()
    for key, value in data.items():
        raw = value.encode()
        if b"\n" in raw:
            out += key.encode() + b"\n" + len(raw).to_bytes(8, "little") + raw + b"\n"
        else:
            out += key.encode() + b"=" + raw + b"\n"
    return bytes(out)


def stderr_is_journal(environ: Mapping[str, str], stderr_fd: int = 2) -> bool:
    """systemd sets $JOURNAL_STREAM to "DEVICE:INODE" of the stream it connected
    stdout/stderr to: stderr is the journal when its fstat(2) says the same."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class StartLog:
    """Writes the line of every failed start: to the journal's socket where stderr is
    the journal (falling back to the stream if the socket refuses), else to ``stream``."""

    def __init__(self, fmt: str, stream: TextIO, journal: bool,
                 journal_socket: str = JOURNAL_SOCKET,
                 clock: Callable[[], float] = time.time) -> None:
        self.fmt, self.stream, self.journal = fmt, stream, journal
        self.journal_socket, self.clock = journal_socket, clock

    def __call__(self, s: Start) -> None:
        if not s.failed:
            return
        if self.journal:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.sendto(journal_datagram(s), self.journal_socket)
                return
            except OSError:
                pass  # journald gone or too big: the stream still reaches it
        self.stream.write(line(s, self.fmt, self.clock()) + "\n")
        self.stream.flush()
