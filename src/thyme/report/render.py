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

Crop regions (:func:`thyme.scoring.crops.crop_regions`): read from the code with a best-effort evaluation of its
literal arithmetic (``x1, y1, x2, y2 = 1250, 1030, 1360, 1070``; ``w, h = img.size``;
``img.crop((x1, y1, x2, y2))``; ``image[y1:y2, x1:x2]``) on images opened from the input
(``Image.open`` / ``cv2.imread`` / ``np.array`` of those; paths under the Thyme output folder
are outputs, not the input), then corrected with the sandbox's own records: a ``crop_clamped``
/ ``crop_min_side`` :class:`~thyme.sandbox.Fix` says ``crop box (l, t, r, b) -> (l', t', r', b')
on a WxH image`` (or ``crop [y0:y1, x0:x1] -> [...]`` for array slices); on an image of the
input's size the repaired box is what was really cropped. The report draws the region really
cropped (solid) and, when a repair changed it, the box the code asked for (dashed). When the
item carries a target box (:attr:`ReportItem.target_box`), it is drawn too, in its own colour
and labelled ``target``, with the share of it the best crop covers (a hit from 50%:
:func:`thyme.scoring.crops.crop_hit`, the rule of ``thyme eval``'s ``crop_hit_rate``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..errors import ThymeError
from ..scoring.crops import HIT_THRESHOLD, crop_hit, crop_regions
from .items import MAX_IMAGE_SIDE, ReportError, ReportItem, to_item

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
    """Embeds image files as data URLs; only files inside ``roots`` (after resolving symlinks;
    :func:`thyme.records.resolve_data_path`), unless ``allow_absolute``: paths in a report's input
    are data, and a page must never carry a host file the run did not produce or read."""

    def __init__(self, max_side: int, quality: int = 85, *, roots: list[str] | None = None, allow_absolute: bool = False):
        self.max_side = max_side
        self.quality = quality
        self.roots = list(roots or [])
        self.allow_absolute = allow_absolute
        self.cache: dict[str, Embedded] = {}

    def allowed(self, path: str) -> str | None:
        """``path`` resolved when it may be read (inside a root), else ``None``."""
        from ..records import resolve_data_path

        if not isinstance(path, str) or not path:
            return None
        if self.allow_absolute:
            return os.path.realpath(path)
        for root in self.roots:
            try:
                return resolve_data_path(path, root)
            except ThymeError:
                continue
        return None

    def __call__(self, path: str) -> Embedded:
        hit = self.cache.get(path)
        if hit is None:
            hit = self.cache[path] = self._embed(path)
        return hit

    def _embed(self, path: str) -> Embedded:
        from PIL import Image

        from ..imageio import load_image, open_image

        real = self.allowed(path)
        if real is None:
            return Embedded(
                None,
                None,
                None,
                path,
                "not embedded: outside the folder of the run this report renders (thyme report --allow-absolute-paths embeds it)",
            )
        try:
            im = open_image(real, load=False)  # budgets checked from the header
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            im = load_image(im, real, mode="RGBA" if has_alpha else "RGB")  # under the decode budget
        except ThymeError as e:
            return Embedded(None, None, None, path, e.message)
        size = im.size
        try:
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
        return text[:i], text[i + 6 :], ""
    return text[:i], text[i + 6 : j], text[j + 7 :]


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
    from ..imageio import image_size

    t = item.trajectory
    rounds, inputs, regions = [], [], []
    tool = False
    stop_reason = None
    if t is not None:
        stop_reason = t.stop_reason
        tool = bool(t.tool_used)
        size = None
        first = embed.allowed(t.images[0]) if t.images else None
        if first is not None:
            try:
                size = image_size(first)
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
        target = None
        if item.target_box is not None and size is not None:
            hit = crop_hit(t, item.target_box, size)
            box = tuple(int(round(v)) for v in item.target_box)
            target = {"box": box, "coverage": hit.best, "hit": hit.hit, "threshold": HIT_THRESHOLD}
            for r, cov in zip(regions, hit.coverages):
                r["coverage"] = cov
        for j, p in enumerate(t.images):
            inputs.append({"img": embed(p), "regions": regions if j == 0 else [], "target": target if j == 0 else None})
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


def _template(name: str = "report.html.j2"):
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: resources.files("thyme").joinpath("report", "assets", name).read_text(encoding="utf-8")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["px"] = lambda v: "?" if not v else f"{v[0]}x{v[1]}"
    return env.get_template(name)


def write_report(
    items: Iterable[Any],
    out_html: str | os.PathLike,
    *,
    title: str | None = None,
    max_image_side: int = MAX_IMAGE_SIDE,
    jpeg_quality: int = 85,
    source: str | None = None,
    provenance: dict[str, Any] | None = None,
    roots: list[str | os.PathLike] | None = None,
    allow_absolute: bool = False,
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
        source: which command wrote the report from which input (e.g. ``thyme eval /runs/x``),
            kept in a ``<meta name="thyme-source">`` so a later command does not overwrite
            another's report unasked (:func:`report_source`).
        provenance: ``label -> value`` shown under the title (model, revision, backend,
            decoding...; :func:`provenance_lines`).
        roots: the folders of the run being rendered: only image files inside one of them
            (after resolving symlinks) are embedded, others are shown as "not embedded"
            (default: ``out_html``'s folder; README: Paths in data).
        allow_absolute: embed image files wherever they are (the user's opt-in).

    Returns:
        The written file's path. The page size is about 100-200 KB per embedded image at the
        default side.

    Raises:
        ReportError: an item cannot be shown (neither trajectory nor row).
    """
    if int(max_image_side) < 16:
        raise ReportError(f"max_image_side must be at least 16 pixels, got {max_image_side}")
    out = Path(out_html)
    embed = _Embedder(
        int(max_image_side),
        int(jpeg_quality),
        roots=[os.fspath(r) for r in roots] if roots is not None else [str(out.resolve().parent)],
        allow_absolute=allow_absolute,
    )
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
    script, csp = _script_and_csp()
    page = _template().render(
        title=title,
        views=views,
        counts=counts,
        categories=categories,
        script=script,
        csp=csp,
        code_css=code_css(),
        source=source or "",
        provenance=provenance_lines(provenance or {}),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _script_and_csp() -> tuple[str, str]:
    script = resources.files("thyme").joinpath("report", "assets", "report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    return script, csp


def render_page(out_html: str | os.PathLike, *, page: str, title: str, source: str | None = None, **context: Any) -> Path:
    """Write one of the pages with plots (``page``: ``summary``, ``compare`` or ``training``;
    :mod:`thyme.report.pages` builds ``context``) with the trajectory report's style, script and
    Content-Security-Policy; written atomically. Returns the path."""
    script, csp = _script_and_csp()
    defaults = {"provenance": [], "plots": [], "facts": [], "table": [], "compare": [], "names": ("A", "B"), "flips": {}, "views": []}
    defaults["trajectories_link"] = None
    html_text = _template("pages.html.j2").render(
        **{**defaults, **context}, page=page, title=title, source=source or "", script=script, csp=csp, code_css=code_css()
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html_text, encoding="utf-8")
    os.replace(tmp, out)
    return out


_SOURCE_RE = re.compile(r'<meta name="thyme-source" content="([^"]*)">')


def report_source(path: str | os.PathLike) -> str | None:
    """The ``source`` an existing report was written with (``""`` for a thyme report without
    one), or ``None`` when ``path`` is not a thyme report."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None
    m = _SOURCE_RE.search(head)
    if m:
        return html.unescape(m.group(1))
    return "" if '<meta name="generator" content="thyme report">' in head else None


def provenance_lines(prov: dict[str, Any]) -> list[tuple[str, str]]:
    """``[(label, text)]`` of what produced the trajectories, for the page header.

    Accepts eval's ``metrics.json`` provenance (``model``, ``revision``, ``model_commit``,
    ``backend``, ``settings.decoding``...) or a backend's ``describe()`` dict (``thyme run``'s
    trajectory ``meta.model``); unknown keys of a plain ``label -> value`` dict are shown as
    they are.
    """
    out: list[tuple[str, str]] = []
    seen = set()

    def add(label: str, value: Any) -> None:
        if value is None or value == "" or value == {} or label in seen:
            return
        seen.add(label)
        out.append((label, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)))

    add("model", prov.get("model"))
    add("revision", prov.get("revision"))
    add("commit", prov.get("model_commit") or prov.get("commit"))
    add("backend", prov.get("backend"))
    settings = prov.get("settings") if isinstance(prov.get("settings"), dict) else {}
    dec = settings.get("decoding") if isinstance(settings.get("decoding"), dict) else None
    if dec:
        add("decoding", ", ".join(f"{k} {v}" for k, v in dec.items() if v is not None))
    pix = (
        settings.get("pixel_budget")
        if isinstance(settings.get("pixel_budget"), dict)
        else {k: prov.get(k) for k in ("min_pixels", "max_pixels")}
    )
    if any(v is not None for v in pix.values()):
        add("pixel budget", ", ".join(f"{k} {v}" for k, v in pix.items() if v is not None))
    data = prov.get("data")
    if isinstance(data, dict):
        add("data", data.get("path") or data)
    add("thyme", prov.get("thyme_version") or prov.get("thyme"))
    for k, v in prov.items():
        if k not in {
            "model",
            "revision",
            "model_commit",
            "commit",
            "backend",
            "settings",
            "data",
            "thyme_version",
            "thyme",
            "backend_details",
            "min_pixels",
            "max_pixels",
        } and isinstance(v, (str, int, float)):
            add(k.replace("_", " "), v)
    return out
