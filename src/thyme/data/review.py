"""Manual review of Thyme records in Label Studio (paper Sec. 3.1, Fig. 3: the last stage of the
SFT data pipeline is manual review): ``thyme data review export`` and ``thyme data review import``.

**Export** (:func:`export_review`): each record of a records file becomes one Label Studio task
whose ``data`` show the question, every image of the record (the inputs, then the sandbox
outputs, in order), the response (reasoning, code and sandbox outputs, with ``[image k]`` where
an output image appears) and the final answer; plus ``thyme_id`` / ``thyme_line`` /
``thyme_sha256`` (the record's id, its line, and a digest of its question and response) so the
decisions find their record again. Written to ``DIR/tasks.json`` (the JSON list Label Studio
imports) and ``DIR/labeling_config.xml`` (:data:`LABEL_CONFIG`: accept / reject, a reject reason
from :data:`REJECT_REASONS`, a free-text note). All text is shown by Label Studio's ``Text`` tag,
which renders it as text, never as HTML (a record is untrusted).

Images (``image_mode``):

- ``data-url`` (default): each image inline as ``data:image/...;base64,...``. Self-contained:
  works with any Label Studio without storage settings; the tasks file (and Label Studio's
  database) grow by 4/3 of the image bytes.
- ``local-files``: ``/data/local-files/?d=<path relative to local_files_root>``, served by Label
  Studio itself when started with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<local_files_root>``; every image must lie inside that
  root, and the project needs a local-files storage on a folder above the images and strictly
  inside the root (Label Studio answers 404 otherwise): ``--push`` adds one on
  :attr:`ExportSummary.images_folder`, the images' common folder.

**Import** (:func:`apply_review`): reads Label Studio's JSON export (an untrusted file: read by
:func:`thyme.jsonl.loads_bounded`, every task checked on its own, a bad task reported and
skipped) and the records file, and writes

- the accepted records, each exactly as its line in the records file (the released format:
  ``thyme data verify`` and ``thyme train sft`` take them; image paths stay relative to the
  records file's folder or its ``--images-root``, so write the output beside it, the default);
- the rejected records, each with ``rejection: {stage: "review", reason, detail}`` and
  ``review: {decision, votes}``.

**Agreement rule** (:func:`decide`, ours; the paper does not state one): each annotator's vote is
their latest (highest id) annotation of the record that was not skipped; a record is *accepted*
only when it has at least ``min_annotators`` votes and every vote accepts; *rejected* when every
vote rejects (reason: the reviewers' reasons) or when the votes disagree (reason
``"disagreement"``; such records are also listed in the summary); *pending* (written nowhere)
with fewer votes than ``min_annotators``. Only the export's ``thyme_*`` fields are read from a
task's data: records, paths and images always come from the records file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal
from urllib.parse import quote

from .. import protocol
from ..config import setting
from ..errors import RecordError, ThymeError
from ..imageio import open_image
from ..jsonl import ensure_writable, loads_bounded
from ..records import Record, iter_records, within
from .labelstudio import xml_attr

#: The reject reasons offered (``reason`` of a rejected record); a team may edit the config, so
#: import takes any short text.
REJECT_REASONS = (
    "wrong answer",
    "reasoning, code and output disagree",
    "code does not do what it says",
    "image operation unneeded or unhelpful",
    "leaks given coordinates or angle",
    "bad question or image",
    "other",
)
ACCEPT, REJECT = "accept", "reject"
#: ``from_name`` of the three controls of :data:`LABEL_CONFIG`.
DECISION, REASON, NOTE = "decision", "reason", "note"
#: Reason of a record whose annotators disagree.
DISAGREEMENT = "disagreement"
#: The stated agreement rule (module docstring), as the summary prints it.
RULE = "accepted only when every annotator accepts (at least min_annotators of them); any reject rejects; mixed votes are a disagreement"

_MAX_REASON = 200
_MAX_NOTE = 4000
_MAX_ANNOTATIONS = 1000
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}


#: The labeling config (Label Studio XML): the record's question, images, response and answer,
#: and the three controls (decision required; reason shown once "reject" is chosen; note).
LABEL_CONFIG = (
    "<View>\n"
    '  <Header value="Question"/>\n'
    '  <Text name="question" value="$question"/>\n'
    '  <Header value="Images: the input(s), then the sandbox outputs in order ([image k] in the response)"/>\n'
    '  <Image name="images" valueList="$images"/>\n'
    '  <Header value="Response: reasoning, code, sandbox outputs"/>\n'
    '  <Text name="response" value="$response"/>\n'
    '  <Header value="Final answer"/>\n'
    '  <Text name="answer" value="$answer"/>\n'
    f'  <Choices name="{DECISION}" toName="question" choice="single" required="true" showInline="true">\n'
    f'    <Choice value="{ACCEPT}"/>\n'
    f'    <Choice value="{REJECT}"/>\n'
    "  </Choices>\n"
    f'  <View visibleWhen="choice-selected" whenTagName="{DECISION}" whenChoiceValue="{REJECT}">\n'
    '    <Header value="Reject reason"/>\n'
    f'    <Choices name="{REASON}" toName="question" choice="single">\n'
    + "".join(f'      <Choice value="{xml_attr(r)}"/>\n' for r in REJECT_REASONS)
    + "    </Choices>\n"
    "  </View>\n"
    f'  <TextArea name="{NOTE}" toName="question" placeholder="note (optional)" maxSubmissions="1" editable="true"/>\n'
    "</View>\n"
)


@dataclass
class ReviewConfig:
    """Settings of ``thyme data review``; each field's meaning, default and source: ``--help``."""

    image_mode: Literal["data-url", "local-files"] = setting(
        "data-url",
        help="how tasks reference images: inline data URLs (self-contained) or Label Studio's local-files serving",
        source="ours",
    )
    local_files_root: str | None = setting(
        None,
        help="with --image-mode local-files: Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (every image must lie inside it)",
        source="Label Studio local storage docs",
        show_default="the records' images root",
    )
    max_image_mb: float = setting(64.0, help="largest image file put into a task as a data URL, in MiB", source="ours")
    allow_absolute_paths: bool = setting(
        False,
        help="accept image paths of the records that leave the images root; only for records you trust (README: Paths in data)",
        source="ours",
    )
    min_annotators: int = setting(1, help="votes a record needs before it is accepted or rejected (fewer: pending)", source="ours")
    max_export_mb: float = setting(
        2048.0, help="largest Label Studio export read, in MiB (data-URL images make exports large)", source="ours"
    )


