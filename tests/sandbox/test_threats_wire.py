"""Threat class "forged results on the wire" (docs/threat-model.md): the caller trusting what the child
sends: nesting depth, forged or extra results, stray descriptors.

Every test runs in bubblewrap's mount view and without it (as on a host without bwrap); in
strict mode (CI) a layer a test needs but the host lacks fails the test instead of skipping it.
"""

from __future__ import annotations

import socket
import time

import pytest

from thyme.sandbox import wire


class TestWire:
    @pytest.mark.parametrize("payload", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000])
    def test_deep_messages_raise_wire_errors_only(self, payload):
        a, b = socket.socketpair()
        try:
            b.sendall(len(payload).to_bytes(4, "big") + payload)
            with pytest.raises(wire.WireError):
                wire.recv_msg(a, deadline=time.monotonic() + 5)
        finally:
            a.close()
            b.close()

    def test_strings_that_look_deep_are_fine(self):
        a, b = socket.socketpair()
        try:
            wire.send_msg(b, {"s": "[" * 10000 + '\\"{' * 100})
            assert wire.recv_msg(a, deadline=time.monotonic() + 5)[0]["s"].startswith("[[[")
        finally:
            a.close()
            b.close()

    @pytest.mark.parametrize(
        "body",
        [
            "'[' * 20000 + ']' * 20000",  # nesting
            '\'{"op": "result", "seq": SEQ, "ok": true, "error": {"type": "X", "message": \' + \'[\' * 900 + \']\' * 900 + \'}}\'',
            '\'{"op": "result", "seq": SEQ, "ok": true, "fixes": "nope"}\'',  # malformed
            "'\\xff\\xfe'",  # not UTF-8
        ],
    )
    def test_hostile_messages_stop_the_process_and_are_results(self, sb, body):
        with sb.session() as s:
            s.run("x = 1")
            pid = s.pid
            code = (
                "import os, struct\n"
                f"m = ({body}).replace('SEQ', str({s._seq + 1})).encode('utf-8', 'surrogateescape') if isinstance(({body}), str) else b''\n"
                "os.write(3, struct.pack('>I', len(m)) + m)\n"
                "import time\ntime.sleep(0.2)\n"
            )
            r = s.run(code)
            assert not r.ok and r.error is not None
            if r.state_lost:
                assert r.error.type == "SandboxError"
                assert s.run("print(2)").stdout == "2\n" and s.pid != pid

    def test_a_forged_result_for_this_run_is_not_accepted(self, sb):
        with sb.session() as s:
            s.run("x = 1")
            seq = s._seq + 1
            r = s.run(
                "import os, struct, json, time\n"
                f"m = json.dumps({{'op': 'result', 'seq': {seq}, 'ok': True, 'error': None, 'fixes': []}}).encode()\n"
                "os.write(3, struct.pack('>I', len(m)) + m)\n"
                "time.sleep(0.3)\n"
                "raise ValueError('the real result')\n"
            )
            assert not r.ok
            assert r.error.type in ("SandboxError", "ValueError"), r.error
            assert not (r.error.type == "ValueError" and r.state_lost)
