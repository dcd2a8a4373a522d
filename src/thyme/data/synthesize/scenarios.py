"""The six synthesis scenarios of the paper (Sec. 3.1, Fig. 3) and their seeded, recorded image transforms.

``no_code``, ``crop``, ``rotate``, ``contrast``, ``compute``, ``multi_round`` (:data:`SCENARIOS`).
What each needs from a seed row and how many code blocks its teacher writes is in
:data:`SCENARIO_SPECS`.

Transforms (recorded in the kept record's ``synthesis.transform`` so a record is reproducible):

- **rotate** (paper: "rotated by a random angle in 30-335 degrees"): ``angle`` an integer drawn
  uniformly from 30..335 by ``random.Random(seed)``, never 180 (a 180-degree turn is the one case
  where a wrong-way correction also looks upright to a rule on sizes); the image is turned
  ``angle`` degrees counter-clockwise with PIL (``expand=True``, black fill). The teacher must turn
  it back: its angle plus ``angle`` is 0 or 360 (measured on pixels, :mod:`.stages`).
- **contrast** (the paper gives no recipe; ours): on the RGB pixels ``x`` in [0, 255]:
  ``x1 = m + factor * (x - m)`` (``m`` the image mean; contrast compression, ``factor`` drawn
  from [0.25, 0.45]), then ``x2 = 255 * (x1 / 255) ** gamma`` (``gamma`` drawn from [0.8, 1.25]),
  then Gaussian noise of standard deviation ``noise`` grey levels (drawn from [1.5, 4.0]) from
  ``numpy.random.default_rng(seed)``, clipped and rounded to uint8. The degraded image's RMS
  contrast (standard deviation of luminance / 255) is about ``factor`` times the original's.
- **multi_round** (paper: "round 1 crops a larger box containing the target (further zoom) or a
  wrong box (error correction), round 2 crops the target"): mode ``zoom`` or ``correct`` drawn by
  the seed; ``zoom``: the target box grown by a factor drawn from [2.0, 3.5] around its centre,
  clipped to the image; ``correct``: a box of the target's size moved to a place that overlaps
  the target by less than 10% of its area.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIOS = ("no_code", "crop", "rotate", "contrast", "compute", "multi_round")

#: Rotation angles drawn (paper Sec. 3.1, degrees, inclusive).
ANGLE_RANGE = (30, 335)
CONTRAST_FACTOR_RANGE = (0.25, 0.45)
GAMMA_RANGE = (0.8, 1.25)
NOISE_RANGE = (1.5, 4.0)
ZOOM_GROW_RANGE = (2.0, 3.5)


@dataclass(frozen=True)
class ScenarioSpec:
    """What a scenario needs and produces.

    Attributes:
        name: the scenario.
        needs_image: seed rows must have an image.
        needs_bbox: seed rows must have ``bbox`` (x1, y1, x2, y2 pixels of the original image).
        code_blocks: code blocks the teacher writes (0: none allowed).
        source: the paper table / section whose intent the default prompt follows.
    """

    name: str
    needs_image: bool
    needs_bbox: bool
    code_blocks: int
    source: str


SCENARIO_SPECS: dict[str, ScenarioSpec] = {
    "no_code": ScenarioSpec("no_code", True, False, 0, "paper Table 7 (generic prompt: decide whether processing is needed) and Sec. 3.1"),
    "crop": ScenarioSpec("crop", True, True, 1, "paper Table 8 (crop prompt, box given) and Sec. 3.1"),
    "rotate": ScenarioSpec("rotate", True, False, 1, "paper Table 9 (rotation prompt, angle given) and Sec. 3.1"),
    "contrast": ScenarioSpec("contrast", True, False, 1, "paper Sec. 3.1 (low contrast: crop-style prompt with enhancement instructions)"),
    "compute": ScenarioSpec(
        "compute", False, False, 1, "paper Sec. 3.1 (computation: a reasoning teacher, then a code teacher; Table 5: comments help)"
    ),
    "multi_round": ScenarioSpec("multi_round", True, True, 2, "paper Sec. 3.1 (multi-round from boxes: further zoom or error correction)"),
}


def row_seed(key: str, base_seed: int = 0) -> int:
    """A stable 63-bit seed of a row key and the run's base seed (the same row, the same transform)."""
    h = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def sample_angle(seed: int) -> int:
    """The rotation angle of a row (degrees, counter-clockwise): uniform in 30..335, never 180."""
    rng = random.Random(seed)
    while True:
        a = rng.randint(*ANGLE_RANGE)
        if a != 180:
            return a


def rotate_image(src: str, dst: str | Path, seed: int) -> dict[str, Any]:
    """Write ``src`` turned by :func:`sample_angle` degrees counter-clockwise to ``dst``.

    Returns:
        ``{"kind": "rotate", "angle": A, "seed": seed}`` (the record's transform).

    Raises:
        ImageError / ImageBudgetError: ``src`` cannot be opened within the budgets.
    """
    from PIL import Image

    from ...imageio import open_image

    angle = sample_angle(seed)
    im = open_image(src, mode="RGB")
    out = im.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    _save(out, dst)
    return {"kind": "rotate", "angle": angle, "seed": seed}


