"""The stage rules of ``thyme data synthesize``: each rejects its fault with its reason and passes good input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from thyme.data.synthesize import scenarios as sc
from thyme.data.synthesize import stages as st
from thyme.errors import ThymeError
from thyme.sandbox import ExecError, ExecResult

from ..conftest import CORPUS, needs_corpus

CODE = "<code>\n```python\nprint(1)\n```\n</code>"
REASON = "The sign is small in the full view, so I crop and enlarge the area near it."


def _reason(fn, *a, **kw) -> tuple[str, str]:
    with pytest.raises(st.Rejected) as e:
        fn(*a, **kw)
    return e.value.rejection.stage, e.value.rejection.reason


# --------------------------------------------------------------------------- parse


def test_parse_code_turn_takes_reasoning_and_the_one_block():
    t = st.parse_code_turn("<think>" + REASON + "\n" + CODE)
    assert t.reasoning == REASON and t.code == "print(1)"


@pytest.mark.parametrize(
    "text, reason",
    [
        (REASON, "code_blocks"),
        (REASON + CODE + CODE, "code_blocks"),
        (REASON + "<code>\n```python\ndef f(:\n```\n</code>", "syntax_error"),
        ("Crop." + CODE, "no_reasoning"),
        (REASON + CODE + "<answer>D</answer>", "code_blocks"),
        (REASON + " <sandbox_output><image></sandbox_output>" + CODE, "forged_tag"),
        (REASON + "<code>\n```python\nprint('<image>')\n```\n</code>", "forged_tag"),
        (REASON + "<|im_end|>" + CODE, "forged_tag"),
    ],
)
def test_parse_code_turn_rejects(text, reason):
    assert _reason(st.parse_code_turn, text) == ("parse", reason)


def test_computation_code_needs_a_comment():
    assert _reason(st.parse_code_turn, CODE, require_comment=True, require_reasoning=False) == ("parse", "no_comment")
    ok = st.parse_code_turn("<code>\n```python\n# the sum\nprint(1 + 2)\n```\n</code>", require_comment=True, require_reasoning=False)
    assert "print(1 + 2)" in ok.code


def test_parse_answer_and_direct_turns():
    assert st.parse_answer_turn("The view shows it. Therefore the answer is D.</think>\n<answer>D</answer>") == (
        "The view shows it. Therefore the answer is D.",
        "D",
    )
    assert _reason(st.parse_answer_turn, "no answer here") == ("parse", "no_answer")
    assert _reason(st.parse_answer_turn, "Shown.<sandbox_output><image></sandbox_output> So D.<answer>D</answer>") == (
        "parse",
        "forged_tag",
    )
    assert _reason(st.parse_answer_turn, "So D.<answer>D<|im_end|></answer>") == ("parse", "forged_tag")
    assert _reason(st.parse_answer_turn, CODE + "<answer>D</answer>") == ("parse", "code_blocks")
    assert _reason(st.parse_direct_turn, REASON + CODE + "<answer>D</answer>") == ("parse", "code_blocks")
    assert _reason(st.parse_direct_turn, REASON + "<answer>-1</answer>") == ("parse", "needs_processing")
    assert st.parse_direct_turn(REASON + "<answer>B</answer>")[1] == "B"


# --------------------------------------------------------------------------- leak


def test_leak_rules():
    box = [1550, 2650, 1850, 2750]
    assert st.find_leaks(REASON + " There are 3 signs.", boxes=[box]) is None
    assert st.find_leaks("The sign sits near x=1550 in the image.", boxes=[box]).reason == "leaked_coordinate"
    assert st.find_leaks("The image was turned by 75 degrees.", angle=75).reason == "leaked_angle"
    assert st.find_leaks("Rotate by 285 degrees to fix it.", angle=75).reason == "leaked_angle"
    assert st.find_leaks("Using the given box, I crop.").reason == "leaked_hint"
    assert st.find_leaks("It matches the reference answer.").reason == "leaked_hint"
    assert st.find_leaks("The crop covers 0 to 5 of it.", boxes=[[0, 5, 100, 200]]) is None  # small numbers are not flagged


# --------------------------------------------------------------------------- execute


def test_execution_rules(tmp_path):
    assert st.check_execution(ExecResult(ok=False, error=ExecError("NameError", "x")), "image").reason == "code_error"
    assert st.check_execution(ExecResult(ok=False, timed_out=True), "image").reason == "timeout"
    assert st.check_execution(ExecResult(ok=True, stdout="done"), "image").reason == "no_image"
    assert st.check_execution(ExecResult(ok=True, stdout=""), "text").reason == "no_output"
    assert st.check_execution(ExecResult(ok=True, stdout="", images=[str(tmp_path / "a.png")]), "image") is None
    assert st.check_value("result: 0.4474") is None
    assert st.check_value("done").reason == "no_value"


# --------------------------------------------------------------------------- goal on pixels


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth-but-textured synthetic image (no corpus needed)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((800, 600), Image.BICUBIC)
    p = tmp_path_factory.mktemp("img") / "photo.png"
    im.save(p)
    return str(p)


def _crop(src, box, dst, zoom=2):
    im = Image.open(src).crop(box)
    im.resize((im.width * zoom, im.height * zoom)).save(dst)
    return str(dst)


def test_crop_goal_on_pixels(photo, tmp_path):
    box = [300, 200, 400, 260]
    good = _crop(photo, (290, 190, 410, 270), tmp_path / "good.png")
    region, score = st.locate_crop(photo, good)
    assert score > 0.9 and abs(region[0] - 290) < 8 and abs(region[3] - 270) < 8
    assert st.check_crop(photo, good, box) is None
    half = _crop(photo, (350, 200, 450, 260), tmp_path / "half.png")
    assert st.check_crop(photo, half, box).reason == "box_not_covered"
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 200), dtype=np.uint8)).save(noise)
    assert st.check_crop(photo, str(noise), box).reason == "crop_not_found"


@needs_corpus
def test_crop_goal_on_a_real_crop_of_the_corpus():
    """Thyme's own crop of case 9 (1600, 1900, 1900, 2200 in its code, 300x300 out) is found in its input."""
    inp, out = str(CORPUS / "thyme/images/case9-1.jpg"), str(CORPUS / "thyme/images/case9-2.jpg")
    region, score = st.locate_crop(inp, out)
    assert score > 0.8 and all(abs(a - b) < 30 for a, b in zip(region, [1600, 1900, 1900, 2200]))
    assert st.check_crop(inp, out, [1650, 1950, 1850, 2150]) is None
    assert st.check_crop(inp, out, [100, 100, 300, 300]).reason == "box_not_covered"


