"""The Thyme record: the one parser and writer, and the one rule for paths that come from data.

A Thyme record (SFT data, corpus trajectories, ``thyme data convert`` output, replay input) is one
JSON object (paper Sec. 3; the reference's SFT data format)::

    {"image": [input, sandbox output 1, ...], "question": "<image>\\n...", "response": "<think>...</answer>"}

optional: ``id``, ``model_answer``, ``reference_outputs`` (per code block, a list of ``{"image",
"size": [w, h]}`` or ``{"text"}``), ``benchmark``, ``question_id``. The question's ``<image>``
placeholders take the first images of the list (one input when the question has none but the
list is not empty); every ``<image>`` inside a ``<sandbox_output>...</sandbox_output>`` of the
response takes the next one, in order.

**Paths in data** (the one rule, :func:`resolve_data_path`; ``docs/threat-model.md`` class "Path
trust"): a path read from a data file (a record, a dataset row, a benchmark row, a predictions
file) is relative to a *root*: the folder of the file it came from, or ``--images-root`` when the
user gives one. It is resolved inside that root **after resolving symlinks**; a path that ends up
outside it (an absolute path elsewhere, ``..`` climbing out, a symlink in the images folder that
points out) is refused with a :class:`PathRefused` error naming the record, the path and the
root, unless the user opts in (``--allow-absolute-paths``, config key ``allow_absolute_paths``).
An absolute path that lies inside the root is accepted (``thyme data convert`` writes absolute
paths into the folder beside its output). Every reader of paths from data calls this function.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import protocol
from .errors import RecordError
from .jsonl import iter_jsonl

#: The flag and config key that let paths from data leave their root.
ALLOW_FLAG = "--allow-absolute-paths"
ALLOW_KEY = "allow_absolute_paths"
ALLOW_HINT = (
    "paths in data files must stay inside the folder they are relative to; if you trust this file, "
    f"pass {ALLOW_FLAG} (config key {ALLOW_KEY}: true), or point --images-root at the folder holding the images"
)

#: A sandbox output with the white space the runtime puts before it (``</code>\\n<sandbox_output>``).
_OUTPUT_RE = re.compile(r"\s*" + re.escape(protocol.OUTPUT_START) + r"(.*?)" + re.escape(protocol.OUTPUT_END), re.S)
#: Text that announces the Thyme user prompt (released records carry it already filled in).
USER_PROMPT_MARKER = "User Image Path"


class PathRefused(RecordError):
    """A path from data resolves outside the root it is relative to (see the module docstring).

    Attributes:
        path: the path as the data gave it.
        root: the root it had to stay in.
    """

    def __init__(self, message: str, hint: str | None = None, *, path: str = "", root: str = ""):
        super().__init__(message, hint)
        self.path = path
        self.root = root


# --------------------------------------------------------------------------- the path rule


def within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` (already real) is ``root`` (already real) or lies below it."""
    p, r = os.fspath(path), os.fspath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def resolve_data_path(
    path: Any,
    root: str | os.PathLike | None,
    *,
    allow_absolute: bool = False,
    where: str | None = None,
    what: str = "image path",
) -> str:
    """Resolve one path read from data inside ``root`` (the one rule; module docstring).

    Args:
        path: the path as the data gave it (a string; ``~`` is not expanded).
        root: the folder it is relative to (the data file's folder or ``--images-root``;
            ``None``: the current folder).
        allow_absolute: the user's opt-in: a path outside ``root`` is resolved and returned.
        where: the record / line for the message (e.g. ``"record on line 3 of x.jsonl"``).
        what: what the path is, for the message.

    Returns:
        The absolute path with every symlink resolved (``os.path.realpath``); existence is not
        checked.

    Raises:
        PathRefused: the path resolves outside ``root`` (naming ``where``, the path, the root and
            the opt-in); RecordError: not a non-empty string, or it holds a NUL byte.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise RecordError(f"{prefix}{what} must be a non-empty string, got {type(path).__name__}")
    if "\x00" in path:
        raise RecordError(f"{prefix}{what} {path[:200]!r} holds a NUL byte")
    base = os.path.abspath(os.fspath(root)) if root is not None else os.getcwd()
    real_root = os.path.realpath(base)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(base, path))
    if allow_absolute or within(real, real_root):
        return real
    if os.path.isabs(path):
        how = "is absolute and outside"
    elif within(os.path.normpath(os.path.join(real_root, path)), real_root):
        how = "goes through a symlink out of"
    else:
        how = "climbs out of"
    raise PathRefused(f"{prefix}{what} {path[:300]!r} {how} the folder it is relative to ({base}); refused", ALLOW_HINT, path=path, root=base)


def relative_to_root(path: str, root: str | os.PathLike | None) -> str:
    """``path`` written relative to ``root`` when it lies inside it, else as it is (the writer's
    side of the rule: records written into a folder stay portable)."""
    if root is None or not os.path.isabs(path):
        return path
    r = os.path.realpath(os.fspath(root))
    real = os.path.realpath(path)
    return os.path.relpath(real, r) if within(real, r) else path


# --------------------------------------------------------------------------- the record


@dataclass
class OutputSpan:
    """One recorded sandbox output inside a response (character offsets into ``response``).

    Attributes:
        start: offset of the white space before ``<sandbox_output>`` (or of the tag itself).
        end: offset just after ``</sandbox_output>``.
        body: the text between the tags (``<image>`` placeholders included).
        images: number of ``<image>`` placeholders in ``body``.
    """

    start: int
    end: int
    body: str
    images: int

    @property
    def text(self) -> str:
        """The printed text of the output (placeholders removed, stripped)."""
        return self.body.replace(protocol.IMAGE_PLACEHOLDER, "").strip()


@dataclass
class Record:
    """A validated Thyme record.

    Attributes:
        id: the record's ``id`` or ``line-N``.
        question: the question as recorded (placeholders included).
        response: the assistant message as recorded.
        inputs: resolved paths of the input images (the question's).
        outputs: resolved paths of the recorded sandbox-output images, in order (with
            ``check_counts=False``: every image after the inputs).
        spans: the sandbox outputs of the response, in order.
        raw: the JSON object as read.
        line: its line in the file (``None`` when not read from a file).
    """

    id: str
    question: str
    response: str
    inputs: list[str]
    outputs: list[str]
    spans: list[OutputSpan] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    line: int | None = None

    @property
    def prompt(self) -> str:
        """The question without its leading ``<image>`` placeholder(s) (what a model is asked)."""
        return protocol.strip_question_placeholder(self.question)

    @property
    def has_user_prompt(self) -> bool:
        """Whether the question already holds the filled Thyme user prompt (released records do)."""
        return USER_PROMPT_MARKER in self.question

    @property
    def has_image(self) -> bool:
        return bool(self.inputs or self.outputs)

    def to_dict(self, root: str | os.PathLike | None = None) -> dict[str, Any]:
        """The record as JSON (:func:`record_to_dict`)."""
        return record_to_dict(self, root=root)


def output_spans(response: str) -> list[OutputSpan]:
    """The ``<sandbox_output>`` blocks of a response, in order.

    Raises:
        RecordError: a ``<sandbox_output>`` is never closed.
    """
    spans = []
    for m in _OUTPUT_RE.finditer(response):
        body = m.group(1)
        spans.append(OutputSpan(m.start(), m.end(), body, body.count(protocol.IMAGE_PLACEHOLDER)))
    last = spans[-1].end if spans else 0
    if protocol.OUTPUT_START in response[last:]:
        raise RecordError("response has a <sandbox_output> that is never closed", "each <sandbox_output> needs its </sandbox_output>")
    return spans


def count_inputs(question: str, n_images: int) -> int:
    """How many of a record's images are inputs: the question's ``<image>`` placeholders, or 1
    when it has none but the record has images (the reference's convention)."""
    if n_images == 0:
        return 0
    return min(n_images, max(1, question.count(protocol.IMAGE_PLACEHOLDER)))


def parse_record(
    obj: Any,
    *,
    line: int | None = None,
    source: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    allow_absolute: bool = False,
    check_counts: bool = True,
    check_files: str | None = "all",
) -> Record:
    """Validate one Thyme record; every image path goes through :func:`resolve_data_path`.

    Args:
        obj: the decoded JSON object.
        line: its line number (for messages and the default id ``line-N``).
        source: the file it came from (for messages).
        root: the folder its relative image paths start from (the records file's folder, or
            ``--images-root``; ``None``: the current folder).
        allow_absolute: the user's opt-in to paths outside ``root``.
        check_counts: require the image list to match the question's input placeholders plus
            the response's output placeholders (SFT data, verify); ``False`` (replay, eval
            ``--replay``): the inputs are taken and the rest is not checked.
        check_files: ``"all"``: every image file must exist; ``"inputs"``: the inputs only;
            ``None``: none.

    Raises:
        RecordError: naming the record (line, id) and what is wrong: missing question /
            response, image list not of paths, counts not matching, an unclosed
            ``<sandbox_output>``, a missing file; :class:`PathRefused` for a path outside ``root``.
    """
    where = f"record on line {line}" if line is not None else "record"
    if source is not None:
        where += f" of {source}"
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("id") is not None:
        where += f" ({str(obj['id'])[:200]})"
    for key in ("question", "response"):
        if not isinstance(obj.get(key), str):
            raise RecordError(f"{where}: field {key!r} is missing or not a string", "Thyme records have 'image', 'question' and 'response'")
    imgs = obj.get("image", obj.get("images", []))
    if imgs is None:
        imgs = []
    if isinstance(imgs, str):
        imgs = [imgs]
    if not isinstance(imgs, list) or not all(isinstance(p, str) for p in imgs):
        raise RecordError(f"{where}: field 'image' must be a list of image paths", "run `thyme data convert` on released datasets first")
    try:
        spans = output_spans(obj["response"])
    except RecordError as e:
        raise RecordError(f"{where}: {e.message}", e.hint) from None
    n_in = count_inputs(obj["question"], len(imgs))
    if check_counts:
        n_out = sum(s.images for s in spans)
        if n_in + n_out != len(imgs):
            raise RecordError(
                f"{where}: {len(imgs)} image(s) listed but the question has {n_in} input placeholder(s) and the "
                f"response's sandbox outputs hold {n_out} <image> placeholder(s)",
                "the 'image' list is [inputs..., sandbox output images...] in order of appearance",
            )
    paths = [resolve_data_path(p, root, allow_absolute=allow_absolute, where=where) for p in imgs]
    checked = paths if check_files == "all" else paths[:n_in] if check_files == "inputs" else []
    for p, given in zip(checked, imgs):
        if not os.path.isfile(p):
            raise RecordError(f"{where}: image not found: {p} (given as {given!r})", "pass --images-root pointing at the folder the record's paths are relative to")
    rid = obj.get("id")
    return Record(
        id=str(rid) if rid is not None else f"line-{line}",
        question=obj["question"],
        response=obj["response"],
        inputs=paths[:n_in],
        outputs=paths[n_in:],
        spans=spans,
        raw=obj,
        line=line,
    )


def iter_records(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    allow_absolute: bool = False,
    check_counts: bool = True,
    check_files: str | None = "all",
) -> Iterator[tuple[int, Record | RecordError]]:
    """Yield ``(line_number, Record or RecordError)`` for each non-empty line of ``path``: a bad
    line (invalid JSON, a malformed record, a refused path) is yielded as its error, never raised.

    Args:
        root: the folder relative paths start from (default: ``path``'s folder).
        Others: as :func:`parse_record`.

    Raises:
        RecordError: ``path`` itself cannot be read.
    """
    root = root if root is not None else Path(path).resolve().parent
    for n, obj in iter_jsonl(path):
        if isinstance(obj, RecordError):
            yield n, obj
            continue
        try:
            yield n, parse_record(obj, line=n, root=root, allow_absolute=allow_absolute, check_counts=check_counts, check_files=check_files)
        except RecordError as e:
            yield n, e


# --------------------------------------------------------------------------- writing


def record_to_dict(record: Record, *, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON object of ``record``: its raw fields, with ``question``, ``response`` and
    ``image`` (inputs then outputs; relative to ``root`` when they lie inside it) as the record
    holds them now."""
    d = {k: v for k, v in record.raw.items() if k not in ("image", "images")}
    d["id"] = record.id if record.raw.get("id") is None else record.raw["id"]
    d["image"] = [relative_to_root(p, root) for p in record.inputs + record.outputs]
    d["question"] = record.question
    d["response"] = record.response
    return d


def record_from_trajectory(
    traj: Any,
    *,
    root: str | os.PathLike | None = None,
    question: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Thyme record (JSON object) of a finished trajectory; duck-typed on the fields of
    :class:`thyme.agent.Trajectory` (``id``, ``question``, ``images``, ``turns`` with ``text``,
    ``code``, ``execution``, ``feedback``; ``prefill``, ``answer``, ``meta``), so the ground
    floor never imports the agent.

    Args:
        traj: the trajectory.
        root: the folder the record will be written in: image paths inside it are written
            relative to it (else absolute).
        question: the record's question (default: one ``<image>`` per input image, then the
            trajectory's question).
        extra: more fields (e.g. ``benchmark``, ``question_id``).

    Returns:
        ``{"id", "image", "question", "response", "model_answer", "reference_outputs", ...}``:
        ``response`` is the whole assistant message (images as ``<image>``), ``image`` the inputs
        then every sandbox-output image in order, ``reference_outputs`` one list per executed
        code block (``{"image", "size"}`` per image, else ``{"text"}``).
    """
    parts: list[Any] = [protocol.text_part(traj.prefill)] if getattr(traj, "prefill", "") else []
    outputs: list[str] = []
    refs: list[list[dict[str, Any]]] = []
    for t in getattr(traj, "turns", []):
        parts.append(protocol.text_part(getattr(t, "text", "") or ""))
        feedback = list(getattr(t, "feedback", None) or [])
        parts.extend(feedback)
        outputs += [p["image"] for p in feedback if p.get("type") == "image"]
        ex = getattr(t, "execution", None)
        if getattr(t, "code", None) is not None and ex is not None:
            imgs = list(ex.get("images") or [])
            sizes = ex.get("image_sizes")
            if imgs:
                block = []
                for k, p in enumerate(imgs):
                    size = sizes[k] if isinstance(sizes, list) and k < len(sizes) else _size(p)
                    block.append({"image": relative_to_root(p, root), "size": list(size) if size else None})
                refs.append(block)
            elif (ex.get("stdout") or "").strip():
                refs.append([{"text": ex["stdout"]}])
            else:
                refs.append([])
    response = protocol.render_parts(protocol.merge_text_parts(parts), protocol.IMAGE_PLACEHOLDER)
    inputs = list(getattr(traj, "images", []) or [])
    if question is None:
        question = "".join(protocol.IMAGE_PLACEHOLDER + "\n" for _ in inputs) + (traj.question or "")
    d: dict[str, Any] = {
        "id": str(traj.id),
        "image": [relative_to_root(p, root) for p in inputs + outputs],
        "question": question,
        "response": response,
    }
    if getattr(traj, "answer", None) is not None:
        d["model_answer"] = traj.answer
    if refs:
        d["reference_outputs"] = refs
    meta = getattr(traj, "meta", None) or {}
    for key in ("benchmark", "question_id"):
        if meta.get(key) is not None:
            d[key] = meta[key]
    d.update(extra or {})
    return d


def _size(path: str) -> tuple[int, int] | None:
    from .imageio import image_size

    try:
        return image_size(path)
    except Exception:  # a missing output: its size is unknown
        return None


def write_records(records: Iterable[dict[str, Any] | Record], path: str | os.PathLike) -> Path:
    """Write records (JSON objects or :class:`Record`) as JSONL; image paths inside ``path``'s
    folder are written relative to it."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    root = p.resolve().parent
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            d = record_to_dict(r, root=root) if isinstance(r, Record) else dict(r, image=[relative_to_root(x, root) for x in r.get("image") or []])
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return p
