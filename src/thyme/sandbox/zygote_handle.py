"""The caller's handle on the zygote process (:mod:`thyme.sandbox.zygote`), and the environment
the zygote and the session processes start with."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

from thyme.sandbox import wire

#: Largest control reply (zygote or session) the caller reads, in bytes.
MAX_REPLY_BYTES = 1 << 20
#: Longest wait for a control reply of the zygote, in seconds.
CONTROL_TIMEOUT_S = 30.0


def minimal_env(home: str, mpl_dir: str) -> dict[str, str]:
    """The only environment variables a zygote or session process gets (threat class "host
    information leaks"): ``home`` as HOME and TMPDIR, one thread per maths library, and, for the
    optional libraries (``SandboxConfig.optional_modules``), joblib in serial mode (sessions cannot
    fork; it would otherwise create a POSIX semaphore to probe for processes) and pyarrow's jemalloc
    without its background thread (the zygote must stay single-threaded to fork)."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": mpl_dir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "JOBLIB_MULTIPROCESSING": "0",
        "JE_ARROW_MALLOC_CONF": "background_thread:false",
    }


def mpl_cache_dir(fallback_root: str) -> str:
    """A writable matplotlib cache folder (the user's cache, else one under ``fallback_root``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for d in (os.path.join(base, "thyme", "matplotlib"), os.path.join(fallback_root, ".matplotlib")):
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    return os.path.join(fallback_root, ".matplotlib")


@dataclass
class ZygoteHandle:
    """A started zygote: its process (or the bwrap around it), control socket, log and generation."""

    proc: subprocess.Popen
    sock: socket.socket
    log: Any
    gen: int
    hello: dict[str, Any]

    def log_tail(self, n: int = 2000) -> str:
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - n))
            return self.log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        try:
            wire.send_msg(self.sock, {"op": "exit"})
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            self.log.close()
        except OSError:
            pass