# --------------------------------------------------------------------------- export


def fingerprint(question: str, response: str) -> str:
    """The digest that ties a task to its record: SHA-256 (hex) of question, NUL, response."""
    return hashlib.sha256(question.encode("utf-8", "surrogatepass") + b"\0" + response.encode("utf-8", "surrogatepass")).hexdigest()


def image_url(path: str, cfg: ReviewConfig, local_root: str | None) -> str:
    """The URL a task shows ``path`` by (``cfg.image_mode``): a data URL, or a
    ``/data/local-files/?d=`` URL relative to ``local_root`` (also used by :mod:`thyme.data.annotate`).

    Raises:
        RecordError: outside ``local_root``, over ``max_image_mb``, or a format Label Studio may not show.
        ImageError: not an image.
    """
    if cfg.image_mode == "local-files":
        root = os.path.realpath(local_root or ".")
        real = os.path.realpath(path)
        if not within(real, root):
            raise RecordError(
                f"image {path} is outside the local-files root {root}",
                "pass --local-files-root (Label Studio's document root) above every image",
            )
        return "/data/local-files/?d=" + quote(os.path.relpath(real, root))
    cap = int(cfg.max_image_mb * (1 << 20))
    size = os.path.getsize(path)
    if size > cap:
        raise RecordError(
            f"image {path} is {size / 2**20:.1f} MiB, over --max-image-mb {cfg.max_image_mb:g}",
            "raise --max-image-mb or use --image-mode local-files",
        )
    with open_image(path, load=False) as im:  # budgets from the header; a non-image is refused here
        mime = _MIME.get(im.format or "")
    if mime is None:
        raise RecordError(f"image {path} is in a format Label Studio may not show", "convert it to PNG or JPEG")
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read(cap + 1)).decode("ascii")


def _numbered_response(rec: Record) -> str:
    """The response with each sandbox-output ``<image>`` written as ``[image k]`` (k counts the
    record's images from 1: the inputs first)."""
    k = len(rec.inputs)
    parts, last = [], 0
    for span in rec.spans:
        body = span.body
        out = []
        for i, piece in enumerate(body.split(protocol.IMAGE_PLACEHOLDER)):
            if i:
                k += 1
                out.append(f"[image {k}]")
            out.append(piece)
        start = rec.response.index(body, span.start)
        parts.append(rec.response[last:start] + "".join(out))
        last = start + len(body)
    parts.append(rec.response[last:])
    return "".join(parts)


