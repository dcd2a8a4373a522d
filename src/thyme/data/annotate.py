"""RL data annotated in Label Studio (paper Sec. 4.1, App. A): ``thyme data annotate export`` and
``thyme data annotate import``.

The paper's own RL data: high-resolution images (width or height above 2048 px), one question per
image about a small object (at most 5% of the image area) that can only be read by zooming, a
short answer, a rough box (x1, y1, x2, y2) whose crop shows the object, a category from
:data:`CATEGORIES`, at least one cross-check between annotators. The released RL dataset kept
no boxes and no categories; these records keep both.

**Export** (:func:`export_annotation`): every file of a folder (recursively; symlinks that leave
it are refused), one image file, or the files of a list file (one path a line, relative to the list's folder; the path rule
of :mod:`thyme.records`) is opened with :mod:`thyme.imageio` (header first, then a full decode
under the image budgets). An image is kept when its longer side is at least ``min_long_side``;
every file left out is named with its reason (:data:`SKIP_REASONS`: ``too small``, ``not an
image``, ``truncated``, ``over the image budget``, ``exif rotated`` (an EXIF orientation that
browsers apply and thyme does not), ``too large for a data URL`` (over ``max_image_mb``),
``outside the folder``, ``missing``) on
stderr and in ``DIR/skipped.jsonl``. Written: ``DIR/tasks.json`` (Label Studio tasks: ``image``,
the URL Label Studio shows, by :func:`thyme.data.review.image_url`: a data URL or a
``/data/local-files/`` URL; ``thyme_image``, the path relative to the images root; ``thyme_size``
``[W, H]``) and ``DIR/labeling_config.xml`` (:data:`LABEL_CONFIG`).

**Import** (:func:`import_annotations`): reads Label Studio's JSON export (untrusted:
:func:`thyme.data.review.read_export`, bounded; a bad task or annotation is listed, never
fatal). The image of a task is ``thyme_image`` resolved inside ``images_root`` (the folder given
to export) by :func:`thyme.records.resolve_data_path`; its size is read again from the file (the
export's numbers are not trusted). Each annotator's latest (highest id), not skipped, annotation
is checked (:func:`check_annotation`); a failing one goes to the rejected file with its reason
(:data:`REJECT_REASONS`).

**Cross-check rule** (:func:`cross_check`, ours; the paper says only "at least one cross-check"):
with two or more valid annotations on a task, every pair must agree: boxes overlap at IoU >=
``min_iou`` (0.5) AND answers are equal under the project's answer normalisation
(:func:`thyme.scoring.answers.normalise_answer` of :func:`~thyme.scoring.answers.bare`: case,
outer white space and a final period, ``$``/LaTeX noise ignored). Agreeing: ONE record, with the
box, question, answer and category of the first annotation (lowest annotation id: who annotated
first) and every annotator listed in ``annotators``. Disagreeing: nothing kept; one rejected line
with reason ``disagreement``, the pair's IoU and their answers. Categories need not agree (the
first annotator's is kept). Fewer valid annotations than ``min_annotators``: rejected,
``too_few_annotators``.

Kept records are RL records in the released schema (``thyme data convert``; read by ``thyme
train rl`` and the veRL converter unchanged): ``messages`` (the Thyme system prompt; a user turn
``<image>\\n`` + the filled Thyme user prompt, as the released records), ``images`` (the absolute
image path), ``solution``, ``question``, plus ``bbox`` (``[x1, y1, x2, y2]``, ints, pixels of the
original image), ``category``, ``annotators``, ``image_size`` (``[W, H]``), ``id``
(``task-<task id>``) and ``label_studio`` (``{"task", "annotation"}``, provenance).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from .. import protocol
from ..config import check_ranges, setting
from ..errors import ImageError, RecordError, ThymeError
from ..imageio import ImageBudgetError, image_size, load_image, open_image
from ..jsonl import ensure_writable, iter_lines_bounded
from ..records import PathRefused, resolve_data_path, within
from ..scoring.answers import bare, normalise_answer
from .labelstudio import xml_attr
from .review import ReviewConfig, clean_text, image_url, read_export, value_text

#: The six categories of the paper (App. A), spelled as the labeling config offers them.
CATEGORIES = ("OCR", "attribute", "location", "quantity", "object", "chart understanding")
#: ``from_name`` of the controls of :data:`LABEL_CONFIG`; ``IMAGE`` is the image's ``name``.
IMAGE, BOX, QUESTION, ANSWER, CATEGORY, NOTE = "image", "box", "question", "answer", "category", "note"
#: The one label of the box control.
TARGET = "target"

#: Why export leaves a file out.
SKIP_REASONS = (
    "too small",
    "not an image",
    "truncated",
    "over the image budget",
    "too large for a data URL",
    "exif rotated",
    "outside the folder",
    "missing",
)
#: Why import rejects an annotation (``reason`` of a rejected line).
REJECT_REASONS = (
    "missing_box",
    "several_boxes",
    "box_rotated",
    "box_empty",
    "box_outside_image",
    "box_too_large",
    "missing_question",
    "missing_answer",
    "unknown_category",
    "image_size_mismatch",
    "bad_annotation",
    "bad_task",
    "too_few_annotators",
    "disagreement",
)
#: The stated cross-check rule, as the summary prints it.
RULE = (
    "two or more annotators: every pair's boxes overlap at IoU >= {iou:g} and their answers are equal after normalisation; "
    "agreeing -> one record (the first annotation's box, question, answer and category; all annotators listed); else disagreement"
)

_MAX_TEXT = 2000
_MAX_NOTE = 4000
_MAX_ANNOTATIONS = 1000
_MAX_RESULTS = 200
_EXIF_ORIENTATION = 0x0112
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_EPS = 1e-6  # percent: Label Studio's float box edges may pass 100 by rounding


#: The labeling config (Label Studio XML): the image (zoomable), one box labelled ``target``,
#: the question, the answer, the category (one of :data:`CATEGORIES`), a free note.
LABEL_CONFIG = (
    "<View>\n"
    '  <Header value="One question about one small object (at most 5% of the image) that can only be read by zooming; '
    'a short answer; a tight box around the object"/>\n'
    f'  <Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true" rotateControl="false"/>\n'
    f'  <RectangleLabels name="{BOX}" toName="{IMAGE}" canRotate="false">\n'
    f'    <Label value="{TARGET}" background="red"/>\n'
    "  </RectangleLabels>\n"
    '  <Header value="Question"/>\n'
    f'  <TextArea name="{QUESTION}" toName="{IMAGE}" maxSubmissions="1" editable="true" required="true" rows="2"/>\n'
    '  <Header value="Answer (short, unambiguous)"/>\n'
    f'  <TextArea name="{ANSWER}" toName="{IMAGE}" maxSubmissions="1" editable="true" required="true"/>\n'
    '  <Header value="Category"/>\n'
    f'  <Choices name="{CATEGORY}" toName="{IMAGE}" choice="single" required="true" showInline="true">\n'
    + "".join(f'    <Choice value="{xml_attr(c)}"/>\n' for c in CATEGORIES)
    + "  </Choices>\n"
    f'  <TextArea name="{NOTE}" toName="{IMAGE}" placeholder="note (optional)" maxSubmissions="1" editable="true"/>\n'
    "</View>\n"
)


@dataclass
class AnnotateConfig:
    """Settings of ``thyme data annotate``; each field's meaning, default and source: ``--help``."""

    min_long_side: int = setting(
        2048, help="keep images whose longer side is at least this many pixels", source="paper Sec. 4.1, App. A", valid={"ge": 1}
    )
    max_area: float = setting(
        0.05,
        help="largest box area accepted, as a share of the image area",
        source="paper App. A: the object covers at most 5% of the image",
        valid={"gt": 0, "le": 1},
    )
    min_iou: float = setting(
        0.5, help="two annotators agree only when their boxes overlap at least this much (IoU)", source="ours", valid={"gt": 0, "le": 1}
    )
    min_annotators: int = setting(
        1,
        help="valid annotations a task needs before it is kept (2: every kept record was cross-checked)",
        source="ours (paper App. A: at least one cross-check)",
        valid={"ge": 1},
    )
    image_mode: Literal["data-url", "local-files"] = setting(
        "data-url",
        help="how tasks reference images: inline data URLs (self-contained) or Label Studio's local-files serving",
        source="ours",
    )
    local_files_root: str | None = setting(
        None,
        help="with --image-mode local-files: Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (every image must lie inside it)",
        source="Label Studio local storage docs",
        show_default="the images root",
    )
    max_image_mb: float = setting(64.0, help="largest image file put into a task as a data URL, in MiB", source="ours", valid={"gt": 0})
    allow_absolute_paths: bool = setting(
        False,
        help="accept paths (of the list file, or of the export's tasks) that leave their root; only for files you trust",
        source="ours",
    )
    max_export_mb: float = setting(2048.0, help="largest Label Studio export read, in MiB", source="ours", valid={"gt": 0})

    def __post_init__(self) -> None:
        check_ranges(self)


