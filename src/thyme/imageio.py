"""Opening untrusted images in the caller: the one place the caller decodes an image.

Images reach the caller from data it does not trust (threat model, class "caller-side bombs,
before any sandbox"): benchmark TSVs (base64), parquet ``Image`` structs, train files, records,
sandbox outputs. A PNG of a few KB can claim 30000x30000 pixels and decode to gigabytes. So
every caller-side decode goes through :func:`open_image` (files) or :func:`open_image_bytes`
(bytes, e.g. decoded base64), which check, from the header only (PIL's lazy open), BEFORE any
pixel is decoded:

- the pixel budget: ``width * height <= max_pixels``;
- the byte budget: the decoded size, ``width * height * bytes per pixel`` in PIL's memory
  layout (1 for ``1``/``L``/``P``, 2 for ``I;16``, 4 for ``I``/``F`` and for every multi-band
  8-bit mode, which PIL stores 4 bytes a pixel), in the larger of the file's mode and the mode
  asked for, is at most ``max_bytes``;
- the compression ratio: an image that decodes to at least ``ratio_floor_bytes`` may decode to
  at most ``max_ratio`` times its encoded size (photos compress 5-20x, charts and screenshots
  up to a few hundred x; deflate cannot exceed ~1032x, so a ratio near it means an almost empty
  canvas: the cheapest bomb);
- the format: one of :data:`ACCEPTED_FORMATS` (no EPS, which PIL decodes with Ghostscript, and
  no exotic plugins).

Concurrent decodes are bounded process-wide (rule): every decode takes its peak decoded bytes
(file mode plus converted copy) from a budget of ``decode_budget_bytes`` and waits while the
budget cannot cover it; one image larger than the whole budget waits until nothing else is
decoding and then decodes alone. So threads (``check_images_decode``'s pool, the OpenAI
backend's concurrent requests, the report's thumbnails) never hold more than that budget of
decoded pixels at once, plus one image.

The limits are :class:`ImageLimits`; :func:`image_limits` gives the process's current ones
(defaults <- ``THYME_IMAGE_<FIELD>`` environment variables, e.g.
``THYME_IMAGE_MAX_PIXELS=300000000``), :func:`configure_images` sets them (e.g. from a YAML
``images:`` section), and every function takes per-call keyword overrides. PIL's own hard limit
(``2 * PIL.Image.MAX_IMAGE_PIXELS``, ~179 Mpx) still applies on top.

A refusal raises :class:`ImageBudgetError` (an :class:`~thyme.errors.ImageError`) naming the
file, its dimensions and mode, the budget it exceeds, and the setting that raises it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from PIL import Image

from .config import build, setting
from .errors import ImageError

#: Largest image (in pixels) accepted as model input: well above 8K (8064x5241 = 42 Mpx) and
#: 16K panoramas, below PIL's hard decompression-bomb error (179 Mpx). Above it we refuse with
#: a clear message instead of decoding gigabytes. (Default of :attr:`ImageLimits.max_pixels`.)
MAX_IMAGE_PIXELS = 150_000_000

#: Formats the caller decodes (PIL format names; PIL's JPEG opener also gives multi-picture
#: JPEGs from phones, as ``MPO``).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

#: Environment variable prefix of the limits: ``THYME_IMAGE_MAX_PIXELS`` etc.
ENV_PREFIX = "THYME_IMAGE_"


class ImageBudgetError(ImageError):
    """An image refused from its header: over the pixel, byte or compression-ratio budget."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Budgets of a caller-side image decode (module docstring)."""

    max_pixels: int = setting(MAX_IMAGE_PIXELS, help="largest image accepted, in pixels (width * height)", source="ours: above 8K and 16K panoramas, below PIL's 179 Mpx hard limit")
    max_bytes: int = setting(
        600_000_000,
        help="largest decoded size of one image, in bytes (PIL layout: 4 bytes a pixel for RGB/RGBA)",
        source="ours: the largest accepted image (150 Mpx) at 4 bytes a pixel; no image accepted before is refused",
    )
    max_ratio: float = setting(1000.0, help="largest decoded size / encoded size of an image decoding to at least ratio_floor_bytes", source="ours: deflate tops out near 1032x; photos 5-20x, charts a few hundred x")
    ratio_floor_bytes: int = setting(64 << 20, help="decoded size (bytes) from which max_ratio applies", source="ours: small images cost little whatever their ratio")
    decode_budget_bytes: int = setting(
        2 << 30,
        help="decoded bytes that concurrent decodes may hold at once, process-wide (one larger image decodes alone)",
        source="ours: three of the largest accepted images; a few hundred ordinary ones",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}")


def _env_limits() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ImageLimits):
        raw = os.environ.get(ENV_PREFIX + f.name.upper())
        if raw:
            try:
                out[f.name] = float(raw) if f.name == "max_ratio" else int(float(raw))
            except ValueError:
                raise ImageError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a number", "unset it or give a positive number") from None
    return out


_limits: ImageLimits | None = None
_limits_lock = threading.Lock()


