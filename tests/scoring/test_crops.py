"""The target-box measure of issue 19 (:mod:`thyme.scoring.crops`): coverage, hit, per trajectory."""

from __future__ import annotations

import math

import pytest

from thyme.agent.trajectory import Trajectory, Turn
from thyme.protocol import extract_code, split_recorded_response
from thyme.scoring.crops import HIT_THRESHOLD, box_coverage, crop_hit, target_box

from ..conftest import CORPUS, corpus_records, needs_corpus

SIZE = (1000, 800)
TARGET = (100, 100, 200, 200)  # 100x100 px


def _crop_code(box) -> str:
    return f"from PIL import Image\nimg = Image.open(image_path)\nc = img.crop({tuple(box)!r})\nc.save('/mnt/data/temp_processed_images/a.png')\n"


def _traj(*codes, fixes=None) -> Trajectory:
    turns = [
        Turn(
            index=i,
            text="<code>...</code>",
            finish_reason="stop",
            end="code",
            code=c,
            execution={"ok": True, "fixes": (fixes or {}).get(i, [])},
        )
        for i, c in enumerate(codes)
    ]
    turns.append(Turn(index=len(codes), text="<answer>A</answer>", finish_reason="eos", end="answer"))
    return Trajectory(id="t", question="q", images=["in.jpg"], turns=turns, answer="A", stop_reason="answer")


def test_box_coverage_is_the_share_of_the_target_inside_the_crop():
    assert box_coverage((0, 0, 1000, 800), TARGET) == 1.0  # a crop around the target: all of it
    assert box_coverage((300, 300, 400, 400), TARGET) == 0.0  # elsewhere
    assert box_coverage((200, 100, 300, 200), TARGET) == 0.0  # touching edges: no area
    assert box_coverage((150, 0, 1000, 800), TARGET) == 0.5  # the right half
    assert box_coverage((150, 150, 1000, 800), TARGET) == 0.25
    assert math.isclose(box_coverage((100.5, 100, 200, 200), (100, 100, 200, 200)), 0.995)
    for bad in ((1, 1, 1, 5), (5, 5, 1, 1), (0, 0, 1), "no", (True, 0, 2, 2), (0, 0, float("nan"), 2)):
        with pytest.raises(ValueError, match="target box"):
            box_coverage((0, 0, 10, 10), bad)


def test_target_box_reads_the_forms_data_holds_and_refuses_the_rest():
    assert target_box([1, 2, 3, 4]) == (1.0, 2.0, 3.0, 4.0)
    assert target_box([[1, 2, 3, 4]]) == (1.0, 2.0, 3.0, 4.0)  # one box in a list
    assert target_box("[1, 2, 3.5, 4]") == (1.0, 2.0, 3.5, 4.0)  # a TSV column
    assert target_box("1,2,3,4") == (1.0, 2.0, 3.0, 4.0)
    for bad in (
        None,
        "",
        "a,b,c,d",
        [1, 2, 3],
        [[1, 2, 3, 4], [5, 6, 7, 8]],
        [3, 2, 1, 4],
        [1, 2, 3, float("inf")],
        [1e300, 0, 2e300, 1],
        [0, 0, 10**400, 1],
        {"x": 1},
        "9" * 500,
    ):
        assert target_box(bad) is None, bad


def test_crop_hit_hit_miss_and_exactly_half():
    hit = crop_hit(_traj(_crop_code((50, 50, 250, 250))), TARGET, SIZE)
    assert (hit.hit, hit.best, hit.used_code) == (True, 1.0, True)
    assert [r.box for r in hit.regions] == [(50, 50, 250, 250)] and hit.to_dict() == {
        "crops": [[50, 50, 250, 250]],
        "coverage": 1.0,
        "hit": True,
    }

    miss = crop_hit(_traj(_crop_code((500, 500, 700, 700))), TARGET, SIZE)
    assert (miss.hit, miss.best, miss.coverages) == (False, 0.0, [0.0])

    half = crop_hit(_traj(_crop_code((150, 0, 400, 400))), TARGET, SIZE)  # exactly 0.5: a hit
    assert HIT_THRESHOLD == 0.5 and half.best == 0.5 and half.hit
    just_under = crop_hit(_traj(_crop_code((151, 0, 400, 400))), TARGET, SIZE)
    assert just_under.best == 0.49 and not just_under.hit
    assert not crop_hit(_traj(_crop_code((150, 0, 400, 400))), TARGET, SIZE, threshold=0.6).hit


def test_crop_hit_takes_the_best_crop_over_all_rounds():
    t = _traj(_crop_code((500, 500, 700, 700)), _crop_code((0, 0, 180, 1000)))  # round 2 covers 80%
    h = crop_hit(t, TARGET, SIZE)
    assert h.coverages == [0.0, 0.8] and h.best == 0.8 and h.hit