# --------------------------------------------------------------------------- export


@dataclass
class ExportSummary:
    """Totals of ``thyme data annotate export`` (the ``--json`` line).

    Attributes:
        files: files looked at; tasks: images kept (one task each); skipped: files left out.
        reasons: files left out per reason (:data:`SKIP_REASONS`).
        tasks_path, config_path, skipped_path: the files written.
        images_folder: the deepest folder holding every kept image (for a local-files storage).
    """

    files: int = 0
    tasks: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    tasks_path: str = ""
    config_path: str = ""
    skipped_path: str = ""
    images_folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidates(source: Path, allow_absolute: bool) -> tuple[Path, Iterator[tuple[str, str | None, str | None]]]:
    """The images root and ``(name, real path or None, reason or None)`` per candidate file."""
    if source.is_dir():
        root = Path(os.path.realpath(source))

        def walk() -> Iterator[tuple[str, str | None, str | None]]:
            for dirpath, dirs, files in os.walk(root, followlinks=False):
                dirs.sort()
                for d in list(dirs):  # a symlinked folder is not walked into: named, not followed
                    if os.path.islink(os.path.join(dirpath, d)):
                        dirs.remove(d)
                        yield os.path.relpath(os.path.join(dirpath, d), root), None, "outside the folder"
                for name in sorted(files):
                    p = os.path.join(dirpath, name)
                    rel = os.path.relpath(p, root)
                    real = os.path.realpath(p)
                    if not within(real, root):
                        yield rel, None, "outside the folder"
                    elif not os.path.exists(real):
                        yield rel, None, "missing"
                    else:
                        yield rel, real, None

        return root, walk()
    if not source.is_file():
        raise ThymeError(f"images not found: {source}", "pass a folder of images or a text file listing image paths (one a line)")
    root = Path(os.path.realpath(source.parent))
    one = iter([(source.name, os.path.realpath(source), None)])  # one image given: itself (check_image names its faults)
    if source.suffix.lower() in _IMAGE_SUFFIXES:
        return root, one
    try:
        with open_image(source, load=False):
            return root, one
    except ImageBudgetError:
        return root, one
    except ImageError:
        pass  # a list of paths

    def listed() -> Iterator[tuple[str, str | None, str | None]]:
        with open(source, "rb") as f:
            for n, raw in iter_lines_bounded(f, 1 << 16):
                if raw is None:
                    yield f"{source.name}:{n}", None, "not an image"
                    continue
                line = raw.decode("utf-8", "replace").strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    real = resolve_data_path(line, root, allow_absolute=allow_absolute, where=f"{source}:{n}")
                except PathRefused:
                    yield line, None, "outside the folder"
                    continue
                except RecordError:
                    yield line, None, "missing"
                    continue
                yield line, real, (None if os.path.isfile(real) else "missing")

    return root, listed()


