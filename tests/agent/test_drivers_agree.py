"""The message driver (``Agent``: run, eval) and the token driver (``RolloutRunner``: RL, veRL)
read every segment through the one step decision (``thyme.agent.step``): the same scripted model
through both gives the same rounds, code, sandbox outputs, feedback, stop reason and answer, for
every stop reason (issue 14, "One trajectory state machine, two drivers").

The scripted model (``thyme.testing.scripted``) emits fixed segments over the tiny checkpoint's
real tokenizer, at the message level (``ScriptedBackend``) and the token level
(``ScriptedEngine``); the code runs in the real sandbox on a real PNG.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

QUESTION = "What is written on the sign? (script-key-7f3)"
PRINT = "<think>Measure first.\n<code>\n```python\nprint(6 * 7)\n```\n</code>"
PRINT2 = "<think>Once more.\n<code>\n```python\nprint('again')\n```\n</code>"
ANSWER = "<think>The sign reads STOP.</think>\n<answer>B</answer>"


def crop(name: str) -> str:
    return (
        "<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
        f"img.crop((0, 0, 32, 24)).save('/mnt/data/temp_processed_images/{name}.png')\n"
        f"print('/mnt/data/temp_processed_images/{name}.png')\n```\n</code>"
    )


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    from thyme.backends.processors import load_processor
    from thyme.sandbox import Sandbox

    d = tmp_path_factory.mktemp("drivers")
    img = d / "sign.png"
    im = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(im).rectangle((8, 8, 40, 30), fill="red")
    im.save(img)
    proc = load_processor(str(tiny_checkpoint), max_pixels=12544)
    with Sandbox() as sb:
        yield SimpleNamespace(proc=proc, tok=proc.tokenizer, image=str(img), sandbox=sb, dir=d)


def run_message(w, segments, *, max_rounds=4, max_new_tokens=400, max_total_tokens=100000, max_images=6, prefill="", name="m"):
    from thyme.agent import Agent, AgentConfig
    from thyme.testing.scripted import ScriptedBackend

    cfg = AgentConfig(
        max_rounds=max_rounds, max_new_tokens=max_new_tokens, max_total_tokens=max_total_tokens, max_images=max_images, prefill=prefill
    )
    with Agent(ScriptedBackend(w.tok, {"script-key-7f3": segments}), w.sandbox, cfg, artifacts_dir=w.dir / f"art-{name}") as agent:
        return agent.run(QUESTION, [w.image], id="q")


def run_token(w, segments, *, max_rounds=4, max_new_tokens=400, max_length=100000, max_images=6, prefill="", name="t"):
    from thyme import protocol
    from thyme.imageio import image_size
    from thyme.rollout import RolloutLimits, RolloutRunner, SamplingSettings
    from thyme.testing.scripted import ScriptedEngine

    prompt = SimpleNamespace(
        id="q",
        question=QUESTION,
        images=[w.image],
        messages=protocol.build_messages(QUESTION, [w.image], image_sizes=[image_size(w.image)]),
    )
    limits = RolloutLimits(
        max_rounds=max_rounds, max_completion_length=max_new_tokens, max_length=max_length, max_images=max_images, prefill=prefill
    )
    runner = RolloutRunner(
        ScriptedEngine(w.tok, {"script-key-7f3": segments}),
        w.proc,
        w.sandbox,
        limits,
        SamplingSettings(temperature=0.0, ats=False),
        w.dir / f"art-{name}",
    )
    ro = runner.run([prompt])[0]
    assert ro.mask_reason is None, ro.trajectory.error
    return ro


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def view(traj):
    """What both drivers must agree on (image outputs by content: each keeps its own copy)."""
    turns = []
    for t in traj.turns:
        ex = t.execution
        turns.append(
            {
                "index": t.index,
                "text": t.text,
                "end": t.end,
                "code": t.code,
                "finish": t.finish_reason,
                "execution": None
                if ex is None
                else (ex["ok"], ex["stdout"], (ex.get("error") or {}).get("type"), [_digest(p) for p in ex["images"]]),
                "feedback": [p["text"] if p["type"] == "text" else ("image", _digest(p["image"])) for p in t.feedback],
            }
        )
    return {"stop_reason": traj.stop_reason, "answer": traj.answer, "turns": turns}


def agree(w, segments, **caps):
    token_caps = dict(caps)
    if "max_total_tokens" in token_caps:
        token_caps["max_length"] = token_caps.pop("max_total_tokens")
    m = run_message(w, segments, **{k: v for k, v in caps.items()})
    ro = run_token(w, segments, **token_caps)
    assert view(m) == view(ro.trajectory)
    return m, ro


def test_answer_after_code(world):
    m, ro = agree(world, [PRINT, ANSWER])
    assert (m.stop_reason, m.answer) == ("answer", "B")
    assert [t.end for t in m.turns] == ["code", "answer"] and m.turns[0].execution["stdout"].strip() == "42"
    assert m.turns[0].feedback[0]["text"] == "\n<sandbox_output>42</sandbox_output>"
    assert ro.completion_ids[-1] == world.tok.convert_tokens_to_ids("<|im_end|>")  # the token driver closes the turn


def test_no_answer(world):
    m, _ = agree(world, ["<think>I cannot tell from this picture.</think>"])
    assert m.stop_reason == "no_answer" and m.answer is None and m.turns[0].end == "eos"


def test_unterminated_answer_at_end_of_turn(world):
    m, _ = agree(world, ["<think>Clear.</think>\n<answer>C"])
    assert (m.stop_reason, m.answer) == ("answer", "C")


def test_length(world):
    m, _ = agree(
        world,
        ["<think>Many different words follow here, each of them new: alpha beta gamma delta epsilon zeta eta theta.</think>"],
        max_new_tokens=8,
    )
    assert m.stop_reason == "length" and m.turns[0].num_tokens == 8 and m.turns[0].end == "length"


def test_max_rounds(world):
    m, _ = agree(world, [PRINT, PRINT2, ANSWER], max_rounds=2)
    assert m.stop_reason == "max_rounds" and len(m.turns) == 2
    assert [t.execution["stdout"].strip() for t in m.turns] == ["42", "again"]


def test_token_cap(world):
    """Round 2 gets the 5 tokens left and is cut there. Each driver counts its own budget (the
    message driver: generated tokens; the token driver: the whole sequence), so each cap is the
    count after round 1 plus 5."""
    long_answer = "<think>Now I look at the crop very carefully and compare every letter.</think>\n<answer>B</answer>"
    m1 = run_message(world, [PRINT, long_answer], max_rounds=1, name="m1")
    ro1 = run_token(world, [PRINT, long_answer], max_rounds=1, name="t1")
    used_m = sum(t.num_tokens for t in m1.turns)
    used_t = len(ro1.prompt_ids) + len(ro1.completion_ids)
    m = run_message(world, [PRINT, long_answer], max_total_tokens=used_m + 5, name="m2")
    ro = run_token(world, [PRINT, long_answer], max_length=used_t + 5, name="t2")
    assert view(m) == view(ro.trajectory)
    assert m.stop_reason == "token_cap" and m.turns[1].num_tokens == 5 and m.answer is None


def test_image_cap(world):
    m, ro = agree(world, [crop("a"), crop("b"), ANSWER], max_images=2)
    assert m.stop_reason == "image_cap" and len(m.turns) == 2
    assert len(m.output_images()) == 1 and len(ro.images) == 2  # input + the first crop; the second never enters
    assert m.turns[1].execution["ok"] and len(m.turns[1].execution["images"]) == 1 and m.turns[1].feedback == []


def test_repetition(world):
    m, _ = agree(world, ["<think>" + "I will zoom in on the sign. " * 60 + "</think><answer>A</answer>"])
    assert m.stop_reason == "repetition" and m.answer is None
    t = m.turns[0]
    assert t.finish_reason == "repetition" and t.end == "length" and "</answer>" not in t.text
    assert t.text.count("I will zoom in on the sign.") >= 3


def test_a_prefilled_code_segment_runs_before_the_first_round_in_both(world):
    # the script's segment index counts sandbox outputs, so the prefill's run is segment 0
    m, ro = agree(world, ["(the prefill)", ANSWER], prefill=crop("p"))
    assert [t.index for t in m.turns] == [-1, 0] and m.turns[0].finish_reason == "prefill"
    assert (m.stop_reason, m.answer) == ("answer", "B") and len(m.output_images()) == 1 and len(ro.images) == 2
    assert m.response_text().startswith(crop("p") + "\n<sandbox_output><image></sandbox_output>")


def test_every_stop_reason_is_covered():
    """This module covers every stop reason of the step decision but ``error`` (not a model's)."""
    from thyme.agent.step import STOP_REASONS

    names = {n for n in globals() if n.startswith("test_")}
    covered = {
        "answer": "test_answer_after_code",
        "no_answer": "test_no_answer",
        "length": "test_length",
        "max_rounds": "test_max_rounds",
        "token_cap": "test_token_cap",
        "image_cap": "test_image_cap",
        "repetition": "test_repetition",
    }
    assert set(STOP_REASONS) - {"error"} == set(covered) and set(covered.values()) <= names
