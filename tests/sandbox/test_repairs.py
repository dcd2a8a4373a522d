"""Unit tests of thyme.sandbox.repairs: pure functions, no processes."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from thyme.sandbox import repairs
from thyme.sandbox.repairs import fix_box, fix_slices, fix_span, instrument_crops, is_image_array, repair


def names(fixes):
    return [f.name for f in fixes]


# ----------------------------------------------------------------- dedent / autopep8
def test_dedent_reports_common_indentation_and_keeps_line_numbers():
    code = "\n    x = 1\n    if x:\n        y = 2\n"
    new, fix = repairs.dedent(code)
    assert fix is not None and fix.name == "dedent"
    assert new.splitlines()[1] == "x = 1"
    assert len(new.splitlines()) == len(code.splitlines())  # no leading line stripped


def test_dedent_ignores_whitespace_only_lines():
    code = "import math\n    \nx = math.pi\n"  # corpus case 7, block 2
    new, fix = repairs.dedent(code)
    assert fix is None and new == code


def test_autopep8_only_when_the_code_does_not_parse():
    r = repair("import math\n    x = 1\nprint(x)\n")
    assert names(r.fixes) == ["autopep8"] and r.error is None and r.tree is not None
    valid = "x  =  1;y=2\nprint( x )\n"
    r = repair(valid)
    assert r.fixes == [] and r.source == valid  # valid code is never reformatted


def test_unfixable_syntax_error_is_reported_with_its_line():
    r = repair("x = 1\nprint((1)\n")
    assert r.tree is None and isinstance(r.error, SyntaxError) and r.error.lineno == 2


def test_repairs_disabled_changes_nothing():
    r = repair("    x = cv.imread('a')\n", enabled=False)
    assert r.error is not None and r.fixes == []
    r = repair("x = cv.imread('a')\n", enabled=False)
    assert r.fixes == [] and "cv" in ast.dump(r.tree) and repairs.SLICE_HELPER not in ast.dump(r.tree)


# ----------------------------------------------------------------- cv2 aliases
@pytest.mark.parametrize("alias", ["cv", "cv3", "cv4", "CV"])
def test_cv2_alias_used_as_module(alias):
    r = repair(f"import cv2\nimg = {alias}.imread('x.jpg')\n")
    assert names(r.fixes) == ["cv2_alias"] and r.fixes[0].line == 2
    dump = ast.dump(r.tree)
    assert f"id='{alias}'" not in dump and "id='cv2'" in dump


def test_cv2_alias_without_any_import_adds_cv2():
    r = repair("img = cv.imread('x.jpg')\n")
    assert names(r.fixes) == ["cv2_alias"]
    assert isinstance(r.tree.body[0], ast.Import) and r.tree.body[0].names[0].name == "cv2"


def test_cv2_alias_bound_by_the_code_or_session_is_left_alone():
    for code in ("import cv2 as cv\nimg = cv.imread('x')\n", "cv = object()\ncv.x\n", "def f(cv):\n    return cv.imread('x')\n"):
        assert repair(code).fixes == []
    assert repair("img = cv.imread('x')\n", predefined=["cv"]).fixes == []


def test_cv2_alias_not_used_as_module_is_left_alone():
    assert repair("print(cv)\n").fixes == []  # a NameError is the honest answer


@pytest.mark.parametrize(
    "code,expect",
    [
        ("import cv3\ncv3.imread('x')\n", ("cv2", "cv3")),
        ("import cv4 as ocv\nocv.imread('x')\n", ("cv2", "ocv")),
    ],
)
def test_import_of_a_cv2_alias_imports_cv2(code, expect):
    r = repair(code)
    assert "cv2_alias" in names(r.fixes)
    imp = r.tree.body[0]
    assert (imp.names[0].name, imp.names[0].asname) == expect


def test_from_cv3_import():
    r = repair("from cv3 import imread\n")
    assert names(r.fixes) == ["cv2_alias"] and r.tree.body[0].module == "cv2"


# ----------------------------------------------------------------- crop instrumentation
def test_instrumentation_keeps_line_numbers_and_only_targets_crops():
    code = "import numpy as np\n\nimg = np.zeros((9, 9))\nc = img[1:5, 2:8]\nd = pil.crop((1, 2, 3, 4))\n"
    tree = ast.parse(code)
    assert instrument_crops(tree) == 2
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in (repairs.SLICE_HELPER, repairs.CROP_HELPER)
    ]
    assert sorted(c.lineno for c in calls) == [4, 5]
    compile(tree, "<code>", "exec")


@pytest.mark.parametrize(
    "code",
    [
        "a = x[1:3]",  # one slice
        "a = x[:, 1:3]",  # open bounds
        "a = x[1:, 2:5]",
        "a = x[0:9:2, 1:5]",  # a step
        "a = x[i, j]",
        "x[1:3, 2:5] = 0",  # a store
        "x[1:3, 2:5] += 1",
        "del x[1:3, 2:5]",
        "a = s[1:3] + t[::2]",
        "a = f(x).crop(*box)",
        "a = x.crop(1, 2, 3, 4)",
        "import math\nprint(math.log2(15/11))",
    ],
)
def test_maths_and_other_indexing_is_not_instrumented(code):
    tree = ast.parse(code)
    before = ast.dump(tree)
    assert instrument_crops(tree) == 0
    assert ast.dump(tree) == before


def test_instrumented_subscript_keeps_python_semantics_for_non_images():
    tree = ast.parse("r = (a[1:3, 0:2].tolist(), b[0:2, 1:3])")
    instrument_crops(tree)

    class Echo:
        def __getitem__(self, key):
            return ("echo", key)

    ns = {"a": np.arange(20.0).reshape(4, 5), "b": Echo()}
    from thyme.sandbox import hooks

    ns.update({repairs.SLICE_HELPER: hooks.slice_helper, repairs.KEY_HELPER: hooks._Key()})
    exec(compile(tree, "<code>", "exec"), ns)
    assert ns["r"] == (ns["a"][1:3, 0:2].tolist(), ("echo", (slice(0, 2), slice(1, 3))))


# ----------------------------------------------------------------- crop arithmetic
def test_fix_span_valid_span_is_untouched():
    assert fix_span(10, 200, 1000, 64) == (10, 200, False, False)


def test_fix_span_grows_short_span_centred():
    lo, hi, clamped, grown = fix_span(1030, 1070, 1392, 64)  # the README example's rows
    assert (hi - lo, clamped, grown) == (64, False, True) and (lo + hi) / 2 == 1050


def test_fix_span_min_side_zero_only_clamps():
    assert fix_span(1030, 1070, 1392, 0) == (1030, 1070, False, False)
    assert fix_span(-10, 40, 100, 0) == (0, 40, True, False)


def test_fix_span_shifts_back_inside_at_the_border():
    assert fix_span(0, 10, 500, 64)[:2] == (0, 64)
    assert fix_span(495, 500, 500, 64)[:2] == (436, 500)


def test_fix_span_negative_start_positive_stop_clips_to_zero():
    assert fix_span(-30, 100, 500, 64) == (0, 100, True, False)


def test_fix_span_both_negative_keep_python_semantics():
    assert fix_span(-100, -10, 500, 64) == (400, 490, False, False)


def test_fix_span_positive_start_negative_stop_keeps_python_semantics():
    assert fix_span(10, -10, 500, 64) == (10, 490, False, False)


def test_fix_span_reversed_is_swapped_and_beyond_is_clipped():
    assert fix_span(300, 100, 500, 64) == (100, 300, True, False)
    assert fix_span(400, 900, 500, 64) == (400, 500, False, False)  # numpy clips the same way
    assert fix_span(600, 700, 500, 64) == (436, 500, False, True)  # outside: empty as in numpy, then grown


def test_fix_span_is_capped_at_the_image_size():
    assert fix_span(10, 20, 40, 64) == (0, 40, False, True)


def test_fix_box_orders_clips_and_grows():
    assert fix_box((10, 10, 300, 300), (1000, 800), 64) == ((10, 10, 300, 300), False, False)
    assert fix_box((300, 20, 10, 400), (1000, 800), 64) == ((10, 20, 300, 400), True, False)
    assert fix_box((-5, 0, 100, 900), (1000, 800), 64) == ((0, 0, 100, 800), True, False)
    box, clamped, grown = fix_box((1550, 2650, 1850, 2750), (4000, 3000), 64)
    assert (box, clamped, grown) == ((1550, 2650, 1850, 2750), False, False)
    box, clamped, grown = fix_box((100, 100, 110, 120), (1000, 800), 64)
    assert (box[2] - box[0], box[3] - box[1], grown) == (64, 64, True)
    assert fix_box((10.4, 10.6, 300.2, 300.5), (1000, 800), 64)[0] == (10, 11, 300, 300)


def test_fix_box_rejects_what_pil_should_reject():
    assert fix_box(None, (10, 10), 64) is None
    assert fix_box((1, 2, 3), (10, 10), 64) is None
    assert fix_box(("a", 2, 3, 4), (10, 10), 64) is None


def test_fix_slices():
    key = (slice(1030, 1070), slice(1250, 1360))
    new, clamped, grown, _ = fix_slices(key, (1392, 2496, 3), 64)
    assert (new[0].stop - new[0].start, new[1].stop - new[1].start, clamped, grown) == (64, 110, False, True)
    new, *_ = fix_slices((slice(5, 100), slice(5, 100), 0), (500, 500, 3), 64)
    assert new[2] == 0
    assert fix_slices((slice(None, 5), slice(0, 5)), (500, 500), 64) is None
    assert fix_slices((slice(0, 5, 2), slice(0, 5)), (500, 500), 64) is None
    assert fix_slices((slice(0.5, 5), slice(0, 5)), (500, 500), 64) is None
    assert fix_slices((slice(np.int64(1), np.int32(20)), slice(0, 5)), (500, 500), 64) is not None


def test_is_image_array_rule():
    assert is_image_array(np.zeros((100, 120, 3), np.uint8))
    assert is_image_array(np.zeros((100, 120), np.uint16))
    assert is_image_array(np.zeros((100, 120, 4), np.uint8))
    assert not is_image_array(np.zeros((100, 120, 3), np.float64))  # maths
    assert not is_image_array(np.zeros((10, 10), np.uint8))  # a small mask: data
    assert not is_image_array(np.zeros((100, 120, 7), np.uint8))  # not 1-4 channels
    assert not is_image_array(np.zeros((100, 120, 3, 2), np.uint8))
    assert not is_image_array(np.zeros((100, 120), bool))
    assert not is_image_array([[0] * 100] * 100)