def check_image(path: str, min_long_side: int) -> tuple[tuple[int, int] | None, str | None, str]:
    """Whether one file is an image to annotate.

    Returns:
        ``(size, reason, detail)``: ``size`` ``(W, H)`` when the header was read; ``reason``
        ``None`` for a kept image, else one of :data:`SKIP_REASONS`; ``detail`` the message.
    """
    try:
        im = open_image(path, load=False)
    except ImageBudgetError as e:
        return None, "over the image budget", e.message
    except ImageError as e:
        return None, "not an image", e.message
    try:
        size = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block: the pixels decide below
            orientation = 1
        if orientation not in (None, 1):
            hint = "browsers show it turned, so boxes would not match the pixels thyme reads; save it upright first"
            return size, "exif rotated", f"EXIF orientation {orientation}: {hint}"
        if max(size) < min_long_side:
            return size, "too small", f"{size[0]}x{size[1]}: the longer side is under {min_long_side} px"
        try:
            load_image(im, path)
        except ImageBudgetError as e:
            return size, "over the image budget", e.message
        except ImageError as e:
            return size, "truncated", e.message
        return size, None, f"{size[0]}x{size[1]}"
    finally:
        im.close()


def export_annotation(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: AnnotateConfig | None = None,
    *,
    on_skip: Callable[[dict[str, Any]], None] | None = None,
    on_task: Callable[[dict[str, Any]], None] | None = None,
) -> ExportSummary:
    """Write ``tasks.json``, ``labeling_config.xml`` and ``skipped.jsonl`` into ``out_dir`` for
    the images of ``source`` (a folder or a list file; module docstring).

    Args:
        on_skip: called with each ``{"file", "reason", "detail"}`` left out (the cli prints them).
        on_task: called with each task written (e.g. to push it to a server).

    Returns:
        The summary.

    Raises:
        ThymeError: ``source`` missing, an output that cannot be written, or (local-files mode)
            an image outside ``local_files_root``.
    """
    cfg = cfg or AnnotateConfig()
    out = ensure_writable(out_dir, what="--out", folder=True)
    root, files = _candidates(Path(source), cfg.allow_absolute_paths)
    rcfg = ReviewConfig(image_mode=cfg.image_mode, local_files_root=cfg.local_files_root, max_image_mb=cfg.max_image_mb)
    local_root = cfg.local_files_root or os.fspath(root)
    if cfg.image_mode == "local-files" and not within(os.fspath(root), os.path.realpath(local_root)):
        raise ThymeError(
            f"the images ({root}) are outside the local-files root {os.path.realpath(local_root)}",
            "pass --local-files-root (Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) above the images",
        )
    cap = int(cfg.max_image_mb * (1 << 20))
    s = ExportSummary()
    folders: set[str] = set()
    tasks_path, config_path, skipped_path = out / "tasks.json", out / "labeling_config.xml", out / "skipped.jsonl"
    with open(tasks_path, "w", encoding="utf-8") as ft, open(skipped_path, "w", encoding="utf-8") as fs:
        ft.write("[")
        for name, real, reason in files:
            s.files += 1
            size, detail = None, ""
            if reason is None:
                size, reason, detail = check_image(real, cfg.min_long_side)
            if reason is None and cfg.image_mode == "data-url" and os.path.getsize(real) > cap:
                reason = "too large for a data URL"
                detail = (
                    f"{os.path.getsize(real) / 2**20:.1f} MiB, over --max-image-mb {cfg.max_image_mb:g} (or use --image-mode local-files)"
                )
            if reason is None:
                try:
                    url = image_url(real, rcfg, local_root)
                except ThymeError as e:
                    if cfg.image_mode == "local-files":
                        raise
                    reason, detail = "not an image", e.message
            if reason is not None:
                s.skipped += 1
                s.reasons[reason] = s.reasons.get(reason, 0) + 1
                item = {"file": name, "reason": reason, "detail": detail or reason}
                fs.write(json.dumps(item, ensure_ascii=False) + "\n")
                if on_skip is not None:
                    on_skip(item)
                continue
            rel = os.path.relpath(real, root) if within(real, str(root)) else real
            task = {"data": {IMAGE: url, "thyme_image": Path(rel).as_posix(), "thyme_size": list(size)}}
            ft.write(("," if s.tasks else "") + "\n" + json.dumps(task, ensure_ascii=False))
            s.tasks += 1
            folders.add(os.path.dirname(real))
            if on_task is not None:
                on_task(task)
        ft.write("\n]\n")
    config_path.write_text(LABEL_CONFIG, encoding="utf-8")
    s.images_folder = os.path.commonpath(sorted(folders)) if folders else None
    s.tasks_path, s.config_path, s.skipped_path = str(tasks_path), str(config_path), str(skipped_path)
    return s


