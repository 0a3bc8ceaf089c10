"""kvmtrace command line: arguments and wiring of serve, trace, explain and doctor."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

from kvmtrace import __version__, kvmdev, notify, privileges, views, webconfig
from kvmtrace import doctor as doctormod
from kvmtrace import evidence as evidencemod
from kvmtrace import facts as factsmod
from kvmtrace import loader as loadermod
from kvmtrace import plan as planmod
from kvmtrace import readiness as readinessmod
from kvmtrace import server as servermod
from kvmtrace.aggregate import Aggregator, NameBudget
from kvmtrace.allocator import Allocator
from kvmtrace.attempts import Attempt
from kvmtrace.decode import Event
from kvmtrace.linesink import LineSink
from kvmtrace.live import Live, LiveError, Stop
from kvmtrace.starts import Start


class UserError(Exception):
    """A problem the user can fix: printed as one ERROR line, exit ``code`` (1)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


EXAMPLES_SERVE = """examples:
  kvmtrace serve                              # exporter on :9929, live view on stdout
  kvmtrace serve --web.listen-address 127.0.0.1:9929 -q
  kvmtrace serve --pid-label                  # add a pid label (unbounded over time)
  kvmtrace serve --web.telemetry-path /kvmtrace/metrics
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


PID_MAX_LIMIT = 4 * 1024 * 1024  # include/linux/threads.h: no pid is larger
SECONDS_MAX = 7 * 24 * 3600.0  # a week: longer intervals and durations are typos


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be 0 to 100000: {text!r}")
    return value


def _pid(text: str) -> int:
    value = _positive_int(text)
    if value > PID_MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"not a pid (at most {PID_MAX_LIMIT}): {text!r}")
    return value


def _telemetry_path(text: str) -> str:
    if not text.startswith("/") or any(c in text for c in "?#") or not text.isprintable():
        raise argparse.ArgumentTypeError(f"not an absolute URL path: {text!r}")
    if text.rstrip("/") in ("", "/api"):
        raise argparse.ArgumentTypeError(f"taken by the landing page or the APIs: {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= SECONDS_MAX:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be positive and at most {SECONDS_MAX:.0f} "
                                         f"seconds: {text!r}")
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
    s.add_argument("--web.telemetry-path", dest="telemetry_path", type=_telemetry_path,
                   default="/metrics", metavar="PATH",
                   help="path under which to expose metrics (default /metrics)")
    s.add_argument("--web.config.file", dest="web_config", metavar="FILE",
                   help="TLS and basic auth, in the Prometheus exporter-toolkit format")
    s.add_argument("--web.max-requests", dest="max_requests", type=_count, default=40,
                   metavar="N", help="at most N requests at once, more get 503 "
                   "(0: no limit; default 40, as node_exporter)")
    s.add_argument("--pid-label", action="store_true",
                   help="add a pid label to per-process metrics (cardinality grows)")
    s.add_argument("-q", "--quiet", action="store_true", help="no live view on stdout")
    s.add_argument("--retire-interval", type=_seconds, default=10.0, metavar="SECONDS",
                   help="fold exited processes' counts out of the kernel map this often")
    s.add_argument("--max-series", type=_positive_int, default=10_000, metavar="N",
                   help="process names first seen once N per-process series are exported "
                   "count as comm=\"other\" (default 10000)")
    s.add_argument("--series-ttl", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="fold the series of a name whose processes all exited this long ago "
                   "into comm=\"other\" (default 3600)")
    s.add_argument("--rejections", type=_positive_int, default=100, metavar="N",
                   help="keep the last N rejected attempts and N failed VM starts for "
                        "/api/rejections (default 100)")
    s.add_argument("--strict", action="store_true",
                   help="fail unless every probe point that is not optional attaches")

    t = sub.add_parser("trace", help="one line per VM creation attempt and type check",
                       epilog=EXAMPLES_TRACE, formatter_class=fmt)
    t.add_argument("-p", "--pid", type=_pid, help="trace this process only")
    t.add_argument("-n", "--name", help="only processes whose comm contains NAME")
    t.add_argument("-x", "--failed", action="store_true", help="only rejected calls")
    t.add_argument("-T", "--time", action="store_true", help="include a time column (HH:MM:SS)")
    t.add_argument("--json", action="store_true", help="JSON lines instead of columns")
    t.add_argument("--duration", type=_seconds, metavar="SECONDS",
                   help="stop after SECONDS")
    t.add_argument("--strict", action="store_true",
                   help="fail unless every probe point that is not optional attaches")
    t.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--facts", metavar="FILE", help=argparse.SUPPRESS)

    e = sub.add_parser("explain", help="wait for rejected VM creations and explain each",
                       epilog=EXAMPLES_EXPLAIN, formatter_class=fmt)
    e.add_argument("-p", "--pid", type=_pid, help="this process only")
    e.add_argument("-n", "--name", help="only processes whose comm contains NAME")
    e.add_argument("--duration", type=_seconds, metavar="SECONDS",
                   help="stop after SECONDS (then say what the host supports if none was seen)")
    e.add_argument("--json", action="store_true", help="one JSON object per rejected attempt")
    e.add_argument("--strict", action="store_true",
                   help="fail unless every probe point that is not optional attaches")

    d = sub.add_parser("doctor", help="can this host be traced? (exit 0 when it can)",
                       epilog=EXAMPLES_DOCTOR, formatter_class=fmt)
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.add_argument("--type", action="append", metavar="NAME",
                   help="only these VM types (DEFAULT, SW_PROTECTED, SEV, SEV_ES, SNP, TDX on "
                        "x86; repeat or comma-separate): exit 0 when they are usable")
    d.add_argument("--dump-facts", action="store_true",
                   help="print the raw host facts as JSON (attach to bug reports) and exit")
    d.add_argument("--facts", metavar="FILE",
                   help="plan for another host's facts (from --dump-facts); attaches nothing")
    return p


# ---- shared start-up -------------------------------------------------------

def _require_privileges() -> privileges.Access:
    """What loading, attaching and serving need (capabilities, tracefs, /dev/kvm,
    headers), not "root": one ERROR line per missing piece."""
    try:
        return privileges.check()
    except privileges.PrivilegeError as exc:
        raise UserError(str(exc)) from None


def _options(filter_pid: int = 0, facts: factsmod.HostFacts | None = None) -> loadermod.Options:
    return loadermod.Options(self_tgid=os.getpid(), filter_tgid=filter_pid,
                             use_ringbuf=facts.ringbuf if facts else True,
                             use_task_storage=facts.task_storage if facts else True)


def _start(strict: bool, filter_pid: int = 0, **kw) -> Live:
    _require_privileges()
    stop = Stop()
    try:
        return Live.start(strict, filter_pid, stop, **kw)
    except LiveError as exc:
        raise UserError(str(exc)) from None


def _notify(problem: str | None) -> None:
    if problem:
        print(f"WARNING: {problem}", file=sys.stderr)


def _wanted(args, pid: int, comm: str) -> bool:
    return (not args.pid or pid == args.pid) and (not args.name or args.name in comm)


# ---- serve -----------------------------------------------------------------

def cmd_serve(args) -> int:
    try:
        host, port = servermod.parse_address(args.listen)
    except servermod.AddressError as exc:
        raise UserError(f"{exc} (--web.listen-address)") from None
    web = webconfig.WebConfig()
    if args.web_config:
        try:
            web = webconfig.load(args.web_config)
        except webconfig.WebConfigError as exc:
            raise UserError(f"--web.config.file {exc}") from None
    contexts = webconfig.Contexts(web.tls, lambda m: print(f"WARNING: {m}", file=sys.stderr)) \
        if web.tls else None
    access = _require_privileges()
    holder: dict = {}
    try:
        httpd = servermod.bind(lambda e, s: holder["app"](e, s), host, port,
                               contexts.get if contexts else None)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc} "
                        "(choose another with --web.listen-address)") from None
    allocator = Allocator()
    _notify(notify.status("compiling and attaching the BPF programs (loader child)"))
    live = _start(args.strict, aggregator=Aggregator(NameBudget(args.max_series)),
                  series_ttl=args.series_ttl, recent_starts=args.rejections)
    # Only fds from here on: keep what the kernel still checks, before any thread starts.
    keep, why = privileges.keep_after_attach(access)
    try:
        privileges.drop(keep)
    except privileges.PrivilegeError as exc:
        live.close()
        raise UserError(str(exc)) from None
    print("capabilities after attach: "
          + (", ".join(privileges.names(keep)) + f" ({why})" if keep else "none"), flush=True)
    from prometheus_client import CollectorRegistry

    from kvmtrace.collector import KvmtraceCollector

    facts, runtime = live.facts, live.runtime
    registry = CollectorRegistry()
    build = {"version": __version__, "bcc_version": facts.bcc_version or "none",
             "kernel": facts.kernel_release}
    # The live view never blocks counting: lines nobody reads are dropped and counted.
    sink = LineSink(sys.stdout)
    evidence = evidencemod.Refresher(facts.evidence)  # the metrics' and the landing page's
    collector = KvmtraceCollector(runtime, live.attachments, kvmdev.query, facts.arch,
                                  build, with_pid=args.pid_label,
                                  extra_health=lambda: {"live_lines_dropped": sink.dropped},
                                  evidence_query=evidence.get)
    registry.register(collector)
    rejections: deque[Attempt] = deque(maxlen=args.rejections)
    holder["app"] = servermod.limit_requests(servermod.make_app(
        registry, f"kvmtrace {__version__} on {platform.node()}",
        lambda: views.plan_rows(live.attachments), runtime.processes,
        lambda: [*(st.to_json() for st in reversed(runtime.recent_starts)),
                 *({"kind": "attempt", **a.to_json()}
                   for a in sorted(rejections, key=lambda a: a.end_ns, reverse=True))],
        exposition=collector.exposition,  # /metrics body: the registry holds only it
        telemetry_path=args.telemetry_path,
        readiness=lambda: [t.to_json() for t in readinessmod.assess_parts(
            facts.arch, kvmdev.query(), evidence.get())]), args.max_requests)
    if web.users:
        holder["app"] = webconfig.basic_auth(holder["app"], web.users)
    if web.headers:
        holder["app"] = webconfig.with_headers(holder["app"], web.headers)
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    print(views.plan_table(live.attachments))
    url = f"http{'s' if contexts else ''}://{host}:{port}{args.telemetry_path}"
    print(f"kvmtrace {__version__}: serving {url} (Ctrl-C to stop)", flush=True)

    def on_attempt(a: Attempt) -> None:
        if a.rejected:
            rejections.append(a)
            if not args.quiet and a.result is None:  # a chain no KVM_CREATE_VM claimed
                sink.write("\n".join(views.attempt_note(a)))

    def on_event(ev: Event, done: list[Attempt]) -> None:
        for a in done:
            on_attempt(a)
        if not args.quiet:
            lines = [views.event_line(ev, facts.arch, show_time=True)]
            if ev.probe == planmod.CREATE_VM and done:
                lines += views.attempt_note(done[-1])
            sink.write("\n".join(lines))

    def on_start(st: Start) -> None:
        if st.failed and not args.quiet:
            sink.write("\n".join(views.start_note(st)))

    runtime.on_start = on_start
    next_retire = time.monotonic() + args.retire_interval

    def retire() -> None:
        nonlocal next_retire
        if time.monotonic() >= next_retire or runtime.filling():
            if runtime.retire_exited():
                allocator.trim()
            live.stitcher.host_mask = kvmdev.query().vm_types_mask
            next_retire = time.monotonic() + args.retire_interval

    live.open_events(on_event)
    if not args.quiet:
        sink.write(views.event_header(show_time=True))
    attached = sum(a.attached for a in live.attachments)
    _notify(notify.ready(f"{attached} probe points attached; serving {url}"))
    try:
        live.run(200, on_attempt, tick=retire, drain=False)
    finally:
        _notify(notify.stopping())
        httpd.shutdown()
        httpd.server_close()
        live.close()
        sink.flush(timeout=1.0)  # what is queued, unless nobody reads
    return 0


# ---- trace -----------------------------------------------------------------

def _retirer(live: Live, every: float = 1.0):
    """A tick that folds exited processes out of the map (and so stitches their VM
    starts, handed to runtime.on_start) every ``every`` seconds."""
    due = time.monotonic() + every

    def tick() -> None:
        nonlocal due
        if time.monotonic() >= due or live.runtime.filling():
            live.runtime.retire_exited()
            due = time.monotonic() + every

    return tick


def cmd_trace(args) -> int:
    if args.ebpf:
        facts = _facts(args.facts)
        print(loadermod.build_text(planmod.make_plan(facts), _options(args.pid or 0, facts)))
        return 0
    live = _start(args.strict, filter_pid=args.pid or 0)
    arch = live.facts.arch
    print(views.plan_table(live.attachments), file=sys.stderr)
    if not args.json:
        print(views.event_header(args.time), flush=True)

    def on_attempt(a: Attempt) -> None:  # a chain no KVM_CREATE_VM claimed
        if not _wanted(args, a.pid, a.comm) or (args.failed and not a.rejected):
            return
        if args.json:
            print(json.dumps({"kind": "attempt", "attempt": a.to_json()}, sort_keys=True))
        else:
            print("\n".join(views.attempt_note(a)), flush=True)

    def on_event(ev: Event, done: list[Attempt]) -> None:
        for a in done[:-1] if ev.probe == planmod.CREATE_VM else done:
            on_attempt(a)
        if (args.failed and not ev.rejected) or not _wanted(args, ev.pid, ev.comm):
            return
        attempt = done[-1] if ev.probe == planmod.CREATE_VM and done else None
        if args.json:
            data = json.loads(views.event_json(ev, arch))
            data["kind"] = "event"
            if attempt is not None:
                data["attempt"] = attempt.to_json()
            print(json.dumps(data, sort_keys=True), flush=True)
        else:
            lines = [views.event_line(ev, arch, args.time)]
            if attempt is not None:
                lines += views.attempt_note(attempt)
            print("\n".join(lines), flush=True)

    def on_start(st: Start) -> None:
        if not _wanted(args, st.pid, st.comm) or (args.failed and not st.failed):
            return
        if args.json:
            print(json.dumps(st.to_json(), sort_keys=True), flush=True)
        elif st.failed:
            print("\n".join(views.start_note(st)), flush=True)

    live.runtime.on_start = on_start
    live.open_events(on_event)
    print("Tracing KVM VM-type dispatch... Hit Ctrl-C to end.", file=sys.stderr, flush=True)
    try:
        live.run(100, on_attempt, duration=args.duration, tick=_retirer(live))
        live.runtime.retire_exited()  # the starts that ended before the stop
        live.lost_warning()
    finally:
        live.close()
    return 0


# ---- explain ---------------------------------------------------------------

def cmd_explain(args) -> int:
    live = _start(args.strict, filter_pid=args.pid or 0)
    facts = live.facts
    print(views.plan_table(live.attachments), file=sys.stderr)
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

    def on_event(_ev: Event, done: list[Attempt]) -> None:
        for a in done:
            on_attempt(a)

    def on_start(st: Start) -> None:
        nonlocal seen
        if not st.failed or not _wanted(args, st.pid, st.comm):
            return
        seen += 1
        if args.json:
            print(json.dumps(st.to_json(), sort_keys=True), flush=True)
        else:
            print(views.start_report(st, seen) + "\n", flush=True)

    live.runtime.on_start = on_start
    live.open_events(on_event)
    print("Waiting for rejected VM creations and failed VM starts... Hit Ctrl-C to end.",
          file=sys.stderr, flush=True)
    began = time.monotonic()
    try:
        live.run(100, on_attempt, duration=args.duration, tick=_retirer(live))
        live.reader.poll(0)
        live.runtime.retire_exited()  # the starts that ended before the stop
        live.lost_warning()
    finally:
        live.close()
    if not seen:
        kvm = facts.kvm
        if args.json:
            print(json.dumps({"kind": "summary", "rejected_attempts": 0,
                              "host_vm_types_mask": kvm.vm_types_mask,
                              "host_vm_types": kvm.supported_types}))
        else:
            print(f"No rejected VM creation seen in {time.monotonic() - began:.1f} s; "
                  f"{views.host_summary(kvm, facts.arch)}.")
    return 0


# ---- doctor ----------------------------------------------------------------

def _facts(path: str | None) -> factsmod.HostFacts:
    if path is None:
        return factsmod.gather()
    try:
        return factsmod.HostFacts.load(path)
    except OSError as exc:
        raise UserError(f"cannot read facts file {path}: {exc.strerror}",
                        doctormod.EXIT_INCOMPLETE) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"bad facts file {path}: {exc}", doctormod.EXIT_INCOMPLETE) from None


def cmd_doctor(args) -> int:
    facts = _facts(args.facts)
    if args.dump_facts:
        print(json.dumps(facts.to_json(), indent=2, sort_keys=True))
        return 0
    known = readinessmod.type_names(facts.arch)
    types = [t.strip().upper() for t in ",".join(args.type or []).split(",") if t.strip()]
    bad = [t for t in types if t not in known]
    if bad:
        raise UserError(f"--type {','.join(bad)}: not a VM type of {facts.arch} (one of "
                        f"{', '.join(known)})", doctormod.EXIT_INCOMPLETE)
    attachments, load_error = (None, None) if args.facts is not None else \
        doctormod.attach_test(facts, _options(0, facts))
    needs = None if args.facts is not None else privileges.requirements(privileges.gather())
    report = doctormod.report(facts, attachments, load_error, types or None, needs)
    print(json.dumps(report, indent=2) if args.json else doctormod.text(report))
    for e in report["errors"]:
        print(f"ERROR: {e}", file=sys.stderr)
    return report["exit_status"]


COMMANDS = {"serve": cmd_serve, "trace": cmd_trace, "explain": cmd_explain,
            "doctor": cmd_doctor}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # stdout closed (kvmtrace trace | head): quiet exit like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
