"""The trajectory report: one self-contained HTML file for one trajectory or a whole run.

For every trajectory: the question, the input image with the regions the code cropped drawn on
it, each round's reasoning, its code (highlighted, repaired lines marked) with the sandbox's
repairs, the printed output or error and the output images, then the answer, the ground truth
and whether it is correct. Above them an index (one row per trajectory) with filters on
correctness, tool use and category, and a text search, applied in the page by a little inline
script. Images are embedded as data URLs, sized down with PIL (``max_image_side``), so the file
can be mailed or archived alone.

Model text is untrusted: everything is HTML-escaped (jinja2 autoescape; pygments escapes the
code it highlights), and the page carries a Content-Security-Policy that allows no script but
its own (by hash), images only from data URLs, and no network access at all, so a slip in the
escaping still could not run injected script.

Inputs (:func:`load_items`): a trajectory JSON written by :meth:`thyme.agent.Trajectory.save`;
a JSONL of rows holding a ``trajectory`` (``thyme replay --out`` results, eval
``predictions.jsonl``); or a folder holding ``predictions.jsonl`` (an eval output folder).
Row fields read when present (all optional): ``correct`` (bool; also ``hit``, or a numeric
``score`` > 0.5), ``category`` (else ``benchmark``), ``benchmark``, ``question_id``, ``id``,
``answer_gt`` / ``gt_answer`` / ``ground_truth`` (the reference answer; in a row that has a
``prediction``, also ``answer``, the benchmark annotations' name), ``prediction`` (the answer
as scored; else the trajectory's ``answer``), ``question``, ``error``,
``answer_match`` / ``recorded_answer`` (replays: shown as "matches the record", not as
correctness). Without an explicit ``correct`` but with a reference answer, correctness is
decided by a conservative rule: equal after trimming and case folding, or the same option
letter (the reference is one letter A-Z and the answer is that letter alone or followed by
``.``, ``)``, ``:`` or a space, or written ``(X)``). Benchmark scoring proper lives in
:mod:`thyme.evaluate`; pass its verdict as ``correct``.

Crop regions (:func:`crop_regions`): read from the code with a best-effort evaluation of its
literal arithmetic (``x1, y1, x2, y2 = 1250, 1030, 1360, 1070``; ``w, h = img.size``;
``img.crop((x1, y1, x2, y2))``; ``image[y1:y2, x1:x2]``) on images opened from the input
(``Image.open`` / ``cv2.imread`` / ``np.array`` of those; paths under the Thyme output folder
are outputs, not the input), then corrected with the sandbox's own records: a ``crop_clamped``
/ ``crop_min_side`` :class:`~thyme.sandbox.Fix` says ``crop box (l, t, r, b) -> (l', t', r', b')
on a WxH image`` (or ``crop [y0:y1, x0:x1] -> [...]`` for array slices); on an image of the
input's size the repaired box is what was really cropped. The report draws the region really
cropped (solid) and, when a repair changed it, the box the code asked for (dashed).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import html
import io
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .errors import ThymeError

#: Default longest side (pixels) of embedded images.
MAX_IMAGE_SIDE = 1024
OUTPUT_DIR_MARKER = "temp_processed_images"


class ReportError(ThymeError):
    """The report's input cannot be read."""


# --------------------------------------------------------------------------- items


@dataclass
class ReportItem:
    """One trajectory as the report shows it.

    Attributes:
        trajectory: the :class:`thyme.agent.Trajectory` (``None``: only the row's fields are shown).
        id: identifier shown in the index.
        question: the question (default the trajectory's).
        correct: ``True`` / ``False``, or ``None`` when unknown.
        category: filter category (benchmark category, else benchmark name).
        benchmark: benchmark name.
        ground_truth: the reference answer.
        prediction: the answer as scored (default the trajectory's answer).
        error: why the sample failed, if it did.
        extra: more ``label -> value`` facts shown under the answer (strings).
    """

    trajectory: Any = None
    id: str = ""
    question: str = ""
    correct: bool | None = None
    category: str | None = None
    benchmark: str | None = None
    ground_truth: str | None = None
    prediction: str | None = None
    error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


