"""The SFT stage's configuration: a ``trl.SFTConfig`` subclass with Thyme's fields only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from thyme.errors import ThymeError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_config_is_an_sft_config_whose_trl_fields_keep_trls_help():
    from trl import SFTConfig

    from thyme.train.sft_config import TRL_DEFAULTS, SFTRunConfig, ThymeSFTSettings

    cfg = SFTRunConfig()
    assert isinstance(cfg, SFTConfig) and isinstance(cfg, ThymeSFTSettings)
    ours = {f.name: f for f in dataclasses.fields(SFTRunConfig)}
    trl = {f.name: f for f in dataclasses.fields(SFTConfig)}
    assert set(trl) <= set(ours)
    for name in ("adam_beta2", "warmup_steps", "eval_strategy"):  # untouched: TRL's help and default
        assert ours[name].metadata.get("help") == trl[name].metadata.get("help") and ours[name].default == trl[name].default
    for name in ("num_train_epochs", "weight_decay", "save_strategy"):  # Thyme's default, TRL's meaning
        assert ours[name].metadata["help"] == trl[name].metadata["help"] and ours[name].metadata["source"] == TRL_DEFAULTS[name][1]
    for f in dataclasses.fields(ThymeSFTSettings):
        assert f.metadata.get("help") and f.metadata.get("source"), f.name
    # the only name Thyme shares with TRL is max_length, with Thyme's meaning (drop, not truncate)
    assert {f.name for f in dataclasses.fields(ThymeSFTSettings)} & set(trl) == {"max_length"}


def test_defaults_derived_values_and_trl_fields_by_set():
    from thyme.config import parse_set
    from thyme.train.sft import trainer_args
    from thyme.train.sft_config import load_sft_config

    c = load_sft_config(CONFIGS / "sft_stage1.yaml", parse_set(["adam_beta2=0.95", "warmup_steps=3", "save_strategy=steps"]))
    assert (c.adam_beta2, c.warmup_steps, c.learning_rate, c.max_length) == (0.95, 3, 1e-5, 10240)
    assert c.gradient_accumulation_steps == 128 and c.accumulation_steps(8) == 16  # derived from effective_batch_size
    assert c.save_steps == 500 and c.bf16 is False and c.remove_unused_columns is False and c.packing is False
    assert c.dataset_kwargs == {"skip_prepare_dataset": True}
    args = trainer_args(c, 16)
    assert args.gradient_accumulation_steps == 16 and args.max_length is None and c.max_length == 10240
    given = load_sft_config(None, {"gradient_accumulation_steps": 4, "effective_batch_size": None})
    assert given.accumulation_steps(8) == 4


@pytest.mark.parametrize("overrides, named", [
    ({"packing": True}, "packing"),
    ({"remove_unused_columns": True}, "remove_unused_columns"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"adam_beta3": 1}, "adam_beta3"),
    ({"effective_batch_size": None}, "effective_batch_size"),
])
def test_bad_values_are_named(overrides, named):
    from thyme.train.sft_config import load_sft_config

    with pytest.raises(ThymeError, match=named):
        load_sft_config(None, overrides)
