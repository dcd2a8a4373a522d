"""The stages of ``thyme data synthesize``: each an explicit rule with a rejection reason.

A row goes through, in order (:data:`STAGES`); the first rule that fails rejects it with
``{"stage", "reason", "detail"}`` (:class:`Rejection`):

``teacher``
    the teacher (or code teacher) gave no usable reply after the retries: ``http_error``,
    ``timeout``, ``bad_reply``. Not final: a rerun tries the row again.
``parse``  (:func:`parse_code_turn`, :func:`parse_answer_turn`, :func:`parse_direct_turn`)
    a code turn needs reasoning before its code (``no_reasoning``, at least :data:`MIN_REASONING_WORDS`
    words) and exactly one ``<code>`` block (``code_blocks``) that compiles (``syntax_error``);
    computation code must carry a comment (``no_comment``: the paper's Table 5); the answer turn
    needs exactly one ``<answer>`` (``no_answer``) and no further code (``code_blocks``); a
    ``no_code`` reply has no code (``code_blocks``) and does not ask for processing
    (``needs_processing``: its answer is ``-1``); reasoning, answer or code holding a Thyme tag
    (``<image>``, ``<sandbox_output>``, ``<think>``...) or a chat special token (``<|im_end|>``)
    would forge structure in the record (``forged_tag``).
``leak``  (:func:`find_leaks`)
    the reasoning (everything outside the code) states a given box coordinate (an integer >= 10
    standing alone), the given rotation angle or its complement to 360, or says a box, angle or
    reference answer was given (``leaked_coordinate``, ``leaked_angle``, ``leaked_hint``).
``execute``  (:func:`check_execution`)
    the code raised (``code_error``), ran out of time (``timeout``), or did not produce what the
    scenario needs: an image (``no_image``) or printed text (``no_output``).
``goal``  measured on pixels (:func:`check_crop`, :func:`check_rotation`, :func:`check_contrast`, :func:`check_value`)
    crop: the output, located in the input by multi-scale template matching (normalised
    correlation >= :data:`MATCH_MIN`), covers >= :data:`CROP_COVERAGE` of the target box's area
    (``box_not_covered``, ``crop_not_found``); rotate: the output, centre-cropped (or resized) to
    the original's size, correlates with the unrotated original (64x64 grey, Pearson) at
    >= :data:`ROTATION_MIN_CORR` and better than with the original turned 180 degrees
    (``not_upright``); contrast: the output's RMS contrast (standard deviation of luminance / 255)
    is >= :data:`CONTRAST_GAIN` times the degraded input's (``contrast_not_raised``); compute: the
    printed text holds a number (``no_value``).
``answer``  (:func:`check_answer`)
    the final answer matches the seed's by the project's scoring rules (:func:`thyme.scoring.score_answer`,
    rule set ``thyme``: options, normalised strings, math equivalence); for computation also
    numbers equal to the reference's precision (``wrong_answer``).
``consistency``  (:func:`verifier_verdict`)
    the MLLM verifier (prompt ``prompts/verifier.yaml``, ours) replies ``accept``; ``reject``
    gives ``verifier_rejected`` with its reason; no parsable verdict after the retries gives
    ``judge_failed`` (never counted as accepted).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from ... import protocol

STAGES = ("input", "teacher", "parse", "leak", "execute", "goal", "answer", "consistency")

MIN_REASONING_WORDS = 5
#: Share of the target box's area the crop must cover (ours).
CROP_COVERAGE = 0.9
#: Least normalised correlation for the crop to count as found in the input (ours).
MATCH_MIN = 0.7
#: Least Pearson correlation of the rotated-back image with the original (ours).
ROTATION_MIN_CORR = 0.8
#: The enhanced image's RMS contrast over the degraded input's, at least (ours).
CONTRAST_GAIN = 1.2

#: Thyme's own tags and chat special tokens: text from the teacher holding one would forge structure in the record.
_TAG_RE = re.compile(r"<(/?)(sandbox_output|answer|code|think|image)>|<\|[A-Za-z0-9_]+\|>", re.I)
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_HINT_RE = re.compile(r"\b(given|provided|supplied)\s+(bounding\s+)?(box|coordinates|angle|rotation|answer)\b|\breference answer\b", re.I)


@dataclass
class Rejection:
    """Why a row was rejected: the stage, a reason from the module docstring, a detail."""

    stage: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "reason": self.reason, "detail": self.detail[:500]}


class Rejected(Exception):
    """Raised inside the pipeline to stop a row at a stage."""

    def __init__(self, stage: str, reason: str, detail: str = ""):
        super().__init__(f"{stage}: {reason}: {detail}")
        self.rejection = Rejection(stage, reason, detail)


# --------------------------------------------------------------------------- parse


@dataclass
class CodeTurn:
    reasoning: str
    code: str


def _strip_think(text: str) -> str:
    t = text.strip()
    if t.startswith("<think>"):
        t = t[len("<think>") :]
    return t.replace("</think>", "").strip()


def parse_code_turn(text: str, *, require_comment: bool = False, require_reasoning: bool = True) -> CodeTurn:
    """A teacher turn that must hold reasoning and exactly one ``<code>`` block.

    Raises:
        Rejected: stage ``parse`` (module docstring).
    """
    t = _strip_think(text or "")
    n = t.count(protocol.CODE_START)
    if n != 1 or t.count(protocol.CODE_END) != 1:
        raise Rejected("parse", "code_blocks", f"expected exactly one <code>...</code> block, found {n}")
    if protocol.ANSWER_START in t:
        raise Rejected("parse", "code_blocks", "the code turn already gives an <answer> (it must stop after </code>)")
    reasoning = t[: t.index(protocol.CODE_START)].strip()
    check_tags(reasoning, "reasoning")
    if require_reasoning and len(reasoning.split()) < MIN_REASONING_WORDS:
        raise Rejected("parse", "no_reasoning", f"{len(reasoning.split())} word(s) of reasoning before the code")
    code = protocol.extract_code(t) or ""
    if not code.strip():
        raise Rejected("parse", "code_blocks", "the code block is empty")
    try:
        ast.parse(code)
    except (SyntaxError, ValueError) as e:
        raise Rejected("parse", "syntax_error", f"line {getattr(e, 'lineno', '?')}: {getattr(e, 'msg', e)}") from None
    check_tags(code, "code")
    if require_comment and not any(line.strip().startswith("#") or " #" in line for line in code.splitlines()):
        raise Rejected("parse", "no_comment", "computation code must carry comments (paper Table 5)")
    return CodeTurn(reasoning, code)


def parse_answer_turn(text: str) -> tuple[str, str]:
    """The last teacher turn: ``(reasoning, answer)``; the reasoning may be empty.

    Raises:
        Rejected: stage ``parse``: no or several ``<answer>``, or a code block.
    """
    t = _strip_think(text or "")
    if protocol.CODE_START in t:
        raise Rejected("parse", "code_blocks", "the answer turn writes more code")
    n = t.count(protocol.ANSWER_START)
    if n != 1 or protocol.ANSWER_END not in t:
        raise Rejected("parse", "no_answer", f"expected exactly one <answer>...</answer>, found {n}")
    i = t.index(protocol.ANSWER_START)
    reasoning = t[:i].strip()
    answer = t[i + len(protocol.ANSWER_START) : t.index(protocol.ANSWER_END, i)].strip()
    if not answer:
        raise Rejected("parse", "no_answer", "the <answer> is empty")
    check_tags(reasoning, "reasoning")
    check_tags(answer, "answer")
    return reasoning, answer


def check_tags(text: str, what: str) -> None:
    m = _TAG_RE.search(text or "")
    if m:
        raise Rejected("parse", "forged_tag", f"the {what} holds {m.group(0)!r}, which would forge structure in the record")


def parse_direct_turn(text: str) -> tuple[str, str]:
    """A ``no_code`` reply: ``(reasoning, answer)`` with no code.

    Raises:
        Rejected: stage ``parse``: ``code_blocks``, ``no_answer``, ``no_reasoning``, ``needs_processing``.
    """
    if protocol.CODE_START in (text or ""):
        raise Rejected("parse", "code_blocks", "a no_code reply must not write code")
    reasoning, answer = parse_answer_turn(text)
    if answer.strip() == "-1":
        raise Rejected("parse", "needs_processing", "the teacher decided the image needs processing")
    if len(reasoning.split()) < MIN_REASONING_WORDS:
        raise Rejected("parse", "no_reasoning", f"{len(reasoning.split())} word(s) of reasoning")
    return reasoning, answer


# --------------------------------------------------------------------------- leak


def find_leaks(reasoning: str, *, boxes: list[list[int]] = (), angle: int | None = None) -> Rejection | None:
    """The first leak in ``reasoning`` (text outside the code), or ``None`` (module docstring)."""
    found = {float(m.group(0)) for m in _NUMBER_RE.finditer(reasoning or "")}
    for box in boxes:
        for v in box:
            if abs(v) >= 10 and float(v) in found:
                return Rejection("leak", "leaked_coordinate", f"the reasoning states the given coordinate {v}")
    if angle is not None:
        for v in {angle, (360 - angle) % 360, -angle}:
            if float(v) in found:
                return Rejection("leak", "leaked_angle", f"the reasoning states the angle {v}")
    m = _HINT_RE.search(reasoning or "")
    if m:
        return Rejection("leak", "leaked_hint", f"the reasoning says {m.group(0)!r}")
    return None


# --------------------------------------------------------------------------- execute


def check_execution(result: Any, expect: str) -> Rejection | None:
    """``result`` (an :class:`thyme.sandbox.ExecResult`) against ``expect`` (``"image"`` or ``"text"``)."""
    if result.timed_out:
        return Rejection("execute", "timeout", "the code did not finish within the time limit")
    if not result.ok:
        err = result.error
        return Rejection("execute", "code_error", f"{getattr(err, 'type', '')}: {getattr(err, 'message', '')}")
    if expect == "image" and not result.images:
        return Rejection("execute", "no_image", f"the code saved no image (printed {result.stdout.strip()[:120]!r})")
    if expect == "text" and not (result.stdout or "").strip():
        return Rejection("execute", "no_output", "the code printed nothing")
    return None


# --------------------------------------------------------------------------- goal (pixels)


def _grey(path: str) -> Any:
    import numpy as np

    from ...imageio import open_image

    return np.asarray(open_image(path, mode="L"), dtype=np.float32)


def _match(img: Any, out: Any, d: float, widths: list[float], window: list[float] | None = None) -> tuple[float, list[float]]:
    """Best ``TM_CCOEFF_NORMED`` match of ``out`` resized to each region width (input pixels) on
    ``img`` scaled by ``d`` (inside ``window`` of input pixels when given)."""
    import cv2
    import numpy as np

    H, W = img.shape
    h, w = out.shape
    ox = oy = 0
    if window is not None:
        x1, y1, x2, y2 = (max(0, int(window[0])), max(0, int(window[1])), min(W, int(window[2]) + 1), min(H, int(window[3]) + 1))
        img, ox, oy = img[y1:y2, x1:x2], x1, y1
    sh, sw = img.shape
    small = cv2.resize(img, (max(1, int(sw * d)), max(1, int(sh * d))), interpolation=cv2.INTER_AREA) if d < 1 else img
    best: tuple[float, list[float]] = (-1.0, [])
    for rw in widths:
        rh = rw * h / w
        tw, th = int(round(rw * d)), int(round(rh * d))
        if tw < 6 or th < 6 or tw > small.shape[1] or th > small.shape[0]:
            continue
        tpl = cv2.resize(out, (tw, th), interpolation=cv2.INTER_AREA)
        if float(tpl.std()) < 1e-3:
            continue
        res = cv2.matchTemplate(small, tpl, cv2.TM_CCOEFF_NORMED)
        _, score, _, loc = cv2.minMaxLoc(res)
        if np.isfinite(score) and score > best[0]:
            x, y = ox + loc[0] / d, oy + loc[1] / d
            best = (float(score), [x, y, x + rw, y + rh])
    return best


def locate_crop(input_path: str, output_path: str) -> tuple[list[float], float]:
    """Where ``output_path`` (a crop of ``input_path``, maybe enlarged, aspect kept) lies in the input.

    Multi-scale template matching (OpenCV ``TM_CCOEFF_NORMED``), coarse to fine: the output resized
    to candidate region widths from 1% to 100% of the input width (ratio 1.1) on the input scaled
    to a long side of 512 px (regions too small there: 1600 px), then the best candidate refined
    on the input scaled to 1600 px in a window around it (widths within 12%, ratio 1.02).

    Returns:
        ``([x1, y1, x2, y2] in input pixels, best correlation)``; ``([], -1.0)`` when nothing fits.
    """
    img = _grey(input_path)
    out = _grey(output_path)
    H, W = img.shape
    h, w = out.shape
    widths = []
    rw = max(4.0, 0.01 * W)
    while rw <= W * 1.0001 and rw * h / w <= H * 1.0001:
        widths.append(rw)
        rw *= 1.1
    coarse, fine = min(1.0, 512.0 / max(H, W)), min(1.0, 1600.0 / max(H, W))
    big = [x for x in widths if x * coarse >= 12 and x * h / w * coarse >= 12]
    small = [x for x in widths if x not in big]
    cands = [_match(img, out, coarse, big), _match(img, out, fine, small)]
    score, region = max(cands, key=lambda c: c[0])
    if not region:
        return [], -1.0
    rw = region[2] - region[0]
    rh = region[3] - region[1]
    window = [region[0] - 0.3 * rw, region[1] - 0.3 * rh, region[2] + 0.3 * rw, region[3] + 0.3 * rh]
    k, refine = 0.88, []
    while k <= 1.12:
        refine.append(rw * k)
        k *= 1.02
    s2, r2 = _match(img, out, fine, refine, window)
    return (r2, s2) if r2 and s2 >= score else (region, score)


def check_crop(
    input_path: str, output_path: str, box: list[int], *, coverage: float = CROP_COVERAGE, match_min: float = MATCH_MIN
) -> Rejection | None:
    """The crop in ``output_path`` covers ``box`` (module docstring)."""
    from .scenarios import box_overlap

    region, score = locate_crop(input_path, output_path)
    if not region or score < match_min:
        return Rejection(
            "goal", "crop_not_found", f"the output does not match any region of the input (best correlation {score:.2f} < {match_min})"
        )
    cov = box_overlap(region, [float(v) for v in box])
    if cov < coverage:
        r = [int(round(v)) for v in region]
        return Rejection("goal", "box_not_covered", f"the crop {r} covers {cov:.0%} of the target box (needs {coverage:.0%})")
    return None


def _small(a: Any) -> Any:
    import cv2
    import numpy as np

    s = cv2.resize(a, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    return s - s.mean()


def _corr(a: Any, b: Any) -> float:
    import numpy as np

    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else 0.0


def rotation_similarity(original_path: str, output_path: str) -> tuple[float, float]:
    """``(corr with the original, corr with the original turned 180 degrees)`` of the output,
    centre-cropped to the original's size when larger in both sides, else resized to it."""
    import cv2

    orig = _grey(original_path)
    out = _grey(output_path)
    H, W = orig.shape
    h, w = out.shape
    if h >= H and w >= W:
        y, x = (h - H) // 2, (w - W) // 2
        out = out[y : y + H, x : x + W]
    else:
        out = cv2.resize(out, (W, H), interpolation=cv2.INTER_AREA)
    o, r, f = _small(orig), _small(out), _small(orig[::-1, ::-1].copy())
    return _corr(o, r), _corr(f, r)


