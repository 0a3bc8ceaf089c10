"""kvmtrace.webconfig: the exporter-toolkit web config, parsed strictly (pure tier; the
real TLS server and clients are in tests/privileged/test_privileged_webconfig.py)."""

from __future__ import annotations

import base64
import subprocess

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtrace import webconfig
from kvmtrace.webconfig import WebConfigError
from tests.conftest import KVMTRACE

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


@pytest.mark.parametrize(("text", "words"), [
    ("tls_server_config: {cert_file: a}\n", "cert_file and key_file"),
    ("tls_server_config: {cert_file: a, key_file: b, cipher_suites: [x]}\n",
     "cipher_suites: not supported"),
    ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS99}\n", "TLS99"),
    ("tls_server_config: {cert_file: a, key_file: b, client_auth_type: Maybe}\n", "Maybe"),
    ("tls_server_config: {cert_file: a, key_file: b, "
     "client_auth_type: RequireAndVerifyClientCert}\n", "needs client_ca_file"),
    ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS13, "
     "max_version: TLS12}\n", "below min_version"),
    ("tls_server_config: {cert_file: /nonexistent, key_file: /nonexistent}\n",
     "cannot load the certificates"),
    ("basic_auth_users: {alice: plaintext}\n", "bcrypt hash"),
    ("basic_auth_users: [alice]\n", "expected a mapping"),
    ("http_server_config: {headers: {X-A: \"a\\nb\"}}\n", "one-line"),
    ("http_server_config: {http2: maybe}\n", "true or false"),
    ("http_server_config: {keepalive: 1}\n", "unknown key 'keepalive'"),
    ("tls_config: {}\n", "unknown key 'tls_config'"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [unclosed\n", "not valid YAML at line"),
])
def test_every_bad_config_is_one_line_naming_what(text, words):
    with pytest.raises(WebConfigError) as e:
        webconfig.parse(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_good_config_and_an_empty_one():
    c = webconfig.parse(f"basic_auth_users:\n  alice: '{HASH}'\n"
                        "http_server_config:\n  http2: true\n"
                        "  headers:\n    X-Frame-Options: deny\n")
    assert c.tls is None and c.users == {"alice": HASH.encode()}
    assert c.headers == {"X-Frame-Options": "deny"}
    assert webconfig.parse("") == webconfig.WebConfig()


def test_files_that_are_not_configs(tmp_path):
    big = tmp_path / "big.yml"
    big.write_bytes(b"#" * (webconfig.MAX_BYTES + 1))
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"\xff\xfe\x00")
    for path, words in ((big, "larger than"), (binary, "not UTF-8"),
                        (tmp_path / "missing.yml", "cannot read")):
        with pytest.raises(WebConfigError, match=words):
            webconfig.load(str(path))


def _call(app, auth: str | None):
    environ = {"PATH_INFO": "/metrics"}
    if auth is not None:
        environ["HTTP_AUTHORIZATION"] = auth
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


def test_basic_auth_lets_only_the_right_password_in_and_headers_are_added():
    def inner(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    app = webconfig.with_headers(webconfig.basic_auth(inner, {"alice": HASH.encode()}),
                                 {"X-Frame-Options": "deny"})

    def basic(user_pass: bytes) -> str:
        return "Basic " + base64.b64encode(user_pass).decode()

    assert _call(app, basic(b"alice:s3cret"))[::2] == ("200 OK", b"ok")
    assert _call(app, basic(b"alice:s3cret"))[0] == "200 OK"  # remembered
    for auth in (None, basic(b"alice:wrong"), basic(b"bob:s3cret"), "Basic !!!", "Bearer x",
                 basic(b"alice")):
        status, headers, _ = _call(app, auth)
        assert status == "401 Unauthorized" and "Basic" in headers["WWW-Authenticate"]
        assert headers["X-Frame-Options"] == "deny"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_config_or_one_line_error(text):
    try:
        webconfig.parse(text)
    except WebConfigError as exc:
        assert "\n" not in str(exc)


def test_serve_refuses_a_bad_config_at_start_in_one_line(tmp_path):
    bad = tmp_path / "web.yml"
    bad.write_text("tls_server_config:\n  cert_file: x.crt\n  key_file: x.key\n  bogus: 1\n")
    p = subprocess.run([*KVMTRACE, "serve", "--web.config.file", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'bogus'" in lines[0] and str(bad) in lines[0], lines
