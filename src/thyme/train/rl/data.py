"""RL prompts: RL records and benchmark rows, wrapped in the Thyme prompt.

Two row forms are read from JSONL (detected per row):

- **RL records** (``Kwai-Keye/Thyme-RL`` as ``thyme data convert`` writes them): ``messages``
  (a system turn and a user turn ``"<image>\\n<filled Thyme user prompt>"``), ``images``,
  ``solution`` (the reference answer), ``question``. The system text and the user text are kept
  byte for byte; the ``<image>`` placeholders become image parts (vision tokens), as training saw.
- **Benchmark rows** (V*, HR-Bench, MME-RealWorld JSONL: ``question``, ``options``, ``answer``,
  ``image``): the multiple-choice text of :func:`thyme.evaluate.prompts.build_question` inside the
  Thyme user prompt (:func:`thyme.protocol.build_messages`, image path and size), exactly as
  ``thyme eval`` asks it.

:class:`RLPrompt` is what a rollout needs; :func:`to_dataset_rows` turns prompts into TRL
dataset rows (``prompt``: the question text, for TRL's logs; ``thyme``: the prompt as JSON; no
``image``/``images`` column, so TRL never rebuilds prompts from dataset images).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ... import protocol
from ...errors import RecordError, ThymeError
from ...imageio import image_size
from ...records import resolve_data_path


@dataclass
class RLPrompt:
    """One question to roll out.

    Attributes:
        id: row id (``id`` / ``question_id`` / ``file:line``).
        messages: ``[system, user]`` content lists, images as ``{"type": "image", "image": path}``.
        images: input image paths (absolute), in the order of the image parts.
        solution: the reference answer (a letter for multiple choice).
        question: the question as the judge sees it (options included).
        options: ``{letter: text}`` for multiple choice (else empty).
        bbox: the target box ``[x1, y1, x2, y2]`` in pixels of the original input image, when
            the row carries one (``thyme data annotate import`` records), else ``None``.
        category: the question's category (:data:`thyme.data.annotate.CATEGORIES`), or ``None``.
        extra: other annotation fields of the row carried along (``annotators``, ``image_size``).
        ``bbox``, ``category`` and ``extra`` travel into each rollout's ``trajectory.meta``
        (``rollouts.jsonl``).
    """

    id: str
    messages: list[dict[str, Any]]
    images: list[str]
    solution: str
    question: str
    options: dict[str, str] = field(default_factory=dict)
    bbox: list[float] | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def target_meta(self) -> dict[str, Any]:
        """``bbox``, ``category`` and ``extra`` as one dict (only those present), for a trajectory's ``meta``."""
        meta: dict[str, Any] = dict(self.extra)
        if self.bbox is not None:
            meta["bbox"] = list(self.bbox)
        if self.category is not None:
            meta["category"] = self.category
        return meta

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "RLPrompt":
        return cls(**json.loads(s))


def _resolve(p: Any, root: Path, *, allow_absolute: bool = False, where: str | None = None) -> str:
    """An image path of a train row, by the one rule for paths from data
    (:func:`thyme.records.resolve_data_path`: inside ``root`` unless ``allow_absolute``)."""
    return resolve_data_path(p, root, allow_absolute=allow_absolute, where=where)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")


#: Row fields besides ``bbox`` / ``category`` that travel along in :attr:`RLPrompt.extra`.
EXTRA_FIELDS = ("annotators", "image_size")


def row_target(row: dict[str, Any], where: str) -> tuple[list[float] | None, str | None, dict[str, Any]]:
    """``bbox``, ``category`` and the :data:`EXTRA_FIELDS` of a train row, checked (rows are untrusted).

    Raises:
        ThymeError: ``bbox`` not four finite numbers with x1 < x2 and y1 < y2, ``category`` not a
            string, or an extra field that is not a short list.
    """
    import math

    bbox = row.get("bbox")
    if bbox is not None:
        ok = isinstance(bbox, list) and len(bbox) == 4
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        if not ok or not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
            raise ThymeError(f"{where}: 'bbox' must be [x1, y1, x2, y2] pixels with x1 < x2 and y1 < y2, got {str(bbox)[:100]}")
        bbox = [float(v) for v in bbox]
    cat = row.get("category")
    if cat is not None and (not isinstance(cat, str) or len(cat) > 200):
        raise ThymeError(f"{where}: 'category' must be a short string")
    extra: dict[str, Any] = {}
    for k in EXTRA_FIELDS:
        v = row.get(k)
        if v is None:
            continue
        if not isinstance(v, list) or len(v) > 100 or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
            raise ThymeError(f"{where}: '{k}' must be a list of at most 100 strings or integers")
        extra[k] = [x[:200] if isinstance(x, str) else x for x in v]
    return bbox, cat, extra


