"""--web.config.file against real certificates (made here with openssl), real HTTPS
clients (Python's ssl, curl) and the real exporter. Never skips: see conftest.py."""

from __future__ import annotations

import base64
import http.client
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import KVMTRACE, free_port
from tests.privileged.conftest import START_TIMEOUT

# host_only: TLS and basic auth of the exporter's HTTP server, not the kernel: the kernel
# tier's emulated guests leave it out (44 s of the 7.3 guest's 1255 s).
pytestmark = [pytest.mark.privileged, pytest.mark.host_only]

USER, PASSWORD = "prom", "s3cret-pw"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path, serial: str = "1") -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by
    the CA (serial: the server certificate's, to tell a rotation apart)."""
    # RFC 5280-conforming (key usage on the CA, authority key ids): Python 3.13's default
    # context verifies with VERIFY_X509_STRICT (Debian 13), so every client here does.
    if not (d / "ca.key").exists():
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                "-out", "ca.crt", "-days", "2", "-subj", "/CN=kvmtrace test CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    leaf = "keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=critical,CA:FALSE"
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(f"{ext}\n{leaf}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key.new",
                "-out", f"{name}.csr", "-subj", f"/CN=kvmtrace {name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-set_serial", serial, "-out", f"{name}.crt.new", "-days", "2",
                "-extfile", f"{name}.ext", cwd=d)
        (d / f"{name}.key.new").rename(d / f"{name}.key")  # rename: atomic for the server
        (d / f"{name}.crt.new").rename(d / f"{name}.crt")


def client_context(d: Path, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # as Python 3.13's default, on every Python
    if cert:
        ctx.load_cert_chain(d / "client.crt", d / "client.key")
    return ctx


def get(port: int, ctx: ssl.SSLContext, auth: str | None = f"{USER}:{PASSWORD}",
        path: str = "/metrics") -> tuple[int, dict, bytes, dict]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} \
        if auth else {}
    conn.request("GET", path, headers=headers)
    peer = conn.sock.getpeercert()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body, peer


@pytest.fixture(scope="module")
def tls_serve(tmp_path_factory):
    assert shutil.which("openssl"), "openssl missing (Debian's openssl package)"
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=6)).decode()
    (d / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        "  min_version: TLS12\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    port = free_port()
    proc = subprocess.Popen([*KVMTRACE, "serve", "-q", "--web.listen-address",
                             f"127.0.0.1:{port}", "--web.config.file", str(d / "web.yml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if b"kvmtrace_probe_attached" in get(port, client_context(d))[2]:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not answer over TLS within {START_TIMEOUT:.0f} s")
        time.sleep(0.3)
    yield port, d, proc
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def test_the_right_client_certificate_and_password_get_the_metrics(tls_serve):
    port, d, _ = tls_serve
    status, headers, body, peer = get(port, client_context(d))
    assert status == 200 and b"kvmtrace_build_info" in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert dict(x[0] for x in peer["subject"])["commonName"] == "kvmtrace server"


def test_wrong_or_missing_credentials_get_401(tls_serve):
    port, d, _ = tls_serve
    for auth in (None, f"{USER}:wrong", f"other:{PASSWORD}"):
        status, headers, body, _ = get(port, client_context(d), auth)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), auth
        assert b"kvmtrace" not in body


def test_no_client_certificate_fails_the_handshake_and_the_server_goes_on(tls_serve):
    port, d, proc = tls_serve
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        get(port, client_context(d, cert=False))
    assert get(port, client_context(d))[0] == 200 and proc.poll() is None


def test_plain_http_to_the_tls_port_fails_cleanly(tls_serve):
    port, d, proc = tls_serve
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert b"kvmtrace_" not in data  # no metrics over plain HTTP
    assert get(port, client_context(d))[0] == 200 and proc.poll() is None


def test_curl_is_a_real_https_client_too(tls_serve):
    port, d, _ = tls_serve
    assert shutil.which("curl"), "curl missing"
    out = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(d / "ca.crt"), "--cert", str(d / "client.crt"),
         "--key", str(d / "client.key"), "-u", f"{USER}:{PASSWORD}",
         f"https://127.0.0.1:{port}/metrics"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "kvmtrace_build_info" in out.stdout, out.stderr
    bad = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(d / "ca.crt"),
         "--cert", str(d / "client.crt"), "--key", str(d / "client.key"),
         f"https://127.0.0.1:{port}/metrics"], capture_output=True, text=True, timeout=60)
    assert bad.stdout == "401"


def test_certificates_rotate_without_a_restart(tls_serve):
    port, d, _ = tls_serve
    before = get(port, client_context(d))[3]["serialNumber"]
    make_pki(d, serial="0x7A")
    deadline = time.monotonic() + 10
    while get(port, client_context(d))[3]["serialNumber"] == before:
        assert time.monotonic() < deadline, "the new certificate was never served"
        time.sleep(0.2)
    assert get(port, client_context(d))[3]["serialNumber"] == "7A"


def test_a_client_that_never_starts_its_handshake_blocks_nobody(tls_serve):
    """Handshakes run in each connection's thread (under its 30 s timeout), not in the
    accept loop: silent connections do not stop other clients."""
    port, d, _ = tls_serve
    idle = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(5)]
    try:
        assert get(port, client_context(d))[0] == 200
    finally:
        for s in idle:
            s.close()
