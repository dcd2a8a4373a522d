"""One execution from files, for ``thyme sandbox exec`` (the CLI parses arguments and calls this).

Where outputs go (threat class "predictable output folders", docs/threat-model.md): the caller
may run as root, and a fixed folder name in a shared directory (the old
``./thyme-sandbox-<time>/``) let another user plant a symbolic link under that name so that root
wrote a model-named file into any folder. Now:

- no folder named: a fresh private folder from :func:`tempfile.mkdtemp` (mode 0700, under
  ``$TMPDIR``), removed again when the run wrote nothing into it;
- a folder named (``--out-dir``): opened from ``/`` one component at a time with
  ``O_NOFOLLOW`` (a symbolic link anywhere in the path is refused), created (mode 0700) where
  missing, and checked BEFORE the run: it must be a folder owned by the caller that no other
  user may write (mode without group/other write), and writable (a probe file is created and
  removed). An existing folder that holds files is accepted under those conditions; outputs
  never replace an entry: each is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to
  the open folder, and a name already taken gets a numbered one (``crop.1.png``).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
import tempfile
from typing import Any

from thyme.sandbox.errors import OutDirError
from thyme.sandbox.outputs import copy_output
from thyme.sandbox.result import ExecResult

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Prefix of the default output folders (not ``thyme-sandbox-``: those are sandbox roots).
OUT_PREFIX = "thyme-exec-"


def _open_nofollow(path: str, create: bool) -> tuple[int, bool]:
    """Open the folder ``path`` walking from ``/`` without following any link; returns
    ``(fd, created)``. Raises OutDirError (a link or a non-folder on the way) or OSError."""
    parts = [p for p in os.path.abspath(path).split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    created = False
    try:
        for i, name in enumerate(parts):
            shown = "/" + "/".join(parts[: i + 1])
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    created = i == len(parts) - 1
                except FileExistsError:
                    pass
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    try:
                        is_link = stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                    except OSError:
                        is_link = False
                    if is_link:
                        raise OutDirError(
                            f"output folder {path}: {shown} is a symbolic link; output folders are opened without following links",
                            hint="name the real folder (e.g. `realpath` of it), or leave --out-dir out for a fresh private folder",
                        ) from None
                    raise OutDirError(
                        f"output folder {path}: {shown} is not a folder", hint="name a folder (it is created if missing)"
                    ) from None
                raise
            os.close(fd)
            fd = nfd
        return fd, created
    except BaseException:
        os.close(fd)
        raise


class OutputFolder:
    """The folder ``exec_file`` writes output images into, opened once and held by descriptor.

    Args:
        path: the folder (created if missing), or None for a fresh :func:`tempfile.mkdtemp`
            folder (``$TMPDIR/thyme-exec-*``, mode 0700).
    Raises:
        OutDirError: ``path`` goes through a symbolic link, is not a folder, is owned or
            writable by another user, or cannot be written (checked here, before any run).
    Attributes:
        path: the folder's absolute path (print it: the default one is new each time).
        temporary: whether the folder was made by :func:`tempfile.mkdtemp`.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.temporary = path is None
        if path is None:
            self.path = tempfile.mkdtemp(prefix=OUT_PREFIX)
            self._created = True
        else:
            self.path = os.path.abspath(os.fspath(path))
            self._created = False
        try:
            self.fd, made = _open_nofollow(self.path, create=not self.temporary)
        except OutDirError:
            raise
        except OSError as e:
            raise OutDirError(
                f"output folder {self.path}: cannot open or create it ({e.strerror})", hint="name a folder you may write"
            ) from None
        self._created = self._created or made
        try:
            self._check()
        except BaseException:
            self.close()
            raise
        self.written: list[str] = []

    def _check(self) -> None:
        st = os.fstat(self.fd)
        if st.st_uid != os.geteuid():
            raise OutDirError(
                f"output folder {self.path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})",
                hint="its owner could replace what is written there; name a folder of your own",
            )
        if st.st_mode & 0o022:
            raise OutDirError(
                f"output folder {self.path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})",
                hint="another user could plant links or files there; name a private folder (chmod go-w) or leave --out-dir out",
            )
        probe = f".thyme-probe-{secrets.token_hex(6)}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd))
            os.unlink(probe, dir_fd=self.fd)
        except OSError as e:
            raise OutDirError(f"output folder {self.path} is not writable ({e.strerror})", hint="name a folder you may write") from None

    def write(self, src: str, name: str, max_bytes: int, max_pixels: int | None) -> str:
        """Copy the output image ``src`` (checked from one descriptor, see
        :func:`thyme.sandbox.outputs.copy_output`) under ``name`` (a plain name; a taken one
        gets a numbered name); returns the path written."""
        name = name.replace("/", "__").lstrip(".") or "output"
        stem, ext = os.path.splitext(name)
        for n in range(1000):
            candidate = name if n == 0 else f"{stem}.{n}{ext}"
            try:
                copy_output(src, candidate, max_bytes, max_pixels, dir_fd=self.fd)
            except FileExistsError:
                continue
            path = os.path.join(self.path, candidate)
            self.written.append(path)
            return path
        raise OutDirError(f"output folder {self.path}: no free name for {name}")

    def close(self) -> None:
        """Close the folder; a default (temporary) folder that received nothing is removed."""
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)
        if self._created and not getattr(self, "written", None):
            try:
                os.rmdir(self.path)
            except OSError:
                pass


def exec_file(
    image: str | os.PathLike | list | None,
    code_path: str | os.PathLike | None,
    timeout_s: float | None = None,
    out_dir: str | os.PathLike | OutputFolder | None = None,
    config: Any = None,
    *,
    code: str | None = None,
) -> ExecResult:
    """Run the code in ``code_path`` once, in a fresh sandbox, on ``image`` (one path, a list, or None).

    Args:
        code_path: the Python file; ``"-"`` reads standard input; None with ``code`` given.
        out_dir: where result images are copied: a folder path (checked before the run, see
            :class:`OutputFolder`), an open :class:`OutputFolder`, or None for a fresh private
            temporary folder (removed when nothing was written). ``ExecResult.images`` lists
            the copies, so the paths stay valid after the sandbox deletes its session folder.
        code: the code itself, instead of ``code_path``.
    Raises:
        FileNotFoundError: ``code_path`` is missing. ImageError: an input is missing.
        OutDirError: ``out_dir`` cannot be used safely (before anything runs).
        OutputRefused: an output changed into something the caller will not copy (a link,
            a hard link, over the byte or pixel budget) after the run.
        SandboxError / ConfinementError: the sandbox cannot start.
    """
    from thyme.sandbox.sandbox import Sandbox

    if code is None:
        if code_path is None:
            raise ValueError("exec_file needs code_path or code")
        if os.fspath(code_path) == "-":
            code = sys.stdin.read()
        else:
            with open(code_path, encoding="utf-8") as f:
                code = f.read()
    images = [] if image is None else ([image] if isinstance(image, (str, os.PathLike)) else list(image))
    overrides = {} if timeout_s is None else {"timeout_s": float(timeout_s)}
    folder = out_dir if isinstance(out_dir, OutputFolder) else OutputFolder(out_dir)
    try:
        with Sandbox(config, **overrides) as sandbox:
            with sandbox.session(images=images) as session:
                result = session.run(code)
                copies = []
                for p in result.images:
                    rel = os.path.relpath(p, session.dir)
                    copies.append(folder.write(p, rel, int(sandbox.config.max_output_file_bytes), int(sandbox.config.max_output_pixels)))
                result.images = copies
    finally:
        if folder is not out_dir:
            folder.close()
    return result
