"""``thyme data synthesize``: seed rows in, Thyme SFT records out, with the funnel of every stage.

For each seed row (JSONL or parquet: ``image``, ``question``, ``answer``, ``bbox`` = x1, y1, x2, y2
in pixels of the original image where the scenario needs it, optional ``options``, ``id``,
``scenario``):

1. the scenario's input image is made (``rotate`` / ``contrast``: a seeded, recorded transform,
   :mod:`.scenarios`) and kept beside the output (``<OUT stem>_images/<row>/``);
2. the teacher gets the scenario's prompt (:func:`.scenarios.load_prompts`) and writes reasoning
   and code; the code runs in the sandbox (a session per row, the path shown in the question
   mapped to the input); the output goes back to the teacher as a new user turn (teacher-side
   protocol, :mod:`.teacher`) and the teacher continues to the answer;
3. every stage of :mod:`.stages` is applied in order; the first failing rule rejects the row.

Kept records go to ``OUT`` in the released Thyme format (``image``: input then sandbox outputs,
relative to ``OUT``'s folder; ``question``: the filled Thyme user prompt with the image path line;
``response``: ``<think>`` reasoning, ``<code>``, ``<sandbox_output>``, more reasoning
``</think>``, ``<answer>``), plus ``key`` (the resume key) and ``synthesis`` (scenario, transform,
teacher tokens, stage times). Rejected rows go to ``OUT.rejected.jsonl`` with ``rejection:
{stage, reason, detail}``. Both are appended as rows finish (:func:`thyme.agent.scheduler.schedule`);
a rerun skips rows already in either file, except those rejected at the ``teacher`` stage (a
failed teacher call), which are dropped from the rejected file and tried again.

The funnel (:func:`funnel_of`): per scenario, rows in, then the rows still in after each stage,
with teacher tokens; computed over both files, so a resumed run reports the whole run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ... import protocol
from ...agent.parallel import import_ray, ray_setting, resolve_workers, workers_setting
from ...config import setting
from ...errors import RecordError, ThymeError
from ...jsonl import ResumableJsonl, ensure_writable, iter_jsonl
from ...records import relative_to_root, resolve_data_path
from . import scenarios as sc
from . import stages as st
from .teacher import TeacherClient, TeacherError, user_turn


@dataclass
class SynthConfig:
    """Settings of ``thyme data synthesize`` (``--help`` shows each with its default)."""

    scenario: str | None = setting(
        None,
        help="one of no_code, crop, rotate, contrast, compute, multi_round (default: each row's 'scenario' column)",
        source="paper Sec. 3.1",
    )
    concurrency: int = setting(4, help="rows in flight at once (teacher calls and sandbox runs)", source="ours")
    seed: int = setting(0, help="base seed of the image transforms (angle, degradation, round-1 box); recorded per row", source="ours")
    prompts: str | None = setting(None, help="folder of prompt YAML files replacing the defaults of the same name", source="ours")
    crop_coverage: float = setting(st.CROP_COVERAGE, help="share of the target box's area the crop must cover", source="ours")
    rotation_min_corr: float = setting(
        st.ROTATION_MIN_CORR, help="least correlation of the rotated-back image with the original", source="ours"
    )
    contrast_gain: float = setting(st.CONTRAST_GAIN, help="least ratio of output to input RMS contrast", source="ours")
    judge_retries: int = setting(
        2, help="verifier calls retried when the reply is unusable (then judge_failed, never accepted)", source="ours"
    )
    verify_consistency: bool = setting(
        True, help="run the MLLM consistency verifier (off: the stage passes every row; for dry runs only)", source="paper Sec. 3.1"
    )
    allow_absolute_paths: bool = setting(False, help="accept seed image paths that leave the images root", source="ours")
    workers: int | None = workers_setting()
    ray: str | None = ray_setting()


@dataclass
class SeedRow:
    key: str
    line: int
    scenario: str
    raw: dict[str, Any]
    image: str | None = None
    question: str = ""
    answer: str = ""
    bbox: list[int] | None = None
    options: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SynthSummary:
    """The ``--json`` summary: rows of this run, kept, rejected, resumed, the funnel, tokens, wall time."""

    rows: int = 0
    kept: int = 0
    rejected: int = 0
    resumed: int = 0
    retried_teacher: int = 0
    funnel: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    teacher_tokens: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    kept_path: str = ""
    rejected_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- seeds


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover
            raise ThymeError("reading parquet seeds needs pyarrow", "pip install pyarrow, or give JSONL") from None
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    return list(iter_jsonl(path))


def _is_dataset(source: str) -> bool:
    """A ``save_to_disk`` folder, or a hub id (``owner/name``, not a path that exists)."""
    from ..convert import is_saved_dataset

    return is_saved_dataset(source) or (not os.path.exists(source) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None)


def _dataset_rows(source: str) -> list[tuple[int, Any]]:
    """Rows of every split of a hub dataset or ``save_to_disk`` folder, numbered from 1 in split
    order (images undecoded: ``{"bytes", "path"}``), through ``thyme data convert``'s opener."""
    from ..convert import ConvertConfig, open_source

    rows: list[tuple[int, Any]] = []
    for _, ds in open_source(source, ConvertConfig()):
        for row in ds:
            rows.append((len(rows) + 1, dict(row)))
    return rows


