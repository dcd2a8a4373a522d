"""Values that make no sense are refused once, where the settings are checked (issue 18, defect 9):
``--max-rounds 0``, ``--temperature -1``, ``--num-samples 0`` stop with exit 2 naming the flag and
the valid range, whichever command, flag or YAML section set them; greedy ``--num-samples 2``
warns that the samples are identical."""

from __future__ import annotations

import pytest
from PIL import Image

from thyme.agent import AgentConfig
from thyme.cli import main as thyme_main
from thyme.config import check_ranges


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(p)
    return p


def _run(argv, capsys):
    try:
        rc = thyme_main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--max-rounds", "0", "--max-rounds (max_rounds) must be >= 1, got 0"),
        ("--temperature", "-1", "--temperature (temperature) must be >= 0, got -1"),
        ("--max-new-tokens", "0", "--max-new-tokens (max_new_tokens) must be >= 1, got 0"),
    ],
)
def test_run_and_eval_refuse_values_that_make_no_sense(flag, value, expected, image, tmp_path, capsys):
    rc, err = _run(["run", "--image", str(image), "--question", "q", "--model", str(tmp_path / "no-model"), flag, value], capsys)
    assert rc == 2 and expected in err and "Traceback" not in err
    rc, err = _run(
        ["eval", "--benchmark", "vstar", "--data", str(tmp_path / "none.jsonl"), "--model", "m", "--out", str(tmp_path / "o"), flag, value],
        capsys,
    )
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_num_samples_zero_is_a_usage_error(image, capsys):
    rc, err = _run(["run", "--image", str(image), "--question", "q", "--model", "m", "--num-samples", "0"], capsys)
    assert rc == 2 and "--num-samples" in err and "must be >= 1, got 0" in err


def test_yaml_and_code_are_checked_the_same_way(image, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agent:\n  max_rounds: 0\n")
    rc, err = _run(["run", "--image", str(image), "--question", "q", "--model", "m", "--config", str(cfg)], capsys)
    assert rc == 2 and "max_rounds" in err and ">= 1" in err
    with pytest.raises(ValueError, match=r"--top-p \(top_p\) must be > 0 and <= 1, got 1.5"):
        AgentConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        AgentConfig(temperature=-0.5)
    check_ranges(AgentConfig(max_rounds=1, temperature=0.0, top_k=0, max_regenerations=0))  # the edges are valid


def test_greedy_samples_warn_and_sampled_ones_do_not(tmp_path, capsys):
    missing = str(tmp_path / "missing.png")  # stops right after the settings are checked
    rc, err = _run(["run", "--image", missing, "--question", "q", "--model", "m", "--num-samples", "2"], capsys)
    assert rc == 2 and "identical samples" in err and "--temperature" in err
    rc, err = _run(["run", "--image", missing, "--question", "q", "--model", "m", "--num-samples", "2", "--temperature", "0.7"], capsys)
    assert rc == 2 and "identical" not in err
