"""The one step decision (``thyme.agent.step``): pure functions, each rule on its own."""

from __future__ import annotations

import pytest

from thyme.agent.step import Caps, decide, feedback_step, loop_finish, next_round, prefill_code
from thyme.backends.repetition import RepetitionRule

CAPS = Caps(max_rounds=3, max_new_tokens=100, max_total_tokens=1000, max_images=3)
CODE = "<think>x<code>\n```python\nprint(1)\n```\n</code>"
RULE = RepetitionRule(32, 3, 1024)


def test_a_code_segment_runs_its_code():
    d = decide(CODE, "stop", tokens_used=50, caps=CAPS)
    assert (d.action, d.end, d.code, d.stop_reason) == ("run_code", "code", "print(1)", None)


def test_answer_first_wins_over_later_code_and_is_extracted():
    d = decide("<answer>\\boxed{B}</answer><code>print(1)</code>", "stop", tokens_used=1, caps=CAPS)
    assert (d.action, d.stop_reason, d.answer, d.end) == ("finish", "answer", "B", "answer")


@pytest.mark.parametrize("text,reason,answer", [("<think>no idea</think>", "no_answer", None), ("<answer>C", "answer", "C")])
def test_end_of_turn(text, reason, answer):
    d = decide(text, "eos", tokens_used=1, caps=CAPS)
    assert (d.stop_reason, d.answer) == (reason, answer)


def test_a_cut_segment_is_length_or_token_cap_by_the_budget():
    assert decide("<think>abc", "length", tokens_used=999, caps=CAPS).stop_reason == "length"
    assert decide("<think>abc", "length", tokens_used=1000, caps=CAPS).stop_reason == "token_cap"


def test_a_loop_ends_the_trajectory_whatever_the_text_holds():
    d = decide("<answer>A</answer>", "repetition", tokens_used=1, caps=CAPS)
    assert (d.action, d.stop_reason, d.end, d.answer) == ("finish", "repetition", "length", None)


def test_a_block_the_context_opened_is_read_with_its_opening():
    d = decide("print(2)\n</code>", "stop", tokens_used=1, caps=CAPS, context_open="<code>\n")
    assert d.code == "print(2)"


def test_next_round_budget_and_caps():
    assert next_round(0, 0, CAPS) == (100, None)
    assert next_round(1, 950, CAPS) == (50, None)
    assert next_round(1, 1000, CAPS) == (0, "token_cap")
    assert next_round(3, 0, CAPS) == (0, "max_rounds")


def test_feedback_image_cap_token_cap_and_never_a_partial_feedback():
    img = [
        {"type": "text", "text": "\n<sandbox_output>"},
        {"type": "image", "image": "a.png"},
        {"type": "text", "text": "</sandbox_output>"},
    ]
    assert feedback_step(img, images_in_context=2, tokens_used=0, caps=CAPS).stop_reason is None
    capped = feedback_step(img + img[1:2], images_in_context=2, tokens_used=0, caps=CAPS)
    assert (capped.action, capped.stop_reason, capped.parts) == ("finish", "image_cap", [])
    calls = []
    fits = feedback_step(img, images_in_context=1, tokens_used=900, caps=CAPS, count_tokens=lambda p: calls.append(p) or 99)
    assert fits.action == "feed" and fits.parts == img and fits.tokens == 99
    no_room = feedback_step(img, images_in_context=1, tokens_used=900, caps=CAPS, count_tokens=lambda p: 100)
    assert (no_room.action, no_room.stop_reason, no_room.parts) == ("finish", "token_cap", [])
    # the image cap is checked before the feedback is encoded (no image opened for nothing)
    feedback_step(img * 3, images_in_context=2, tokens_used=0, caps=CAPS, count_tokens=lambda p: calls.append("late") or 0)
    assert "late" not in calls
    # a driver that cannot count feedback tokens: the budget already spent ends it
    assert feedback_step(img[:1], images_in_context=1, tokens_used=1000, caps=CAPS).stop_reason == "token_cap"


def test_loop_finish_applies_the_rule_only_where_the_generator_did_not():
    loop = "<think>" + "I will zoom in on the sign. " * 60
    assert loop_finish("length", loop, RULE, checked=False) == "repetition"
    assert loop_finish("length", loop, RULE, checked=True) == "length"  # the generator's word stands
    assert loop_finish("eos", loop, RULE, checked=False) == "eos"  # a finished turn is read as it is
    assert loop_finish("length", "".join(chr(0x4E00 + i) for i in range(2000)), RULE, checked=False) == "length"


def test_prefill_code_and_caps_validation():
    assert prefill_code(CODE) == "print(1)" and prefill_code("<think>") is None and prefill_code("") is None
    with pytest.raises(ValueError, match="max_images"):
        Caps(max_rounds=1, max_new_tokens=1, max_total_tokens=1, max_images=0)


def test_message_driver_sends_the_one_loop_rule_to_the_backend(tmp_path):
    from PIL import Image

    from thyme.agent import Agent, AgentConfig
    from thyme.backends.base import Backend, Generation

    seen = []

    class Spy(Backend):
        def generate(self, requests, stream=None):
            seen.extend(requests)
            return [Generation("<answer>A</answer>", "stop") for _ in requests]

    class NoSandbox:
        def session(self, images, shown_paths=None):
            import contextlib

            return contextlib.nullcontext(None)

    p = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(p)
    with Agent(Spy(), NoSandbox(), AgentConfig(repetition_span=20, repetition_repeats=4, repetition_window=500)) as agent:
        assert agent.run("Q", [str(p)]).stop_reason == "answer"
    assert seen[0].repetition == RepetitionRule(20, 4, 500)
    assert AgentConfig().repetition_rule() == RULE  # the same default rule as thyme train rl