def record_to_task(rec: Record, cfg: ReviewConfig | None = None, *, local_root: str | None = None) -> dict[str, Any]:
    """One Label Studio task (``{"data": {...}}``) for a record (module docstring).

    Args:
        rec: a parsed record (:func:`thyme.records.parse_record`; its image paths resolved).
        local_root: with ``image_mode="local-files"``, the folder Label Studio serves.

    Raises:
        RecordError: an image missing, unreadable, over ``max_image_mb``, or outside ``local_root``.
        ImageError: an image file that is not an image.
    """
    cfg = cfg or ReviewConfig()
    try:
        images = [image_url(p, cfg, local_root) for p in rec.inputs + rec.outputs]
    except OSError as e:
        raise RecordError(f"record {rec.id}: cannot read an image: {e}") from None
    answer = protocol.extract_answer(rec.response, allow_unterminated=True)
    return {
        "data": {
            "question": rec.prompt,
            "images": images,
            "response": _numbered_response(rec),
            "answer": answer if answer is not None else "(no <answer>)",
            "thyme_id": rec.id,
            "thyme_line": rec.line,
            "thyme_sha256": fingerprint(rec.question, rec.response),
        }
    }


@dataclass
class ExportSummary:
    """Totals of ``thyme data review export`` (the ``--json`` line).

    Attributes:
        records: records read; tasks: tasks written; failed: records left out (see ``errors``).
        images: images put into tasks; image_mode: how.
        tasks_path, config_path: the files written.
        images_folder: the deepest folder holding every image (resolved), for a local-files storage.
        errors: ``{"line", "error"}`` per record left out (at most 100).
    """

    records: int = 0
    tasks: int = 0
    failed: int = 0
    images: int = 0
    image_mode: str = "data-url"
    tasks_path: str = ""
    config_path: str = ""
    images_folder: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_review(
    records_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ReviewConfig | None = None,
    *,
    images_root: str | os.PathLike | None = None,
    on_task: Callable[[dict[str, Any]], None] | None = None,
) -> ExportSummary:
    """Write ``out_dir/tasks.json`` and ``out_dir/labeling_config.xml`` for the records of
    ``records_path`` (module docstring); a record that cannot be exported is listed, not fatal.
    Tasks are written one by one (memory stays bounded by one task, images included).

    Args:
        images_root: the folder the records' image paths are relative to (default: the records
            file's folder; the path rule of :mod:`thyme.records`).
        on_task: called with each task written (e.g. to push it to a server in batches).

    Returns:
        The summary.

    Raises:
        ThymeError: the records file is missing or the output cannot be written; what
            ``on_task`` raises stops the export.
    """
    cfg = cfg or ReviewConfig()
    src = Path(records_path)
    if not src.is_file():
        raise ThymeError(
            f"records file not found: {src}", "pass a JSONL file of Thyme records (e.g. the kept records of thyme data synthesize)"
        )
    out = ensure_writable(out_dir, what="--out", folder=True)
    root = images_root if images_root is not None else src.resolve().parent
    local_root = cfg.local_files_root or os.fspath(root)
    summary = ExportSummary(image_mode=cfg.image_mode)
    folders: set[str] = set()
    tasks_path, config_path = out / "tasks.json", out / "labeling_config.xml"
    with open(tasks_path, "w", encoding="utf-8") as f:
        f.write("[")
        for line, rec in iter_records(src, root=root, allow_absolute=cfg.allow_absolute_paths):
            summary.records += 1
            try:
                if isinstance(rec, RecordError):
                    raise rec
                task = record_to_task(rec, cfg, local_root=local_root)
            except ThymeError as e:
                summary.failed += 1
                if len(summary.errors) < 100:
                    summary.errors.append({"line": line, "error": e.message})
                continue
            f.write(("," if summary.tasks else "") + "\n" + json.dumps(task, ensure_ascii=False))
            summary.tasks += 1
            summary.images += len(task["data"]["images"])
            folders.update(os.path.dirname(os.path.realpath(p)) for p in rec.inputs + rec.outputs)
            if on_task is not None:
                on_task(task)
        f.write("\n]\n")
    summary.images_folder = os.path.commonpath(sorted(folders)) if folders else None
    config_path.write_text(LABEL_CONFIG, encoding="utf-8")
    summary.tasks_path, summary.config_path = str(tasks_path), str(config_path)
    return summary


