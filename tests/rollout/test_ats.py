"""GRPO-ATS decoding (greedy inside code blocks) and the rolling-hash repetition detector."""

from __future__ import annotations

import random

import pytest

from thyme.backends.ats import GreedyInsideCode, code_open_after
from thyme.backends.repetition import RepetitionDetector, RepetitionRule, sequence_loops, substring_count_reference, text_loops

from ..conftest import CORPUS, needs_corpus


def test_repetition_rule_fires_on_loops_only_and_survives_collisions():
    assert text_loops("<think>" + "I will zoom in on the sign. " * 60)
    assert not text_loops("".join(chr(0x4E00 + i) for i in range(2000)))
    rng = random.Random(0)
    assert not sequence_loops([rng.randrange(150000) for _ in range(5000)])
    # a period-100 loop is caught once its first 32 tokens came back twice: by token 2 * 100 + 32
    d = RepetitionDetector(RepetitionRule(32, 3, 1024))
    seq = [rng.randrange(1000) for _ in range(100)] * 5
    hit = next(i for i, t in enumerate(seq) if d.push(t))
    assert hit == 2 * 100 + 31
    with pytest.raises(ValueError):
        RepetitionRule(32, 3, 50)
    assert substring_count_reference("abc" * 100) and not substring_count_reference("short")
    assert not substring_count_reference("".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(1000)))  # no loop: no hit


class _CharTok:
    """One character per token id (ord)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_greedy_inside_code_masks_only_between_tags_split_across_tokens():
    import torch

    text = "ab<code>xy</code>z"
    proc = GreedyInsideCode(_CharTok(), prompt_len=1, start_open=[False])
    vocab = 200
    masked_steps = []
    for step in range(len(text) + 1):
        ids = torch.tensor([[0] + [ord(c) for c in text[:step]]])
        scores = torch.randn(1, vocab)
        out = proc(ids, scores)
        if torch.isinf(out).any():
            assert (~torch.isinf(out)).sum() == 1 and out.argmax() == scores.argmax()
            masked_steps.append(step)
    # open after "<code>" (8 chars) until "</code>" is complete (17 chars)
    assert masked_steps == list(range(8, 17)) and proc.forced[0] == masked_steps
    assert code_open_after("x<code>\n```python\n") and not code_open_after("<code>a</code>")
    assert GreedyInsideCode(_CharTok(), 0, [True]).open == [True]


@needs_corpus
def test_run_ats_gives_identical_code_for_two_seeds_and_sampling_differs(tiny_checkpoint, tmp_path, capsys):
    from thyme.agent import Trajectory
    from thyme.cli import main

    image = str(CORPUS / "thyme/images/case6-1.jpg")
    prefill = "<think>Zoom in.\n<code>\n```python\n"

    def run(seed: int, ats: bool, samples: int = 1):
        out = tmp_path / f"s{seed}{'a' if ats else ''}.json"
        argv = ["run", "--model", str(tiny_checkpoint), "--image", image, "--question", "What is written?", "--prefill", prefill,
                "--temperature", "1", "--seed", str(seed), "--max-new-tokens", "24", "--max-rounds", "1", "--quiet",
                "--max-pixels", "12544", "--out", str(out), "--num-samples", str(samples)] + (["--ats"] if ats else [])
        assert main(argv) == 0
        if samples > 1:
            return [Trajectory.load(out.with_name(f"{out.stem}-{i}.json")) for i in range(samples)]
        return Trajectory.load(out)

    a, b = run(1, True), run(2, True)
    assert a.turns[0].text == b.turns[0].text and a.turns[0].text  # everything generated is inside the open block
    c, d = run(1, False), run(2, False)
    assert c.turns[0].text != d.turns[0].text  # plain sampling at T=1 differs between seeds
    assert c.turns[0].text != a.turns[0].text or d.turns[0].text != a.turns[0].text
    many = run(3, False, samples=3)
    assert len(many) == 3 and len({t.turns[0].text for t in many}) > 1
    capsys.readouterr()


def test_the_stopping_criterion_takes_one_rule_per_row():
    """The HF backend gives each request its own rule (``GenerationRequest.repetition``, from
    ``AgentConfig``): row 0 (span 4) stops on a 5-token loop that row 1 (span 32) lets run."""
    import torch

    from thyme.backends.repetition import RepetitionStoppingCriteria

    loop = [1, 2, 3, 4, 5] * 6
    crit = RepetitionStoppingCriteria(2, 2, [RepetitionRule(span=4, repeats=3, window=64), RepetitionRule(span=32, repeats=3, window=1024)])
    ids = torch.tensor([[0, 0] + loop, [0, 0] + loop])
    assert crit(ids).tolist() == [True, False]
    with pytest.raises(ValueError, match="2 repetition rules for 3 rows"):
        RepetitionStoppingCriteria(2, 3, [RepetitionRule(), RepetitionRule()])
