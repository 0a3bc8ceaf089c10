"""HTTP side of `kvmtrace serve`: the routes (/metrics, the landing page of
kvmtrace.landing, JSON APIs), shared collections and the request cap, and the
listening socket."""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
from collections.abc import Callable, Hashable
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from kvmtrace import landing

# (encoder, content type) as prometheus_client.exposition.choose_encoder gives them →
# the body that encoder would make of the registry, or None to let it do so.
Exposition = Callable[[Callable[[Collector], bytes], str], bytes | None]
# gzip level for /metrics (prometheus_client uses 9). On the 2.4 MB body of 20,000
# series, level 1 gives the same size (114 KB) in 4 ms instead of 24 ms; the client
# sees the same decompressed bytes.
GZIP_LEVEL = 1

# listen(2) backlog: a burst of concurrent scrapes waits in the kernel's queue instead
# of being refused (socketserver's default is 5). As Go's net package (node_exporter):
# ask for the most, the kernel caps it at net.core.somaxconn (4096 since 5.4). 128 was
# too few: 200 scrapes at once overflowed it and some waited 1 s for a SYN resend.
LISTEN_BACKLOG = socket.SOMAXCONN
DEFAULT_PORT = 9929
DEFAULT_ADDRESS = f":{DEFAULT_PORT}"


class AddressError(ValueError):
    pass


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or '[v6]:PORT' → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"bad listen address {text!r}: expected HOST:PORT, e.g. :{DEFAULT_PORT}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    # A client that sends nothing (or stalls mid-request) is dropped after this long,
    # so idle connections cannot pile up (each holds a thread and an fd).
    timeout = 30

    def log_message(self, format, *args):
        pass


class SingleFlight:
    """Concurrent calls with the same key share one run: the first caller runs ``fn``,
    the others that arrive meanwhile wait for it and get its result (so 200 scrapes at
    once cost one collection, not 200 in a row behind the collector's lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, _Flight] = {}

    def do(self, key: Hashable, fn: Callable[[], object]) -> object:
        with self._lock:
            flight = self._running.get(key)
            leader = flight is None
            if leader:
                flight = self._running[key] = _Flight()
        if leader:
            try:
                flight.result = fn()
            except BaseException as exc:  # handed to every waiter, then raised here too
                flight.error = exc
            finally:
                with self._lock:
                    del self._running[key]
                flight.done.set()
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.result


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


def metrics_app(registry: CollectorRegistry, exposition: Exposition | None = None) -> Callable:
    """/metrics: prometheus_client's WSGI app, or, for plain GETs, the same response
    with the body from ``exposition`` (which must render what ``registry`` holds):
    the same content negotiation (Accept: OpenMetrics or text format, with their
    versions and name escaping) and gzip when the client accepts it. Concurrent
    plain GETs asking for the same format share one collection."""
    library = make_wsgi_app(registry)
    if exposition is None:
        return library
    flights = SingleFlight()

    def body(encoder, content_type: str, gzipped: bool) -> bytes | None:
        output = exposition(encoder, content_type)
        if output is not None and gzipped:
            output = gzip.compress(output, compresslevel=GZIP_LEVEL)
        return output

    def app(environ, start_response):
        if (environ.get("REQUEST_METHOD") != "GET"
                or "name[]" in parse_qs(environ.get("QUERY_STRING", ""))):
            return library(environ, start_response)
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT"))
        gzipped = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING"))
        output = flights.do((content_type, gzipped),
                            lambda: body(encoder, content_type, gzipped))
        if output is None:
            return library(environ, start_response)
        headers = [("Content-Type", content_type)]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app


def limit_requests(app: Callable, most: int) -> Callable:
    """At most ``most`` requests at once (0: no limit); more get 503 at once, like
    node_exporter's --web.max-requests."""
    if most <= 0:
        return app
    slots = threading.BoundedSemaphore(most)

    def limited(environ, start_response):
        if not slots.acquire(blocking=False):
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"too many concurrent requests (--web.max-requests {most})\n".encode()]
        try:
            return app(environ, start_response)
        finally:
            slots.release()

    return limited


def make_app(registry: CollectorRegistry, title: str,
             plan_rows: Callable[[], list[list[str]]],
             processes: Callable[[], list[dict]],
             rejections: Callable[[], list[dict]],
             exposition: Exposition | None = None,
             telemetry_path: str = "/metrics",
             readiness: Callable[[], list[dict]] = list) -> Callable:
    """The exporter's routes: metrics at ``telemetry_path`` (--web.telemetry-path), the
    landing page at / (``readiness``: the per-type readiness it shows, as
    TypeReadiness.to_json()), the JSON APIs under /api/."""
    metrics = metrics_app(registry, exposition)
    cols = ["probe", "mechanism", "attached", "detail"]
    apis: dict[str, Callable[[], str]] = {
        "/api/processes": lambda: json.dumps(processes(), indent=1),
        "/api/rejections": lambda: json.dumps(rejections(), indent=1),
        "/api/plan": lambda: json.dumps([dict(zip(cols, r, strict=True))
                                         for r in plan_rows()]),
    }

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == telemetry_path:
            return metrics(environ, start_response)
        if path in apis:
            data = apis[path]().encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [data]
        if path == "/":
            text = parse_qs(environ.get("QUERY_STRING", "")).get("filter", [""])[0]
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [landing.page(title, plan_rows(), processes(), telemetry_path,
                                 readiness(), rejections(), text)]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


def bind(app: Callable, host: str, port: int,
         tls: Callable[[], ssl.SSLContext] | None = None) -> WSGIServer:
    """Bind HOST:PORT (OSError on failure, socket.gaierror for a name that does not
    resolve); the caller runs serve_forever. The address family is what getaddrinfo
    gives for HOST, as prometheus_client's start_wsgi_server picks it; the server is its
    thread-per-request ThreadingWSGIServer. ``tls``: the server context to use for each
    new connection (kvmtrace.webconfig.Contexts.get); the handshake then happens in the
    connection's own thread, under its timeout, never in the accept loop."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family
        request_queue_size = LISTEN_BACKLOG

        def get_request(self):
            sock, addr = super().get_request()
            if tls is not None:
                sock = tls().wrap_socket(sock, server_side=True,
                                         do_handshake_on_connect=False)
            return sock, addr

        def handle_error(self, request, client_address):
            # A client that fails its TLS handshake or goes away mid-request: its own
            # problem, not a traceback on the exporter's stderr.
            return

    return make_server(sockaddr[0], port, app, server_class=Server,
                       handler_class=_QuietHandler)
