"""--web.config.file: TLS and basic auth in the Prometheus exporter-toolkit format.

The file is the one node_exporter and every exporter built on
github.com/prometheus/exporter-toolkit read (docs/web-configuration.md there)::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # NoClientCert (default), ...
      client_ca_file: ca.crt
      min_version: TLS12                             # TLS10 .. TLS13
      max_version: TLS13
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
      http2: true                                    # accepted; kvmtrace serves HTTP/1.1
    basic_auth_users:
      alice: $2y$10$...                              # bcrypt hashes

Parsed strictly (``yaml.safe_load``; an unknown key, a wrong type or an unreadable file
is one :class:`WebConfigError` line). Keys of the toolkit kvmtrace does not implement
(cipher_suites, curve_preferences, prefer_server_cipher_suites, client_allowed_sans) are
refused by name rather than silently ignored. Relative paths are relative to the file.
Certificates are re-read when their files change, so they can rotate without a restart.
"""

from __future__ import annotations

import base64
import hmac
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MAX_BYTES = 1 << 20  # a web config is a few lines

CLIENT_AUTH = {
    # exporter-toolkit name -> (ssl verify mode, client CA required)
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_OPTIONAL, False),
    "RequireAnyClientCert": (ssl.CERT_REQUIRED, False),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}
VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
            "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version"}
_TLS_UNSUPPORTED = {"cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
                    "client_allowed_sans", "cert", "key"}
_HTTP_KEYS = {"headers", "http2"}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}


class WebConfigError(ValueError):
    """A bad --web.config.file: one line saying what and where."""


