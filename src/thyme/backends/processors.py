"""Loading a VLM processor (tokenizer + image processor + chat template), with or without torchvision.

Why this module exists: in transformers 5.x the Qwen VL processors (``Qwen2VLProcessor``,
``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) always build a *video* processor, and the Qwen video
processors require torchvision. Without torchvision, ``AutoProcessor.from_pretrained`` fails with
"Qwen2VLVideoProcessor requires the Torchvision library" although images work fine with the PIL
image processor (``Qwen2VLImageProcessorPil``). Thyme only feeds images, so when torchvision is
missing :func:`load_processor` builds the same processor class without its video half
(:func:`without_video`): a subclass created per processor class, used only for that load; no
transformers global (mapping, class attribute) is changed, so users who have torchvision get
``AutoProcessor``'s result untouched.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Any
from urllib.parse import urlparse

from ..errors import ModelLoadError

_NO_VIDEO_CLASSES: dict[type, type] = {}
_REACHABLE: dict[str, tuple[float, bool]] = {}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached, decided in at most ``timeout`` seconds.

    ``False`` when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set or a TCP connection to
    the ``HF_ENDPOINT`` host (default huggingface.co:443) fails; ``True`` when it succeeds or a
    proxy variable is set (the proxy decides). Why: without network, huggingface_hub retries each
    file with back-off (about 4 minutes for one processor here); knowing up front lets loading go
    straight to the local cache (``local_files_only=True``). Cached for 60 s.
    """
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return False
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    now = time.monotonic()
    hit = _REACHABLE.get(endpoint)
    if hit is not None and now - hit[0] < 60:
        return hit[1]
    u = urlparse(endpoint)
    host = u.hostname or "huggingface.co"
    port = u.port or (80 if u.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _REACHABLE[endpoint] = (now, ok)
    return ok


def hub_kwargs(src: str) -> dict[str, Any]:
    """``{"local_files_only": True}`` for a hub id when the hub is unreachable, else ``{}``."""
    if looks_like_path(src):
        return {}
    return {} if hub_reachable() else {"local_files_only": True}


def torchvision_available() -> bool:
    """Whether torchvision can be imported (transformers' own check)."""
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


def without_video(processor_class: type) -> type:
    """Return a subclass of ``processor_class`` that has no ``video_processor`` attribute.

    ``ProcessorMixin`` derives a processor's sub-processors from its ``__init__`` signature
    (``ProcessorMixin.get_attributes``), so the subclass's ``__init__`` simply omits
    ``video_processor`` and passes ``None`` up. The subclass keeps the base class's name, so
    ``save_pretrained`` still writes ``"processor_class": "<base name>"``; ``isinstance`` checks
    against the base class hold. Cached per base class.

    Calling it with video input raises (there is no video processor); images and text work.
    """
    cached = _NO_VIDEO_CLASSES.get(processor_class)
    if cached is not None:
        return cached

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        processor_class.__init__(
            self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs
        )

    sub = type(
        processor_class.__name__,
        (processor_class,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"{processor_class.__name__} without its video processor (no torchvision).",
        },
    )
    _NO_VIDEO_CLASSES[processor_class] = sub
    return sub


def resolve_processor_class_name(
    model_id_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False, local_files_only: bool = False
) -> str | None:
    """The processor class a checkpoint names, looked up as ``AutoProcessor`` does (simplified).

    Order: ``processor_class`` in ``processor_config.json``, ``preprocessor_config.json``,
    ``tokenizer_config.json``; then the model type of ``config.json`` through transformers'
    ``PROCESSOR_MAPPING_NAMES``. Hub files come from the local cache or the network like any
    ``from_pretrained``. Returns ``None`` when nothing names one (or on any lookup error).
    """
    from transformers.utils import cached_file

    kw = dict(
        revision=revision,
        local_files_only=local_files_only,
        _raise_exceptions_for_gated_repo=False,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            path = cached_file(model_id_or_path, name, **kw)
        except Exception:
            path = None
        if not path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                cls = json.load(f).get("processor_class")
        except (OSError, ValueError):
            cls = None
        if cls:
            return cls
    try:
        from transformers import AutoConfig
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        cfg = AutoConfig.from_pretrained(
            model_id_or_path, revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
        return PROCESSOR_MAPPING_NAMES.get(cfg.model_type)
    except Exception:
        return None


def load_processor(
    model_id_or_path: str | os.PathLike,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load the processor of a hub id or local checkpoint folder.

    Args:
        model_id_or_path: ``"Qwen/Qwen2.5-VL-7B-Instruct"`` or a folder.
        min_pixels / max_pixels: pixel budget of one image (pixels, i.e. width x height after
            resizing); ``None`` keeps the checkpoint's (Qwen2.5-VL: 3136 and 12845056).
            Applied as the image processor's ``size = {"shortest_edge": min_pixels,
            "longest_edge": max_pixels}`` (transformers 5's spelling; the Qwen ``smart_resize``
            keeps the aspect ratio and rounds both sides to multiples of patch x merge = 28).
        revision: hub branch, tag or commit.
        trust_remote_code: forwarded to transformers.

    Returns:
        The processor (``AutoProcessor``'s class; without torchvision, the Qwen VL processors
        come from :func:`without_video`, with the PIL image processor).

    Raises:
        ModelLoadError: naming the id / path and the likely cause (missing folder, no network
            and not in the cache, not a processor checkpoint).
    """
    src = os.fspath(model_id_or_path)
    if src.startswith("~"):
        src = os.path.expanduser(src)
    check_model_source(src)
    _check_budget(min_pixels, max_pixels)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, **hub_kwargs(src)}
    if revision is not None:
        kw["revision"] = revision
    try:
        processor = _load(src, revision=revision, **kw)
    except ModelLoadError:
        raise
    except Exception as e:
        raise load_error("processor", src, e) from e
    if not hasattr(processor, "image_processor"):
        raise ModelLoadError(
            f"{src} has no image processor (got {type(processor).__name__}): not a vision-language checkpoint?",
            "pass a Qwen2.5-VL / Qwen2-VL / Qwen3-VL (or other image-text-to-text) checkpoint",
        )
    set_pixel_budget(processor, min_pixels=min_pixels, max_pixels=max_pixels)
    return processor


def _load(src: str, *, revision: str | None, **kw: Any) -> Any:
    from transformers import AutoProcessor

    if not torchvision_available():
        name = resolve_processor_class_name(
            src,
            revision=revision,
            trust_remote_code=kw.get("trust_remote_code", False),
            local_files_only=kw.get("local_files_only", False),
        )
        base = _transformers_class(name)
        if base is not None and "video_processor" in base.get_attributes():
            return without_video(base).from_pretrained(src, **kw)
    return AutoProcessor.from_pretrained(src, **kw)


def _transformers_class(name: str | None) -> type | None:
    if not name:
        return None
    import transformers

    try:
        cls = getattr(transformers, name)
    except Exception:  # lazy module: missing backends raise on access
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "get_attributes") else None


def pixel_budget(processor: Any) -> tuple[int | None, int | None]:
    """``(min_pixels, max_pixels)`` of the processor's image processor (``None`` when unknown)."""
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)
    lo = _get(size, "shortest_edge")
    hi = _get(size, "longest_edge")
    lo = lo if lo is not None else getattr(ip, "min_pixels", None)
    hi = hi if hi is not None else getattr(ip, "max_pixels", None)
    return lo, hi


def set_pixel_budget(processor: Any, *, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Set the image pixel budget in place (see :func:`load_processor`); ``None`` keeps a bound.

    Raises:
        ModelLoadError: a bound is not a positive integer or ``min_pixels > max_pixels``.
    """
    if min_pixels is None and max_pixels is None:
        return
    _check_budget(min_pixels, max_pixels)
    ip = getattr(processor, "image_processor", processor)
    lo, hi = pixel_budget(processor)
    lo = int(min_pixels) if min_pixels is not None else lo
    hi = int(max_pixels) if max_pixels is not None else hi
    if lo is not None and hi is not None and lo > hi:
        raise ModelLoadError(f"min_pixels ({lo}) is larger than max_pixels ({hi})", "lower --min-pixels or raise --max-pixels")
    try:
        from transformers.image_utils import SizeDict

        ip.size = SizeDict(shortest_edge=lo, longest_edge=hi)
    except ImportError:  # pragma: no cover - older transformers
        ip.size = {"shortest_edge": lo, "longest_edge": hi}
    # Older image processors read these attributes instead of ``size``.
    if hasattr(ip, "min_pixels"):
        ip.min_pixels = lo
    if hasattr(ip, "max_pixels"):
        ip.max_pixels = hi


def _check_budget(min_pixels: int | None, max_pixels: int | None) -> None:
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ModelLoadError(f"{name} must be a positive integer (pixels), got {v!r}", "e.g. --max-pixels 1003520 (1280 x 28 x 28)")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ModelLoadError(
            f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})", "lower --min-pixels or raise --max-pixels"
        )


def _get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


# --------------------------------------------------------------------------- errors


def looks_like_path(src: str) -> bool:
    """Whether ``src`` is meant as a local path rather than a hub id ``owner/name``."""
    if os.path.exists(src):
        return True
    if src.startswith(("/", "./", "../", "~", ".\\", "..\\")) or src in (".", ".."):
        return True
    if os.sep != "/" and os.sep in src:
        return True
    # Hub ids have at most one "/" and no empty parts.
    parts = src.split("/")
    return len(parts) > 2 or any(p == "" for p in parts)


def check_model_source(src: str) -> None:
    """Raise :class:`ModelLoadError` early for a local path that does not exist or is not a folder."""
    if not src:
        raise ModelLoadError("no model given", "pass a hub id such as Qwen/Qwen2.5-VL-7B-Instruct or a local folder")
    if looks_like_path(src):
        p = os.path.expanduser(src)
        if not os.path.exists(p):
            raise ModelLoadError(
                f"model path not found: {src}",
                "pass an existing checkpoint folder (config.json, *.safetensors, tokenizer and processor files) "
                "or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct",
            )
        if not os.path.isdir(p):
            raise ModelLoadError(f"model path is a file, not a checkpoint folder: {src}", "pass the folder that holds config.json")


def _is_offline_error(e: BaseException) -> bool:
    text = ""
    cur: BaseException | None = e
    seen = 0
    while cur is not None and seen < 8:
        text += f" {type(cur).__name__}: {cur}"
        cur = cur.__cause__ or cur.__context__
        seen += 1
    keys = (
        "LocalEntryNotFound",
        "OfflineModeIsEnabled",
        "offline mode",
        "HF_HUB_OFFLINE",
        "ConnectionError",
        "ConnectError",
        "Max retries",
        "Temporary failure in name resolution",
        "Failed to resolve",
        "couldn't connect",
        "Cannot reach",
        "Network is unreachable",
        "not cached",
        "cannot find the requested files in the local cache",
        "We couldn't connect",
        "ProxyError",
        "timed out",
    )
    low = text.lower()
    return any(k.lower() in low for k in keys)


def hub_cli() -> tuple[str, str]:
    """``(download, login)`` commands of the hub CLI this environment has: ``hf download`` /
    ``hf auth login`` (huggingface-hub >= 0.34 ships the ``hf`` CLI; 1.x removed
    ``huggingface-cli``), else ``huggingface-cli download`` / ``huggingface-cli login``."""
    try:
        from importlib.metadata import version

        parts = [int(x) for x in re.findall(r"\d+", version("huggingface_hub"))[:2]]
        new = tuple(parts) >= (0, 34)
    except Exception:
        new = True  # what a current install has
    return ("hf download", "hf auth login") if new else ("huggingface-cli download", "huggingface-cli login")


def load_error(what: str, src: str, e: BaseException) -> ModelLoadError:
    """Turn a transformers / hub exception into a :class:`ModelLoadError` with a hint.

    ``what`` is ``"model"`` or ``"processor"``; the message names ``src`` and the original error.
    """
    detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    msg = f"cannot load the {what} of {src!r} ({detail})"
    download, login = hub_cli()
    if looks_like_path(src):
        hint = (
            f"{src} exists but is not a complete transformers checkpoint: it needs config.json, the weights "
            "(*.safetensors), the tokenizer files and preprocessor_config.json / chat template"
        )
    elif not hub_reachable() or _is_offline_error(e):
        hint = (
            "the Hugging Face hub is unreachable (offline?) and the model is not in the local cache: pass a local path, "
            f"or pre-download it on a connected machine (`{download} {src}`) and set HF_HUB_OFFLINE=1"
        )
    elif (
        "401" in detail
        or "403" in detail
        or "gated" in detail.lower()
        or "Repository Not Found" in detail
        or "RepositoryNotFound" in detail
    ):
        hint = f"check the id {src!r} (owner/name), and log in (`{login}`) if the repository is gated or private"
    elif "trust_remote_code" in detail:
        hint = "this checkpoint needs custom code: pass trust_remote_code=True if you trust it"
    else:
        hint = (
            "check the hub id / path and the revision; without network, pass a local path or pre-download the model "
            f"(`{download} {src}`) and set HF_HUB_OFFLINE=1"
        )
    return ModelLoadError(msg, hint)