_GT_KEYS = ("answer_gt", "gt_answer", "ground_truth", "gt")


def to_item(obj: Any, *, base_dir: str | os.PathLike | None = None, index: int = 0) -> ReportItem:
    """Normalise a :class:`ReportItem`, a :class:`~thyme.agent.Trajectory`, a trajectory dict or
    a row dict (see the module docstring) into a :class:`ReportItem`.

    Relative image paths in a trajectory are resolved against ``base_dir``.

    Raises:
        ReportError: ``obj`` is none of these.
    """
    from .agent import Trajectory

    if isinstance(obj, ReportItem):
        item = obj
    elif isinstance(obj, Trajectory):
        item = ReportItem(trajectory=obj)
    elif isinstance(obj, dict):
        item = _item_from_row(obj, base_dir)
    else:
        raise ReportError(f"cannot show a {type(obj).__name__} in a report", "pass Trajectory objects, trajectory dicts or result rows")
    t = item.trajectory
    if t is not None:
        item.id = item.id or str(t.id)
        item.question = item.question or t.question
        if item.prediction is None:
            item.prediction = t.answer
        if item.error is None and t.error:
            item.error = t.error
        meta = t.meta or {}
        if not item.benchmark and meta.get("benchmark") is not None:
            item.benchmark = _str(meta["benchmark"])
        if not item.category and meta.get("category") is not None:
            item.category = _str(meta["category"])
        if item.ground_truth is None:
            for k in _GT_KEYS:
                if meta.get(k) is not None:
                    item.ground_truth = _str(meta[k])
                    break
    item.id = item.id or f"item-{index + 1}"
    item.category = item.category or item.benchmark
    if item.correct is None and item.ground_truth is not None and item.prediction is not None:
        item.correct = answers_agree(item.prediction, item.ground_truth)
    return item


def _item_from_row(row: dict[str, Any], base_dir: str | os.PathLike | None) -> ReportItem:
    from .agent import Trajectory

    traj_d = row.get("trajectory") if isinstance(row.get("trajectory"), dict) else (row if "turns" in row else None)
    traj = None
    if traj_d is not None:
        try:
            traj = Trajectory.from_dict(traj_d)
        except TypeError as e:
            raise ReportError(f"malformed trajectory in row {row.get('id', row.get('question_id'))!r}: {e}") from None
        _absolute_paths(traj, base_dir)
    correct = row.get("correct", row.get("hit"))
    if correct is None and isinstance(row.get("score"), (int, float)) and not isinstance(row.get("score"), bool):
        correct = row["score"] > 0.5
    gt = next((row[k] for k in _GT_KEYS if row.get(k) is not None), None)
    if gt is None and "prediction" in row and row.get("answer") is not None:
        gt = row["answer"]  # benchmark rows: `answer` is the reference when `prediction` is the model's
    extra: dict[str, str] = {}
    if "answer_match" in row:
        extra["matches the record"] = "yes" if row.get("answer_match") else "no"
    if row.get("recorded_answer") is not None:
        extra["recorded answer"] = _str(row["recorded_answer"])
    if row.get("extracted") is not None:
        extra["extracted"] = _str(row["extracted"])
    for k in ("question_id", "stop_reason"):
        if row.get(k) is not None and traj_d is not row:
            extra[k.replace("_", " ")] = _str(row[k])
    rid = row.get("id") if traj_d is not row else None
    if rid is None and row.get("question_id") is not None:
        rid = f"{row.get('benchmark') + '/' if row.get('benchmark') else ''}{row['question_id']}"
    return ReportItem(
        trajectory=traj,
        id=_str(rid) if rid is not None else "",
        question=_str(row.get("question")) if traj is None and row.get("question") is not None else "",
        correct=None if correct is None else bool(correct),
        category=_str(row.get("category")) if row.get("category") is not None else None,
        benchmark=_str(row.get("benchmark")) if row.get("benchmark") is not None else None,
        ground_truth=_str(gt) if gt is not None else None,
        prediction=_str(row.get("prediction")) if row.get("prediction") is not None else None,
        error=_str(row.get("error")) if row.get("error") else None,
        extra=extra,
    )