def from_rl_record(row: dict[str, Any], rid: str, root: Path, *, allow_absolute: bool = False) -> RLPrompt:
    """An RL record -> :class:`RLPrompt` (see the module docstring).

    Raises:
        ThymeError: no user turn, no solution, or placeholder / image count mismatch;
            :class:`thyme.records.PathRefused`: an image path outside ``root``.
    """
    where = f"RL record {rid}"
    raw = row.get("images") or row.get("image") or []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ThymeError(f"{where}: 'images' must be a list of image paths")
    images = [_resolve(p, root, allow_absolute=allow_absolute, where=where) for p in raw]
    system = next((m for m in row["messages"] if m.get("role") == "system"), None)
    user = next((m for m in row["messages"] if m.get("role") == "user"), None)
    if user is None:
        raise ThymeError(f"RL record {rid}: no user message")
    text = _text(user.get("content"))
    n_ph = text.count(protocol.IMAGE_PLACEHOLDER)
    if n_ph and n_ph != len(images):
        raise ThymeError(f"RL record {rid}: {n_ph} <image> placeholders but {len(images)} images")
    for _ in range(n_ph):
        text = text.replace(protocol.IMAGE_PLACEHOLDER, "", 1)
    text = text.lstrip("\n") if n_ph else text
    solution = row.get("solution", row.get("answer", row.get("answer_gt")))
    if solution is None:
        raise ThymeError(f"RL record {rid}: no solution")
    content = [protocol.image_part(p) for p in images] + [protocol.text_part(text)]
    msgs = [
        {"role": "system", "content": [protocol.text_part(_text(system["content"]) if system else protocol.SYSTEM_PROMPT)]},
        {"role": "user", "content": content},
    ]
    question = row.get("question") or text
    bbox, category, extra = row_target(row, where)
    return RLPrompt(rid, msgs, images, str(solution), protocol.strip_question_placeholder(str(question)), {}, bbox, category, extra)


def from_benchmark_row(
    row: dict[str, Any], rid: str, root: Path, shown_path: str | None = None, *, allow_absolute: bool = False
) -> RLPrompt:
    """A benchmark row (question, options, answer, image) -> :class:`RLPrompt` in the Thyme prompt."""
    from ...evaluate.benchmarks import parse_options
    from ...evaluate.prompts import build_question

    options = parse_options(row.get("options")) if row.get("options") is not None else {}
    question = build_question(SimpleNamespace(hint=row.get("hint"), question=str(row["question"]), options=options))
    img = row.get("image")
    images = [_resolve(img, root, allow_absolute=allow_absolute, where=f"benchmark row {rid}")] if isinstance(img, str) and img else []
    shown = [shown_path.replace("{name}", os.path.basename(p)).replace("{path}", p) if shown_path else p for p in images]
    sizes = []
    for p in images:
        try:
            sizes.append(image_size(p))
        except Exception:
            sizes.append(None)
    msgs = protocol.build_messages(question, images, shown_paths=shown, image_sizes=sizes)
    return RLPrompt(rid, msgs, images, str(row.get("answer", "")).strip(), question, options)