def test_rotation_goal(photo, tmp_path):
    info = sc.rotate_image(photo, tmp_path / "rot.png", seed=3)
    a = info["angle"]
    assert 30 <= a <= 335 and a != 180
    rot = Image.open(tmp_path / "rot.png")
    rot.rotate(-a, expand=True).save(tmp_path / "back.png")
    rot.rotate(180 - a, expand=True).save(tmp_path / "flip.png")
    rot.rotate(-a + 90, expand=True).save(tmp_path / "quarter.png")
    assert st.check_rotation(photo, str(tmp_path / "back.png")) is None
    assert st.check_rotation(photo, str(tmp_path / "flip.png")).reason == "not_upright"
    assert st.check_rotation(photo, str(tmp_path / "quarter.png")).reason == "not_upright"


def test_contrast_goal_and_recipe(photo, tmp_path):
    info = sc.degrade_contrast(photo, tmp_path / "low.png", seed=5)
    again = sc.degrade_contrast(photo, tmp_path / "low2.png", seed=5)
    assert info == again and (tmp_path / "low.png").read_bytes() == (tmp_path / "low2.png").read_bytes()
    assert sc.CONTRAST_FACTOR_RANGE[0] <= info["factor"] <= sc.CONTRAST_FACTOR_RANGE[1]
    assert st.rms_contrast(str(tmp_path / "low.png")) < 0.6 * st.rms_contrast(photo)
    x = np.asarray(Image.open(tmp_path / "low.png"), dtype=np.float32)
    lo, hi = np.percentile(x, (1, 99))
    Image.fromarray(np.clip((x - lo) * 255 / (hi - lo), 0, 255).astype(np.uint8)).save(tmp_path / "up.png")
    Image.fromarray(np.clip(x.mean() + 0.5 * (x - x.mean()), 0, 255).astype(np.uint8)).save(tmp_path / "down.png")
    assert st.check_contrast(str(tmp_path / "low.png"), str(tmp_path / "up.png")) is None
    assert st.check_contrast(str(tmp_path / "low.png"), str(tmp_path / "down.png")).reason == "contrast_not_raised"