def _absolute_paths(traj: Any, base_dir: str | os.PathLike | None) -> None:
    if base_dir is None:
        return
    base = Path(base_dir)

    def fix(p: str) -> str:
        # Trajectory.save writes paths relative to the JSON file; replay rows hold paths as the
        # run saw them (relative to its working folder when --out was relative): try both.
        if not isinstance(p, str) or os.path.isabs(p):
            return p
        beside = (base / p).resolve()
        return str(beside) if beside.exists() or not Path(p).exists() else str(Path(p).resolve())

    traj.images = [fix(p) for p in traj.images]
    for t in traj.turns:
        for part in t.feedback:
            if part.get("type") == "image":
                part["image"] = fix(part["image"])
        if t.execution:
            t.execution["images"] = [fix(p) for p in t.execution.get("images", [])]


def answers_agree(prediction: str, reference: str) -> bool:
    """The conservative agreement rule of the module docstring (used only without ``correct``)."""
    p, r = _bare(prediction), _bare(reference)
    if p.casefold() == r.casefold():
        return True
    if len(r) == 1 and r.isalpha():
        m = re.match(r"^\(?([A-Za-z])(?:[.):]|\s|$)", p)
        return bool(m) and m.group(1).upper() == r.upper()
    return False


def _bare(v: Any) -> str:
    """Trimmed, without math delimiters (``$...$``, ``$$...$$``, ``\\(...\\)``) or a final period."""
    s = str(v).strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
            s = s[len(a): len(s) - len(b)].strip()
            break
    return s[:-1].rstrip() if s.endswith(".") and len(s) > 1 else s


def _str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


def load_items(path: str | os.PathLike, *, records: str | os.PathLike | None = None) -> list[ReportItem]:
    """Read report items from a trajectory JSON, a JSONL of rows, or an eval output folder.

    Args:
        path: see the module docstring.
        records: optional Thyme records JSONL (the file a replay ran on): their ``answer_gt``,
            ``category`` and ``benchmark`` fields are joined to rows by ``id``.

    Raises:
        ReportError: naming the file and the problem (missing, not JSON, a bad line).
    """
    p = Path(path)
    if p.is_dir():
        cand = p / "predictions.jsonl"
        if not cand.is_file():
            jsons = sorted(p.glob("*.json"))
            if not jsons:
                raise ReportError(f"{p} holds no predictions.jsonl and no trajectory JSON files", "pass an eval output folder, a results JSONL or a trajectory JSON")
            return [to_item(_read_json(j), base_dir=j.parent, index=i) for i, j in enumerate(jsons)]
        p = cand
    if not p.is_file():
        raise ReportError(f"report input not found: {p}", "pass a trajectory JSON, a results / predictions JSONL, or an eval output folder")
    joined = _records_by_id(records) if records is not None else {}
    items: list[ReportItem] = []
    if p.suffix == ".json":
        items.append(to_item(_read_json(p), base_dir=p.parent))
    else:
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ReportError(f"{p}, line {n}: invalid JSON ({e.msg})", "an interrupted run may have cut the last line: delete it") from None
                if not isinstance(row, dict):
                    raise ReportError(f"{p}, line {n}: expected a JSON object")
                rec = joined.get(str(row.get("id")))
                if rec:
                    row = {**{k: rec[k] for k in ("answer_gt", "category", "benchmark") if k in rec}, **row}
                items.append(to_item(row, base_dir=p.parent, index=len(items)))
    return items


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {p}: {e}") from None