def _options(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k).strip().upper(): str(v).strip() for k, v in value.items()}
    out: dict[str, str] = {}
    lines = value.splitlines() if isinstance(value, str) else [str(x) for x in value or []]
    for line in lines:
        m = re.match(r"^\s*\(?([A-Z])[).:]\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def load_seeds(
    path: str | os.PathLike,
    *,
    scenario: str | None,
    images_root: str | os.PathLike | None = None,
    allow_absolute: bool = False,
    embedded_dir: str | os.PathLike | None = None,
) -> list[SeedRow]:
    """Read seed rows; a bad row becomes a :class:`SeedRow` with ``error`` (rejected at ``input``), never raised.

    ``image`` is a path (relative to ``images_root``, default the seeds file's folder, and inside
    it: :func:`thyme.records.resolve_data_path`) or an embedded image (a ``datasets.Image``
    struct with bytes, raw bytes, a data URL), decoded within the image budgets
    (:func:`thyme.data.convert.check_image_bytes`) and written to ``embedded_dir``.

    Raises:
        ThymeError: the file is missing or unreadable, or ``scenario`` is unknown.
    """
    p = Path(path)
    if scenario is not None and scenario not in sc.SCENARIOS:
        raise ThymeError(f"unknown scenario {scenario!r}", f"use one of {', '.join(sc.SCENARIOS)}")
    if p.is_file():
        root = Path(images_root) if images_root is not None else p.resolve().parent
        source_rows = _read_rows(p)
    elif _is_dataset(str(path)):
        root = Path(images_root) if images_root is not None else (p.resolve() if p.is_dir() else Path.cwd())
        source_rows = _dataset_rows(str(path))
    else:
        raise ThymeError(
            f"seeds file not found: {p}",
            "pass a JSONL or parquet file of seed rows (image, question, answer, bbox), a save_to_disk folder or a hub dataset id",
        )
    out: list[SeedRow] = []
    for n, obj in source_rows:
        name = scenario or (obj.get("scenario") if isinstance(obj, dict) else None) or "?"
        rid = obj.get("id") if isinstance(obj, dict) else None
        row = SeedRow(
            key=f"{n}:{rid if rid is not None else ''}:{name}", line=n, scenario=str(name), raw=obj if isinstance(obj, dict) else {}
        )
        out.append(row)
        try:
            if isinstance(obj, RecordError):
                raise ThymeError(obj.message)
            if not isinstance(obj, dict):
                raise ThymeError(f"line {n} is not a JSON object")
            if row.scenario not in sc.SCENARIOS:
                raise ThymeError(f"unknown scenario {row.scenario!r} (use --scenario or a 'scenario' column)")
            spec = sc.SCENARIO_SPECS[row.scenario]
            for k in ("question", "answer"):
                if not isinstance(obj.get(k), (str, int, float)) or str(obj.get(k)).strip() == "":
                    raise ThymeError(f"field {k!r} is missing or empty")
            row.question, row.answer = str(obj["question"]), str(obj["answer"])
            img = obj.get("image")
            if isinstance(img, list):
                img = img[0] if img else None
            if isinstance(img, str) and img and not img.startswith("data:image/"):
                row.image = resolve_data_path(img, root, allow_absolute=allow_absolute, where=f"seed row on line {n}")
                if not os.path.isfile(row.image):
                    raise ThymeError(f"image not found: {row.image}")
            elif img:  # embedded (a datasets.Image struct, bytes, a data URL): checked, then written once
                from ..convert import _ext_of, check_image_bytes, image_bytes

                if embedded_dir is None:
                    raise ThymeError("embedded images need a folder to be written to")
                raw, _ = image_bytes(img, images_root=root, allow_absolute=allow_absolute)
                check_image_bytes(raw)
                dst = Path(embedded_dir) / f"seed-{n}{_ext_of(raw) or '.png'}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    dst.write_bytes(raw)
                row.image = str(dst.resolve())
            elif spec.needs_image:
                raise ThymeError(f"scenario {row.scenario} needs an image")
            if spec.needs_bbox:
                b = obj.get("bbox")
                if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
                    raise ThymeError("field 'bbox' must be [x1, y1, x2, y2] in pixels")
                b = [int(round(v)) for v in b]
                from ...imageio import image_size

                W, H = image_size(row.image)
                if not (0 <= b[0] < b[2] <= W and 0 <= b[1] < b[3] <= H):
                    raise ThymeError(f"bbox {b} is not inside the {W}x{H} image")
                row.bbox = b
            row.options = _options(obj.get("options"))
        except (ThymeError, RecordError) as e:
            row.error = e.message
        except Exception as e:  # noqa: BLE001 - a bad row never stops the run
            row.error = f"{type(e).__name__}: {e}"
    return out