def test_crop_hit_follows_the_sandbox_repairs():
    # the code asks for a box the sandbox clamped onto the target: the box really cropped counts
    code = _crop_code((-300, -300, 90, 90))
    fix = {"name": "crop_clamped", "detail": "crop box (-300, -300, 90, 90) -> (0, 0, 160, 160) on a 1000x800 image", "line": 3}
    h = crop_hit(_traj(code, fixes={0: [fix]}), TARGET, SIZE)
    assert [r.box for r in h.regions] == [(0, 0, 160, 160)] and h.best == 0.36 and not h.hit
    fix["detail"] = "crop box (-300, -300, 90, 90) -> (0, 0, 190, 190) on a 1000x800 image"
    assert crop_hit(_traj(code, fixes={0: [fix]}), TARGET, SIZE).hit  # 0.81
    # code the reader cannot follow, with the sandbox's record of what it cropped
    fix = {"name": "crop_min_side", "detail": "crop box (120, 120, 130, 130) -> (93, 93, 157, 157) on a 1000x800 image"}
    h = crop_hit(_traj("boxes = detect()\nimg.crop(boxes[0])\n", fixes={0: [fix]}), TARGET, SIZE)
    assert h.regions[0].source == "repair" and math.isclose(h.best, 0.3249) and not h.hit
    # a repair on an image of another size (a crop of a crop) is not a region of the input
    fix = {"name": "crop_clamped", "detail": "crop box (-5, 0, 90, 90) -> (0, 0, 90, 90) on a 200x200 image"}
    assert crop_hit(_traj("c = crop.crop((-5, 0, 90, 90))\n", fixes={0: [fix]}), TARGET, SIZE).regions == []


def test_crops_of_crops_do_not_count():
    # the second crop's coordinates are relative to the first crop, not to the input image
    code = "from PIL import Image\nimg = Image.open(image_path)\nc = img.crop((500, 500, 900, 700)).crop((100, 100, 200, 200))\n"
    h = crop_hit(_traj(code), TARGET, SIZE)
    assert [r.box for r in h.regions] == [(500, 500, 900, 700)] and not h.hit
    reopened = "from PIL import Image\nc = Image.open('/mnt/data/temp_processed_images/a.png')\nc.crop((100, 100, 200, 200))\n"
    assert crop_hit(_traj(reopened), TARGET, SIZE).regions == []


def test_trajectories_without_code_or_without_execution():
    plain = Trajectory(id="p", question="q", images=["in.jpg"], turns=[Turn(0, "<answer>A</answer>", "eos", "answer")], answer="A")
    h = crop_hit(plain, TARGET, SIZE)
    assert (h.hit, h.used_code, h.regions, h.best) == (False, False, [], 0.0)
    # code that was never run (a cap stopped the loop) made no crop
    unran = Trajectory(id="u", question="q", images=["in.jpg"], turns=[Turn(0, "x", "stop", "code", code=_crop_code((0, 0, 500, 500)))])
    assert crop_hit(unran, TARGET, SIZE).regions == [] and not crop_hit(unran, TARGET, SIZE).used_code
    # the dict form (predictions.jsonl, rollouts.jsonl) reads the same; no image size: no crop placed
    d = _traj(_crop_code((50, 50, 250, 250))).to_dict()
    assert crop_hit(d, TARGET, SIZE).hit and not crop_hit(d, TARGET, None).hit
    assert not crop_hit({"turns": "garbage"}, TARGET, SIZE).hit
    with pytest.raises(ValueError):
        crop_hit(d, (5, 5, 5, 5), SIZE)


# Target boxes on the corpus's real HR-Bench 4K items, annotated for this test by hand (this
# project, by looking at the input images in shared/corpus/thyme/images): the corpus and the
# benchmarks ship no box for them (HR-Bench publishes none; the V* sample has no trajectory).
# Pixels of the original input image, (x1, y1, x2, y2).
REAL_TARGETS = {
    # HR-Bench 4K 179, "What street is indicated by the sign...": the green MICHIGAN AV sign
    "thyme-case-1": ((1587, 2715, 1788, 2777), True),  # Thyme's crop (1550, 2650, 1850, 2750) cuts it at y 2750: 0.56
    # HR-Bench 4K 224, the phone number: the "206 441 5000" lines on the brown facade band
    "thyme-case-2": ((1795, 2462, 1850, 2550), True),  # the crop (1750, 1950, 1850, 2600) contains it
    # HR-Bench 4K 243, the train's model number: the white "2001" on the red front
    "thyme-case-9": ((1953, 2253, 2087, 2307), False),  # the crop (1600, 1900, 1900, 2200) is above and left of it
}


@needs_corpus
@pytest.mark.parametrize("rid", sorted(REAL_TARGETS))
def test_real_thyme_trajectories_on_hand_annotated_targets(rid):
    from thyme.imageio import image_size

    rec = next(r for r in corpus_records() if r["id"] == rid)
    box, expect_hit = REAL_TARGETS[rid]
    segments = split_recorded_response(rec["response"])
    turns = []
    for i, seg in enumerate(segments):
        code = extract_code(seg)
        turns.append(Turn(i, seg, "stop", "code" if code else "answer", code=code, execution={"ok": True, "fixes": []} if code else None))
    size = image_size(CORPUS / "thyme" / rec["image"][0])
    h = crop_hit(Trajectory(id=rid, question=rec["question"], images=[rec["image"][0]], turns=turns), box, size)
    assert len(h.regions) == 1 and h.hit is expect_hit, (h.regions, h.coverages)
    # the region read from the code has the size the reference sandbox returned (zoom aside)
    ref = rec["reference_outputs"][0][0]["size"]
    (w, hh) = (h.regions[0].box[2] - h.regions[0].box[0], h.regions[0].box[3] - h.regions[0].box[1])
    assert ref[0] % w == 0 and ref[1] % hh == 0 and ref[0] // w == ref[1] // hh