def _records_by_id(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ReportError(f"cannot read records {path}: {e}") from None
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("id") is not None:
            out[str(r["id"])] = r
    return out


# --------------------------------------------------------------------------- crop regions


@dataclass
class CropRegion:
    """A region of the input image the code cropped.

    Attributes:
        box: ``(left, top, right, bottom)`` in input pixels, as really cropped.
        requested: the box the code asked for when a repair changed it, else ``None``.
        line: the code line, when known.
        source: ``"code"`` (read from the code) or ``"repair"`` (only the sandbox's record).
    """

    box: tuple[int, int, int, int]
    requested: tuple[int, int, int, int] | None = None
    line: int | None = None
    source: str = "code"


class _Img:
    """An image derived from the input (as PIL image or array) during the evaluation."""

    def __init__(self, size: tuple[int, int]):
        self.size = size


_INPUT = object()  # the value of ``image_path`` / an input path
_OPENERS = {"open", "imread"}
_SAME_IMAGE_METHODS = {"convert", "copy", "load"}
_ARRAY_FUNCS = {"array", "asarray", "cvtColor", "ascontiguousarray", "exif_transpose"}
_NUM_FUNCS = {"int": int, "round": round, "float": float, "abs": abs, "max": max, "min": min}


#: Bounds of the best-effort crop arithmetic (class 8 of issue 10: ``thyme report`` evaluated
#: model code's arithmetic without bound, e.g. ``x = x * x`` repeated, and hung): numbers beyond
#: +-MAX_MAGNITUDE evaluate to unknown, at most MAX_STEPS expression nodes are evaluated per code
#: block, and code longer than MAX_CODE_CHARS is not read.
MAX_MAGNITUDE = 2**53
MAX_STEPS = 200_000
MAX_CODE_CHARS = 200_000


class _Budget(Exception):
    """The evaluation budget (MAX_STEPS) is spent."""


class _CropFinder:
    def __init__(self, size: tuple[int, int]):
        self.steps = 0
        self.size = size
        self.env: dict[str, Any] = {"image_path": _INPUT}
        self.regions: list[tuple[tuple[float, float, float, float], int | None]] = []

    # ---- expressions
    def ev(self, node: ast.AST) -> Any:
        try:
            return self._ev(node)
        except _Budget:
            raise
        except Exception:  # includes RecursionError on deep expressions
            return None

    def _ev(self, n: ast.AST) -> Any:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _Budget()
        v = self._ev1(n)
        if _num(v) and not (abs(v) <= MAX_MAGNITUDE):  # also NaN
            return None
        if isinstance(v, str) and len(v) > 4096:
            return None
        return v

    def _ev1(self, n: ast.AST) -> Any:
        if isinstance(n, ast.Constant):
            return n.value if isinstance(n.value, (int, float, str)) and not isinstance(n.value, bool) else None
        if isinstance(n, ast.Name):
            return self.env.get(n.id)
        if isinstance(n, (ast.Tuple, ast.List)):
            vals = tuple(self._ev(e) for e in n.elts)
            return None if any(v is None for v in vals) else vals
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = self._ev(n.operand)
            return (-v if isinstance(n.op, ast.USub) else v) if _num(v) else None
        if isinstance(n, ast.BinOp):
            a, b = self._ev(n.left), self._ev(n.right)
            if not (_num(a) and _num(b)):
                return None
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b,
                   ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}
            f = ops.get(type(n.op))
            return f() if f else None
        if isinstance(n, ast.Attribute):
            v = self._ev(n.value)
            if isinstance(v, _Img):
                w, h = v.size
                return {"size": (w, h), "width": w, "height": h, "shape": (h, w, 3)}.get(n.attr)
            return None
        if isinstance(n, ast.Subscript):
            v = self._ev(n.value)
            if isinstance(v, tuple):
                if isinstance(n.slice, ast.Slice):
                    lo = self._ev(n.slice.lower) if n.slice.lower else None
                    hi = self._ev(n.slice.upper) if n.slice.upper else None
                    return v[slice(lo, hi)]
                i = self._ev(n.slice)
                return v[i] if isinstance(i, int) else None
            return None
        if isinstance(n, ast.Call):
            return self._call(n)
        return None

    def _call(self, n: ast.Call) -> Any:
        f = n.func
        args = [self._ev(a) for a in n.args]
        if isinstance(f, ast.Name) and f.id in _NUM_FUNCS:
            if args and all(_num(a) for a in args):
                return _NUM_FUNCS[f.id](*args)
            return None
        if isinstance(f, ast.Attribute):
            owner = self._ev(f.value)
            if f.attr in _OPENERS and n.args:
                return _Img(self.size) if _is_input_path(args[0]) else None
            if f.attr in _SAME_IMAGE_METHODS and isinstance(owner, _Img):
                return owner
            if f.attr in _ARRAY_FUNCS and args and isinstance(args[0], _Img):
                return args[0]
        return None

    # ---- statements
    def run(self, body: list[ast.stmt]) -> None:
        for st in body:
            self.stmt(st)

    def stmt(self, st: ast.stmt) -> None:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return
        self.scan(st)
        if isinstance(st, ast.Assign):
            v = self.ev(st.value)
            for t in st.targets:
                self.bind(t, v)
        elif isinstance(st, ast.AnnAssign) and st.value is not None:
            self.bind(st.target, self.ev(st.value))
        elif isinstance(st, ast.AugAssign) and isinstance(st.target, ast.Name):
            self.env[st.target.id] = self.ev(ast.BinOp(left=ast.Name(st.target.id, ast.Load()), op=st.op, right=st.value))
        elif isinstance(st, (ast.For, ast.AsyncFor)):
            self.bind(st.target, None)
            self.run(st.body)
            self.run(st.orelse)
        elif isinstance(st, (ast.If, ast.While)):
            self.run(st.body)
            self.run(st.orelse)
        elif isinstance(st, (ast.With, ast.AsyncWith)):
            for it in st.items:
                if it.optional_vars is not None:
                    self.bind(it.optional_vars, self.ev(it.context_expr))
            self.run(st.body)
        elif isinstance(st, ast.Try):
            self.run(st.body)
            for h in st.handlers:
                self.run(h.body)
            self.run(st.orelse)
            self.run(st.finalbody)

    def bind(self, target: ast.AST, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            vals = value if isinstance(value, tuple) and len(value) == len(target.elts) else (None,) * len(target.elts)
            for t, v in zip(target.elts, vals):
                self.bind(t, v)

    def scan(self, st: ast.stmt) -> None:
        """Record crops in ``st`` (not descending into nested blocks, which :meth:`stmt` visits)."""
        for node in _walk_shallow(st):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "crop":
                if not isinstance(self.ev(node.func.value), _Img):
                    continue
                arg = node.args[0] if len(node.args) == 1 else next((k.value for k in node.keywords if k.arg == "box"), None)
                box = self.ev(arg) if arg is not None else None
                if isinstance(box, tuple) and len(box) == 4 and all(_num(v) for v in box):
                    self.regions.append((box, getattr(node, "lineno", None)))
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and isinstance(node.slice, ast.Tuple):
                elts = node.slice.elts
                if len(elts) < 2 or not all(isinstance(e, ast.Slice) for e in elts[:2]):
                    continue
                if not isinstance(self.ev(node.value), _Img):
                    continue
                rows, cols = elts[0], elts[1]
                vals = [self.ev(x) if x is not None else None for x in (cols.lower, rows.lower, cols.upper, rows.upper)]
                if all(_num(v) for v in vals):
                    self.regions.append((tuple(vals), getattr(node, "lineno", None)))


def _walk_shallow(st: ast.stmt):
    """Nodes of one statement, without the bodies of nested compound statements."""
    todo: list[ast.AST] = [st]
    while todo:
        n = todo.pop()
        yield n
        for name, value in ast.iter_fields(n):
            if name in ("body", "orelse", "finalbody", "handlers") and n is st:
                continue
            if isinstance(value, ast.AST):
                todo.append(value)
            elif isinstance(value, list):
                todo.extend(v for v in value if isinstance(v, ast.AST))


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_input_path(v: Any) -> bool:
    if v is _INPUT:
        return True
    if isinstance(v, str):
        return OUTPUT_DIR_MARKER not in v
    return False


def _clip_box(box: Iterable[float], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    l, t, r, b = (int(round(float(v))) for v in box)
    if l > r:
        l, r = r, l
    if t > b:
        t, b = b, t
    w, h = size
    l, r = max(0, min(l, w)), max(0, min(r, w))
    t, b = max(0, min(t, h)), max(0, min(b, h))
    if r - l < 1 or b - t < 1:
        return None
    return (l, t, r, b)


_FIX_BOX_RE = re.compile(r"crop box \(([^)]*)\) -> \(([^)]*)\) on a (\d+)x(\d+) image")
_FIX_SLICE_RE = re.compile(r"crop \[(-?\d+):(-?\d+), (-?\d+):(-?\d+)\] -> \[(\d+):(\d+), (\d+):(\d+)\] on a (\d+)x(\d+) image")


def parse_crop_fix(detail: str) -> tuple[tuple[float, ...], tuple[int, int, int, int], tuple[int, int]] | None:
    """``(requested box, repaired box, (W, H))`` from a ``crop_clamped`` / ``crop_min_side``
    fix detail (boxes as ``(left, top, right, bottom)``), or ``None``."""
    m = _FIX_BOX_RE.search(detail or "")
    if m:
        try:
            req = tuple(float(x) for x in m.group(1).split(","))
            new = tuple(int(float(x)) for x in m.group(2).split(","))
        except ValueError:
            return None
        if len(req) != 4 or len(new) != 4:
            return None
        return req, new, (int(m.group(3)), int(m.group(4)))  # type: ignore[return-value]
    m = _FIX_SLICE_RE.search(detail or "")
    if m:
        y0, y1, x0, x1, ny0, ny1, nx0, nx1, w, h = (int(g) for g in m.groups())
        return (float(x0), float(y0), float(x1), float(y1)), (nx0, ny0, nx1, ny1), (w, h)
    return None


def crop_regions(code: str | None, image_size: tuple[int, int] | None, fixes: Iterable[dict[str, Any]] = ()) -> list[CropRegion]:
    """Regions of the input image (``image_size`` = (W, H)) that ``code`` cropped (module docstring).

    Best effort: code that computes boxes from data (loops, detections) yields what can be
    read; it never raises.
    """
    if image_size is None:
        return []
    found: list[CropRegion] = []
    if code and len(code) <= MAX_CODE_CHARS:
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            try:
                import textwrap

                tree = ast.parse(textwrap.dedent(code))
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                tree = None
        if tree is not None:
            finder = _CropFinder(tuple(image_size))  # type: ignore[arg-type]
            try:
                finder.run(tree.body)
            except (RecursionError, _Budget):  # what was found until then stays
                pass
            for box, line in finder.regions:
                clipped = _clip_box(box, image_size)
                if clipped is not None:
                    found.append(CropRegion(clipped, None, line, "code"))
    for fx in fixes or ():
        if not isinstance(fx, dict) or fx.get("name") not in ("crop_clamped", "crop_min_side"):
            continue
        parsed = parse_crop_fix(str(fx.get("detail", "")))
        if parsed is None or tuple(parsed[2]) != tuple(image_size):
            continue
        req, new, _ = parsed
        req_i = tuple(int(round(v)) for v in req)
        req_clip = _clip_box(req, image_size)
        match = next((r for r in found if r.requested is None and (r.box == req_clip or r.box == req_i)), None)
        if match is not None:
            match.requested = req_i if req_i != tuple(new) else None
            match.box = tuple(new)  # type: ignore[assignment]
        elif not any(r.box == tuple(new) for r in found):
            found.append(CropRegion(tuple(new), req_i if req_i != tuple(new) else None, fx.get("line"), "repair"))  # type: ignore[arg-type]
    out: list[CropRegion] = []
    for r in found:
        if not any(o.box == r.box and o.requested == r.requested for o in out):
            out.append(r)
    return out


# --------------------------------------------------------------------------- images


@dataclass
class Embedded:
    """An image ready for the page: ``url`` (data URL or ``None`` when unreadable), sizes."""

    url: str | None
    size: tuple[int, int] | None
    shown: tuple[int, int] | None
    path: str
    problem: str | None = None


class _Embedder:
    def __init__(self, max_side: int, quality: int = 85):
        self.max_side = max_side
        self.quality = quality
        self.cache: dict[str, Embedded] = {}

    def __call__(self, path: str) -> Embedded:
        hit = self.cache.get(path)
        if hit is None:
            hit = self.cache[path] = self._embed(path)
        return hit

    def _embed(self, path: str) -> Embedded:
        from PIL import Image

        from .imageio import open_image

        try:
            im = open_image(path)
        except ThymeError as e:
            return Embedded(None, None, None, path, e.message)
        size = im.size
        try:
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if has_alpha else "RGB")
            if max(size) > self.max_side:
                im.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if has_alpha:
                im.save(buf, format="PNG", optimize=True)
                mime = "image/png"
            else:
                im.save(buf, format="JPEG", quality=self.quality)
                mime = "image/jpeg"
        except Exception as e:  # a truncated file, an exotic mode
            return Embedded(None, size, None, path, f"{type(e).__name__}: {e}")
        url = f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return Embedded(url, size, im.size, path)


# --------------------------------------------------------------------------- code highlighting


def highlight_code(code: str, marked_lines: Iterable[int] = ()) -> str:
    """HTML of ``code`` with line numbers and the ``marked_lines`` (1-based) highlighted.

    pygments (``PythonLexer``, ``HtmlFormatter`` with CSS classes) when installed, else plain
    escaped text with line numbers. The result is safe HTML: every character of ``code`` is
    escaped.
    """
    marked = sorted({int(n) for n in marked_lines if isinstance(n, int) and n > 0})
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        fmt = HtmlFormatter(linenos="inline", hl_lines=marked, cssclass="code", wrapcode=True)
        return highlight(code, PythonLexer(stripnl=False, ensurenl=False), fmt)
    except ImportError:
        lines = []
        for i, line in enumerate(code.split("\n"), 1):
            cls = ' class="hll"' if i in marked else ""
            lines.append(f'<span{cls}><span class="linenos">{i:>3}</span>{html.escape(line)}</span>')
        return '<div class="code"><pre><code>' + "\n".join(lines) + "</code></pre></div>"


def code_css() -> str:
    """CSS of the highlighter's classes (empty without pygments)."""
    try:
        from pygments.formatters import HtmlFormatter

        return HtmlFormatter(style="friendly", cssclass="code").get_style_defs(".code")
    except ImportError:
        return ""


# --------------------------------------------------------------------------- page model


def _split_text(text: str) -> tuple[str, str | None, str]:
    """(before ``<code>``, the code block's raw text, after ``</code>``) of a segment."""
    i = text.find("<code>")
    if i < 0:
        return text, None, ""
    j = text.find("</code>", i)
    if j < 0:
        return text[:i], text[i + 6:], ""
    return text[:i], text[i + 6: j], text[j + 7:]


def _round_view(t: Any, index: int, prefill: str, embed: _Embedder) -> dict[str, Any]:
    text = prefill if getattr(t, "finish_reason", "") == "prefill" else (t.text or "")
    before, raw_code, after = _split_text(text)
    ex = t.execution or None
    fixes = list((ex or {}).get("fixes") or [])
    code = t.code if t.code is not None else (raw_code.strip("\n") if raw_code is not None else None)
    outputs = []
    if ex:
        for p in ex.get("images") or []:
            outputs.append(embed(p))
    err = None
    if ex and ex.get("error"):
        e = ex["error"]
        if isinstance(e, dict):
            err = (e.get("traceback") or "").rstrip() or f"{e.get('type')}: {e.get('message')}"
        else:
            err = str(e)
    return {
        "label": "prefill" if getattr(t, "finish_reason", "") == "prefill" else f"round {index + 1}",
        "reasoning": before,
        "after": after,
        "code_html": highlight_code(code, [f.get("line") for f in fixes]) if code is not None else None,
        "fixes": fixes,
        "executed": ex is not None,
        "ok": bool(ex and ex.get("ok")),
        "timed_out": bool(ex and ex.get("timed_out")),
        "duration": (ex or {}).get("duration_s"),
        "stdout": ((ex or {}).get("stdout") or "").rstrip(),
        "error": err,
        "outputs": outputs,
        "finish": f"{t.finish_reason} / {t.end}",
        "discarded": [d.get("text", "") for d in (t.discarded or [])],
    }


def _item_view(i: int, item: ReportItem, embed: _Embedder) -> dict[str, Any]:
    from .imageio import image_size

    t = item.trajectory
    rounds, inputs, regions = [], [], []
    tool = False
    stop_reason = None
    if t is not None:
        stop_reason = t.stop_reason
        tool = bool(t.tool_used)
        size = None
        if t.images:
            try:
                size = image_size(t.images[0])
            except ThymeError:
                size = None
        for k, turn in enumerate([x for x in t.turns]):
            if turn.code is not None and turn.execution is not None:
                for r in crop_regions(turn.code, size, (turn.execution or {}).get("fixes") or []):
                    regions.append({"box": r.box, "requested": r.requested, "line": r.line, "source": r.source, "round": k + 1})
        n = 0
        for turn in t.turns:
            rounds.append(_round_view(turn, n if turn.finish_reason != "prefill" else -1, t.prefill, embed))
            if turn.finish_reason != "prefill":
                n += 1
        for j, p in enumerate(t.images):
            inputs.append({"img": embed(p), "regions": regions if j == 0 else []})
    correct = "unknown" if item.correct is None else ("correct" if item.correct else "wrong")
    for k, r in enumerate(regions, 1):
        r["n"] = k
    return {
        "i": i,
        "anchor": f"t{i}",
        "item": item,
        "correct": correct,
        "tool": "yes" if tool else "no",
        "category": item.category or "(none)",
        "rounds": rounds,
        "n_rounds": sum(1 for r in rounds if r["label"] != "prefill"),
        "inputs": inputs,
        "regions": regions,
        "stop_reason": stop_reason,
        "search": " ".join(x for x in (item.id, item.question[:300], item.category or "", item.benchmark or "") if x).lower(),
    }


# --------------------------------------------------------------------------- writing


def _template():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: resources.files("thyme").joinpath("report_assets", name).read_text(encoding="utf-8")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["px"] = lambda v: "?" if not v else f"{v[0]}x{v[1]}"
    return env.get_template("report.html.j2")


def write_report(
    items: Iterable[Any],
    out_html: str | os.PathLike,
    *,
    title: str | None = None,
    max_image_side: int = MAX_IMAGE_SIDE,
    jpeg_quality: int = 85,
) -> Path:
    """Write the self-contained HTML report of ``items``.

    Args:
        items: :class:`ReportItem`, :class:`~thyme.agent.Trajectory`, trajectory dicts or result
            rows (see :func:`to_item`), in display order.
        out_html: the file to write (its folder is created).
        title: page title (default ``"Thyme trajectories"`` or the single trajectory's id).
        max_image_side: longest side, in pixels, of embedded images (larger ones are sized
            down with PIL, keeping the aspect ratio; crop regions stay in original pixels).
        jpeg_quality: JPEG quality of embedded images (images with transparency are PNG).

    Returns:
        The written file's path. The page size is about 100-200 KB per embedded image at the
        default side.

    Raises:
        ReportError: an item cannot be shown (neither trajectory nor row).
    """
    if int(max_image_side) < 16:
        raise ReportError(f"max_image_side must be at least 16 pixels, got {max_image_side}")
    embed = _Embedder(int(max_image_side), int(jpeg_quality))
    views = [_item_view(i, to_item(it, index=i), embed) for i, it in enumerate(items)]
    if title is None:
        title = f"Thyme trajectory {views[0]['item'].id}" if len(views) == 1 else "Thyme trajectories"
    counts = {
        "total": len(views),
        "correct": sum(1 for v in views if v["correct"] == "correct"),
        "wrong": sum(1 for v in views if v["correct"] == "wrong"),
        "unknown": sum(1 for v in views if v["correct"] == "unknown"),
        "tool": sum(1 for v in views if v["tool"] == "yes"),
    }
    categories = sorted({v["category"] for v in views})
    script = resources.files("thyme").joinpath("report_assets", "report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    page = _template().render(
        title=title, views=views, counts=counts, categories=categories, script=script, csp=csp, code_css=code_css(),
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