# --------------------------------------------------------------------------- one row


class _Row:
    """State of one row while it runs (the teacher conversation and the record's pieces)."""

    def __init__(self, seed: SeedRow, work_dir: Path, out_root: Path):
        self.seed = seed
        self.dir = work_dir
        self.out_root = out_root
        self.tokens = {"prompt": 0, "completion": 0}
        self.stage_s: dict[str, float] = {}
        self.transform: dict[str, Any] | None = None
        self.turns: list[str] = []
        self.outputs: list[str] = []
        self.stage = "input"

    def timed(self, stage: str, t0: float) -> None:
        self.stage_s[stage] = round(self.stage_s.get(stage, 0.0) + time.perf_counter() - t0, 4)


class Synthesizer:
    """Runs rows (thread-safe: one per worker at a time).

    Args:
        teacher: the teacher client; code_teacher: for ``compute`` (default: the teacher);
        verifier: the consistency verifier (default: the teacher).
        sandbox: a :class:`thyme.sandbox.Sandbox`.
        images_dir: where each row's images go (a folder per row).
        out_root: the folder of ``OUT`` (record image paths are relative to it).
    """

    def __init__(
        self,
        config: SynthConfig,
        *,
        teacher: TeacherClient,
        sandbox: Any,
        images_dir: Path,
        out_root: Path,
        code_teacher: TeacherClient | None = None,
        verifier: TeacherClient | None = None,
    ):
        self.cfg = config
        self.teacher = teacher
        self.code_teacher = code_teacher or teacher
        self.verifier = verifier or teacher
        self.sandbox = sandbox
        self.images_dir = images_dir
        self.out_root = out_root
        self.prompts = sc.load_prompts(config.prompts)

    # ------------------------------------------------------------------ helpers
    def _ask(self, row: _Row, client: TeacherClient, messages: list[dict[str, Any]]) -> str:
        row.stage = "teacher"
        t0 = time.perf_counter()
        try:
            r = client.chat(messages)
        except TeacherError as e:
            raise st.Rejected("teacher", e.reason, e.message) from None
        finally:
            row.timed("teacher", t0)
        row.tokens["prompt"] += r.prompt_tokens
        row.tokens["completion"] += r.completion_tokens
        row.turns.append(r.text)
        return r.text

    def _run_code(self, row: _Row, session: Any, code: str, expect: str, k: int) -> tuple[Any, list[str]]:
        row.stage = "execute"
        t0 = time.perf_counter()
        res = session.run(code)
        row.timed("execute", t0)
        rej = st.check_execution(res, expect)
        if rej:
            raise st.Rejected(rej.stage, rej.reason, rej.detail)
        kept = []
        for j, p in enumerate(res.images):  # the session folder goes with the session: keep copies beside the output
            dst = row.dir / f"out{k}_{j}{Path(p).suffix or '.png'}"
            shutil.copyfile(p, dst)
            kept.append(str(dst))
        row.outputs += kept
        return res, kept

    @staticmethod
    def _feedback_record(res: Any, images: list[str]) -> str:
        from dataclasses import replace

        return protocol.render_parts(protocol.feedback_parts(replace(res, images=images)), protocol.IMAGE_PLACEHOLDER)

    @staticmethod
    def _feedback_teacher(res: Any, images: list[str]) -> str:
        if images:
            return f"({len(images)} image(s) saved, attached; printed: {res.stdout.strip()[:500]!r})"
        return res.stdout.strip()[:4000]

    def _goal(self, row: _Row, fn: Callable[..., st.Rejection | None], *args: Any, **kw: Any) -> None:
        row.stage = "goal"
        t0 = time.perf_counter()
        try:
            rej = fn(*args, **kw)
        finally:
            row.timed("goal", t0)
        if rej:
            raise st.Rejected(rej.stage, rej.reason, rej.detail)

    @staticmethod
    def _leak(row: _Row, text: str, **kw: Any) -> None:
        row.stage = "leak"
        rej = st.find_leaks(text, **kw)
        if rej:
            raise st.Rejected(rej.stage, rej.reason, rej.detail)

    # ------------------------------------------------------------------ the row
    def run_row(self, seed: SeedRow) -> dict[str, Any]:
        """Run one seed row; returns the kept record or the rejected line (never raises for a row)."""
        row = _Row(seed, self.images_dir / _safe(seed.key), self.out_root)
        try:
            if seed.error:
                raise st.Rejected("input", "bad_row", seed.error)
            return self._run(row)
        except st.Rejected as r:
            return self._rejected(row, r.rejection)
        except Exception as e:  # noqa: BLE001 - one bad row never stops the run
            detail = f"{type(e).__name__}: {e} | " + "".join(traceback.format_exception_only(type(e), e)).strip()[:200]
            return self._rejected(row, st.Rejection(row.stage, "internal_error", detail))

    def _rejected(self, row: _Row, rej: st.Rejection) -> dict[str, Any]:
        s = row.seed
        return {
            "key": s.key,
            "id": s.raw.get("id", f"line-{s.line}"),
            "scenario": s.scenario,
            "line": s.line,
            "question": s.question,
            "answer": s.answer,
            "rejection": rej.to_dict(),
            "synthesis": {"scenario": s.scenario, "transform": row.transform, "teacher_tokens": row.tokens, "stage_s": row.stage_s},
            "teacher_turns": [t[:4000] for t in row.turns],
        }

    def _prepare_input(self, row: _Row) -> tuple[str | None, str | None]:
        """The input image the teacher and the student see (transformed where the scenario says)."""
        s = row.seed
        if s.image is None:
            return None, None
        row.dir.mkdir(parents=True, exist_ok=True)
        seed = sc.row_seed(s.key, self.cfg.seed)
        ext = Path(s.image).suffix.lower() or ".png"
        dst = row.dir / f"input{ext}"
        if s.scenario == "rotate":
            row.transform = sc.rotate_image(s.image, dst, seed)
        elif s.scenario == "contrast":
            row.transform = sc.degrade_contrast(s.image, dst, seed)
        else:
            shutil.copyfile(s.image, dst)
        if s.scenario == "multi_round":
            from ...imageio import image_size

            row.transform = sc.multi_round_box(s.bbox, image_size(str(dst)), seed)
        return str(dst), relative_to_root(str(dst), self.out_root)

    def _run(self, row: _Row) -> dict[str, Any]:
        from ...imageio import image_size

        s = row.seed
        name = s.scenario
        P = self.prompts[name]
        t0 = time.perf_counter()
        inp, shown = self._prepare_input(row)
        row.timed("input", t0)
        size = image_size(inp) if inp else None
        fields = dict(
            question=s.question,
            image_path=shown or "N/A",
            image_size=protocol.format_image_size(size) if size else "N/A",
            answer=s.answer,
            box=", ".join(map(str, s.bbox or [])),
            angle=(row.transform or {}).get("angle", ""),
            round1_box=", ".join(map(str, (row.transform or {}).get("round1_box", []))),
            mode=(row.transform or {}).get("mode", ""),
        )
        msgs: list[dict[str, Any]] = [
            {"role": "system", "content": sc.fill(P["system"], **fields)},
            user_turn(sc.fill(P["user"], **fields), [inp] if inp else []),
        ]
        boxes = [b for b in (s.bbox, (row.transform or {}).get("round1_box")) if b]
        angle = (row.transform or {}).get("angle")
        pieces: list[str] = []  # the record's response, before </think>
        goal_text = ""
        if name == "no_code":
            text = self._ask(row, self.teacher, msgs)
            row.stage = "parse"
            reasoning, answer = st.parse_direct_turn(text)
            self._leak(row, reasoning)
            pieces.append(reasoning)
            goal_text = "no code: the question is answered from the image as it is"
        else:
            session = self.sandbox.session(images=[inp] if inp else [], shown_paths=[shown] if inp else None)
            with session as sess:
                if name == "compute":
                    reasoning = self._ask(row, self.teacher, msgs)
                    row.stage = "parse"
                    reasoning = reasoning.replace("<think>", "").replace("</think>", "").strip()
                    if (
                        protocol.CODE_START in reasoning
                        or protocol.ANSWER_START in reasoning
                        or len(reasoning.split()) < st.MIN_REASONING_WORDS
                    ):
                        raise st.Rejected("parse", "no_reasoning", "the reasoning teacher must write reasoning only (no code, no answer)")
                    st.check_tags(reasoning, "reasoning")
                    cmsgs = [
                        {"role": "system", "content": sc.fill(P.get("code_system", P["system"]), **fields)},
                        {"role": "user", "content": sc.fill(P.get("code_user", ""), **dict(fields, reasoning=reasoning))},
                    ]
                    ctext = self._ask(row, self.code_teacher, cmsgs)
                    row.stage = "parse"
                    turn = st.parse_code_turn(ctext, require_comment=True, require_reasoning=False)
                    self._leak(row, reasoning)
                    res, imgs = self._run_code(row, sess, turn.code, "text", 1)
                    self._goal(row, st.check_value, res.stdout)
                    pieces.append(reasoning + "\n" + _code_block(turn.code) + self._feedback_record(res, imgs))
                    msgs += [{"role": "assistant", "content": reasoning}]
                    goal_text = "print the computed value"
                else:
                    rounds = 2 if name == "multi_round" else 1
                    for k in range(1, rounds + 1):
                        text = self._ask(row, self.teacher, msgs)
                        row.stage = "parse"
                        turn = st.parse_code_turn(text)
                        self._leak(row, turn.reasoning, boxes=boxes, angle=angle)
                        res, imgs = self._run_code(row, sess, turn.code, "image", k)
                        out = imgs[-1]
                        if name == "crop" or name == "multi_round":
                            target = s.bbox if (name == "crop" or k == rounds) else row.transform["round1_box"]
                            self._goal(row, st.check_crop, inp, out, target, coverage=self.cfg.crop_coverage)
                            goal_text = "crop and enlarge the region that answers the question"
                        elif name == "rotate":
                            self._goal(row, st.check_rotation, s.image, out, min_corr=self.cfg.rotation_min_corr)
                            goal_text = "rotate the image back upright"
                        else:
                            self._goal(row, st.check_contrast, inp, out, gain=self.cfg.contrast_gain)
                            goal_text = "raise the contrast so the content is easier to read"
                        pieces.append(turn.reasoning + "\n" + _code_block(turn.code) + self._feedback_record(res, imgs))
                        key = "feedback_next" if k < rounds else "feedback"
                        msgs += [
                            {"role": "assistant", "content": text},
                            user_turn(sc.fill(P.get(key, P["feedback"]), **dict(fields, output=self._feedback_teacher(res, imgs))), imgs),
                        ]
                if name == "compute":
                    msgs.append(user_turn(sc.fill(P["feedback"], **dict(fields, output=self._feedback_teacher(res, imgs)))))
                text = self._ask(row, self.teacher, msgs)
                row.stage = "parse"
                final, answer = st.parse_answer_turn(text)
                self._leak(row, final, boxes=boxes, angle=angle)
                pieces.append(final)
        response = (
            "<think>"
            + "\n".join(p.strip("\n") if i == 0 else p for i, p in enumerate(pieces)).rstrip()
            + "</think>\n<answer>"
            + answer
            + "</answer>"
        )
        row.stage = "answer"
        rej = st.check_answer(answer, s.answer, options=s.options, numeric=(name == "compute"))
        if rej:
            raise st.Rejected(rej.stage, rej.reason, rej.detail)
        self._consistency(row, goal_text, response, answer, [inp] + row.outputs if inp else row.outputs)
        return self._record(row, inp, shown, size, response, answer)

    def _consistency(self, row: _Row, goal: str, response: str, answer: str, images: list[str]) -> None:
        row.stage = "consistency"
        if not self.cfg.verify_consistency:
            return
        V = self.prompts["verifier"]
        f = dict(question=row.seed.question, scenario=row.seed.scenario, goal=goal, response=response, answer=answer)
        msgs = [{"role": "system", "content": sc.fill(V["system"], **f)}, user_turn(sc.fill(V["user"], **f), images)]
        last = ""
        for _ in range(max(0, self.cfg.judge_retries) + 1):
            t0 = time.perf_counter()
            try:
                r = self.verifier.chat(msgs)
                row.tokens["prompt"] += r.prompt_tokens
                row.tokens["completion"] += r.completion_tokens
                verdict, reason = st.verifier_verdict(r.text)
            except (TeacherError, ValueError) as e:
                last = str(e)[:300]
                continue
            finally:
                row.timed("consistency", t0)
            if verdict == "accept":
                return
            raise st.Rejected("consistency", "verifier_rejected", reason or "the verifier rejected the example")
        raise st.Rejected("consistency", "judge_failed", f"no usable verdict after {self.cfg.judge_retries + 1} call(s): {last}")

    def _record(self, row: _Row, inp: str | None, shown: str | None, size: Any, response: str, answer: str) -> dict[str, Any]:
        s = row.seed
        if inp:
            question = protocol.user_prompt_text(s.question, shown, size)
        else:
            question = protocol.user_prompt_text(s.question, "N/A", None).replace(protocol.UNKNOWN_SIZE, "N/A")
            question = question[len(protocol.IMAGE_PLACEHOLDER) :].lstrip("\n")
        images = ([inp] if inp else []) + row.outputs
        rid = s.raw.get("id")
        return {
            "id": f"synth-{s.scenario}-{s.line}" + (f"-{rid}" if rid is not None else ""),  # unique per row, whatever the seed ids
            "image": [relative_to_root(p, self.out_root) for p in images],
            "question": question,
            "response": response,
            "model_answer": answer,
            "answer_gt": s.answer,
            "key": s.key,
            "synthesis": {
                "scenario": s.scenario,
                "seed_line": s.line,
                "transform": row.transform,
                "teacher_tokens": row.tokens,
                "stage_s": row.stage_s,
                "teacher": self.teacher.describe(),
            },
        }


