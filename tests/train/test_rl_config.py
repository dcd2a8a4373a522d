"""The RL stage's configuration: a ``trl.GRPOConfig`` subclass with Thyme's fields, the same
``sandbox:`` / ``judge:`` sections as ``thyme run`` / ``thyme eval``, one variable per secret."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from thyme.errors import ThymeError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "rl_grpo_ats.yaml"


def _yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "rl.yaml"
    p.write_text(text)
    return p


def test_the_config_is_a_grpo_config_whose_trl_fields_keep_trls_help():
    from trl import GRPOConfig

    from thyme.train.rl.config import TRL_DEFAULTS, GRPOATSConfig, ThymeRLSettings, load_rl_config

    cfg = load_rl_config(None)
    assert isinstance(cfg, GRPOConfig) and isinstance(cfg, ThymeRLSettings)
    ours = {f.name: f for f in dataclasses.fields(GRPOATSConfig)}
    trl = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    assert set(trl) <= set(ours)  # every TRL field is there, under its own name
    for name in ("num_generations", "learning_rate", "beta", "save_steps"):  # Thyme default, TRL's meaning
        assert ours[name].metadata["help"] == trl[name].metadata["help"] and ours[name].metadata["source"], name
    for name in ("vllm_importance_sampling_correction", "warmup_steps", "adam_beta1"):  # untouched TRL fields
        assert ours[name].metadata.get("help") == trl[name].metadata.get("help")
        assert ours[name].default == trl[name].default
    for f in dataclasses.fields(ThymeRLSettings):  # Thyme's own: help and source each
        assert f.metadata.get("help") and f.metadata.get("source"), f.name
    assert not set(f.name for f in dataclasses.fields(ThymeRLSettings)) & set(trl)  # no TRL field copied by hand
    for name, (_default, source, _) in TRL_DEFAULTS.items():
        assert ours[name].metadata["source"] == source


def test_todays_defaults_are_kept():
    from thyme.train.rl.config import load_rl_config

    c = load_rl_config(None)
    expect = dict(
        model="Kwai-Keye/Thyme-SFT",
        output_dir="runs/rl_grpo_ats",
        max_pixels=2408448,
        num_generations=4,
        max_completion_length=3196,
        max_length=10240,
        max_rounds=4,
        max_images=6,
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.05,
        ats=True,
        ats_code_tokens="train",
        mask_truncated=False,
        repetition_span=32,
        repetition_repeats=3,
        repetition_window=1024,
        engine="hf",
        vllm_gpu_memory_utilization=0.55,
        wrong_result_value=0.0,
        format_weight=0.5,
        consistency_weight=0.5,
        learning_rate=5e-7,
        min_lr_rate=0.1,
        warmup_ratio=0.03,
        num_train_epochs=2.0,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=5,
        num_iterations=1,
        beta=0.01,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        max_grad_norm=1.0,
        weight_decay=0.1,
        max_steps=-1,
        seed=42,
        freeze_vision_tower=True,
        train_merger=True,
        dtype="auto",
        gradient_checkpointing=True,
        logging_steps=1,
        save_steps=100,
        save_total_limit=5,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    for k, v in expect.items():
        assert getattr(c, k) == v, k
    assert c.sandbox.timeout_s == 10 and c.judge.base_url is None
    # derived TRL values: the min-lr schedule, the warm-up ratio, whole groups per generation batch
    assert c.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and c.warmup_steps == pytest.approx(0.03)
    assert str(getattr(c.lr_scheduler_type, "value", c.lr_scheduler_type)) == "cosine_with_min_lr"
    assert c.steps_per_generation == 4 and c.generation_batch_size == 4  # 1 process x 1 x 5 is not whole groups of 4
    assert c.gradient_checkpointing_kwargs == {"use_reentrant": False} and c.use_vllm is False


def test_steps_per_generation_holds_whole_groups():
    from thyme.train.rl.config import generation_steps, load_rl_config

    assert generation_steps(1, 5, 4, 8) == 5  # 8 x 1 x 5 = 40 = 10 groups of 4, as the reference ran
    assert generation_steps(1, 5, 4, 1) == 4 and generation_steps(2, 1, 2, 1) == 1 and generation_steps(1, 5, 4, 1, 3) == 3
    c = load_rl_config(None, {"steps_per_generation": 8})  # an explicit count wins
    assert c.steps_per_generation == 8 and c.generation_batch_size == 8


def test_sections_beside_or_inside_rl_and_dotted_set_keys(tmp_path):
    from thyme.train.rl.config import RL_REQUIRED_LAYERS, load_rl_config

    beside = _yaml(
        tmp_path, "rl:\n  learning_rate: 1e-6\n  warmup_steps: 7\nsandbox:\n  timeout_s: 3\njudge:\n  base_url: http://j/v1\n  model: jm\n"
    )
    c = load_rl_config(beside, {"sandbox.allow_weaker": True, "judge.timeout_s": 5, "vllm_importance_sampling_correction": False})
    assert c.learning_rate == 1e-6 and c.warmup_steps == 7  # a TRL field from YAML; warmup_steps wins over warmup_ratio
    assert c.sandbox.timeout_s == 3 and c.sandbox.allow_weaker is True and c.sandbox.require == RL_REQUIRED_LAYERS
    assert (c.judge.base_url, c.judge.model, c.judge.timeout_s) == ("http://j/v1", "jm", 5.0)
    assert c.vllm_importance_sampling_correction is False
    top = _yaml(tmp_path, "learning_rate: 2.0e-6\nsandbox: {require: [seccomp]}\n")
    c = load_rl_config(top, {"judge_model": "short", "sandbox_timeout": 4})  # the old flat keys still read
    assert c.learning_rate == 2e-6 and c.sandbox.require == ("seccomp",) and c.judge.model == "short" and c.sandbox.timeout_s == 4


@pytest.mark.parametrize(
    "text, overrides, named",
    [
        (
            "rl: {}\neval: {limit: 3}\n",
            None,
            "eval",
        ),  # a section the stage does not take (agent: is taken: its keys map to the RL loop fields)
        ("sandbox: [seccomp]\n", None, "sandbox"),  # a section that is not a mapping
        ("sandbox: {timeoutt: 3}\n", None, "timeoutt"),  # a typo inside a section
        ("", {"sandbox.require": ["nolayer"]}, "nolayer"),  # a layer that does not exist
        ("", {"judge_api_key_env": "MY_KEY"}, "THYME_JUDGE_API_KEY"),  # removed: says what replaced it
        ("", {"learning_rat": 1}, "learning_rat"),
        ("", {"num_generations": 1}, "num_generations"),  # Thyme's check
        ("", {"ats_engine": "fast"}, "ats_engine"),  # the vLLM engines' ATS: auto, processor or resubmit
        ("", {"mask_truncated_completions": True}, "mask_truncated"),  # Thyme's trainer needs TRL's off
        ("rl: {sandbox: {timeout_s: 1}}\nsandbox: {timeout_s: 2}\n", None, "both"),
    ],
)
def test_bad_configs_are_named(tmp_path, text, overrides, named):
    from thyme.train.rl.config import load_rl_config

    with pytest.raises(ThymeError, match=named):
        load_rl_config(_yaml(tmp_path, text), overrides)


def test_judge_key_comes_from_the_one_variable_and_never_reaches_the_trainers_args(monkeypatch, caplog, tmp_path):
    from thyme.config import JUDGE_API_KEY_ENV
    from thyme.train.rl.config import config_record, load_rl_config
    from thyme.train.rl.run import judge_client, trainer_args

    assert JUDGE_API_KEY_ENV == "THYME_JUDGE_API_KEY"
    monkeypatch.delenv("THYME_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-model-server")
    cfg = load_rl_config(None, {"judge.base_url": "http://127.0.0.1:9/v1", "judge.model": "j"})
    caplog.set_level(logging.WARNING, logger="thyme.train.rl")
    assert judge_client(cfg).config.api_key is None  # the model server's key is not sent to the judge
    assert any("THYME_JUDGE_API_KEY" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("THYME_JUDGE_API_KEY", "sk-judge")
    assert judge_client(cfg).config.api_key == "sk-judge"
    cfg = load_rl_config(None, {"judge.base_url": "http://127.0.0.1:9/v1", "judge.model": "j", "judge.api_key": "sk-yaml"})
    assert judge_client(cfg).config.api_key == "sk-yaml"  # the section wins over the variable
    args = trainer_args(cfg)
    assert args.judge.api_key is None and cfg.judge.api_key == "sk-yaml"  # the trainer pickles and logs its args
    assert "sk-yaml" not in repr(args.to_dict()) and "sk-yaml" not in yaml.safe_dump(config_record(cfg))
    assert load_rl_config(None).judge.base_url is None and judge_client(load_rl_config(None)) is None


def test_verl_reward_reads_the_same_variable_and_refuses_the_removed_setting(monkeypatch):
    from thyme.integrations.verl import reward

    monkeypatch.setenv("THYME_JUDGE_API_KEY", "sk-judge")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-model-server")
    reward._judges.clear()
    assert reward._judge("http://127.0.0.1:9/v1", "j").config.api_key == "sk-judge"
    reward._judges.clear()
    with pytest.raises(ThymeError, match="THYME_JUDGE_API_KEY"):
        reward.compute_score("thyme", "<answer>A</answer>", "A", {}, judge_api_key_env="OPENAI_API_KEY")


def test_shipped_config_loads_and_the_record_is_yaml(tmp_path):
    from thyme.train.rl.config import config_record, load_rl_config

    c = load_rl_config(SHIPPED, {"output_dir": str(tmp_path)})
    rec = yaml.safe_load(yaml.safe_dump(config_record(c)))
    assert rec["learning_rate"] == 5e-7 and rec["sandbox"]["timeout_s"] == 10 and rec["num_generations"] == 4
    assert rec["judge"]["base_url"] is None and rec["model"] == "Kwai-Keye/Thyme-SFT"


def test_train_help_lists_thymes_fields_and_the_trl_defaults(capsys):
    from thyme.cli import main

    with pytest.raises(SystemExit):
        main(["train", "rl", "--help"])
    out = capsys.readouterr().out
    for text in (
        "sandbox:",
        "judge:",
        "THYME_JUDGE_API_KEY",
        "num_generations",
        "reference scripts/rl.sh --learning_rate 5e-7",
        "sandbox.allow_weaker",
    ):
        assert text in out, text


def test_the_agent_section_of_run_and_eval_sets_the_rl_loop_fields(tmp_path):
    """One YAML `agent:` section serves eval and RL: its keys reach the RL fields they map to,
    inside or beside the `rl:` key and through --set; a key RL has no use for is an error."""
    from thyme.errors import ThymeError
    from thyme.train.rl.config import load_rl_config

    cfg_file = tmp_path / "rl.yaml"
    cfg_file.write_text("rl:\n  model: m\nagent:\n  max_rounds: 3\n  max_new_tokens: 512\n  temperature: 0.7\n  ats: false\n")
    cfg = load_rl_config(str(cfg_file), {"agent.repetition_span": 16})
    assert (cfg.max_rounds, cfg.max_completion_length, cfg.temperature, cfg.ats, cfg.repetition_span) == (3, 512, 0.7, False, 16)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  model: m\nagent:\n  on_error: regenerate\n")
    with pytest.raises(ThymeError, match="agent.on_error"):
        load_rl_config(str(bad))
