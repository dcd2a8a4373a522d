"""Crop regions read from model code, and whether they found a target box.

- :func:`crop_regions`: the regions of the input image a turn's code cropped: a best-effort,
  bounded evaluation of the code's literal arithmetic, corrected by the sandbox's own repair
  records. The report draws them on the input image.
- :func:`box_coverage`, :func:`crop_hit`: the share of a known target box (an annotated
  ``bbox``) that a trajectory's crops cover, and the hit rule of issue 19 ("faithful tool use":
  did the crop find the target?). ``thyme eval`` (``crop_hit_rate``), the RL logs
  (``thyme/crop_hit_rate``) and the report all read it from here, so they cannot disagree.

Floor 1 (beside the answer rules): imports only :mod:`thyme.constants`.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..constants import OUTPUT_DIR_MARKER

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
            ops = {
                ast.Add: lambda: a + b,
                ast.Sub: lambda: a - b,
                ast.Mult: lambda: a * b,
                ast.Div: lambda: a / b,
                ast.FloorDiv: lambda: a // b,
                ast.Mod: lambda: a % b,
            }
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


# --------------------------------------------------------------------------- target coverage

#: A crop "finds" the target when it covers at least this share of the target box's area
#: (issue 19: "a crop covering at least half of the target box"; exactly 0.5 counts as a hit).
HIT_THRESHOLD = 0.5

Box = tuple[float, float, float, float]


def target_box(value: Any) -> Box | None:
    """A target box read from data, or ``None`` when ``value`` is not one.

    Accepts ``[x1, y1, x2, y2]`` (list or tuple of 4 finite numbers, pixels of the original
    input image, ``x2 > x1`` and ``y2 > y1``), the same as one box wrapped in a list
    (``[[x1, y1, x2, y2]]``), or its text form (``"[x1, y1, x2, y2]"`` or ``"x1,y1,x2,y2"``, as a
    TSV column holds it). Anything else (hostile data: booleans, NaN, huge or empty boxes, more
    than one box) is ``None``: the row then simply carries no box. Never raises.
    """
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 200:
            return None
        text = text.strip("[]() ")
        try:
            value = [float(x) for x in text.split(",")]
        except ValueError:
            return None
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_num(v) for v in value):
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except OverflowError:  # an int beyond float range
        return None
    if not all(abs(v) <= MAX_MAGNITUDE for v in (x1, y1, x2, y2)) or not (x2 > x1 and y2 > y1):
        return None  # NaN fails the comparisons too
    return (x1, y1, x2, y2)


def box_coverage(crop_box: Sequence[float], target: Sequence[float]) -> float:
    """Share of ``target``'s area that ``crop_box`` covers, in ``[0, 1]``.

    Both boxes are ``(x1, y1, x2, y2)`` in pixels of the same image (the original input
    image). 1.0: the crop contains the whole target; 0.0: they do not overlap (or the crop is
    empty). Not IoU: a large crop around a small target covers all of it, which is what the
    question of issue 19 asks ("did the crop find the target?").

    Raises:
        ValueError: ``target`` is not a box of positive area (see :func:`target_box`).
    """
    t = target_box(target)
    if t is None:
        raise ValueError(f"target box {target!r} is not [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
    cx1, cy1, cx2, cy2 = (float(v) for v in crop_box)
    w = min(cx2, t[2]) - max(cx1, t[0])
    h = min(cy2, t[3]) - max(cy1, t[1])
    if not (w > 0 and h > 0):
        return 0.0
    return min(1.0, (w * h) / ((t[2] - t[0]) * (t[3] - t[1])))


@dataclass
class CropHit:
    """How a trajectory's crops relate to a target box (:func:`crop_hit`).

    Attributes:
        regions: every crop of the input image its code made, all rounds, in order.
        coverages: :func:`box_coverage` of the target by each region (same order).
        best: the largest coverage (0.0 without crops).
        hit: ``best >= threshold``.
        used_code: the trajectory executed at least one code block.
    """

    regions: list[CropRegion]
    coverages: list[float]
    best: float
    hit: bool
    used_code: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``crops`` (boxes), ``coverage`` (best, rounded to 4 places), ``hit``."""
        return {"crops": [list(r.box) for r in self.regions], "coverage": round(self.best, 4), "hit": self.hit}


def _turns(trajectory: Any) -> list[tuple[str | None, dict[str, Any] | None]]:
    turns = trajectory.get("turns") if isinstance(trajectory, dict) else getattr(trajectory, "turns", None)
    out = []
    for t in turns or []:
        code = t.get("code") if isinstance(t, dict) else getattr(t, "code", None)
        ex = t.get("execution") if isinstance(t, dict) else getattr(t, "execution", None)
        out.append((code if isinstance(code, str) else None, ex if isinstance(ex, dict) else None))
    return out


def crop_hit(trajectory: Any, target: Sequence[float], image_size: tuple[int, int] | None, threshold: float = HIT_THRESHOLD) -> CropHit:
    """Did ``trajectory``'s crops find ``target``?

    Args:
        trajectory: a :class:`thyme.agent.Trajectory` or its dict form (``turns`` with ``code``
            and ``execution``; read by duck typing, this module does not import the agent).
        target: the target box ``(x1, y1, x2, y2)`` in pixels of the original input image.
        image_size: ``(W, H)`` of that input image (``None``: no crop can be placed, no hit).
        threshold: :data:`HIT_THRESHOLD` by default.

    Only executed turns count (code the sandbox ran), over all rounds. Only crops of the
    input image count, in its pixels (:func:`crop_regions`): a crop of a crop (``img.crop(a).crop(b)``,
    or a crop of a saved output re-opened from the output folder) has coordinates relative to
    the first crop and is not counted; the sandbox's repair records of an image of another size
    are ignored for the same reason.

    Raises:
        ValueError: ``target`` is not a box (:func:`box_coverage`).
    """
    if target_box(target) is None:
        raise ValueError(f"target box {target!r} is not [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
    regions: list[CropRegion] = []
    used = False
    for code, ex in _turns(trajectory):
        if code is None or ex is None:
            continue
        used = True
        for r in crop_regions(code, image_size, ex.get("fixes") or []):
            regions.append(r)
    cov = [box_coverage(r.box, target) for r in regions]
    best = max(cov, default=0.0)
    return CropHit(regions, cov, best, best >= threshold, used)