def _code_block(code: str) -> str:
    return f"{protocol.CODE_START}\n```python\n{code.strip(chr(10))}\n```\n{protocol.CODE_END}"


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._")[:100] or "row"


# --------------------------------------------------------------------------- run


class _SplitWriter(ResumableJsonl):
    """The scheduler's one writer: kept records to ``OUT``, rejected lines to ``OUT.rejected.jsonl``."""

    def __init__(self, kept: Path, rejected: Path):
        super().__init__(kept, key=lambda d: d.get("key"), fsync=True)
        self.rejected = ResumableJsonl(rejected, key=lambda d: d.get("key"), fsync=True)
        self.done |= self.rejected.done

    def write(self, obj: dict[str, Any]) -> None:
        if "rejection" in obj:
            self.rejected.write(obj)
            self.done.add(str(obj.get("key")))
        else:
            super().write(obj)

    def close(self) -> None:
        super().close()
        self.rejected.close()


def rejected_path_of(out: str | os.PathLike) -> Path:
    """``OUT.rejected.jsonl`` beside ``OUT`` (``x.jsonl`` -> ``x.rejected.jsonl``)."""
    p = Path(out)
    return p.with_name((p.name[:-6] if p.name.endswith(".jsonl") else p.name) + ".rejected.jsonl")