@dataclass(frozen=True)
class TLS:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def context(self) -> ssl.SSLContext:
        """A server context from the files as they are now (WebConfigError if bad)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = VERSIONS[self.max_version]
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            mode, _ = CLIENT_AUTH[self.client_auth_type]
            if self.client_ca_file is not None:
                ctx.load_verify_locations(cafile=self.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"tls_server_config: cannot load the certificates "
                                 f"({self.cert_file}, {self.key_file}): {exc}") from None
        ctx.verify_mode = mode
        return ctx

    def stamp(self) -> tuple:
        """What changes when a certificate file is replaced (rotation)."""
        out = []
        for p in (self.cert_file, self.key_file, self.client_ca_file):
            try:
                st = os.stat(p) if p is not None else None
                out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
            except OSError:
                out.append(None)
        return tuple(out)


@dataclass(frozen=True)
class WebConfig:
    tls: TLS | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash


def _mapping(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _keys(d: dict, allowed: set[str], where: str, unsupported: set[str] = frozenset()) -> None:
    for k in d:
        if k in unsupported:
            raise WebConfigError(f"{where}.{k}: not supported by kvmtrace")
        if k not in allowed:
            raise WebConfigError(f"{where}: unknown key {k!r} (known: "
                                 f"{', '.join(sorted(allowed))})")


def _str(d: dict, key: str, where: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise WebConfigError(f"{where}.{key}: expected a non-empty string")
    return v


def parse(text: str, base: Path = Path(".")) -> WebConfig:
    """A web config from its YAML text; paths relative to ``base``. Pure."""
    import yaml  # PyYAML: only when a web config is given

    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:  # bad dates too
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        why = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise WebConfigError(f"not valid YAML{at}: {why}") from None
    top = _mapping(data, "web config")
    _keys(top, _TOP_KEYS, "web config")
    tls = None
    t = _mapping(top.get("tls_server_config"), "tls_server_config")
    if t:
        _keys(t, _TLS_KEYS, "tls_server_config", _TLS_UNSUPPORTED)
        cert, key = (_str(t, k, "tls_server_config") for k in ("cert_file", "key_file"))
        if not cert or not key:
            raise WebConfigError("tls_server_config: cert_file and key_file are both required")
        auth = _str(t, "client_auth_type", "tls_server_config") or "NoClientCert"
        if auth not in CLIENT_AUTH:
            raise WebConfigError(f"tls_server_config.client_auth_type: {auth!r} is not one of "
                                 f"{', '.join(CLIENT_AUTH)}")
        ca = _str(t, "client_ca_file", "tls_server_config")
        if CLIENT_AUTH[auth][1] and not ca:
            raise WebConfigError(f"tls_server_config: client_auth_type {auth} needs "
                                 "client_ca_file")
        versions = {}
        for k in ("min_version", "max_version"):
            v = _str(t, k, "tls_server_config")
            if v is not None and v not in VERSIONS:
                raise WebConfigError(f"tls_server_config.{k}: {v!r} is not one of "
                                     f"{', '.join(VERSIONS)}")
            versions[k] = v
        lo, hi = versions["min_version"] or "TLS12", versions["max_version"]
        if hi and VERSIONS[hi] < VERSIONS[lo]:
            raise WebConfigError(f"tls_server_config: max_version {hi} is below "
                                 f"min_version {lo}")
        tls = TLS(base / cert, base / key, auth, base / ca if ca else None, lo, hi)
        tls.context()  # refuse bad certificates at start, in one line
    h = _mapping(top.get("http_server_config"), "http_server_config")
    _keys(h, _HTTP_KEYS, "http_server_config")
    if "http2" in h and not isinstance(h["http2"], bool):
        raise WebConfigError("http_server_config.http2: expected true or false")
    headers = _mapping(h.get("headers"), "http_server_config.headers")
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str) or "\n" in k + v or "\r" in k + v:
            raise WebConfigError(f"http_server_config.headers: {k!r}: expected one-line "
                                 "strings")
    users = {}
    for user, hashed in _mapping(top.get("basic_auth_users"), "basic_auth_users").items():
        if not isinstance(user, str) or not isinstance(hashed, str) \
                or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"basic_auth_users: {user!r}: expected a bcrypt hash "
                                 "($2y$...)")
        users[user] = hashed.encode()
    if users:
        import bcrypt  # noqa: F401  (refuse at start when it is missing)
    return WebConfig(tls, dict(headers), users)


def load(path: str) -> WebConfig:
    """The web config in file ``path`` (WebConfigError, one line, when bad)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise WebConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise WebConfigError(f"{path}: larger than {MAX_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise WebConfigError(f"{path}: not UTF-8 text") from None
    try:
        return parse(text, Path(path).resolve().parent)
    except WebConfigError as exc:
        raise WebConfigError(f"{path}: {exc}") from None


class Contexts:
    """The TLS server context, rebuilt when a certificate file changes (rotation); a
    rotation to bad files keeps the last good context (and says so once)."""

    def __init__(self, tls: TLS, warn: Callable[[str], None]):
        self._tls = tls
        self._warn = warn
        self._lock = threading.Lock()
        self._stamp = tls.stamp()
        self._ctx = tls.context()

    def get(self) -> ssl.SSLContext:
        stamp = self._tls.stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._ctx = self._tls.context()
                    except WebConfigError as exc:
                        self._warn(f"{exc}; still serving the previous certificates")
        return self._ctx


def basic_auth(app: Callable, users: Mapping[str, bytes]) -> Callable:
    """WSGI middleware: 401 unless the request carries one of ``users``' credentials.
    A checked (user, password) is remembered (bcrypt is slow on purpose), bounded."""
    import bcrypt

    good: dict[tuple[str, bytes], bool] = {}
    lock = threading.Lock()

    def check(user: str, password: bytes) -> bool:
        hashed = users.get(user)
        if hashed is None:
            bcrypt.checkpw(b"x", next(iter(users.values())))  # same cost for a bad user
            return False
        key = (user, hmac.new(hashed, password, "sha256").digest())
        with lock:
            if key in good:
                return good[key]
        ok = bcrypt.checkpw(password, hashed)
        with lock:
            if len(good) >= 256:
                good.clear()
            good[key] = ok
        return ok

    def guarded(environ, start_response):
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if user and check(user, password.encode()):
                return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Basic realm="kvmtrace"')])
        return [b"Unauthorized\n"]

    return guarded


def with_headers(app: Callable, headers: Mapping[str, str]) -> Callable:
    """WSGI middleware: ``headers`` on every response."""
    extra = list(headers.items())

    def wrapped(environ, start_response):
        def start(status, response_headers, exc_info=None):
            names = {k.lower() for k, _ in extra}
            kept = [(k, v) for k, v in response_headers if k.lower() not in names]
            return start_response(status, kept + extra, exc_info)
        return app(environ, start)

    return wrapped