def format_export_summary(s: ExportSummary) -> str:
    why = ", ".join(f"{n} {r}" for r, n in sorted(s.reasons.items(), key=lambda kv: -kv[1]))
    return "\n".join(
        [
            f"{s.tasks} task(s) from {s.files} file(s); {s.skipped} left out" + (f" ({why})" if why else ""),
            f"tasks:   {s.tasks_path}",
            f"config:  {s.config_path}",
            f"skipped: {s.skipped_path}",
        ]
    )


# --------------------------------------------------------------------------- import


@dataclass
class Annotation:
    """One annotator's answer on one task, as read from the export (not yet checked).

    Attributes:
        annotator: ``completed_by`` (email when the export carries it, else the user id).
        annotation_id: Label Studio's id (the latest per annotator counts; the lowest is "first").
        boxes: each box as ``(x, y, width, height, rotation)`` in percent of the image.
        original_size: ``(original_width, original_height)`` Label Studio reported, if any.
        question, answer, category, note: the texts (bounded, without control characters).
    """

    annotator: str
    annotation_id: int
    boxes: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    original_size: tuple[int, int] | None = None
    question: str = ""
    answer: str = ""
    category: str = ""
    note: str = ""


@dataclass
class Checked:
    """An annotation that passed :func:`check_annotation`: ``bbox`` ``[x1, y1, x2, y2]`` (int pixels)."""

    ann: Annotation
    bbox: list[int]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def parse_annotation(ann: Any) -> Annotation | None:
    """One exported annotation; ``None`` for a skipped one (``was_cancelled``).

    Raises:
        RecordError: not an object, no annotator, or ``result`` not a list.
    """
    if not isinstance(ann, dict):
        raise RecordError(f"an annotation is a JSON {type(ann).__name__}, not an object")
    if ann.get("was_cancelled") is True:
        return None
    aid = ann.get("id")
    aid = aid if isinstance(aid, int) and not isinstance(aid, bool) else 0
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    if isinstance(who, bool) or not isinstance(who, (int, str)) or who == "":
        raise RecordError(f"annotation {aid} has no annotator (completed_by)")
    result = ann.get("result")
    if not isinstance(result, list):
        raise RecordError(f"annotation {aid}: 'result' is not a list")
    a = Annotation(clean_text(str(who), 200, one_line=True), aid)
    for item in result[:_MAX_RESULTS]:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            continue
        name, value = item.get("from_name"), item["value"]
        if name == BOX:
            nums = [_num(value.get(k, 0 if k == "rotation" else None)) for k in ("x", "y", "width", "height", "rotation")]
            if any(n is None for n in nums):
                raise RecordError(f"annotation {aid}: a box without numeric x, y, width, height")
            a.boxes.append(tuple(nums))  # type: ignore[arg-type]
            ow, oh = item.get("original_width"), item.get("original_height")
            if isinstance(ow, int) and isinstance(oh, int) and not isinstance(ow, bool) and not isinstance(oh, bool):
                a.original_size = (ow, oh)
        elif name == QUESTION and "text" in value:
            a.question = value_text(value["text"], _MAX_TEXT).strip()
        elif name == ANSWER and "text" in value:
            a.answer = value_text(value["text"], _MAX_TEXT).strip()
        elif name == CATEGORY and "choices" in value:
            a.category = value_text(value["choices"], 200, one_line=True)
        elif name == NOTE and "text" in value:
            a.note = value_text(value["text"], _MAX_NOTE)
    return a


