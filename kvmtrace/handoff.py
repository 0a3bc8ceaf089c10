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
the plan from the facts (a pure function) and hands the fds to
:class:`kvmtrace.reader.Reader`, which checks each map against kvmtrace.contract and
reads the maps and the event buffer. Closing it closes the fds: that detaches.

This module is the protocol only: the request, the reply and the fds.

A compile error that makes bcc end the child (bcc 0.26 calls exit(1)) becomes a one-line
error here instead of the end of the exporter.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from kvmtrace import access, privileges
from kvmtrace import facts as factsmod
from kvmtrace import plan as planmod
from kvmtrace.loader import LoadError, Options
from kvmtrace.reader import Reader, ReadError

# What keeps an attachment alive: kprobe/tracepoint perf events, fentry/fexit links.
ATTACHMENT_FDS = ("anon_inode:[perf_event]", "anon_inode:bpf_link")
SCM_MAX_FD = 253  # include/net/scm.h: fds per SCM_RIGHTS message
_LEN = struct.Struct("<I")


class HandoffError(Exception):
    """The loader child could not deliver a loaded program; one line for the user."""


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
    # What this process really has (a new program: ambient capabilities only), checked
    # before bcc turns a missing one into "Failed to compile BPF module".
    lacking = privileges.missing(access.gather())
    facts = factsmod.gather()
    if lacking:
        _send(sock, {"error": str(privileges.PrivilegeError(lacking)),
                     "facts": facts.to_json()})
        return 0
    plan = planmod.make_plan(facts)
    problem = loader.preflight(facts, plan)
    if problem:
        _send(sock, {"error": problem, "facts": facts.to_json()})
        return 0
    opts = Options(self_tgid=req["self_tgid"], filter_tgid=req["filter_tgid"],
                   use_ringbuf=facts.ringbuf, use_task_storage=facts.task_storage)
    try:
        session = loader.load(plan, opts)
    except LoadError as exc:
        _send(sock, {"error": str(exc), "facts": facts.to_json()})
        return 0
    maps = session.map_fds()
    keep = _attachment_fds()
    # Maps are sent as the first fds, in the order of their names in "maps".
    _send(sock, {"facts": facts.to_json(), "maps": list(maps), "ringbuf": session.ringbuf,
                 "counts_max": opts.counts_max, "ringbuf_pages": opts.ringbuf_pages,
                 "attachments": [[a.attached, a.error] for a in session.attachments],
                 "keep": len(keep)}, [*maps.values(), *keep])
    return 0


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
          ) -> tuple[factsmod.HostFacts, Reader]:
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
    maps = dict(zip(payload["maps"], fds, strict=False))
    keep = fds[len(maps):]
    attachments = [planmod.Attachment(p, attached, error)
                   for p, (attached, error) in zip(plan.points, payload["attachments"],
                                                   strict=True)]
    try:
        reader = Reader(plan, attachments, maps, keep, payload["ringbuf"],
                        payload["counts_max"], payload["ringbuf_pages"])
    except (OSError, ReadError) as exc:
        for fd in fds:
            os.close(fd)
        raise HandoffError(str(exc)) from None
    return facts, reader


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m kvmtrace.handoff FD (run by kvmtrace itself)", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[0])) as sock:
        try:
            child(sock)
        except Exception as exc:  # never a traceback: the parent reports this line
            print(f"ERROR: the loader child failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip bcc's atexit cleanup: it would detach what this side now holds.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
