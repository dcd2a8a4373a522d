"""The sandbox's shared input store: input images made readable to sessions without exposing
the originals (a hard link or a read-only copy under ``<root>/inputs``), shared by every session
of one file and removed when the last one closes."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from typing import Any


class InputStore:
    """Inputs made visible to (or readable by) sessions, shared by every session of one file.

    ``root/inputs/<dev>-<ino>-<size>-<mtime>-<name>``: a hard link to the original (no copy; only
    when the session user may read it but not change it) or a read-only copy. Reference counted
    by the sessions using it; the last one to close removes it. A GRPO group's sessions thus
    share one link or copy (and a copy happens once, even across file systems).
    """

    def __init__(self, root: str):
        self.dir = os.path.join(root, "inputs")
        self._lock = threading.Lock()
        self._refs: dict[tuple, list[Any]] = {}  # key -> [path, count, copied, ready Event, error]

    def acquire(self, src: str, st: os.stat_result, may_link: bool, readable: Any) -> tuple[tuple, str, bool]:
        """``(key, path, copied)`` for ``src``; ``readable(path)`` says whether a link will do.

        Raises OSError when neither a link nor a copy can be made.
        """
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            e = self._refs.get(key)
            if e is not None:
                e[1] += 1
                mine = False
            else:
                name = f"{key[0]}-{key[1]}-{key[2]}-{key[3]}-{os.path.basename(src)[-80:]}"
                e = self._refs[key] = [os.path.join(self.dir, name), 1, False, threading.Event(), None]
                mine = True
        if mine:
            try:
                e[2] = self._make(src, e[0], may_link, readable)
            except OSError as err:
                e[4] = err
                with self._lock:
                    self._refs.pop(key, None)
            e[3].set()
        else:
            e[3].wait()
        if e[4] is not None:
            raise e[4]
        return key, e[0], e[2]

    def _make(self, src: str, dst: str, may_link: bool, readable: Any) -> bool:
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
            os.chmod(self.dir, 0o711)  # crossed, not listed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)  # left over by a failed attempt
        if may_link:
            try:
                os.link(src, dst)
            except OSError:
                pass
            else:
                if readable(dst):
                    return False
                os.unlink(dst)
        tmp = f"{dst}.{secrets.token_hex(4)}.tmp"
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True

    def release(self, key: tuple) -> None:
        with self._lock:
            e = self._refs.get(key)
            if e is None:
                return
            e[1] -= 1
            if e[1] > 0:
                return
            del self._refs[key]
            with contextlib.suppress(OSError):
                os.unlink(e[0])  # under the lock: a new entry of the same name cannot exist yet