def check_rotation(original_path: str, output_path: str, *, min_corr: float = ROTATION_MIN_CORR) -> Rejection | None:
    """The output is the original upright again (module docstring)."""
    c, c180 = rotation_similarity(original_path, output_path)
    if c < min_corr or c <= c180:
        return Rejection(
            "goal",
            "not_upright",
            f"correlation with the upright original {c:.2f} (needs {min_corr}, and above {c180:.2f} for a 180-degree turn)",
        )
    return None


def rms_contrast(path: str) -> float:
    """RMS contrast: the standard deviation of the luminance (PIL ``L``) divided by 255."""
    return float(_grey(path).std() / 255.0)


def check_contrast(input_path: str, output_path: str, *, gain: float = CONTRAST_GAIN) -> Rejection | None:
    """The output's RMS contrast is at least ``gain`` times the degraded input's."""
    a, b = rms_contrast(input_path), rms_contrast(output_path)
    if b < gain * a:
        return Rejection("goal", "contrast_not_raised", f"RMS contrast {a:.3f} -> {b:.3f} (needs x{gain})")
    return None


def check_value(stdout: str) -> Rejection | None:
    """The computation printed a number."""
    if not _NUMBER_RE.search(stdout or ""):
        return Rejection("goal", "no_value", f"the program printed no number: {(stdout or '').strip()[:120]!r}")
    return None


