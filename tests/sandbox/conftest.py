"""Shared helpers of the sandbox tests: the two modes (bubblewrap's mount view, and none), a
module-wide sandbox per mode, and small code snippets."""

from __future__ import annotations

import errno

import pytest

from thyme.sandbox import Sandbox

from ..conftest import NO_BWRAP, require_layer

#: Every threat test runs in bubblewrap's mount view and without it (only without on NO_BWRAP).
MODES = ["no-bwrap"] if NO_BWRAP else ["bwrap", "no-bwrap"]


def make_sandbox(mode: str, **kw) -> Sandbox:
    """A sandbox in ``mode`` ("bwrap": requires the mount_view layer; "no-bwrap": without it)."""
    sb = Sandbox(mount_view=(mode == "bwrap"), memory_bytes=2 * 2**30, timeout_s=10, **kw)
    if mode == "bwrap":
        require_layer(sb.layers, "mount_view")
    return sb


@pytest.fixture(scope="module", params=MODES)
def sb(request):
    sandbox = make_sandbox(request.param)
    try:
        yield sandbox
    finally:
        sandbox.close()


def ctypes_prelude() -> str:
    """Code defining ``call(name, *args)``: a libc call returning ``-errno`` on failure."""
    return (
        "import ctypes, os, errno\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(name, *args):\n"
        "    f = getattr(libc, name)\n"
        "    r = f(*args)\n"
        "    return r if r != -1 else -ctypes.get_errno()\n"
    )


def errno_eperm() -> int:
    return errno.EPERM
