"""kvmtrace command line: serve, trace, doctor."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

from kvmtrace import __version__, kvmdev, tables, views
from kvmtrace import facts as factsmod
from kvmtrace import handoff as handoffmod
from kvmtrace import loader as loadermod
from kvmtrace import plan as planmod
from kvmtrace import server as servermod
from kvmtrace.attempts import Attempt, Stitcher
from kvmtrace.decode import Decoder
from kvmtrace.runtime import Runtime


class UserError(Exception):
    """A problem the user can fix: printed as one ERROR line, exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


EXAMPLES_SERVE = """examples:
  kvmtrace serve                              # exporter on :9929, live view on stdout
  kvmtrace serve --web.listen-address 127.0.0.1:9929 -q
  kvmtrace serve --pid-label                  # add a pid label (unbounded over time)
  curl -s localhost:9929/metrics | grep kvmtrace_vm_create"""

EXAMPLES_TRACE = """examples:
  kvmtrace trace                  # every KVM_CREATE_VM, VM_TYPES query and type check
  kvmtrace trace -x               # only rejected calls
  kvmtrace trace -p 4242 -T       # one process, with a time column
  kvmtrace trace -n qemu --json   # comm contains "qemu", JSON lines
  kvmtrace trace --duration 10    # stop after 10 seconds"""

EXAMPLES_EXPLAIN = """examples:
  kvmtrace explain                    # explain every rejected VM creation until Ctrl-C
  kvmtrace explain -n qemu --duration 60
  kvmtrace explain -p 4242 --json"""

EXAMPLES_DOCTOR = """examples:
  kvmtrace doctor                 # can kvmtrace trace this host? exit 0 when it can
  kvmtrace doctor --json"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmtrace", description="Trace Linux KVM's VM-type dispatch with eBPF.")
    p.add_argument("--version", action="version", version=f"kvmtrace {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="{serve,trace,explain,doctor}")
    fmt = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser("serve", help="Prometheus exporter with a live view",
                       epilog=EXAMPLES_SERVE, formatter_class=fmt)
    s.add_argument("--web.listen-address", dest="listen", default=servermod.DEFAULT_ADDRESS,
                   metavar="HOST:PORT",
                   help=f"address for /metrics (default {servermod.DEFAULT_ADDRESS})")
    s.add_argument("--pid-label", action="store_true",
                   help="add a pid label to per-process metrics (cardinality grows)")
    s.add_argument("-q", "--quiet", action="store_true", help="no live view on stdout")
    s.add_argument("--retire-interval", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="fold exited processes' counts out of the kernel map this often")
    s.add_argument("--rejections", type=_positive_int, default=100, metavar="N",
                   help="keep the last N rejected attempts for /api/rejections (default 100)")
    s.add_argument("--strict", action="store_true", help="fail unless every probe point attaches")

    t = sub.add_parser("trace", help="one line per VM creation attempt and type check",
                       epilog=EXAMPLES_TRACE, formatter_class=fmt)
    t.add_argument("-p", "--pid", type=_positive_int, help="trace this process only")
    t.add_argument("-n", "--name", help="only processes whose comm contains NAME")
    t.add_argument("-x", "--failed", action="store_true", help="only rejected calls")
    t.add_argument("-T", "--time", action="store_true", help="include a time column (HH:MM:SS)")
    t.add_argument("--json", action="store_true", help="JSON lines instead of columns")
    t.add_argument("--duration", type=_positive_float, metavar="SECONDS",
                   help="stop after SECONDS")
    t.add_argument("--strict", action="store_true", help="fail unless every probe point attaches")
    t.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--facts", metavar="FILE", help=argparse.SUPPRESS)

    e = sub.add_parser("explain", help="wait for rejected VM creations and explain each",
                       epilog=EXAMPLES_EXPLAIN, formatter_class=fmt)
    e.add_argument("-p", "--pid", type=_positive_int, help="this process only")
    e.add_argument("-n", "--name", help="only processes whose comm contains NAME")
    e.add_argument("--duration", type=_positive_float, metavar="SECONDS",
                   help="stop after SECONDS (then say what the host supports if none was seen)")
    e.add_argument("--json", action="store_true", help="one JSON object per rejected attempt")
    e.add_argument("--strict", action="store_true", help="fail unless every probe point attaches")

    d = sub.add_parser("doctor", help="can this host be traced? (exit 0 when it can)",
                       epilog=EXAMPLES_DOCTOR, formatter_class=fmt)
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.add_argument("--dump-facts", action="store_true",
                   help="print the raw host facts as JSON (attach to bug reports) and exit")
    d.add_argument("--facts", metavar="FILE",
                   help="plan for another host's facts (from --dump-facts); attaches nothing")
    return p


# ---- shared start-up -------------------------------------------------------

def _require_root() -> None:
    if os.geteuid() != 0:
        raise UserError("kvmtrace loads BPF programs and must run as root (try: sudo kvmtrace ...)")


def _options(filter_pid: int = 0, facts: factsmod.HostFacts | None = None) -> loadermod.Options:
    return loadermod.Options(self_tgid=os.getpid(), filter_tgid=filter_pid,
                             use_ringbuf=facts.ringbuf if facts else True,
                             use_task_storage=facts.task_storage if facts else True)


def _start(strict: bool, filter_pid: int = 0):
    """Gather, plan, compile and attach in the loader child (kvmtrace.handoff): this
    process then holds only the fds, never libbcc and its LLVM."""
    _require_root()
    try:
        facts, session = handoffmod.start(filter_pid)
    except handoffmod.HandoffError as exc:
        raise UserError(str(exc)) from None
    if not facts.kvm.present:
        print(f"WARNING: {facts.kvm.error}: no VM can be created until KVM is loaded",
              file=sys.stderr)
    plan = session.plan
    attached = [a for a in session.attachments if a.attached]
    missing = [a for a in session.attachments if not a.attached]
    if not attached:
        session.close()
        raise UserError("no probe point could attach here: "
                        + "; ".join(f"{a.point.name}: {a.reason}" for a in missing[:3])
                        + " (run 'kvmtrace doctor')")
    if strict and missing:
        session.close()
        raise UserError("--strict: not attached: "
                        + "; ".join(f"{a.point.name} ({a.reason})" for a in missing))
    return facts, plan, session


class _Allocator:
    """glibc's malloc, tuned for a long-running exporter (measured in bench/, scale phase).

    By default glibc raises its mmap and trim thresholds after a large block is freed, so
    from the second scrape on a 2.4 MB /metrics body (10,000 series) is carved from the
    heap and its pages stay resident when freed. Fixed thresholds keep such blocks in
    their own mappings, returned when freed; ``trim()`` after a retirement pass gives back
    what the folded records left free in the heap. No-ops where there is no glibc."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    THRESHOLD = 256 * 1024

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None)
        with contextlib.suppress(AttributeError):
            self._libc.mallopt(self.M_MMAP_THRESHOLD, self.THRESHOLD)
            self._libc.mallopt(self.M_TRIM_THRESHOLD, self.THRESHOLD)

    def trim(self) -> None:
        with contextlib.suppress(AttributeError):
            self._libc.malloc_trim(0)