def _drop_teacher_failures(kept: Path, rejected: Path) -> int:
    """Remove the ``teacher``-stage rejections (and lines of keys already kept) from the rejected
    file so a rerun tries those rows again; returns how many were dropped."""
    if not rejected.is_file():
        return 0
    import json

    kept_keys = {str(o.get("key")) for _, o in iter_jsonl(kept) if isinstance(o, dict)} if kept.is_file() else set()
    keep, dropped = [], 0
    for _, o in iter_jsonl(rejected):
        if not isinstance(o, dict):
            continue
        if (o.get("rejection") or {}).get("stage") == "teacher" or str(o.get("key")) in kept_keys:
            dropped += 1
            continue
        keep.append(o)
    if dropped:
        tmp = rejected.with_name(rejected.name + ".tmp")
        tmp.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in keep), encoding="utf-8")
        os.replace(tmp, rejected)
    return dropped


def funnel_of(kept: Path, rejected: Path) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, int]]:
    """``(funnel, reasons, tokens)`` over both files: per scenario (and ``all``) ``rows_in`` then the
    rows still in after each stage of :data:`.stages.STAGES` (the last is the kept count), with
    ``prompt_tokens`` / ``completion_tokens`` of the teacher and ``row_s`` (seconds spent in stages);
    reasons as ``stage/reason`` counts; teacher tokens ``prompt`` / ``completion``."""
    funnel: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    tokens = {"prompt": 0, "completion": 0}

    def add(o: dict[str, Any], stage: str | None) -> None:
        syn = o.get("synthesis") or {}
        name = str(syn.get("scenario") or o.get("scenario") or "?")
        t = syn.get("teacher_tokens") or {}
        secs = sum(float(v) for v in (syn.get("stage_s") or {}).values() if isinstance(v, (int, float)))
        for k in (name, "all"):
            f = funnel.setdefault(k, {"rows_in": 0, **{s: 0 for s in st.STAGES}, "prompt_tokens": 0, "completion_tokens": 0, "row_s": 0.0})
            f["rows_in"] += 1
            cut = st.STAGES.index(stage) if stage in st.STAGES else len(st.STAGES)
            for s in st.STAGES[:cut]:
                f[s] += 1
            f["prompt_tokens"] += int(t.get("prompt", 0) or 0)
            f["completion_tokens"] += int(t.get("completion", 0) or 0)
            f["row_s"] = round(f["row_s"] + secs, 3)
        for k in tokens:
            tokens[k] += int(t.get(k, 0) or 0)

    for path, is_kept in ((kept, True), (rejected, False)):
        if not path.is_file():
            continue
        for _, o in iter_jsonl(path):
            if not isinstance(o, dict):
                continue
            if is_kept:
                add(o, None)
            else:
                r = o.get("rejection") or {}
                add(o, r.get("stage"))
                k = f"{r.get('stage')}/{r.get('reason')}"
                reasons[k] = reasons.get(k, 0) + 1
    return funnel, reasons, tokens


