"""Iterative, bounded removal of folder trees the sandboxed code controls.

``shutil.rmtree`` recurses once per folder level (Python 3.11): a 1500-deep chain made by model
code raised ``RecursionError`` out of ``Session.close``/``Sandbox.close`` and, in
``sweep_stale_roots``, out of every later ``Sandbox()`` (reference defect, threat class "cleanup the code can break").
:func:`remove_tree` walks with one open folder descriptor at a time (no recursion, no path longer
than one name, links never followed) and stops after a bounded number of entries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

#: Most entries one :func:`remove_tree` call removes before giving up (files, links, folders).
MAX_REMOVALS = 2_000_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int) -> int:
    """Open a sub-folder without following links; a folder without read/search permission for
    this user (mode 000 set by the code, same uid) gets mode 0700 first."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        pfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{pfd}", 0o700)
        finally:
            os.close(pfd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def remove_tree(path: str, max_removals: int = MAX_REMOVALS) -> bool:
    """Remove ``path`` and everything under it; never raises.

    Depth-first with a stack of (name, device, inode) only: it descends with ``openat`` relative
    to the one open folder and climbs with ``..``, checking that ``..`` is the folder it came
    from. Returns True when ``path`` no longer exists; False when something could not be removed
    or more than ``max_removals`` entries were met (what is left stays).
    """
    try:
        return _remove_tree(os.path.abspath(path), max_removals)
    except Exception:  # noqa: BLE001 - cleanup never fails its caller
        return not os.path.lexists(path)


def _remove_tree(path: str, budget: int) -> bool:
    parent, name = os.path.split(path.rstrip("/") or "/")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return True
    top = os.open(parent or "/", _DIR_FLAGS)
    try:
        cur = _open_dir(name, top)
    except OSError:
        os.close(top)
        return False
    stack = [(name, os.fstat(cur))]
    removed = 0
    ok = True
    try:
        while True:
            sub = None
            with os.scandir(cur) as it:
                for entry in it:
                    removed += 1
                    if removed > budget:
                        return False
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if is_dir:
                        sub = entry.name
                        break
                    try:
                        os.unlink(entry.name, dir_fd=cur)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        ok = False
            if sub is not None:
                try:
                    nfd = _open_dir(sub, cur)
                except OSError:
                    with contextlib.suppress(OSError):  # an empty unreadable folder still goes
                        os.rmdir(sub, dir_fd=cur)
                        continue
                    return False
                os.close(cur)
                cur = nfd
                stack.append((sub, os.fstat(cur)))
                continue
            # cur is empty: climb and remove it
            if len(stack) == 1:
                os.close(cur)
                cur = -1
                try:
                    os.rmdir(name, dir_fd=top)
                except OSError as e:
                    return e.errno == errno.ENOENT and ok
                return ok
            up = os.open("..", _DIR_FLAGS, dir_fd=cur)
            pst = os.fstat(up)
            expect = stack[-2][1]
            if (pst.st_dev, pst.st_ino) != (expect.st_dev, expect.st_ino):
                os.close(up)
                return False  # the tree was moved under us: stop rather than remove elsewhere
            os.close(cur)
            cur = up
            done = stack.pop()[0]
            try:
                os.rmdir(done, dir_fd=cur)
            except OSError:
                return False
    finally:
        if cur >= 0:
            os.close(cur)
        os.close(top)