class _Stop:
    """SIGINT/SIGTERM set a flag; the poll loop sees it within one poll."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())


# ---- serve -----------------------------------------------------------------

def cmd_serve(args) -> int:
    try:
        host, port = servermod.parse_address(args.listen)
    except servermod.AddressError as exc:
        raise UserError(f"{exc} (--web.listen-address)") from None
    _require_root()
    holder: dict = {}
    try:
        httpd = servermod.bind(lambda e, s: holder["app"](e, s), host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc} "
                        "(choose another with --web.listen-address)") from None
    stop = _Stop()
    allocator = _Allocator()
    facts, plan, session = _start(args.strict)
    from prometheus_client import CollectorRegistry

    from kvmtrace.collector import KvmtraceCollector

    runtime = Runtime(session, Decoder(plan, facts.arch))
    registry = CollectorRegistry()
    build = {"version": __version__, "bcc_version": facts.bcc_version or "none",
             "kernel": facts.kernel_release}
    collector = KvmtraceCollector(runtime, session.attachments, kvmdev.query, facts.arch,
                                  build, with_pid=args.pid_label)
    registry.register(collector)
    stitcher = _stitcher(facts, session)
    rejections: deque[Attempt] = deque(maxlen=args.rejections)
    holder["app"] = servermod.make_app(
        registry, f"kvmtrace {__version__} on {platform.node()}",
        lambda: views.plan_rows(session.attachments), runtime.processes,
        lambda: [a.to_json() for a in sorted(rejections, key=lambda a: a.end_ns, reverse=True)],
        exposition=collector.exposition)  # /metrics body: the registry holds only this collector
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    print(views.plan_table(session.attachments))
    print(f"kvmtrace {__version__}: serving http://{host}:{port}/metrics "
          "(Ctrl-C to stop)", flush=True)

    def on_attempt(a: Attempt) -> None:
        if a.rejected:
            rejections.append(a)
            if not args.quiet and a.result is None:  # a chain no KVM_CREATE_VM claimed
                print("\n".join(views.attempt_note(a)), flush=True)

    def on_event(data: bytes) -> None:
        ev = runtime.decode_event(data)
        if ev is None:
            return
        done = stitcher.feed(ev)
        for a in done:
            on_attempt(a)
        if not args.quiet:
            lines = [views.event_line(ev, facts.arch, show_time=True)]
            if ev.probe == planmod.CREATE_VM and done:
                lines += views.attempt_note(done[-1])
            print("\n".join(lines), flush=True)

    session.open_events(on_event)
    if not args.quiet:
        print(views.event_header(show_time=True), flush=True)
    next_retire = time.monotonic() + args.retire_interval
    try:
        while not stop.event.is_set():
            session.poll(200)
            for a in stitcher.flush(time.monotonic_ns()):
                on_attempt(a)
            if time.monotonic() >= next_retire:
                if runtime.retire_exited():
                    allocator.trim()
                stitcher.host_mask = kvmdev.query().vm_types_mask
                next_retire = time.monotonic() + args.retire_interval
    finally:
        httpd.shutdown()
        httpd.server_close()
        session.close()
    return 0


# ---- trace -----------------------------------------------------------------

def _stitcher(facts: factsmod.HostFacts, session) -> Stitcher:
    return Stitcher(session.attachments, facts.arch, host_mask=facts.kvm.vm_types_mask,
                    vendor_modules=facts.vendor_modules)


def _wanted(args, pid: int, comm: str) -> bool:
    return (not args.pid or pid == args.pid) and (not args.name or args.name in comm)


def _loop(session, stitcher: Stitcher, stop: _Stop, duration: float | None,
          on_attempt) -> None:
    """Poll until SIGINT/SIGTERM or ``duration``; hand orphan chains to ``on_attempt``."""
    deadline = time.monotonic() + duration if duration else None
    while not stop.event.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            break
        session.poll(100)
        for a in stitcher.flush(time.monotonic_ns()):
            on_attempt(a)
    session.poll(0)  # drain what is already queued
    for a in stitcher.flush():
        on_attempt(a)


def _lost_warning(session) -> None:
    lost = session.health()["events_lost"]
    if lost:
        print(f"WARNING: {lost} events lost (buffer full)", file=sys.stderr)


def cmd_trace(args) -> int:
    if args.ebpf:
        facts = _facts(args.facts)
        print(loadermod.build_text(planmod.make_plan(facts), _options(args.pid or 0, facts)))
        return 0
    stop = _Stop()
    facts, plan, session = _start(args.strict, filter_pid=args.pid or 0)
    runtime = Runtime(session, Decoder(plan, facts.arch))
    stitcher = _stitcher(facts, session)
    print(views.plan_table(session.attachments), file=sys.stderr)
    if not args.json:
        print(views.event_header(args.time), flush=True)

    def on_attempt(a: Attempt) -> None:  # a chain no KVM_CREATE_VM claimed
        if not _wanted(args, a.pid, a.comm) or (args.failed and not a.rejected):
            return
        if args.json:
            print(json.dumps({"kind": "attempt", "attempt": a.to_json()}, sort_keys=True))
        else:
            print("\n".join(views.attempt_note(a)), flush=True)

    def on_event(data: bytes) -> None:
        ev = runtime.decode_event(data)
        if ev is None:
            return
        done = stitcher.feed(ev)
        for a in done[:-1] if ev.probe == planmod.CREATE_VM else done:
            on_attempt(a)
        if (args.failed and not ev.rejected) or not _wanted(args, ev.pid, ev.comm):
            return
        attempt = done[-1] if ev.probe == planmod.CREATE_VM and done else None
        if args.json:
            data = json.loads(views.event_json(ev, facts.arch))
            data["kind"] = "event"
            if attempt is not None:
                data["attempt"] = attempt.to_json()
            print(json.dumps(data, sort_keys=True), flush=True)
        else:
            lines = [views.event_line(ev, facts.arch, args.time)]
            if attempt is not None:
                lines += views.attempt_note(attempt)
            print("\n".join(lines), flush=True)

    session.open_events(on_event)
    print("Tracing KVM VM-type dispatch... Hit Ctrl-C to end.", file=sys.stderr, flush=True)
    try:
        _loop(session, stitcher, stop, args.duration, on_attempt)
        _lost_warning(session)
    finally:
        session.close()
    return 0


# ---- explain ---------------------------------------------------------------

def cmd_explain(args) -> int:
    stop = _Stop()
    facts, plan, session = _start(args.strict, filter_pid=args.pid or 0)
    runtime = Runtime(session, Decoder(plan, facts.arch))
    stitcher = _stitcher(facts, session)
    print(views.plan_table(session.attachments), file=sys.stderr)
    seen = 0

    def on_attempt(a: Attempt) -> None:
        nonlocal seen
        if not a.rejected or not _wanted(args, a.pid, a.comm):
            return
        seen += 1
        if args.json:
            print(json.dumps(a.to_json(), sort_keys=True), flush=True)
        else:
            print(views.attempt_report(a, facts.arch, seen) + "\n", flush=True)

    def on_event(data: bytes) -> None:
        ev = runtime.decode_event(data)
        if ev is not None:
            for a in stitcher.feed(ev):
                on_attempt(a)

    session.open_events(on_event)
    print("Waiting for rejected VM creations... Hit Ctrl-C to end.", file=sys.stderr, flush=True)
    began = time.monotonic()
    try:
        _loop(session, stitcher, stop, args.duration, on_attempt)
        _lost_warning(session)
    finally:
        session.close()
    if not seen:
        kvm = facts.kvm
        if kvm.vm_types_mask is None:
            host = f"/dev/kvm could not be asked ({kvm.error})"
        else:
            names = ", ".join(f"{t} {tables.vm_type_name(t, facts.arch)}"
                              for t in kvm.supported_types)
            host = f"this host supports {names} (KVM_CAP_VM_TYPES={kvm.vm_types_mask:#x})"
        if args.json:
            print(json.dumps({"kind": "summary", "rejected_attempts": 0,
                              "host_vm_types_mask": kvm.vm_types_mask,
                              "host_vm_types": kvm.supported_types}))
        else:
            print(f"No rejected VM creation seen in {time.monotonic() - began:.1f} s; {host}.")
    return 0


# ---- doctor ----------------------------------------------------------------

def doctor_report(facts: factsmod.HostFacts, attachments: Sequence[planmod.Attachment] | None,
                  load_error: str | None) -> dict:
    """The doctor's verdict from facts and (when root could try) attach results. Pure."""
    plan = planmod.make_plan(facts)
    errors, warnings = [], []
    if not facts.is_root:
        errors.append("not root: kvmtrace loads BPF programs (run as root)")
    if facts.bcc_version is None:
        errors.append("bcc not importable: install python3-bpfcc, use the .venv (make setup)")
    if facts.headers.path is None:
        errors.append(f"no kernel headers ({facts.headers.error}): run 'make setup'")
    elif facts.headers.release != facts.kernel_release:
        warnings.append(f"kernel headers are for {facts.headers.release}, the kernel is "
                        f"{facts.kernel_release}: fine for kvmtrace (no struct layouts), "
                        "but other bcc tools may misread kernel structs")
    if facts.tracefs is None:
        warnings.append("tracefs not mounted: mount -t tracefs nodev /sys/kernel/tracing")
    if not facts.kvm.present:
        warnings.append(f"/dev/kvm: {facts.kvm.error}")
    elif facts.kvm.error:
        warnings.append(facts.kvm.error)
    if load_error:
        errors.append(load_error)
    points = []
    by_id = {a.point.id: a for a in attachments or []}
    for p in plan.points:
        a = by_id.get(p.id)
        points.append({
            "probe": p.name, "layer": p.layer, "mechanism": p.mechanism or planmod.Mechanism.NONE,
            "target": p.target, "attached": bool(a and a.attached),
            "detail": a.reason if a else p.reason,
        })
    ioctl_ok = any(pt["attached"] for pt in points if pt["layer"] == planmod.Layer.IOCTL)
    if attachments is not None and not ioctl_ok:
        errors.append("the ioctl layer (KVM_CREATE_VM) could not attach: "
                      + points[0]["detail"])
    if attachments is None and plan.ioctl_mechanism is None:
        errors.append(f"no mechanism for the ioctl layer: {plan.points[0].reason}")
    kvm = facts.kvm
    return {
        "kvmtrace": __version__,
        "kernel": facts.kernel_release,
        "arch": facts.arch,
        "root": facts.is_root,
        "bcc": facts.bcc_version,
        "kvm": {
            "present": kvm.present, "api_version": kvm.api_version,
            "vm_types_mask": kvm.vm_types_mask, "error": kvm.error,
            "vm_types": [{"vm_type": t, "name": tables.vm_type_name(t, facts.arch)}
                         for t in kvm.supported_types],
        },
        "vendor_modules": facts.vendor_modules,
        "kprobes": {"available": facts.kprobes, "detail": facts.kprobes_detail},
        "fentry": facts.fentry,
        "btf": facts.btf,
        "tracefs": facts.tracefs,
        "ringbuf": facts.ringbuf,
        "task_storage": facts.task_storage,
        "headers": {"path": facts.headers.path, "release": facts.headers.release,
                    "matches_kernel": facts.headers.release == facts.kernel_release},
        "attach_tested": attachments is not None,
        "points": points,
        "warnings": warnings,
        "errors": errors,
        "ok": not errors,
    }