def image_limits() -> ImageLimits:
    """The process's current limits (defaults <- ``THYME_IMAGE_*`` environment, or what
    :func:`configure_images` set)."""
    global _limits
    with _limits_lock:
        if _limits is None:
            _limits = build(ImageLimits, section_name="images", extra=_env_limits())
        return _limits


def configure_images(limits: ImageLimits | dict[str, Any] | None = None) -> ImageLimits:
    """Set the process's limits (a dict is a YAML ``images:`` section: the environment still
    overrides it); ``None`` goes back to defaults <- environment. Returns the new limits."""
    global _limits
    if isinstance(limits, dict) or limits is None:
        limits = build(ImageLimits, limits or {}, section_name="images", extra=_env_limits())
    with _limits_lock:
        _limits = limits
    return limits


# --------------------------------------------------------------------------- decode budget


class _DecodeBudget:
    """A process-wide semaphore weighted by decoded bytes (module docstring's rule)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._used = 0
        self._active = 0
        self.peak = 0  # the most bytes held at once (tests read it)

    @contextmanager
    def hold(self, nbytes: int, capacity: int) -> Iterator[None]:
        with self._cond:
            # an image bigger than the whole budget waits for an idle process and decodes alone
            while self._active and self._used + nbytes > capacity:
                self._cond.wait()
            self._used += nbytes
            self._active += 1
            self.peak = max(self.peak, self._used)
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._active -= 1
                self._cond.notify_all()


_budget = _DecodeBudget()


def decode_budget_peak(reset: bool = False) -> int:
    """The most decoded bytes held at once by concurrent decodes so far (``reset``: start over)."""
    with _budget._cond:
        peak = _budget.peak
        if reset:
            _budget.peak = _budget._used
    return peak


# --------------------------------------------------------------------------- the checks


def pixel_bytes(mode: str) -> int:
    """Bytes a pixel of PIL ``mode`` takes once decoded (PIL's in-memory layout)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16") or mode.startswith("BGR;1"):
        return 2
    if mode in ("I", "F"):
        return 4
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        return 8  # unknown: assume the worst
    return 4 if bands > 1 else 1


def _limit_hint(field: str) -> str:
    return f"if you trust this file, raise the budget with the environment variable {ENV_PREFIX}{field.upper()}=N (setting images.{field}); otherwise downscale it first (the model sees at most --max-pixels anyway)"


def _px(n: int) -> str:
    return f"{n / 1e6:.0f} Mpx" if n >= 10_000_000 else f"{n / 1e6:.1f} Mpx" if n >= 1_000_000 else f"{n} px"


def check_budget(name: str, size: tuple[int, int], mode: str, encoded_bytes: int | None, *, target_mode: str | None = None, limits: ImageLimits | None = None) -> int:
    """Check an image's header against the budgets; return its peak decoded bytes.

    Args:
        name: how messages name the image (its path, or e.g. ``"<base64 image of question 3>"``).
        size: ``(width, height)`` from the header.
        mode: the file's PIL mode; ``target_mode``: the mode it will be converted to.
        encoded_bytes: the encoded (file) size, for the ratio check (``None``: skipped).

    Returns:
        Bytes decoding (and converting) it holds at its peak: the weight it takes from the
        decode budget.

    Raises:
        ImageBudgetError: naming ``name``, its size and mode, and the budget exceeded.
    """
    lim = limits or image_limits()
    w, h = size
    px = w * h
    native = px * pixel_bytes(mode)
    target = px * pixel_bytes(target_mode) if target_mode and target_mode != mode else 0
    decoded = max(native, target)
    what = f"{name} is {w}x{h} {mode} ({_px(px)}, {decoded / 2**20:.0f} MiB decoded)"
    if px > lim.max_pixels:
        raise ImageBudgetError(f"image too large: {what}, above the budget of {_px(lim.max_pixels)} (max_pixels): a possible decompression bomb, refused before decoding", _limit_hint("max_pixels"))
    if decoded > lim.max_bytes:
        raise ImageBudgetError(f"image too large: {what}, above the budget of {lim.max_bytes / 2**20:.0f} MiB decoded (max_bytes): a possible decompression bomb, refused before decoding", _limit_hint("max_bytes"))
    if encoded_bytes is not None and native >= lim.ratio_floor_bytes and native > lim.max_ratio * max(1, encoded_bytes):
        raise ImageBudgetError(
            f"image too large: {what} from {encoded_bytes} encoded bytes, a ratio of {native / max(1, encoded_bytes):.0f}x, above {lim.max_ratio:.0f}x (max_ratio): a possible decompression bomb, refused before decoding",
            _limit_hint("max_ratio"),
        )
    return native + target


def _decode(im: Image.Image, name: str, mode: str | None, weight: int, limits: ImageLimits) -> Image.Image:
    with _budget.hold(weight, limits.decode_budget_bytes):
        im.load()
        if mode and im.mode != mode:
            im = im.convert(mode)
    return im


def load_image(im: Image.Image, name: str, *, mode: str | None = None, limits: ImageLimits | None = None) -> Image.Image:
    """Decode a lazily opened image (from ``open_image(..., load=False)``) under the decode
    budget, converting it to ``mode``; returns the decoded image.

    Raises:
        ImageBudgetError: over a budget (checked again: ``mode`` may need more bytes).
        ImageError: the pixels cannot be decoded (truncated file...), naming ``name``.
    """
    lim = limits or image_limits()
    weight = check_budget(name, im.size, im.mode, None, target_mode=mode, limits=lim)
    try:
        return _decode(im, name, mode, weight, lim)
    except Exception as e:
        raise ImageError(f"cannot read image {name}: {type(e).__name__}: {e}", "is it a valid image file (JPEG, PNG, WebP...)?") from e


def _limits_with(overrides: dict[str, Any]) -> ImageLimits:
    base = image_limits()
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **given) if given else base


