"""The listening socket of ``thyme serve`` (:func:`thyme.serve.server.bind`) hands uvicorn
connections with Nagle's algorithm off (``TCP_NODELAY``): a response written in parts (headers
then body, each stream chunk) must not wait for the client's delayed ACK (about 40 ms a
response on Linux, measured by ``benchmarks/serve.py`` before the fix)."""

from __future__ import annotations

import socket

from .conftest import running_server
from .test_disconnects import _until


def test_bind_gives_a_tcp_socket_whose_connections_turn_nagle_off(scripted, sandbox):
    from thyme.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only on such sockets
    finally:
        sock.close()
    with running_server(scripted, sandbox) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 200")
            _until(lambda: srv.server.server_state.connections, "no connection seen")
            socks = [p.transport.get_extra_info("socket") for p in list(srv.server.server_state.connections)]
            assert socks and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)