def _facts(path: str | None) -> factsmod.HostFacts:
    if path is None:
        return factsmod.gather()
    try:
        return factsmod.HostFacts.load(path)
    except OSError as exc:
        raise UserError(f"cannot read facts file {path}: {exc.strerror}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"bad facts file {path}: {exc}") from None


def cmd_doctor(args) -> int:
    facts = _facts(args.facts)
    if args.dump_facts:
        print(json.dumps(facts.to_json(), indent=2, sort_keys=True))
        return 0
    attachments, load_error = None, None
    if args.facts is None and facts.is_root and facts.bcc_version and facts.headers.path:
        try:
            session = loadermod.load(planmod.make_plan(facts), _options(0, facts))
            attachments = session.attachments
            session.close()
        except loadermod.LoadError as exc:
            load_error = str(exc)
    report = doctor_report(facts, attachments, load_error)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_doctor_text(report))
    for e in report["errors"]:
        print(f"ERROR: {e}", file=sys.stderr)
    return 0 if report["ok"] else 1


def _doctor_text(r: dict) -> str:
    kvm = r["kvm"]
    if kvm["present"] and kvm["vm_types_mask"] is not None:
        names = ", ".join(f"{t['vm_type']} {t['name']}" for t in kvm["vm_types"])
        kvm_line = (f"/dev/kvm: API {kvm['api_version']}, KVM_CAP_VM_TYPES="
                    f"{kvm['vm_types_mask']:#x} ({names})")
    else:
        kvm_line = f"/dev/kvm: {kvm['error']}"
    lines = [
        f"kvmtrace {r['kvmtrace']} on {r['kernel']} ({r['arch']}), bcc {r['bcc']}",
        kvm_line,
        f"vendor modules: {', '.join(r['vendor_modules']) or 'none loaded'}",
        f"kprobes: {'yes' if r['kprobes']['available'] else 'NO'} ({r['kprobes']['detail']})",
        f"fentry: {r['fentry'] or 'not probed'}",
        f"BTF: {'yes' if r['btf'] else 'no'}; tracefs: {r['tracefs'] or 'NOT MOUNTED'}; "
        f"ring buffer: {'yes' if r['ringbuf'] else 'no (perf buffer)'}",
        f"headers: {r['headers']['path'] or 'MISSING'} ({r['headers']['release']})",
        "",
        "probe points" + ("" if r["attach_tested"] else " (planned; attach not tested)") + ":",
    ]
    for p in r["points"]:
        planned = not r["attach_tested"] and p["mechanism"] != planmod.Mechanism.NONE
        state = "attached" if p["attached"] else ("planned" if planned else "NOT ATTACHED")
        lines.append(f"  {p['probe']:<40} {p['mechanism']:<10} {state:<12} {p['detail']}")
    lines += [f"WARNING: {w}" for w in r["warnings"]]
    lines.append("verdict: tracing works here" if r["ok"] else "verdict: tracing cannot work here")
    return "\n".join(lines)


COMMANDS = {"serve": cmd_serve, "trace": cmd_trace, "explain": cmd_explain,
            "doctor": cmd_doctor}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # stdout closed (kvmtrace trace | head): quiet exit like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