def _open(fp: Any, name: str, encoded: int | None, *, load: bool, mode: str | None, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limits below
            im = Image.open(fp, formats=list(ACCEPTED_FORMATS))
        try:
            weight = check_budget(name, im.size, im.mode, encoded, target_mode=mode if load else None, limits=limits)
            if load:
                im = _decode(im, name, mode, weight, limits)
        except BaseException:
            im.close()
            raise
        return im
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # over PIL's own hard limit: name the size anyway
        head = _header(fp)
        if head is not None:
            check_budget(name, head[0], head[1], encoded, limits=limits)  # raises with the dimensions
        raise ImageBudgetError(
            f"image too large: {name}{f' is {head[0][0]}x{head[0][1]}' if head else ''} and was refused as a possible decompression bomb ({e}); refused before decoding",
            f"PIL refuses images above 2 * PIL.Image.MAX_IMAGE_PIXELS ({2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels) whatever the budgets; downscale it first",
        ) from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"cannot read image {name}: not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})", "is it a valid image file (JPEG, PNG, WebP...)?") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...
        raise ImageError(f"cannot read image {name}: {type(e).__name__}: {e}", "is it a valid image file (JPEG, PNG, WebP...)?") from e


def _header(fp: Any) -> tuple[tuple[int, int], str] | None:
    """``(size, mode)`` from the header through PIL's format openers, without PIL's bomb
    check (only to name the size of an image that check refused); ``None`` if unknown."""
    try:
        f = open(fp, "rb") if isinstance(fp, str) else fp
        try:
            f.seek(0)
            prefix = f.read(16)
            for fmt in ACCEPTED_FORMATS:
                factory, accept = Image.OPEN[fmt]
                if accept is not None and accept(prefix) is not True:
                    continue
                f.seek(0)
                im = factory(f, "")
                return tuple(im.size), im.mode  # type: ignore[return-value]
        finally:
            if f is not fp:
                f.close()
    except Exception:
        return None
    return None


# --------------------------------------------------------------------------- public API


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Return ``(width, height)`` of the image at ``path`` by reading its header only.

    Raises:
        ImageError: the file is missing, not an image, or over a budget
            (:class:`ImageBudgetError`).
    """
    with open_image(path, load=False) as im:
        return im.size


def open_image(
    path: str | os.PathLike,
    *,
    load: bool = True,
    mode: str | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
) -> Image.Image:
    """Open an untrusted image file in the caller, budgets checked from its header first.

    Args:
        path: file path.
        load: decode the pixels now (``True``, under the process-wide decode budget) or only
            read the header (``False``; decode later with :func:`load_image`).
        mode: convert to this PIL mode (e.g. ``"RGB"``) after loading (its bytes count).
        max_pixels, max_bytes, max_ratio: this call's budgets (default: :func:`image_limits`).

    Returns:
        A PIL image (decoded when ``load`` is true).

    Raises:
        ImageBudgetError: over the pixel, byte or ratio budget: naming ``path``, its
            dimensions, the budget and the setting that raises it; nothing was decoded.
        ImageError: naming ``path``: missing, a folder, unreadable, not an image of an
            accepted format, or truncated.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ImageError(f"image not found: {p}", "check the path (relative paths are resolved from the current folder)")
    if os.path.isdir(p):
        raise ImageError(f"image path is a folder, not a file: {p}", "pass an image file")
    if not os.access(p, os.R_OK):
        raise ImageError(f"image is not readable: {p}", "check the file's permissions")
    try:
        encoded = os.path.getsize(p)
    except OSError:
        encoded = None
    return _open(p, p, encoded, load=load, mode=mode, limits=_limits_with(dict(max_pixels=max_pixels, max_bytes=max_bytes, max_ratio=max_ratio)))


def open_image_bytes(
    data: bytes | bytearray | memoryview,
    *,
    name: str = "<embedded image>",
    load: bool = True,
    mode: str | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
) -> Image.Image:
    """:func:`open_image` for encoded bytes (a decoded base64 string, a parquet ``Image``
    struct's ``bytes``); ``name`` is how messages name it (e.g. the row it came from).

    Raises:
        ImageBudgetError, ImageError: as :func:`open_image`.
    """
    raw = bytes(data)
    return _open(io.BytesIO(raw), name, len(raw), load=load, mode=mode, limits=_limits_with(dict(max_pixels=max_pixels, max_bytes=max_bytes, max_ratio=max_ratio)))
