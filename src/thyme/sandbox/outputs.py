"""Collecting an execution's outputs in the caller: printed text and new images.

Runs in the caller (outside the sandbox) over files the sandboxed code controls, so it never
follows symbolic links, reads at most a few header bytes per file, and bounds the walk.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thyme.sandbox.errors import SandboxError

MAX_ENTRIES = 4096
MAX_DEPTH = 16

Snapshot = dict[str, tuple[int, int, int, int]]


def image_kind(head: bytes) -> str | None:
    """The image format of a file from its first bytes (magic numbers), or None.

    Covers what PIL and OpenCV write: JPEG, PNG, GIF, BMP, TIFF, WebP, PNM, JPEG 2000, ICO,
    Radiance HDR, OpenEXR, AVIF/HEIF.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "pnm"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    if head.startswith(b"\x00\x00\x01\x00") and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "ico"
    if head.startswith(b"#?RADIANCE") or head.startswith(b"#?RGBE"):
        return "hdr"
    if head.startswith(b"\x76\x2f\x31\x01"):
        return "exr"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "heif"
    return None


#: PIL plugins the caller may use on an output (what :func:`image_kind` accepts and PIL reads);
#: ``Image.open(..., formats=...)`` tries no other plugin (against threat class "work the caller does for the code": every PIL plugin ran).
PIL_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
    "webp": "WEBP",
    "pnm": "PPM",
    "jpeg2000": "JPEG2000",
    "ico": "ICO",
}

#: Largest output file the caller copies or decodes, in bytes, unless told otherwise.
DEFAULT_MAX_BYTES = 64 * 2**20
#: Largest output image (width x height) the caller decodes, unless told otherwise.
DEFAULT_MAX_PIXELS = 4096 * 4096


class OutputRefused(SandboxError):
    """An output file the caller will not copy or decode (not a plain file, a link count other
    than one, larger than the byte budget, sparse, or an image over the pixel budget)."""