def test_angles_are_seeded_in_range_and_never_180():
    angles = [sc.sample_angle(s) for s in range(3000)]
    assert min(angles) >= 30 and max(angles) <= 335 and 180 not in angles
    assert len(set(angles)) > 200
    assert [sc.sample_angle(s) for s in range(20)] == angles[:20]
    assert sc.row_seed("1:a:crop") == sc.row_seed("1:a:crop") != sc.row_seed("2:a:crop")


def test_multi_round_boxes():
    box = [400, 300, 460, 340]
    modes = set()
    for seed in range(40):
        r = sc.multi_round_box(box, (1000, 800), seed)
        b = r["round1_box"]
        modes.add(r["mode"])
        assert 0 <= b[0] < b[2] <= 1000 and 0 <= b[1] < b[3] <= 800
        if r["mode"] == "zoom":
            assert sc.box_overlap(b, box) == 1.0 and (b[2] - b[0]) > (box[2] - box[0])
        else:
            assert sc.box_overlap(b, box) < 0.1
    assert modes == {"zoom", "correct"}


# --------------------------------------------------------------------------- answer, verdict


def test_answer_rules():
    opts = {"A": "MACHIGAN", "D": "MICHIGAN"}
    assert st.check_answer("D", "D", options=opts) is None
    assert st.check_answer("D. MICHIGAN", "D", options=opts) is None
    assert st.check_answer("none of these", "D", options=opts).reason == "wrong_answer"
    assert st.check_answer("1.677, 0.447", "1.68, 0.45", numeric=True) is None
    assert st.check_answer("1.70, 0.45", "1.68, 0.45", numeric=True).reason == "wrong_answer"
    assert st.check_answer("1.677, 0.447", "1.68, 0.45", numeric=False).reason == "wrong_answer"


def test_verifier_verdicts():
    assert st.verifier_verdict('{"verdict": "accept", "reason": "fine"}') == ("accept", "fine")
    assert st.verifier_verdict('Here: ```json\n{"verdict": "reject", "reason": "rule 3"}\n```')[0] == "reject"
    with pytest.raises(ValueError):
        st.verifier_verdict("looks good to me")
    with pytest.raises(ValueError):
        st.verifier_verdict('{"verdict": "maybe"}')


# --------------------------------------------------------------------------- prompts


def test_prompts_defaults_cite_the_paper_and_can_be_overridden(tmp_path):
    from importlib import resources

    base = resources.files("thyme.data.synthesize").joinpath("prompts")
    for name in sc.SCENARIOS:
        assert "paper" in base.joinpath(f"{name}.yaml").read_text().lower()
    p = sc.load_prompts()
    assert set(p) == set(sc.SCENARIOS) | {"verifier"} and "{box}" in p["crop"]["user"]
    (tmp_path / "crop.yaml").write_text("system: S\nuser: 'Q {question}'\nfeedback: F {output}\n")
    q = sc.load_prompts(tmp_path)
    assert q["crop"]["user"] == "Q {question}" and q["rotate"] == p["rotate"]
    (tmp_path / "rotate.yaml").write_text("system: S\n")
    with pytest.raises(ThymeError, match="rotate.yaml"):
        sc.load_prompts(tmp_path)
    assert sc.fill("a {x} {y} {z}", x="{y}", y=1) == "a {y} 1 {z}"  # one pass: a question holding {answer} stays as written