def load_prompts(
    files: list[str], *, images_root: str | None = None, shown_path: str | None = None, allow_absolute_paths: bool = False
) -> list[RLPrompt]:
    """Read every row of ``files`` (JSONL): RL records or benchmark rows.

    Every line is read; a bad line (invalid JSON, not an object, an unknown row form, a
    malformed record, an image path outside the images root: :mod:`thyme.records`) is collected,
    and when there are any, one error names each (file and line, the reason) before the model
    loads: an RL run never trains on a silently shortened train set (README, ``thyme train rl``).

    Args:
        images_root: folder relative image paths start from (default: each file's folder).
        allow_absolute_paths: the user's opt-in to image paths outside it.

    Raises:
        ThymeError: a missing file, no rows, or the bad lines (up to 10 listed, and the count).
    """
    from ...jsonl import iter_jsonl

    out: list[RLPrompt] = []
    bad: list[str] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ThymeError(f"train file not found: {f}", "pass JSONL of RL records or benchmark rows")
        root = Path(images_root) if images_root else path.resolve().parent
        for line, row in iter_jsonl(path):
            at = f"{f}:{line}"
            if isinstance(row, RecordError):
                bad.append(f"{at}: {row.message}")
                continue
            if not isinstance(row, dict):
                bad.append(f"{at}: expected a JSON object, got {type(row).__name__}")
                continue
            rid = str(row.get("id", row.get("question_id", f"{path.name}:{line}")))
            try:
                if isinstance(row.get("messages"), list):
                    out.append(from_rl_record(row, rid, root, allow_absolute=allow_absolute_paths))
                elif "question" in row and ("answer" in row or "solution" in row):
                    out.append(from_benchmark_row(row, rid, root, shown_path, allow_absolute=allow_absolute_paths))
                else:
                    bad.append(
                        f"{at}: unknown row form (keys {sorted(row)[:20]}); expected RL records (messages, images, solution) or benchmark rows (question, options, answer, image)"
                    )
            except ThymeError as e:
                bad.append(f"{at}: {e.message}" + (f" ({e.hint})" if e.hint else ""))
    if bad:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ThymeError(
            f"{len(bad)} bad line(s) in the train files:\n" + "\n".join(f"  {b}" for b in bad[:10]) + more,
            "fix or remove these lines (nothing was trained)",
        )
    if not out:
        raise ThymeError(f"no rows in {files}")
    return out


def check_prompt_images(prompts: list[RLPrompt], *, images_root: str | None = None, decode: bool = True) -> None:
    """Check, before a model loads, that every prompt's images exist and (``decode``) decode fully.

    A prompt whose image is missing would only be masked at every step (``input_error``): a run
    of such prompts trains on nothing. Relative paths were resolved against ``images_root`` or
    the train file's folder (:func:`load_prompts`), which the error says.

    Raises:
        ThymeError: naming up to 10 records with a missing image (id and resolved path) and the count.
        ImageError: the first image that is unreadable or truncated (``decode``).
    """
    missing = [(p.id, x) for p in prompts for x in p.images if not os.path.isfile(x)]
    if missing:
        lines = "\n".join(f"  record {rid}: {x}" for rid, x in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        where = f"--set images_root={images_root}" if images_root else "each train file's own folder"
        raise ThymeError(
            f"{len(missing)} image(s) of the train files not found:\n{lines}{more}",
            f"relative image paths are resolved against {where}; give absolute paths or --set images_root=DIR",
        )
    if decode:
        from ...agent.preflight import check_images_decode

        check_images_decode([x for p in prompts for x in p.images])


def to_dataset_rows(prompts: list[RLPrompt]) -> dict[str, list[Any]]:
    """Columns for ``datasets.Dataset.from_dict``: ``prompt`` (question text), ``thyme`` (JSON)."""
    return {"prompt": [p.question for p in prompts], "thyme": [p.to_json() for p in prompts]}


def rl_record(question: str, image: str, solution: str, *, rid: str | None = None) -> dict[str, Any]:
    """An RL record in the released schema for ``question`` about ``image`` (tests, examples)."""
    try:
        size = image_size(image)
    except Exception:
        size = None
    user = (
        protocol.IMAGE_PLACEHOLDER + "\n" + protocol.user_prompt_text(question, image, size)[len(protocol.IMAGE_PLACEHOLDER) :].lstrip("\n")
    )
    rec = {
        "messages": [{"role": "system", "content": protocol.SYSTEM_PROMPT}, {"role": "user", "content": user}],
        "images": [image],
        "solution": solution,
        "question": question,
    }
    if rid is not None:
        rec["id"] = rid
    return rec