def open_output(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, os.stat_result]:
    """Open an output once, without following links, and check the open descriptor.

    Returns ``(fd, fstat)``; the caller reads only from ``fd`` and closes it. Checks the
    descriptor itself (not the path): a regular file, exactly one link, at most ``max_bytes``
    (bytes) apparent size and allocated blocks (against threat class "output races and self-resume": checked by path, reopened by path;
    threat class "disk exhaustion": sparse or fallocated files copied as real blocks).

    Raises:
        OutputRefused: the checks fail (also when the path is a symbolic link or missing).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise OutputRefused(f"output {os.path.basename(path)!r} cannot be opened without following links: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputRefused(f"output {os.path.basename(path)!r} is not a regular file")
        if st.st_nlink != 1:
            raise OutputRefused(f"output {os.path.basename(path)!r} has {st.st_nlink} links (hard links to other files are refused)")
        if st.st_size > max_bytes or st.st_blocks * 512 > max_bytes + (1 << 16):
            raise OutputRefused(
                f"output {os.path.basename(path)!r} is larger than the {max_bytes}-byte budget ({st.st_size} bytes, {st.st_blocks * 512} allocated)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_output_bytes(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The content of an output, read from one checked descriptor (see :func:`open_output`);
    at most ``max_bytes`` bytes and never more than its size at open time.

    Raises:
        OutputRefused: the descriptor checks fail or the file grows while it is read.
    """
    fd, st = open_output(path, max_bytes)
    try:
        want = st.st_size
        chunks, got = [], 0
        while got <= want:
            b = os.pread(fd, min(1 << 20, want + 1 - got), got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > want:
            raise OutputRefused(f"output {os.path.basename(path)!r} grew while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def image_info(data: bytes) -> tuple[str, int, int]:
    """``(kind, width, height)`` of an image's bytes from its header, with PIL limited to
    :data:`PIL_FORMATS` (no pixel is decoded).

    Raises:
        OutputRefused: not an image of an accepted format, or a header PIL cannot read.
    """
    kind = image_kind(data[:32])
    if kind is None or kind not in PIL_FORMATS:
        raise OutputRefused(f"not an image of an accepted format ({', '.join(sorted(PIL_FORMATS))})")
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked next
            with Image.open(io.BytesIO(data), formats=[PIL_FORMATS[kind]]) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise OutputRefused(
            f"a {kind} image of more pixels than PIL will open; resize it in the code (e.g. cv2.resize or Image.thumbnail) before saving"
        ) from None
    except Exception as e:  # noqa: BLE001 - any PIL failure on hostile bytes is a refusal
        raise OutputRefused(f"unreadable {kind} header: {type(e).__name__}") from None
    return kind, int(w), int(h)


def check_pixels(kind: str, w: int, h: int, max_pixels: int, name: str = "output") -> None:
    """Raise OutputRefused when ``w * h`` exceeds ``max_pixels`` (the model's pixel budget)."""
    if w * h > max_pixels:
        raise OutputRefused(
            f"{name} is a {w}x{h} {kind} image ({w * h} pixels), more than the {max_pixels}-pixel budget; "
            "resize it in the code (e.g. cv2.resize or Image.thumbnail) before saving"
        )


def copy_output(
    path: str, dest: str, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, dir_fd: int | None = None
) -> str:
    """Copy an output image to ``dest`` (created, never overwritten) from one checked descriptor.

    The bytes copied are the ones checked: a regular single-link file of at most ``max_bytes``
    bytes whose header is an accepted image of at most ``max_pixels`` pixels (None: any size).
    The caller-side replacement of ``shutil.copy*`` on outputs (threat classes "output races and self-resume" and "work the caller does for the code").

    ``dir_fd``: an open folder ``dest`` (then a plain name) is created in, so that no component
    of the folder's path is looked up again (threat class "predictable output folders").

    Returns ``dest``. Raises OutputRefused (checks) or OSError (``dest`` exists or is unwritable).
    """
    data = read_output_bytes(path, max_bytes)
    if max_pixels is not None:
        kind, w, h = image_info(data)
        check_pixels(kind, w, h, max_pixels, os.path.basename(path))
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(dest, dir_fd=dir_fd)
        raise
    os.close(fd)
    return dest


def keep_output(path: str, dest_dir: str | os.PathLike, config: Any = None) -> str | None:
    """Keep a session output beyond its session: copy it into ``dest_dir`` under its own name
    (``name-1.png``... when taken) with :func:`copy_output`, within ``config``'s
    ``max_output_file_bytes`` / ``max_output_pixels`` (a :class:`~thyme.sandbox.SandboxConfig`;
    ``None``: the defaults). What every caller that keeps outputs uses (the agent loop, RL
    rollouts): never ``shutil.copy*`` by path, which a thread the code left running can race.

    Returns:
        The kept copy's path, or ``None`` when the output is refused (a link, a hard link, not
        an accepted image, over the byte or pixel budget).
    """
    max_bytes = int(getattr(config, "max_output_file_bytes", DEFAULT_MAX_BYTES) or DEFAULT_MAX_BYTES)
    max_pixels = int(getattr(config, "max_output_pixels", DEFAULT_MAX_PIXELS) or DEFAULT_MAX_PIXELS)
    folder = Path(dest_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = os.path.splitext(os.path.basename(path))
    for n in range(10_000):
        dest = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            return copy_output(path, str(dest), max_bytes, max_pixels)
        except FileExistsError:
            continue
        except OutputRefused:
            return None
    raise OSError(f"no free name for {stem}{suffix} in {folder}")


def load_image(path: str, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """Decode an output image (a loaded ``PIL.Image``) from one checked descriptor, within the
    byte and pixel budgets, with PIL limited to :data:`PIL_FORMATS`.

    Raises: OutputRefused.
    """
    data = read_output_bytes(path, max_bytes)
    kind, w, h = image_info(data)
    check_pixels(kind, w, h, max_pixels, os.path.basename(path))
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[kind]])
        im.load()
    except Exception as e:  # noqa: BLE001
        raise OutputRefused(f"cannot decode {os.path.basename(path)!r}: {type(e).__name__}") from None
    return im


def is_image_file(path: str) -> bool:
    """True when ``path`` is a regular file (not a link) whose content is an image."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return image_kind(os.pread(fd, 32, 0)) is not None
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class Scan:
    """One walk of a session folder: regular files, and totals over *every* entry.

    Attributes: files (path -> (mtime_ns, size, ino, ctime_ns)); entries (every entry seen:
    files, folders, links, others); apparent and allocated bytes of regular files; truncated
    (the walk stopped at its entry limit).
    """

    files: Snapshot = field(default_factory=dict)
    entries: int = 0
    apparent: int = 0
    allocated: int = 0
    truncated: bool = False


def scan(folder: str, max_entries: int = MAX_ENTRIES) -> Scan:
    """Walk ``folder`` (links not followed, depth <= MAX_DEPTH), counting every entry and
    stopping after ``max_entries`` of them (against threat class "work the caller does for the code": only regular files were counted, so
    symlinks and folders made every later run cost the caller seconds)."""
    out = Scan()
    stack = [(folder, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for entry in it:
                out.entries += 1
                if out.entries > max_entries:
                    out.truncated = True
                    return out
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if depth < MAX_DEPTH:
                        stack.append((entry.path, depth + 1))
                    else:
                        out.truncated = True
                elif stat.S_ISREG(st.st_mode):
                    out.files[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
                    out.apparent += st.st_size
                    out.allocated += st.st_blocks * 512
    return out


def snapshot(folder: str) -> Snapshot:
    """Regular files under ``folder`` (recursively, links not followed) -> (mtime_ns, size, ino, ctime_ns)."""
    return scan(folder).files


def new_images(before: Snapshot, after: Snapshot) -> list[str]:
    """Image files created or modified between two snapshots, ordered by (mtime, path)."""
    changed = [p for p, key in after.items() if before.get(p) != key]
    changed.sort(key=lambda p: (after[p][0], p))
    return [p for p in changed if is_image_file(p)]


def read_output(fd: int, cap: int) -> str:
    """The text captured in file ``fd`` (stdout+stderr), cut at ``cap`` bytes with a marker line."""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, cap + 1, 0)
    except OSError:
        return ""
    cut = len(data) > cap or size > cap
    text = data[:cap].decode("utf-8", errors="replace")
    if cut:
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"[... output truncated: showing the first {cap} bytes ...]\n"
    return text
