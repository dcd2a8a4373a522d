"""Threat-model class "URLs a client names" (server-side request forgery): ``thyme serve
--allow-url-fetch`` must not become a proxy into its own machine or network, DNS rebinding
included. A host is resolved once (:func:`thyme.http.resolve_checked`), every address is checked
(:func:`thyme.http.is_public_address` unless ``--allow-private-urls``), and the connection goes to
a checked address with the name kept in ``Host`` (:func:`thyme.http.fetch`'s ``allow_address``).

The resolver is ours (``socket.getaddrinfo`` patched): a rebinding host answers a public address
first and loopback afterwards."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from thyme.http import AddressRefused, HTTPLimits, fetch_sync, is_public_address
from thyme.serve import RequestError, ServeConfig
from thyme.serve.inputs import parse_request

from ..serve.conftest import png_bytes, user_message

PUBLIC = "93.184.216.34"  # a global address (the checked first answer of the rebinding host)


class Recorder:
    """A loopback HTTP server serving a PNG at any path, recording each request's Host header."""

    def __init__(self, host: str, port: int = 0):
        self.hosts: list[str] = []
        raw, hosts = png_bytes(), self.hosts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hosts.append(self.headers.get("Host", ""))
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def internal():
    srv = Recorder("127.0.0.1")
    yield srv
    srv.close()


def rebinding_resolver(monkeypatch, name: str, answers: list[list[str]]):
    """Patch ``socket.getaddrinfo``: ``name``'s n-th lookup answers ``answers[min(n, last)]``;
    other names resolve as usual. Returns the list of ``name``'s lookups (ports)."""
    real = socket.getaddrinfo
    calls: list[object] = []

    def fake(host, port, *args, **kwargs):
        if (host.decode("idna") if isinstance(host, bytes) else host) != name:  # anyio passes bytes
            return real(host, port, *args, **kwargs)
        addrs = answers[min(len(calls), len(answers) - 1)]
        calls.append(port)
        port = int(port or 0)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port) if ":" not in a else (a, port, 0, 0))
            for a in addrs
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return calls


def _parse(tmp_path, url, **cfg):
    out = tmp_path / "req"
    out.mkdir(exist_ok=True)
    return parse_request({"messages": user_message(url=url)}, ServeConfig(allow_url_fetch=True, **cfg), out)


def test_a_rebinding_host_is_resolved_once_and_never_fetched_from_loopback(tmp_path, internal, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "*")
    calls = rebinding_resolver(monkeypatch, "rebind.test", [[PUBLIC], ["127.0.0.1"]])
    with pytest.raises(RequestError) as e:  # the public address is unreachable here, or answers no PNG
        _parse(tmp_path, f"http://rebind.test:{internal.port}/a.png", fetch_timeout_s=3)
    assert e.value.status == 400
    assert internal.hosts == [], "the fetch reached loopback through the second DNS answer"
    assert len(calls) == 1, f"the host was resolved {len(calls)} times"


def test_the_connection_goes_to_the_checked_address_keeping_the_name(monkeypatch, internal):
    """Two servers on one port: the checked address (127.0.0.2, allowed by this test's policy)
    and loopback's 127.0.0.1 (refused). The second DNS answer names the refused one."""
    monkeypatch.setenv("NO_PROXY", "*")
    try:
        checked = Recorder("127.0.0.2", internal.port)
    except OSError as e:
        pytest.fail(f"cannot bind 127.0.0.2:{internal.port} ({e}): the loopback network should cover 127.0.0.0/8")
    try:
        rebinding_resolver(monkeypatch, "rebind.test", [["127.0.0.2"], ["127.0.0.1"]])
        url = f"http://rebind.test:{internal.port}/a.png"
        r = fetch_sync("GET", url, HTTPLimits(deadline_s=10, proxy="none"), allow_address=lambda a: str(a) == "127.0.0.2")
        assert r.status == 200 and r.body == png_bytes() and r.url == url
        assert checked.hosts == [f"rebind.test:{internal.port}"]  # the name is kept in Host
        assert internal.hosts == []
    finally:
        checked.close()


def test_one_refused_address_refuses_the_host(monkeypatch, internal):
    rebinding_resolver(monkeypatch, "mixed.test", [[PUBLIC, "127.0.0.1"]])
    with pytest.raises(AddressRefused) as e:
        fetch_sync(
            "GET", f"http://mixed.test:{internal.port}/a.png", HTTPLimits(deadline_s=5, proxy="none"), allow_address=is_public_address
        )
    assert e.value.address == "127.0.0.1" and "127.0.0.1" in str(e.value)
    assert internal.hosts == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433", "0x7f.1", "127.1"])
def test_loopback_in_any_spelling_is_refused(host, tmp_path, internal, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "*")
    with pytest.raises(RequestError) as e:
        _parse(tmp_path, f"http://{host}:{internal.port}/a.png", fetch_timeout_s=5)
    assert e.value.status == 400
    assert e.value.param in ("allow_private_urls", "messages"), e.value.message
    assert internal.hosts == []


@pytest.mark.parametrize(
    "addr, public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
    ],
)
def test_is_public_address(addr, public):
    import ipaddress

    assert is_public_address(ipaddress.ip_address(addr)) is public


def test_https_keeps_the_name_for_sni_and_an_ipv6_address_is_bracketed(monkeypatch):
    """What reaches the transport: the checked address in the URL (IPv6 in brackets), the name
    in ``Host`` and, for https, in ``sni_hostname`` (TLS SNI and the certificate check)."""
    import asyncio

    import httpx

    from thyme.http import fetch

    v6 = "2606:2800:220:1:248:1893:25c8:1946"
    calls = rebinding_resolver(monkeypatch, "v6.test", [[v6], ["::1"]])
    seen = []

    def handler(request):
        seen.append((str(request.url), request.headers["host"], request.extensions.get("sni_hostname")))
        return httpx.Response(200, content=b"ok")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await fetch(client, "GET", "https://v6.test:8443/a.png?x=1", HTTPLimits(deadline_s=5), allow_address=is_public_address)

    r = asyncio.run(go())
    assert r.body == b"ok" and r.url == "https://v6.test:8443/a.png?x=1"
    assert seen == [(f"https://[{v6}]:8443/a.png?x=1", "v6.test:8443", "v6.test")]
    assert len(calls) == 1