# --------------------------------------------------------------------------- answer


def _numbers(s: str) -> list[str]:
    return [m.group(0) for m in _NUMBER_RE.finditer(s or "")]


def numbers_match(answer: str, reference: str) -> bool:
    """The same numbers in the same order, each equal to the reference's precision (half a unit
    of its last decimal), e.g. ``1.677, 0.447`` matches ``1.68, 0.45``."""
    a, g = _numbers(answer), _numbers(reference)
    if not g or len(a) != len(g):
        return False
    for x, y in zip(a, g):
        dec = len(y.split(".")[1]) if "." in y else 0
        if abs(float(x) - float(y)) > 0.5 * 10 ** (-dec) + 1e-9:
            return False
    return True


def check_answer(answer: str, reference: Any, *, options: dict[str, str] | None = None, numeric: bool = False) -> Rejection | None:
    """The final answer against the seed's (module docstring)."""
    from ...scoring.rules import score_answer

    v = score_answer(answer, str(reference), options=options or {}, rule_set="thyme")
    if v is not None and v.correct:
        return None
    if numeric and numbers_match(answer, str(reference)):
        return None
    return Rejection(
        "answer", "wrong_answer", f"answer {answer[:120]!r}, reference {str(reference)[:120]!r}" + (f" ({v.detail})" if v else "")
    )


# --------------------------------------------------------------------------- consistency


def verifier_verdict(text: str) -> tuple[str, str]:
    """``(verdict, reason)`` from a verifier reply (``{"verdict": "accept"|"reject", "reason": ...}``).

    Raises:
        ValueError: no such JSON object in the reply.
    """
    import json

    from ...scoring.judge import parse_verdict

    verdict = str(parse_verdict(text, "verdict", ["accept", "reject", "ACCEPT", "REJECT"])).lower()
    reason = ""
    m = re.search(r"\{.*\}", text or "", re.S)
    if m:
        try:
            obj = json.loads(m.group(0))
            reason = str(obj.get("reason", ""))[:300] if isinstance(obj, dict) else ""
        except ValueError:
            pass
    return verdict, reason
