"""kvmtrace command line: the arguments of serve, trace, explain, top and doctor, and the
dispatch to the command's module (kvmtrace.commands), which composes it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from kvmtrace import __version__, owners
from kvmtrace import server as servermod
from kvmtrace import top as topmod
from kvmtrace.commands import doctor, explain, serve, top, trace
from kvmtrace.commands.common import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


EXAMPLES_SERVE = """examples:
  kvmtrace serve                              # exporter on :9929, live view on stdout
  kvmtrace serve --web.listen-address 127.0.0.1:9929 -q
  kvmtrace serve --pid-label                  # add a pid label (unbounded over time)
  kvmtrace serve --metrics.labels=vm,pod      # series per VM and pod, under --max-series
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

EXAMPLES_TOP = """examples:
  kvmtrace top                                # attach, one row per VM or workload
  kvmtrace top --from http://localhost:9929   # read a running exporter instead
  kvmtrace top --from http://localhost:9929 --once --sort r
  watch -n 2 kvmtrace top --from http://localhost:9929 --once"""

EXAMPLES_DOCTOR = """examples:
  kvmtrace doctor                 # can kvmtrace trace this host? exit 0 when it can
  kvmtrace doctor --json"""


PID_MAX_LIMIT = 4 * 1024 * 1024  # include/linux/threads.h: no pid is larger
SECONDS_MAX = 7 * 24 * 3600.0  # a week: longer intervals and durations are typos


def _number(kind: Callable[[str], int | float], ok: Callable, wrong: str):
    """An argparse type: ``text`` as ``kind`` (int or float) where ``ok`` holds, else
    "``wrong``: 'text'" (and "not a number: 'text'" where it is none)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{wrong}: {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "must be positive")
_count = _number(int, lambda v: 0 <= v <= 100_000, "must be 0 to 100000")
_seconds = _number(float, lambda v: 0 < v <= SECONDS_MAX,  # also refuses nan and inf
                   f"must be positive and at most {SECONDS_MAX:.0f} seconds")


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


def _metric_labels(text: str) -> tuple[str, ...]:
    """--metrics.labels: a comma-separated subset of the owner labels, in their order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    wrong = [n for n in names if n not in owners.METRIC_LABELS]
    if wrong or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"not a list of distinct labels of {','.join(owners.METRIC_LABELS)}: {text!r}")
    return tuple(n for n in owners.METRIC_LABELS if n in names)


def _serve_args(sub, fmt) -> None:
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
    s.add_argument("--metrics.labels", dest="metrics_labels", type=_metric_labels,
                   default=(), metavar="LABELS",
                   help="add these owner labels (of vm,unit,pod,namespace: from each "
                        "process's cgroup and command line) to the per-process metrics and "
                        "the failed starts; each name and owner is a series under "
                        "--max-series (default: none)")
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
    s.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"),
                   default="logfmt",
                   help="the one line on stderr per failed VM start (default logfmt; "
                        "under systemd, journal fields instead)")
    s.add_argument("--no-vmm-words", action="store_true",
                   help="do not read the VMMs' stderr back (then CAP_SYS_PTRACE and "
                        "CAP_DAC_READ_SEARCH are not kept after attach)")


def _trace_args(sub, fmt) -> None:
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


def _explain_args(sub, fmt) -> None:
    e = sub.add_parser("explain", help="wait for rejected VM creations and explain each",
                       epilog=EXAMPLES_EXPLAIN, formatter_class=fmt)
    e.add_argument("-p", "--pid", type=_pid, help="this process only")
    e.add_argument("-n", "--name", help="only processes whose comm contains NAME")
    e.add_argument("--duration", type=_seconds, metavar="SECONDS",
                   help="stop after SECONDS (then say what the host supports if none was seen)")
    e.add_argument("--json", action="store_true", help="one JSON object per rejected attempt")
    e.add_argument("--strict", action="store_true",
                   help="fail unless every probe point that is not optional attaches")


def _top_args(sub, fmt) -> None:
    o = sub.add_parser("top", help="live table: one row per VM or workload",
                       epilog=EXAMPLES_TOP, formatter_class=fmt)
    o.add_argument("--from", dest="source", metavar="URL",
                   help="read a running exporter's /api/processes and /api/rejections "
                        "instead of attaching")
    o.add_argument("--once", action="store_true",
                   help="print the table once and exit (scripts, watch)")
    o.add_argument("--interval", type=_seconds, default=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2; with --once and no --from: "
                        "read this long first)")
    o.add_argument("--sort", choices=tuple(topmod.SORTS), default="f",
                   help="f failures (default), r rejected, a accepted, n name, p pid")
    o.add_argument("--filter", metavar="TEXT",
                   help="only rows whose VM/workload, unit or comm contains TEXT")


def _doctor_args(sub, fmt) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmtrace", description="Trace Linux KVM's VM-type dispatch with eBPF.")
    p.add_argument("--version", action="version", version=f"kvmtrace {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="{serve,trace,explain,top,doctor}")
    fmt = argparse.RawDescriptionHelpFormatter
    for add in (_serve_args, _trace_args, _explain_args, _top_args, _doctor_args):
        add(sub, fmt)
    return p


COMMANDS = {"serve": serve.run, "trace": trace.run, "explain": explain.run,
            "top": top.run, "doctor": doctor.run}



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