def box_pixels(box: tuple[float, float, float, float], size: tuple[int, int]) -> list[int]:
    """A Label Studio box ``(x, y, width, height)`` in percent -> ``[x1, y1, x2, y2]`` in pixels
    of an image of ``size`` ``(W, H)`` (rounded to the nearest pixel, clamped to the image)."""
    x, y, w, h = box
    W, H = size
    x1, y1 = round(x * W / 100.0), round(y * H / 100.0)
    x2, y2 = round((x + w) * W / 100.0), round((y + h) * H / 100.0)
    return [min(max(0, x1), W), min(max(0, y1), H), min(max(0, x2), W), min(max(0, y2), H)]


def iou(a: list[int] | list[float], b: list[int] | list[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 when either is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def answers_agree(a: str, b: str) -> bool:
    """Whether two answers are equal under the project's answer normalisation
    (:func:`thyme.scoring.answers.normalise_answer` of :func:`~thyme.scoring.answers.bare`)."""
    return normalise_answer(bare(a)) == normalise_answer(bare(b))


def check_annotation(a: Annotation, size: tuple[int, int], cfg: AnnotateConfig) -> tuple[Checked | None, str, str]:
    """The checks of one annotation on an image of ``size`` ``(W, H)``.

    Returns:
        ``(checked, "", "")`` when it passes, else ``(None, reason, detail)`` with ``reason``
        from :data:`REJECT_REASONS`: no box or several, a rotated / empty box or one outside the
        image, a box over ``max_area`` of the image, no question, no answer, a category not in
        :data:`CATEGORIES`, or Label Studio's image size differing from the file's.
    """
    W, H = size
    if not a.boxes:
        return None, "missing_box", "no box drawn"
    if len(a.boxes) > 1:
        return None, "several_boxes", f"{len(a.boxes)} boxes drawn; one question is about one object"
    x, y, w, h, rot = a.boxes[0]
    if a.original_size is not None and tuple(a.original_size) != (W, H):
        return None, "image_size_mismatch", f"Label Studio saw {a.original_size[0]}x{a.original_size[1]}, the file is {W}x{H}"
    if rot % 360 != 0:
        return None, "box_rotated", f"a box rotated by {rot:g} degrees (draw it upright)"
    if w <= 0 or h <= 0:
        return None, "box_empty", f"width {w:g}%, height {h:g}%"
    if x < -_EPS or y < -_EPS or x + w > 100 + _EPS or y + h > 100 + _EPS:
        return None, "box_outside_image", f"x {x:g}%, y {y:g}%, width {w:g}%, height {h:g}% (in percent of the image)"
    bbox = box_pixels((x, y, w, h), size)
    if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
        return None, "box_empty", f"{bbox} is under one pixel wide or high"
    area = (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) / float(W * H)
    if area > cfg.max_area:
        return None, "box_too_large", f"the box covers {100 * area:.2f}% of the image, over {100 * cfg.max_area:g}%"
    if not a.question:
        return None, "missing_question", "no question"
    if not a.answer:
        return None, "missing_answer", "no answer"
    if a.category not in CATEGORIES:
        return None, "unknown_category", f"{a.category[:100]!r} is not one of {', '.join(CATEGORIES)}"
    return Checked(a, bbox), "", ""


def cross_check(checked: list[Checked], min_iou: float) -> dict[str, Any] | None:
    """The cross-check rule (module docstring) over a task's valid annotations.

    Returns:
        ``None`` when every pair agrees (or there is one annotation), else the first
        disagreeing pair: ``{"annotators": [a, b], "iou", "answers": [a's, b's], "boxes"}``.
    """
    for i in range(len(checked)):
        for j in range(i + 1, len(checked)):
            a, b = checked[i], checked[j]
            v = iou(a.bbox, b.bbox)
            if v < min_iou or not answers_agree(a.ann.answer, b.ann.answer):
                return {
                    "annotators": [a.ann.annotator, b.ann.annotator],
                    "iou": round(v, 4),
                    "answers": [a.ann.answer, b.ann.answer],
                    "boxes": [a.bbox, b.bbox],
                }
    return None


def rl_record(question: str, image: str, size: tuple[int, int], solution: str) -> dict[str, Any]:
    """An RL record in the released schema (``messages``, ``images``, ``solution``, ``question``):
    the Thyme system prompt, and the user turn ``<image>\\n`` + the filled Thyme user prompt
    (question, ``image`` path, ``size`` ``(W, H)``), as ``Kwai-Keye/Thyme-RL`` rows are."""
    filled = protocol.user_prompt_text(question, image, size)
    if filled.startswith(protocol.IMAGE_PLACEHOLDER):
        filled = filled[len(protocol.IMAGE_PLACEHOLDER) :].lstrip("\n")
    return {
        "messages": [
            {"role": "system", "content": protocol.SYSTEM_PROMPT},
            {"role": "user", "content": protocol.IMAGE_PLACEHOLDER + "\n" + filled},
        ],
        "images": [image],
        "solution": solution,
        "question": question,
    }


@dataclass
class ImportSummary:
    """Totals of ``thyme data annotate import`` (the ``--json`` line).

    Attributes:
        tasks: tasks in the export; bad_tasks: tasks that could not be read (listed in the rejected file).
        annotations: annotations read (skipped ones not counted); kept: records written;
        rejected: rejected lines written; reasons: rejected lines per reason.
        disagreements: ``{"task", "annotators", "iou", "answers"}`` per task whose annotators disagree.
        unannotated: tasks with no annotation.
        rule: the cross-check rule; out_path, rejected_path: the files written.
    """

    tasks: int = 0
    bad_tasks: int = 0
    annotations: int = 0
    kept: int = 0
    rejected: int = 0
    unannotated: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    rule: str = ""
    out_path: str = ""
    rejected_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _task_image(task: dict[str, Any], images_root: Path, allow_absolute: bool, where: str) -> tuple[str, str, tuple[int, int]]:
    data = task.get("data")
    if not isinstance(data, dict):
        raise RecordError(f"{where}: 'data' is not an object")
    rel = data.get("thyme_image")
    if not isinstance(rel, str) or not rel:
        raise RecordError(f"{where}: its data carry no thyme_image (not a task from thyme data annotate export)")
    path = resolve_data_path(rel, images_root, allow_absolute=allow_absolute, where=where)
    try:
        size = image_size(path)
    except ImageError as e:
        raise RecordError(f"{where}: {e.message}", "pass --images-root: the folder given to thyme data annotate export") from None
    return clean_text(rel, 1000, one_line=True), path, size


def import_annotations(
    export: str | os.PathLike | bytes,
    out_path: str | os.PathLike,
    rejected_path: str | os.PathLike | None = None,
    cfg: AnnotateConfig | None = None,
    *,
    images_root: str | os.PathLike | None = None,
) -> ImportSummary:
    """Check the annotations of a Label Studio export and write RL records (module docstring).

    Args:
        export: the export file (or its bytes).
        out_path: the kept RL records (JSONL, overwritten).
        rejected_path: the rejected annotations, one JSON line each with ``reason`` and
            ``detail`` (``None``: ``<out stem>.rejected.jsonl``).
        images_root: the folder the tasks' ``thyme_image`` paths are relative to (the folder
            given to export; default: the current folder).

    Returns:
        The :class:`ImportSummary`.

    Raises:
        ThymeError: the export cannot be read (too large, too deep, not JSON, not a list), or an
            output cannot be written. A bad task or annotation is listed, never raised.
    """
    cfg = cfg or AnnotateConfig()
    out = ensure_writable(out_path, what="--out")
    rej = ensure_writable(rejected_path or out.with_suffix("").as_posix() + ".rejected.jsonl", what="--rejected")
    root = Path(images_root) if images_root is not None else Path.cwd()
    tasks = read_export(export, max_mb=cfg.max_export_mb)
    s = ImportSummary(tasks=len(tasks), rule=RULE.format(iou=cfg.min_iou), out_path=str(out), rejected_path=str(rej))
    with open(out, "w", encoding="utf-8") as fo, open(rej, "w", encoding="utf-8") as fr:

        def reject(line: dict[str, Any]) -> None:
            s.rejected += 1
            s.reasons[line["reason"]] = s.reasons.get(line["reason"], 0) + 1
            fr.write(json.dumps(line, ensure_ascii=False) + "\n")

        for n, task in enumerate(tasks, 1):
            tid: Any = f"#{n}"
            if isinstance(task, dict) and isinstance(task.get("id"), int) and not isinstance(task.get("id"), bool):
                tid = task["id"]
            where = f"task {tid} of the Label Studio export"
            try:
                if not isinstance(task, dict):
                    raise RecordError(f"{where}: a JSON {type(task).__name__}, not a task object")
                rel, path, size = _task_image(task, root, cfg.allow_absolute_paths, where)
                anns = task.get("annotations", [])
                if not isinstance(anns, list):
                    raise RecordError(f"{where}: 'annotations' is not a list")
            except RecordError as e:
                s.bad_tasks += 1
                reject({"task": tid, "reason": "bad_task", "detail": clean_text(e.message, 1000, one_line=True)})
                continue
            base = {"task": tid, "image": rel}
            latest: dict[str, Annotation] = {}
            for ann in anns[:_MAX_ANNOTATIONS]:
                try:
                    a = parse_annotation(ann)
                except RecordError as e:
                    reject({**base, "reason": "bad_annotation", "detail": f"{where}: {clean_text(e.message, 1000, one_line=True)}"})
                    continue
                if a is None:
                    continue
                s.annotations += 1
                if a.annotator not in latest or a.annotation_id >= latest[a.annotator].annotation_id:
                    latest[a.annotator] = a
            if not latest:
                s.unannotated += 1
                continue
            valid: list[Checked] = []
            for a in sorted(latest.values(), key=lambda a: (a.annotation_id, a.annotator)):
                c, reason, detail = check_annotation(a, size, cfg)
                if c is None:
                    reject({**base, "annotation": a.annotation_id, "annotator": a.annotator, "reason": reason, "detail": detail})
                else:
                    valid.append(c)
            if not valid:
                continue
            who = [c.ann.annotator for c in valid]
            if len(valid) < cfg.min_annotators:
                reject(
                    {
                        **base,
                        "annotators": who,
                        "reason": "too_few_annotators",
                        "detail": f"{len(valid)} valid annotation(s), --min-annotators {cfg.min_annotators}",
                    }
                )
                continue
            diff = cross_check(valid, cfg.min_iou)
            if diff is not None:
                detail = f"IoU {diff['iou']:g} (needs >= {cfg.min_iou:g}); answers {diff['answers'][0]!r} / {diff['answers'][1]!r}"
                reject({**base, "annotators": who, "reason": "disagreement", "detail": detail, **diff})
                if len(s.disagreements) < 200:
                    s.disagreements.append({"task": tid, "annotators": diff["annotators"], "iou": diff["iou"], "answers": diff["answers"]})
                continue
            first = valid[0]
            rec = {"id": f"task-{tid}", **rl_record(first.ann.question, path, size, first.ann.answer)}
            rec.update(
                bbox=first.bbox,
                category=first.ann.category,
                annotators=who,
                image_size=[size[0], size[1]],
                label_studio={"task": tid, "annotation": first.ann.annotation_id},
            )
            fo.write(json.dumps(rec, ensure_ascii=False) + "\n")
            s.kept += 1
    return s


def format_import_summary(s: ImportSummary) -> str:
    lines = [
        f"{s.tasks} task(s) ({s.bad_tasks} bad, {s.unannotated} unannotated), {s.annotations} annotation(s): {s.kept} record(s) kept, {s.rejected} rejected",
        f"rule: {s.rule}",
        f"kept:     {s.out_path}",
        f"rejected: {s.rejected_path}",
    ]
    lines += [f"  {n} x {r}" for r, n in sorted(s.reasons.items(), key=lambda kv: -kv[1])]
    for d in s.disagreements[:20]:
        lines.append(f"  disagreement on task {d['task']}: {' / '.join(d['annotators'])}: IoU {d['iou']:g}, answers {d['answers']}")
    return "\n".join(lines)


def print_skip(item: dict[str, Any], file: Any = None) -> None:
    """One file left out by export, as a line on stderr (``file``): ``skipped NAME: REASON (detail)``."""
    name = re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", item["file"])
    print(f"skipped {name}: {item['reason']} ({clean_text(item['detail'], 500, one_line=True)})", file=file or sys.stderr)