def format_export_summary(s: ExportSummary) -> str:
    lines = [
        f"{s.tasks} task(s) from {s.records} record(s), {s.images} image(s) as {s.image_mode}; {s.failed} record(s) left out",
        f"tasks:  {s.tasks_path}",
        f"config: {s.config_path}",
    ]
    lines += [f"  line {e['line']}: {e['error']}" for e in s.errors[:20]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- import


@dataclass
class Vote:
    """One annotator's decision on one record.

    Attributes:
        annotator: who (``completed_by``: the user's email when the export carries it, else its id).
        decision: ``"accept"`` or ``"reject"``.
        reason: the reject reason (``""`` when none).
        note: the free-text note (``""`` when none).
        annotation_id: the annotation's id in Label Studio (the latest one per annotator counts).
        task_id: the task it belongs to.
    """

    annotator: str
    decision: str
    reason: str = ""
    note: str = ""
    annotation_id: int = 0
    task_id: int | None = None


@dataclass
class Decision:
    """The outcome for one record under the agreement rule (:func:`decide`).

    Attributes:
        status: ``"accepted"``, ``"rejected"`` or ``"pending"``.
        reason: for rejected records: the reviewers' reasons (``"; "``-joined) or ``"disagreement"``.
        votes: the votes counted (one per annotator).
    """

    status: str
    reason: str = ""
    votes: list[Vote] = field(default_factory=list)

    @property
    def disagreement(self) -> bool:
        return self.status == "rejected" and self.reason == DISAGREEMENT


def decide(votes: Iterable[Vote], min_annotators: int = 1) -> Decision:
    """Apply the agreement rule (module docstring) to one record's votes.

    Args:
        votes: every vote on the record (several per annotator allowed: the highest
            ``annotation_id`` of each counts).
        min_annotators: votes needed before a decision (fewer: pending).

    Returns:
        The :class:`Decision`.
    """
    latest: dict[str, Vote] = {}
    for v in votes:
        if v.annotator not in latest or v.annotation_id >= latest[v.annotator].annotation_id:
            latest[v.annotator] = v
    counted = sorted(latest.values(), key=lambda v: v.annotator)
    if not counted or len(counted) < max(1, min_annotators):
        return Decision("pending", votes=counted)
    kinds = {v.decision for v in counted}
    if kinds == {ACCEPT}:
        return Decision("accepted", votes=counted)
    if kinds == {REJECT}:
        reasons = sorted({v.reason or "no reason given" for v in counted})
        return Decision("rejected", "; ".join(reasons), counted)
    return Decision("rejected", DISAGREEMENT, counted)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(s: str, limit: int, *, one_line: bool = False) -> str:
    """Text from the export, bounded and without control characters (an escape sequence in a
    reviewer name or note must not reach the terminal that prints the summary)."""
    s = _CONTROL.sub("", s[:limit])
    return " ".join(s.split()) if one_line else s


def value_text(v: Any, limit: int, *, one_line: bool = False) -> str:
    """The first string of a Label Studio value list, bounded and cleaned."""
    if isinstance(v, list):
        v = next((x for x in v if isinstance(x, str)), "")
    return clean_text(v, limit, one_line=one_line) if isinstance(v, str) else ""


def parse_annotation(ann: Any, task_id: int | None) -> Vote | None:
    """One exported annotation as a :class:`Vote`; ``None`` for a skipped one (``was_cancelled``).

    Raises:
        RecordError: not an object, no annotator, or no accept/reject decision (naming why).
    """
    if not isinstance(ann, dict):
        raise RecordError(f"an annotation is a {type(ann).__name__}, not an object")
    if ann.get("was_cancelled") is True:
        return None
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    if isinstance(who, bool) or not isinstance(who, (int, str)) or who == "":
        raise RecordError(f"annotation {str(ann.get('id'))[:40]} has no annotator (completed_by)")
    aid = ann.get("id")
    aid = aid if isinstance(aid, int) and not isinstance(aid, bool) else 0
    result = ann.get("result")
    if not isinstance(result, list):
        raise RecordError(f"annotation {aid}: 'result' is not a list")
    got: dict[str, str] = {}
    for item in result[:_MAX_ANNOTATIONS]:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            continue
        name, value = item.get("from_name"), item["value"]
        if name in (DECISION, REASON) and "choices" in value:
            got[name] = value_text(value["choices"], _MAX_REASON, one_line=True)
        elif name == NOTE and "text" in value:
            got[NOTE] = value_text(value["text"], _MAX_NOTE)
    decision = got.get(DECISION, "").strip().lower()
    if decision not in (ACCEPT, REJECT):
        raise RecordError(
            f"annotation {aid} by {str(who)[:100]}: no '{ACCEPT}' or '{REJECT}' choice in '{DECISION}'",
            "was the project made with thyme's labeling_config.xml?",
        )
    return Vote(
        clean_text(str(who), 200, one_line=True),
        decision,
        got.get(REASON, "") if decision == REJECT else "",
        got.get(NOTE, ""),
        aid,
        task_id,
    )


def read_export(source: str | os.PathLike | bytes, *, max_mb: float = 2048.0) -> list[Any]:
    """The task list of a Label Studio JSON export (a file path, or the bytes themselves).

    Raises:
        ThymeError: the file cannot be read, is over ``max_mb``, is not JSON within the limits
            (:func:`thyme.jsonl.loads_bounded`), or is not a list.
    """
    cap = int(max_mb * (1 << 20))
    if isinstance(source, bytes):
        raw, what = source, "Label Studio export"
    else:
        p = Path(source)
        what = f"Label Studio export {p}"
        try:
            if p.stat().st_size > cap:
                raise ThymeError(f"{what} is {p.stat().st_size / 2**20:.0f} MiB, over --max-export-mb {max_mb:g}", "raise --max-export-mb")
            raw = p.read_bytes()
        except OSError as e:
            raise ThymeError(f"cannot read {what}: {e.strerror or e}", "pass the JSON file Label Studio's Export (JSON) gave") from None
    data = loads_bounded(raw, max_bytes=cap, what=what)
    if not isinstance(data, list):
        raise ThymeError(
            f"{what} is a JSON {type(data).__name__}, not a list of tasks", "export the project as JSON (not JSON-MIN, CSV or COCO)"
        )
    return data


@dataclass
class ImportSummary:
    """Totals of ``thyme data review import`` (the ``--json`` line).

    Attributes:
        tasks: tasks in the export; bad_tasks: tasks skipped (see ``errors``).
        records: records in the records file; reviewed: records with at least one task.
        accepted, rejected, pending: records per outcome; not_in_export: records with no task.
        disagreements: ``{"id", "line", "votes"}`` per record whose annotators disagree.
        reasons: rejected records per reason.
        errors: ``{"task", "error"}`` per bad task or annotation (at most 200).
        rule: the agreement rule applied; accepted_path, rejected_path: the files written.
    """

    tasks: int = 0
    bad_tasks: int = 0
    records: int = 0
    reviewed: int = 0
    accepted: int = 0
    rejected: int = 0
    pending: int = 0
    not_in_export: int = 0
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    rule: str = RULE
    accepted_path: str = ""
    rejected_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _task_ref(task: dict[str, Any]) -> tuple[int | None, int | None, str, str]:
    tid = task.get("id") if isinstance(task.get("id"), int) and not isinstance(task.get("id"), bool) else None
    data = task.get("data")
    if not isinstance(data, dict):
        raise RecordError("'data' is not an object")
    line, sha, rid = data.get("thyme_line"), data.get("thyme_sha256"), data.get("thyme_id")
    rid = clean_text(str(rid), 200, one_line=True) if rid is not None else None
    if not isinstance(sha, str) or len(sha) != 64:
        raise RecordError("its data carry no thyme_sha256 (not a task from thyme data review export)")
    line = line if isinstance(line, int) and not isinstance(line, bool) else None
    return tid, line, sha.lower(), rid or ""


def apply_review(
    export: str | os.PathLike | bytes,
    records_path: str | os.PathLike,
    accepted_path: str | os.PathLike,
    rejected_path: str | os.PathLike | None = None,
    cfg: ReviewConfig | None = None,
) -> ImportSummary:
    """Apply the reviewers' decisions of a Label Studio export to a records file (module docstring).

    Args:
        export: the export file (or its bytes).
        records_path: the records file the tasks were exported from.
        accepted_path: where the accepted records go (each line as in ``records_path``).
        rejected_path: where the rejected records go, with ``rejection`` and ``review``
            (``None``: ``<accepted stem>.rejected.jsonl``).

    Returns:
        The :class:`ImportSummary`.

    Raises:
        ThymeError: the export or the records file cannot be read, or an output cannot be
            written (a bad task or annotation is counted and listed, never raised).
    """
    cfg = cfg or ReviewConfig()
    src = Path(records_path)
    if not src.is_file():
        raise ThymeError(f"records file not found: {src}", "pass the records file the tasks were exported from")
    acc = ensure_writable(accepted_path, what="--out")
    rej = ensure_writable(rejected_path or acc.with_suffix("").as_posix() + ".rejected.jsonl", what="--rejected")
    tasks = read_export(export, max_mb=cfg.max_export_mb)
    s = ImportSummary(tasks=len(tasks), accepted_path=str(acc), rejected_path=str(rej))

    # the records: raw objects by line and by digest (image paths are not touched: no path rule needed here)
    by_line: dict[int, tuple[str, dict[str, Any]]] = {}
    by_sha: dict[str, list[int]] = {}
    for line, rec in iter_records(src, check_counts=False, check_files=None, allow_absolute=True):
        s.records += 1
        if isinstance(rec, RecordError):
            continue
        sha = fingerprint(rec.question, rec.response)
        by_line[line] = (sha, rec.raw)
        by_sha.setdefault(sha, []).append(line)

    def error(task_no: int, tid: int | None, msg: str) -> None:
        if len(s.errors) < 200:
            s.errors.append({"task": tid if tid is not None else f"#{task_no}", "error": clean_text(msg, 500, one_line=True)})

    votes: dict[int, list[Vote]] = {}
    for n, task in enumerate(tasks, 1):
        tid = None
        try:
            if not isinstance(task, dict):
                raise RecordError(f"it is a JSON {type(task).__name__}, not a task object")
            tid, line, sha, rid = _task_ref(task)
            if line in by_line and by_line[line][0] == sha:
                target = line
            elif by_sha.get(sha):
                target = by_sha[sha][0]  # the record moved (or the file was re-ordered)
            else:
                raise RecordError(f"no record of {src} matches it (record {rid or '?'}, line {line}): was it exported from another file?")
            anns = task.get("annotations", [])
            if not isinstance(anns, list):
                raise RecordError("'annotations' is not a list")
        except RecordError as e:
            s.bad_tasks += 1
            error(n, tid, e.message)
            continue
        bucket = votes.setdefault(target, [])
        for ann in anns[:_MAX_ANNOTATIONS]:
            try:
                v = parse_annotation(ann, tid)
            except RecordError as e:
                error(n, tid, e.message)
                continue
            if v is not None:
                bucket.append(v)

    s.reviewed = len(votes)
    s.not_in_export = len(by_line) - len(votes)
    with open(acc, "w", encoding="utf-8") as fa, open(rej, "w", encoding="utf-8") as fr:
        for line in sorted(votes):
            d = decide(votes[line], cfg.min_annotators)
            raw = by_line[line][1]
            if d.status == "pending":
                s.pending += 1
            elif d.status == "accepted":
                s.accepted += 1
                fa.write(json.dumps(raw, ensure_ascii=False) + "\n")
            else:
                s.rejected += 1
                s.reasons[d.reason] = s.reasons.get(d.reason, 0) + 1
                vs = [asdict(v) for v in d.votes]
                notes = "; ".join(f"{v.annotator}: {v.note}" for v in d.votes if v.note)
                if d.disagreement:
                    s.disagreements.append({"id": raw.get("id"), "line": line, "votes": vs})
                out = dict(
                    raw, rejection={"stage": "review", "reason": d.reason, "detail": notes}, review={"decision": d.status, "votes": vs}
                )
                fr.write(json.dumps(out, ensure_ascii=False) + "\n")
    return s


def format_import_summary(s: ImportSummary) -> str:
    lines = [
        (
            f"{s.tasks} task(s) ({s.bad_tasks} bad) covering {s.reviewed} of {s.records} record(s): "
            f"{s.accepted} accepted, {s.rejected} rejected, {s.pending} pending; {s.not_in_export} not in the export"
        ),
        f"rule: {s.rule}",
        f"accepted: {s.accepted_path}",
        f"rejected: {s.rejected_path}",
    ]
    lines += [f"  {n} x {r}" for r, n in sorted(s.reasons.items(), key=lambda kv: -kv[1])]
    for d in s.disagreements[:20]:
        lines.append(
            f"  disagreement on {d['id']} (line {d['line']}): " + ", ".join(f"{v['annotator']}={v['decision']}" for v in d["votes"])
        )
    lines += [f"  task {e['task']}: {e['error']}" for e in s.errors[:20]]
    return "\n".join(lines)
