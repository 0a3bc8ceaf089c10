"""``kvmtrace serve``: the Prometheus exporter, with a live view of the calls seen.

Binds first (a taken port fails before the compile), attaches in the loader child, drops
the capabilities the kernel no longer checks before any thread starts, then serves the
collector, the landing page and the APIs while the poll loop feeds the live view."""

from __future__ import annotations

import os
import platform
import sys
import threading
from collections import deque
from collections.abc import Callable

from kvmtrace import (
    __version__,
    capdrop,
    kvmdev,
    logline,
    notify,
    privileges,
    views,
    webconfig,
)
from kvmtrace import evidence as evidencemod
from kvmtrace import plan as planmod
from kvmtrace import readiness as readinessmod
from kvmtrace import server as servermod
from kvmtrace.aggregate import Aggregator, NameBudget
from kvmtrace.allocator import Allocator
from kvmtrace.attempts import Attempt
from kvmtrace.commands import common
from kvmtrace.commands.common import UserError
from kvmtrace.decode import Event
from kvmtrace.linesink import LineSink
from kvmtrace.live import Live
from kvmtrace.starts import Start


def _notify(problem: str | None) -> None:
    if problem:
        print(f"WARNING: {problem}", file=sys.stderr)


def _web(args) -> tuple[str, int, webconfig.WebConfig, webconfig.Contexts | None]:
    """(host, port, the web configuration, its TLS contexts or None); UserError where
    --web.listen-address or --web.config.file is wrong."""
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
    return host, port, web, contexts


def _drop_capabilities(live: Live, access: privileges.Access, words: bool) -> None:
    """Only fds from here on: keep what the kernel still checks (and, for the VMMs'
    words, what /proc and their logs ask), before any thread starts."""
    keep, why = privileges.keep_after_attach(access, words)
    try:
        capdrop.drop(keep)
    except privileges.PrivilegeError as exc:
        live.close()
        raise UserError(str(exc)) from None
    print("capabilities after attach: "
          + (", ".join(privileges.names(keep)) + f" ({why})" if keep else "none"), flush=True)


def _app(args, live: Live, web: webconfig.WebConfig, sink: LineSink,
         rejections: deque[Attempt]) -> Callable:
    """The WSGI app: /metrics (the collector), the landing page and the APIs, behind the
    request limit, basic auth and the configured headers."""
    from prometheus_client import CollectorRegistry

    from kvmtrace.collector import KvmtraceCollector

    facts, runtime = live.facts, live.runtime
    registry = CollectorRegistry()
    build = {"version": __version__, "bcc_version": facts.bcc_version or "none",
             "kernel": facts.kernel_release}
    evidence = evidencemod.Refresher(facts.evidence)  # the metrics' and the landing page's
    collector = KvmtraceCollector(runtime, live.attachments, kvmdev.query, facts.arch,
                                  build, with_pid=args.pid_label,
                                  extra_health=lambda: {"live_lines_dropped": sink.dropped},
                                  evidence_query=evidence.get,
                                  owner_labels=args.metrics_labels)
    registry.register(collector)
    app = servermod.limit_requests(servermod.make_app(
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
        app = webconfig.basic_auth(app, web.users)
    if web.headers:
        app = webconfig.with_headers(app, web.headers)
    return app


def _live_view(args, live: Live, sink: LineSink, rejections: deque[Attempt]):
    """(on_attempt, on_event, on_start): rejected attempts kept for /api/rejections, and
    the live view's lines unless -q."""
    arch = live.facts.arch

    def on_attempt(a: Attempt) -> None:
        if a.rejected:
            rejections.append(a)
            if not args.quiet and a.result is None:  # a chain no KVM_CREATE_VM claimed
                sink.write("\n".join(views.attempt_note(a)))

    def on_event(ev: Event, done: list[Attempt]) -> None:
        for a in done:
            on_attempt(a)
        if not args.quiet:
            lines = [views.event_line(ev, arch, show_time=True)]
            if ev.probe == planmod.CREATE_VM and done:
                lines += views.attempt_note(done[-1])
            sink.write("\n".join(lines))

    start_log = logline.StartLog(args.log_format, sys.stderr,
                                 logline.stderr_is_journal(os.environ))

    def on_start(st: Start) -> None:
        if not st.failed:
            return
        start_log(st)  # the structured line, -q or not
        if not args.quiet:
            sink.write("\n".join(views.start_note(st)))

    return on_attempt, on_event, on_start


def run(args) -> int:
    host, port, web, contexts = _web(args)
    access = common.require_privileges()
    holder: dict = {}
    try:
        httpd = servermod.bind(lambda e, s: holder["app"](e, s), host, port,
                               contexts.get if contexts else None)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc} "
                        "(choose another with --web.listen-address)") from None
    allocator = Allocator()
    _notify(notify.status("compiling and attaching the BPF programs (loader child)"))
    live = common.start(args.strict, aggregator=Aggregator(NameBudget(args.max_series)),
                        series_ttl=args.series_ttl, recent_starts=args.rejections,
                        words=not args.no_vmm_words, owner_labels=args.metrics_labels)
    _drop_capabilities(live, access, words=not args.no_vmm_words)
    # The live view never blocks counting: lines nobody reads are dropped and counted.
    sink = LineSink(sys.stdout)
    rejections: deque[Attempt] = deque(maxlen=args.rejections)
    holder["app"] = _app(args, live, web, sink, rejections)
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    print(views.plan_table(live.attachments))
    url = f"http{'s' if contexts else ''}://{host}:{port}{args.telemetry_path}"
    print(f"kvmtrace {__version__}: serving {url} (Ctrl-C to stop)", flush=True)
    on_attempt, on_event, on_start = _live_view(args, live, sink, rejections)
    live.runtime.on_start = on_start

    def after_retiring(retired: int) -> None:
        if retired:
            allocator.trim()
        live.stitcher.host_mask = kvmdev.query().vm_types_mask

    retire = common.retirer(live, args.retire_interval, after_retiring)
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
