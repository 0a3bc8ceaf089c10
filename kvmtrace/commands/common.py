"""What several commands share: the user's error, the privilege check, the host facts
(this host's, or a --dump-facts file's), the loader's options, starting the live
session, the process filter and the retirer tick."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from kvmtrace import access, privileges
from kvmtrace import doctor as doctor_report
from kvmtrace import facts as factsmod
from kvmtrace import loader as loadermod
from kvmtrace.live import Live, LiveError, Stop


class UserError(Exception):
    """A problem the user can fix: printed as one ERROR line, exit ``code`` (1)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def require_privileges() -> privileges.Access:
    """What loading, attaching and serving need (capabilities, tracefs, /dev/kvm,
    headers), not "root": one ERROR line per missing piece."""
    try:
        return access.check()
    except privileges.PrivilegeError as exc:
        raise UserError(str(exc)) from None


def host_facts(path: str | None) -> factsmod.HostFacts:
    """This host's facts, or those of a --dump-facts file (``path``)."""
    if path is None:
        return factsmod.gather()
    try:
        return factsmod.HostFacts.load(path)
    except OSError as exc:
        raise UserError(f"cannot read facts file {path}: {exc.strerror}",
                        doctor_report.EXIT_INCOMPLETE) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"bad facts file {path}: {exc}",
                        doctor_report.EXIT_INCOMPLETE) from None


def options(filter_pid: int = 0, facts: factsmod.HostFacts | None = None) -> loadermod.Options:
    return loadermod.Options(self_tgid=os.getpid(), filter_tgid=filter_pid,
                             use_ringbuf=facts.ringbuf if facts else True,
                             use_task_storage=facts.task_storage if facts else True)


def start(strict: bool, filter_pid: int = 0, **kw) -> Live:
    """The privilege check, then the live session (kvmtrace.live.Live.start)."""
    require_privileges()
    stop = Stop()
    try:
        return Live.start(strict, filter_pid, stop, **kw)
    except LiveError as exc:
        raise UserError(str(exc)) from None


def wanted(args, pid: int, comm: str) -> bool:
    """Whether -p/--pid and -n/--name let this process through."""
    return (not args.pid or pid == args.pid) and (not args.name or args.name in comm)


def retirer(live: Live, every: float = 1.0,
            then: Callable[[int], None] | None = None) -> Callable[[], None]:
    """A tick that folds exited processes out of the map (and so stitches their VM
    starts, handed to runtime.on_start) every ``every`` seconds, or at once when the map
    is filling; ``then`` is told after each pass how many processes it folded."""
    due = time.monotonic() + every

    def tick() -> None:
        nonlocal due
        if time.monotonic() >= due or live.runtime.filling():
            retired = live.runtime.retire_exited()
            if then is not None:
                then(retired)
            due = time.monotonic() + every

    return tick