def synthesize(
    seeds: str | os.PathLike,
    out: str | os.PathLike,
    *,
    teacher: TeacherClient,
    sandbox: Any = None,
    config: SynthConfig | None = None,
    images_root: str | os.PathLike | None = None,
    code_teacher: TeacherClient | None = None,
    verifier: TeacherClient | None = None,
    progress: Any = None,
    sandbox_config: Any = None,
) -> SynthSummary:
    """Run the pipeline (module docstring) over ``seeds``, writing ``out`` and ``OUT.rejected.jsonl``.

    Args:
        sandbox: a :class:`thyme.sandbox.Sandbox` running every row's code in this process
            (used when ``config.workers`` is ``None`` or 1 and ``config.ray`` is ``None``).
        sandbox_config: what each worker builds its sandbox from with ``config.workers`` > 1
            or ``config.ray`` (:mod:`.workers`; default: ``sandbox``'s config, else the defaults).
            The records written are the same, line for line, as with one process.
        progress: a :class:`thyme.agent.scheduler.Progress` factory ``(total, initial) -> Progress``, or ``None``.

    Raises:
        ThymeError: seeds unreadable, unknown scenario, bad prompts, outputs not writable, Ray
            missing (``config.ray``), the sandbox workers could not start or failed.
    """
    from ...agent.scheduler import schedule

    cfg = config or SynthConfig()
    n_workers = 1 if cfg.workers is None and sandbox is not None else resolve_workers(cfg.workers)
    pool: Any = None
    if n_workers > 1 or cfg.ray is not None:
        from .workers import WorkerSandbox

        if cfg.ray is not None:
            import_ray()  # a clear error naming the extra, before anything is opened
        if sandbox_config is None:
            from ...sandbox.config import SandboxConfig

            sandbox_config = sandbox.config if sandbox is not None else SandboxConfig()
        pool = sandbox = WorkerSandbox(sandbox_config, workers=n_workers, ray=cfg.ray)
    elif sandbox is None:
        raise ThymeError("synthesize needs a sandbox in this process, or workers (config.workers > 1 or config.ray)")
    t0 = time.monotonic()
    out = Path(out)
    rej = rejected_path_of(out)
    ensure_writable(out, what="--out")
    ensure_writable(rej, what="the rejected file")
    images_dir = out.parent / f"{out.name[:-6] if out.name.endswith('.jsonl') else out.name}_images"
    rows = load_seeds(
        seeds, scenario=cfg.scenario, images_root=images_root, allow_absolute=cfg.allow_absolute_paths, embedded_dir=images_dir / "_seeds"
    )
    synth = Synthesizer(
        cfg,
        teacher=teacher,
        sandbox=sandbox,
        images_dir=images_dir.resolve(),
        out_root=out.resolve().parent,
        code_teacher=code_teacher,
        verifier=verifier,
    )
    summary = SynthSummary(kept_path=str(out), rejected_path=str(rej))
    summary.retried_teacher = _drop_teacher_failures(out, rej)
    writer = _SplitWriter(out, rej)
    done = set(writer.done)
    summary.resumed = sum(1 for r in rows if r.key in done)

    def on_record(task: SeedRow, line: dict[str, Any]) -> None:
        summary.rows += 1
        if "rejection" in line:
            summary.rejected += 1
        else:
            summary.kept += 1

    prog = progress(len(rows), summary.resumed) if progress else None
    try:
        if pool is not None:
            pool.start()
        schedule(
            rows,
            lambda batch: [synth.run_row(r) for r in batch],
            out=writer,
            key=lambda r: r.key,
            record=lambda t, line: line,
            workers=max(1, int(cfg.concurrency)),
            batch_size=1,
            done=done,
            failure=lambda d: (
                (d.get("rejection") or {}).get("detail") if (d.get("rejection") or {}).get("stage") in ("teacher", "input") else None
            ),
            on_record=on_record,
            progress=prog,
            label="row",
            on_error=lambda batch, e: [
                synth._rejected(_Row(r, images_dir, out.parent), st.Rejection("input", "internal_error", str(e))) for r in batch
            ],
        )
    except BaseException:
        if pool is not None:
            pool.close(abort=True)
        raise
    finally:
        writer.close()
    if pool is not None:
        pool.close()
        if pool.error is not None:
            raise pool.error
    summary.funnel, summary.reasons, summary.teacher_tokens = funnel_of(out, rej)
    summary.wall_s = round(time.monotonic() - t0, 3)
    return summary


def format_funnel(s: SynthSummary) -> str:
    """The funnel as a table: a row per scenario, a column per stage."""
    cols = ["rows_in", *st.STAGES, "prompt_tokens", "completion_tokens", "row_s"]
    short = {"prompt_tokens": "prompt_tok", "completion_tokens": "compl_tok"}
    head = f"{'scenario':<12}" + "".join(f"{short.get(c, c):>12}" for c in cols)
    lines = [head]
    for name in sorted(s.funnel, key=lambda n: (n == "all", n)):
        f = s.funnel[name]
        lines.append(f"{name:<12}" + "".join(f"{f.get(c, 0):>12}" for c in cols))
    lines.append(f"kept (this run): {s.kept}, rejected: {s.rejected}, resumed: {s.resumed}, teacher rows retried: {s.retried_teacher}")
    for k, v in sorted(s.reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected {k}: {v}")
    lines.append(
        f"teacher tokens: {s.teacher_tokens.get('prompt', 0)} prompt, {s.teacher_tokens.get('completion', 0)} completion; "
        f"wall {s.wall_s:.1f} s"
    )
    lines.append(f"kept records: {s.kept_path}")
    lines.append(f"rejected rows: {s.rejected_path}")
    return "\n".join(lines)
