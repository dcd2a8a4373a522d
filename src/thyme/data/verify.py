"""``thyme data verify``: the paper's sandbox execution filtering (Sec. 3.1), on ``thyme replay``.

Every record's code blocks run again in the sandbox, in order, one session per record
(:func:`thyme.agent.replay.replay`, backend ``replay``). A record is **kept** when every block's
regenerated output matches what the record says the sandbox returned:

- an output with images: the same number of images, of the same sizes;
- printed text: the same text (white space collapsed; numbers equal within ``float_rel_tol``);
- a recorded error (the output reads like ``NameError: ...`` or a traceback): the block fails
  again (records whose first round failed and second round fixed it are legitimate SFT data);
- an empty output: no images and no printed text.

What the sandbox returned comes from ``reference_outputs`` when the record has it (the corpus
format: per block a list of ``{"image", "size": [w, h]}`` / ``{"text"}``); otherwise it is read
from the record itself: the ``<sandbox_output>`` following each ``</code>``, its ``<image>``
placeholders sized from the record's ``image`` list after the inputs, its text as printed.

Kept records are written to the kept file as they were (plus ``_verify_key``); rejected ones to the rejected file with
``rejection: {"reason", "detail", "block"}``, ``reason`` one of ``record_error`` (malformed,
missing image, an image path outside the images root: :mod:`thyme.records`), ``replay_error`` (the run itself failed), ``rounds_mismatch`` (fewer blocks ran
than recorded), ``code_error`` (a block failed that the record shows working), ``timeout``,
``image_mismatch`` (count or sizes), ``text_mismatch``, ``unexpected_success`` (the record shows
an error, the block ran). Both files are appended as records finish; a rerun skips the records
already in either file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import protocol
from ..config import setting
from ..scoring.answers import texts_match
from ..errors import RecordError, ThymeError
from ..jsonl import ResumableJsonl, ensure_writable
from ..agent.parallel import import_ray, ray_setting, resolve_workers, workers_setting
from .records import OutputSpan, SFTRecord, iter_jsonl, parse_sft_record

_ERROR_RE = re.compile(r"(?m)^\s*(Traceback \(most recent call last\)|[A-Za-z_][\w.]*(Error|Exception)\b|Error:)")


@dataclass
class VerifyConfig:
    """Settings of the execution filter; each field's meaning, default and source:
    ``thyme data verify --help``."""

    batch_size: int = setting(8, help="records replayed together (their code runs concurrently in the pool)", source="ours")
    float_rel_tol: float = setting(1e-6, help="relative tolerance for numbers in printed text (the last digits of a float may differ across library versions)", source="ours")
    keep_without_code: bool = setting(True, help="keep records that have no code block (nothing to execute)", source="ours")
    allow_absolute_paths: bool = setting(False, help="accept image paths that leave the images root (absolute, .., symlinks pointing out); only for records you trust (README: Paths in data)", source="ours")
    workers: int | None = workers_setting()
    ray: str | None = ray_setting()


@dataclass
class Expected:
    """What the record says one code block's sandbox returned.

    Attributes:
        kind: ``images``, ``text``, ``error``, ``empty`` or ``unknown`` (no output recorded).
        sizes: ``[w, h]`` per image (``images``).
        text: the printed text (``text`` / ``error``).
    """

    kind: str
    sizes: list[list[int]] = field(default_factory=list)
    text: str = ""


@dataclass
class VerifySummary:
    """Totals (the ``--json`` line): records seen in this run, kept, rejected, reasons, resumed."""

    records: int = 0
    kept: int = 0
    rejected: int = 0
    resumed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    kept_path: str = ""
    rejected_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- expectations


def looks_like_error(text: str) -> bool:
    """Whether recorded sandbox text is an error report (``NameError: ...``, a traceback)."""
    return bool(_ERROR_RE.search(text))


def _image_sizes(paths: list[str]) -> list[list[int]]:
    from ..imageio import image_size

    return [list(image_size(p)) for p in paths]


def expected_outputs(rec: SFTRecord) -> list[Expected]:
    """One :class:`Expected` per code block of the response, in order.

    From ``reference_outputs`` when present; else from the ``<sandbox_output>`` right after each
    ``</code>`` (its images sized from the record's output images, in order).
    """
    blocks = protocol.split_recorded_response(rec.response)
    n_blocks = sum(1 for seg in blocks if protocol.parse_segment(seg, "stop").end == "code")
    refs = rec.raw.get("reference_outputs")
    if isinstance(refs, list):
        out = []
        for k in range(n_blocks):
            ref = refs[k] if k < len(refs) and isinstance(refs[k], list) else []
            sizes = [list(r["size"]) for r in ref if isinstance(r, dict) and "size" in r]
            texts = [str(r["text"]) for r in ref if isinstance(r, dict) and "text" in r]
            if sizes:
                out.append(Expected("images", sizes=sizes))
            elif texts:
                t = "\n".join(x.strip() for x in texts)
                out.append(Expected("error" if looks_like_error(t) else "text", text=t))
            else:
                out.append(Expected("empty"))
        return out
    # derive from the record: the output that follows each </code>
    out = []
    outputs = list(rec.outputs)
    used = 0
    by_block: list[OutputSpan | None] = []
    r = rec.response
    spans = list(rec.spans)
    pos = 0
    for _ in range(n_blocks):
        end = r.find(protocol.CODE_END, pos)
        if end < 0:
            break
        end += len(protocol.CODE_END)
        span = next((s for s in spans if s.start >= end and r[end: s.start].strip() == ""), None)
        by_block.append(span)
        pos = span.end if span is not None else end
    for span in by_block:
        if span is None:
            out.append(Expected("unknown"))
            continue
        if span.images:
            paths = outputs[used: used + span.images]
            used += span.images
            out.append(Expected("images", sizes=_image_sizes(paths)))
        elif span.text:
            out.append(Expected("error" if looks_like_error(span.text) else "text", text=span.text))
        else:
            out.append(Expected("empty"))
    while len(out) < n_blocks:
        out.append(Expected("unknown"))
    return out


def judge(expected: list[Expected], executions: list[dict[str, Any] | None], *, rel_tol: float = 1e-6) -> dict[str, Any] | None:
    """Compare each block's regenerated execution with its expectation.

    Returns:
        ``None`` when every block matches, else ``{"reason", "detail", "block"}`` for the first
        block that does not (``block`` counts from 1).
    """
    if len(executions) < len(expected):
        return {"reason": "rounds_mismatch", "detail": f"{len(executions)} of {len(expected)} recorded code blocks ran", "block": len(executions) + 1}
    for k, (exp, ex) in enumerate(zip(expected, executions), 1):
        if exp.kind == "unknown":
            continue
        ok = bool(ex and ex.get("ok"))
        if exp.kind == "error":
            if ok:
                return {"reason": "unexpected_success", "detail": f"the record shows an error ({exp.text[:120]!r}) but the block ran", "block": k}
            continue
        if not ok:
            if ex and ex.get("timed_out"):
                return {"reason": "timeout", "detail": "the block did not finish within the time limit", "block": k}
            err = (ex or {}).get("error") or {}
            return {"reason": "code_error", "detail": f"{err.get('type')}: {err.get('message')}", "block": k}
        images = ex.get("images") or []
        if exp.kind == "images":
            got = ex["image_sizes"] if "image_sizes" in ex else _image_sizes(images)
            if got != exp.sizes:
                fmt = lambda ss: ", ".join(f"{w}x{h}" for w, h in ss) or "none"  # noqa: E731
                return {"reason": "image_mismatch", "detail": f"expected image(s) {fmt(exp.sizes)}, got {fmt(got)}", "block": k}
            continue
        stdout = (ex.get("stdout") or "").strip()
        if exp.kind == "text":
            if images:
                return {"reason": "text_mismatch", "detail": f"expected text {exp.text[:120]!r}, got {len(images)} image(s)", "block": k}
            if not texts_match(exp.text, stdout, rel_tol):
                return {"reason": "text_mismatch", "detail": f"expected {exp.text[:120]!r}, got {stdout[:120]!r}", "block": k}
            continue
        if exp.kind == "empty" and (images or stdout):
            return {"reason": "text_mismatch", "detail": f"expected no output, got {stdout[:120]!r}" + (f" and {len(images)} image(s)" if images else ""), "block": k}
    return None


# --------------------------------------------------------------------------- run


def verify(
    records_path: str | os.PathLike,
    *,
    sandbox: Any = None,
    sandbox_config: Any = None,
    kept_path: str | os.PathLike,
    rejected_path: str | os.PathLike,
    images_root: str | os.PathLike | None = None,
    config: VerifyConfig | None = None,
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None,
) -> VerifySummary:
    """Filter ``records_path`` by re-executing its code; see the module docstring.

    Args:
        records_path: JSONL of Thyme SFT records.
        sandbox: a :class:`thyme.sandbox.Sandbox` (used with ``config.workers == 1``).
        sandbox_config: the workers' :class:`thyme.sandbox.SandboxConfig` (default:
            ``sandbox.config``); see :func:`thyme.agent.replay.replay`.
        kept_path / rejected_path: JSONL files appended as records finish (a rerun resumes).
            Each line carries ``_verify_key`` (``<line>:<id>``) so a rerun recognises it.
        images_root: folder relative image paths start from (default: the records file's folder).
        config: see :class:`VerifyConfig` (``workers``: ``None`` is the usable cores; ``ray``).
            The kept and rejected files hold the same records whatever the number of workers,
            in input order.
        progress: called with the number of records finished (those an earlier run verified
            included).
        on_result: called with ``(record, rejection or None)`` for each record.

    Raises:
        RecordError / ThymeError: the records file cannot be read.
    """
    from ..agent import AgentConfig
    from ..agent.replay import replay

    cfg = config or VerifyConfig()
    if cfg.ray is not None:
        import_ray()  # a clear error naming the extra, before anything is written
    records_path = Path(records_path)
    root = Path(images_root) if images_root is not None else records_path.parent
    kept_path, rejected_path = Path(kept_path), Path(rejected_path)
    for p, what in ((kept_path, "--kept"), (rejected_path, "--rejected")):
        ensure_writable(p, what=what)
    key = lambda obj: obj.get("_verify_key")  # noqa: E731
    kept_f = ResumableJsonl(kept_path, key=key)  # a torn last line is cut; its record is verified again
    rej_f = ResumableJsonl(rejected_path, key=key)
    done = kept_f.done | rej_f.done
    summary = VerifySummary(kept_path=str(kept_path), rejected_path=str(rejected_path))
    finished = 0

    def write(obj: dict[str, Any], key: str, rejection: dict[str, Any] | None) -> None:
        nonlocal finished
        line = dict(obj) if isinstance(obj, dict) else {"raw": obj}
        line["_verify_key"] = key
        summary.records += 1
        if rejection is None:
            summary.kept += 1
            kept_f.write(line)
        else:
            summary.rejected += 1
            summary.reasons[rejection["reason"]] = summary.reasons.get(rejection["reason"], 0) + 1
            line["rejection"] = rejection
            rej_f.write(line)
        finished += 1
        if on_result:
            on_result(obj, rejection)
        if progress:
            progress(finished + summary.resumed)  # resumed records count: the bar starts where the last run stopped

    pending: dict[str, tuple[str, dict[str, Any], SFTRecord, list[Expected]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="thyme-verify-") as tmp:
            todo = Path(tmp) / "todo.jsonl"
            with todo.open("w", encoding="utf-8") as f:
                for n, obj in iter_jsonl(records_path):
                    rid = obj.get("id") if isinstance(obj, dict) else None
                    key = f"{n}:{rid if rid is not None else 'line-' + str(n)}"
                    if key in done:
                        summary.resumed += 1
                        continue
                    if isinstance(obj, RecordError):
                        write({"line": n}, key, {"reason": "record_error", "detail": obj.message, "block": None})
                        continue
                    try:
                        rec = parse_sft_record(obj, line=n, images_root=root, allow_absolute=cfg.allow_absolute_paths)
                        expected = expected_outputs(rec)
                    except (RecordError, ThymeError) as e:
                        write(obj, key, {"reason": "record_error", "detail": e.message, "block": None})
                        continue
                    if not expected:
                        write(obj, key, None if cfg.keep_without_code else {"reason": "no_code", "detail": "the response has no code block", "block": None})
                        continue
                    vid = f"v{n}"
                    pending[vid] = (key, obj, rec, expected)
                    # the paths as the record gives them: replay resolves them by the same rule, in the same root
                    f.write(json.dumps({"id": vid, "image": obj.get("image", obj.get("images")) or [], "question": rec.question, "response": rec.response}, ensure_ascii=False) + "\n")
            if not pending:
                return summary
            # a sandbox given and no worker count: this process, with it; never more workers than batches
            workers = 1 if cfg.workers is None and sandbox is not None else resolve_workers(cfg.workers)
            workers = min(workers, -(-len(pending) // max(1, cfg.batch_size)))

            def on_row(row: dict[str, Any]) -> None:
                item = pending.pop(str(row.get("id")), None)
                if item is None:
                    return
                key, obj, rec, expected = item
                if not row.get("ok"):
                    write(obj, key, {"reason": "replay_error", "detail": str(row.get("error")), "block": None})
                    return
                turns = (row.get("trajectory") or {}).get("turns", [])
                executions = [t.get("execution") for t in turns if t.get("code") is not None]
                sizes = row.get("image_sizes")
                if isinstance(sizes, list):  # measured where the images were made (they may be gone)
                    executions = [dict(ex, image_sizes=sizes[k]) if ex is not None and k < len(sizes) else ex for k, ex in enumerate(executions)]
                write(obj, key, judge(expected, executions, rel_tol=cfg.float_rel_tol))

            replay(
                todo,
                sandbox=sandbox,
                sandbox_config=sandbox_config,
                images_root=root,
                allow_absolute_paths=cfg.allow_absolute_paths,
                config=AgentConfig(max_images=10_000, max_total_tokens=10**9),
                batch_size=cfg.batch_size,
                workers=workers,
                ray=cfg.ray,
                on_row=on_row,
            )
            for vid, (key, obj, _, _) in list(pending.items()):  # replay reported nothing for them
                write(obj, key, {"reason": "replay_error", "detail": "no result from replay", "block": None})
    finally:
        kept_f.close()
        rej_f.close()
    return summary


def format_summary(s: VerifySummary) -> str:
    lines = [f"records: {s.records}", f"kept:    {s.kept}", f"rejected: {s.rejected}"]
    for k, v in sorted(s.reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k}: {v}")
    if s.resumed:
        lines.append(f"resumed: {s.resumed} (already verified)")
    lines.append(f"kept records: {s.kept_path}")
    lines.append(f"rejected records: {s.rejected_path}")
    return "\n".join(lines)