def contrast_params(seed: int) -> dict[str, float]:
    """``factor``, ``gamma``, ``noise`` of a row's degradation (module docstring)."""
    rng = random.Random(seed)
    return {
        "factor": round(rng.uniform(*CONTRAST_FACTOR_RANGE), 4),
        "gamma": round(rng.uniform(*GAMMA_RANGE), 4),
        "noise": round(rng.uniform(*NOISE_RANGE), 4),
    }


def degrade_contrast(src: str, dst: str | Path, seed: int) -> dict[str, Any]:
    """Write the low-contrast version of ``src`` to ``dst`` (our recipe, module docstring).

    Returns:
        ``{"kind": "contrast", "factor", "gamma", "noise", "seed"}``.
    """
    import numpy as np
    from PIL import Image

    from ...imageio import open_image

    p = contrast_params(seed)
    x = np.asarray(open_image(src, mode="RGB"), dtype=np.float32)
    m = float(x.mean())
    x = m + p["factor"] * (x - m)
    x = 255.0 * np.power(np.clip(x, 0, 255) / 255.0, p["gamma"])
    x = x + np.random.default_rng(seed).normal(0.0, p["noise"], size=x.shape)
    out = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")
    _save(out, dst)
    return {"kind": "contrast", **p, "seed": seed}


def multi_round_box(box: list[int], size: tuple[int, int], seed: int) -> dict[str, Any]:
    """Round 1's box of a multi-round row (module docstring).

    Args:
        box: the target box (x1, y1, x2, y2) in pixels.
        size: the image's (width, height).

    Returns:
        ``{"kind": "multi_round", "mode": "zoom" | "correct", "round1_box": [x1, y1, x2, y2], "seed"}``.
    """
    rng = random.Random(seed)
    W, H = size
    x1, y1, x2, y2 = box
    w, h = max(1, x2 - x1), max(1, y2 - y1)
    mode = "zoom" if rng.random() < 0.5 else "correct"
    if mode == "correct":
        for _ in range(50):
            nx = rng.randint(0, max(0, W - w))
            ny = rng.randint(0, max(0, H - h))
            if box_overlap([nx, ny, nx + w, ny + h], box) < 0.1:
                return {"kind": "multi_round", "mode": mode, "round1_box": [nx, ny, nx + w, ny + h], "seed": seed}
        mode = "zoom"  # no room for a disjoint box: the image is mostly target
    g = rng.uniform(*ZOOM_GROW_RANGE)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    gw, gh = w * g / 2, h * g / 2
    r1 = [max(0, int(cx - gw)), max(0, int(cy - gh)), min(W, int(round(cx + gw))), min(H, int(round(cy + gh)))]
    r1 = [min(r1[0], x1), min(r1[1], y1), max(r1[2], x2), max(r1[3], y2)]
    return {"kind": "multi_round", "mode": mode, "round1_box": r1, "seed": seed}


def box_overlap(a: list[float], b: list[float]) -> float:
    """Share of box ``b``'s area that box ``a`` covers (0..1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = max(1e-9, (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / area


def _save(im: Any, dst: str | Path) -> None:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix.lower() in (".jpg", ".jpeg"):
        im.save(dst, quality=95)
    else:
        im.save(dst)


# --------------------------------------------------------------------------- prompts


def load_prompts(prompts_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """The prompt files: ``{scenario or "verifier": {key: template}}``.

    Defaults are the package's ``prompts/*.yaml``; a file of the same name in ``prompts_dir``
    (``--prompts DIR``) replaces the default whole. Templates use ``{name}`` fields filled by
    :func:`fill` (plain replacement: braces in questions are safe).

    Raises:
        ThymeError: a file is not a YAML mapping of strings, or misses a key the pipeline needs.
    """
    from importlib import resources

    import yaml

    from ...errors import ThymeError

    names = list(SCENARIOS) + ["verifier"]
    need = {"verifier": ("system", "user")}
    out: dict[str, dict[str, str]] = {}
    base = resources.files("thyme.data.synthesize").joinpath("prompts")
    for name in names:
        custom = Path(prompts_dir) / f"{name}.yaml" if prompts_dir else None
        src = custom if custom is not None and custom.is_file() else None
        text = src.read_text(encoding="utf-8") if src else base.joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        where = str(src) if src else f"the default prompts ({name}.yaml)"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ThymeError(f"prompt file {where} is not valid YAML: {e}", "fix the file or drop it to use the default") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ThymeError(f"prompt file {where} must be a YAML mapping of strings", "see the defaults in thyme/data/synthesize/prompts/")
        for key in need.get(name, ("system", "user", "feedback")):
            if key not in data:
                raise ThymeError(f"prompt file {where} has no {key!r} template", "see the defaults in thyme/data/synthesize/prompts/")
        out[name] = data
    return out


def fill(template: str, **fields: Any) -> str:
    """``template`` with each ``{name}`` replaced by ``str(fields[name])`` in one pass (unknown
    fields stay; a value holding ``{other}`` is not filled again, so a question cannot pull in
    the reference answer)."""
    import re

    return re.sub(r"\{(\w+)\}", lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)
