"""``thyme train rl``: build everything from a :class:`~thyme.train.rl.config.GRPOATSConfig` and train.

:func:`train_rl` reads the prompts and checks their images (:mod:`thyme.train.rl.data`), starts
the warm sandbox pool from the config's ``sandbox`` section (before anything loads: a layer the
section requires but this host lacks stops the run with a ConfinementError naming it), loads the
processor (pixel budget applied: the rollouts' pad counts and the training forward share it) and
the policy (vision tower frozen, merger trainable as the reference), builds the judge client from
the ``judge`` section, hands the config itself to the trainer as its ``GRPOConfig`` (it is one;
the judge's key left out), picks the engine (``hf`` | ``vllm_colocate`` | ``vllm_server``),
trains :class:`ThymeGRPOTrainer`, saves the final model with processor and chat template
(``thyme run --model <output_dir>`` loads it) and returns the summary dict that ``--json`` prints.

Single process: ``thyme train rl --config configs/rl_grpo_ats.yaml``. Many GPUs:
``accelerate launch --config_file configs/accelerate_zero3.yaml -m thyme.cli train rl
--config configs/rl_grpo_ats.yaml`` (see the README).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from ...errors import ThymeError
from .config import GRPOATSConfig, config_record

logger = logging.getLogger(__name__)


def _dtype(cfg: GRPOATSConfig) -> Any:
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def trainer_args(cfg: GRPOATSConfig) -> Any:
    """The ``GRPOConfig`` the trainer gets: ``cfg`` itself (a ``trl.GRPOConfig``), copied without
    the judge's key (the trainer pickles and logs its arguments)."""
    args = copy.copy(cfg)
    if cfg.judge.api_key:
        args.judge = dataclasses.replace(cfg.judge, api_key=None)
    return args


def start_sandbox(cfg: GRPOATSConfig) -> Any:
    """The run's sandbox from the config's ``sandbox`` section, started before anything loads.

    Raises:
        ConfinementError: a layer of ``sandbox.require`` is not active here (named, with why and
            what running without it gives up), unless ``sandbox.allow_weaker``: then it warns.
    """
    from ...sandbox import Sandbox

    sandbox = Sandbox(cfg.sandbox)
    if sandbox.missing_layers:
        logger.warning(
            "RL sandbox runs without required layer(s) %s (sandbox.allow_weaker is set)",
            ", ".join(name for name, _ in sandbox.missing_layers),
        )
    return sandbox


def judge_client(cfg: GRPOATSConfig) -> Any:
    """The judge of the config's ``judge`` section (None without ``base_url``); its key is the
    section's ``api_key`` or the environment variable ``THYME_JUDGE_API_KEY``."""
    if not cfg.judge.base_url:
        return None
    from ...config import JUDGE_API_KEY_ENV, MODEL_API_KEY_ENV, env_secret
    from ...scoring.judge import JudgeClient

    key = cfg.judge.api_key or env_secret(JUDGE_API_KEY_ENV)
    if key is None and env_secret(MODEL_API_KEY_ENV):
        logger.warning(
            "the judge gets no key: %s is not set (%s is the model server's key and is no longer sent to the judge)",
            JUDGE_API_KEY_ENV,
            MODEL_API_KEY_ENV,
        )
    return JudgeClient(dataclasses.replace(cfg.judge, api_key=key))


def make_runner_factory(cfg: GRPOATSConfig, processor: Any, sandbox: Any) -> Any:
    """``factory(trainer) -> RolloutRunner`` on the configured engine (built once the trainer exists)."""
    from ... import protocol
    from ...backends.repetition import RepetitionRule
    from ...chat import end_of_turn_ids, never_sampled_ids
    from ...rollout import RolloutLimits, RolloutRunner, SamplingSettings
    from ...rollout.registry import EngineContext, build_engine

    def factory(trainer: Any) -> RolloutRunner:
        model = trainer.accelerator.unwrap_model(trainer.model)
        tok = processor.tokenizer
        suppress = never_sampled_ids(tok, getattr(model, "config", None), processor)
        eos = end_of_turn_ids(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        engine = build_engine(
            cfg.engine,
            EngineContext(
                model=model,
                processor=processor,
                suppress_ids=tuple(suppress),
                eos_ids=tuple(eos),
                pad_id=pad,
                llm=getattr(getattr(trainer, "vllm_generation", None), "llm", None),
                client=getattr(getattr(trainer, "vllm_generation", None), "vllm_client", None),
                ats_engine=cfg.ats_engine,
            ),
        )
        if cfg.kv_cache and cfg.engine == "hf":
            engine.enable_kv_cache()  # HFEngine: a KV cache per rollout across rounds, cleared by the trainer each step
        limits = RolloutLimits(
            max_rounds=cfg.max_rounds,
            max_completion_length=cfg.max_completion_length,
            max_length=cfg.max_length,
            max_images=cfg.max_images,
            ats_code_tokens=cfg.ats_code_tokens,
            feedback=protocol.FeedbackConfig(separator=cfg.feedback_separator),
            prefill=cfg.prefill,
        )
        settings = SamplingSettings(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty,
            ats=cfg.ats,
            repetition=RepetitionRule(span=cfg.repetition_span, repeats=cfg.repetition_repeats, window=cfg.repetition_window),
        )
        return RolloutRunner(engine, processor, sandbox, limits, settings, Path(cfg.output_dir) / "rollout_images")

    return factory


def build_trainer(cfg: GRPOATSConfig, *, sandbox: Any = None, judge: Any = None, callbacks: list[Any] | None = None) -> Any:
    """Everything up to ``trainer.train()``. ``sandbox`` / ``judge`` may be injected (tests)."""
    import datasets
    from transformers import AutoModelForImageTextToText

    from ...backends.processors import check_model_source, hub_kwargs, load_error, load_processor
    from ..sft import check_reporters, freeze_vision
    from .data import check_prompt_images, load_prompts, to_dataset_rows
    from .trainer import trainer_class

    if not cfg.train_files:
        raise ThymeError("no train_files in the RL config", "pass --train-file RECORDS.jsonl (RL records or benchmark rows)")
    check_reporters(cfg.report_to)
    prompts = load_prompts(
        cfg.train_files, images_root=cfg.images_root, shown_path=cfg.shown_path, allow_absolute_paths=cfg.allow_absolute_paths
    )
    check_prompt_images(prompts, images_root=cfg.images_root, decode=cfg.check_images)
    if judge is None:
        judge = judge_client(cfg)  # a judge section it cannot use is an input error: before anything starts
    # the sandbox first (as thyme run): a layer the config requires but this host lacks stops
    # the run here, before the model loads
    own_sandbox = sandbox is None
    if own_sandbox:
        sandbox = start_sandbox(cfg)
    try:
        processor = load_processor(cfg.model, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        check_model_source(cfg.model)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                cfg.model,
                dtype=_dtype(cfg),
                **hub_kwargs(cfg.model),
                **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
            )
        except Exception as e:
            raise load_error("model", cfg.model, e) from e
        if cfg.freeze_vision_tower:
            freeze_vision(model, train_merger=cfg.train_merger)
        os.makedirs(cfg.output_dir, exist_ok=True)
        dataset = datasets.Dataset.from_dict(to_dataset_rows(prompts))
        trainer = trainer_class()(
            model=model,
            args=trainer_args(cfg),
            train_dataset=dataset,
            processing_class=processor,
            callbacks=callbacks,
            runner_factory=make_runner_factory(cfg, processor, sandbox),
            judge=judge,
            reward_options={
                "wrong_result_value": cfg.wrong_result_value,
                "format_weight": cfg.format_weight,
                "consistency_weight": cfg.consistency_weight,
            },
            mask_truncated=cfg.mask_truncated,
            rollouts_path=str(Path(cfg.output_dir) / "rollouts.jsonl"),
        )
    except BaseException:
        if own_sandbox:
            sandbox.close()
        raise
    trainer._thyme_sandbox = sandbox
    return trainer


def summary(trainer: Any, cfg: GRPOATSConfig) -> dict[str, Any]:
    """The ``--json`` summary of a run (see :func:`train_rl`)."""
    t = trainer.totals
    return {
        "output_dir": cfg.output_dir,
        "global_step": int(trainer.state.global_step),
        "rollouts": t["rollouts"],
        "masked_rollouts": t["masked_rollouts"],
        "mask_reasons": t["mask_reasons"],
        "stop_reasons": t["stop_reasons"],
        "code_blocks": t["code_blocks"],
        "code_executed_ok": t["code_executed_ok"],
        "engine_calls": t["engine_calls"],
        "engine_calls_per_code_block": (round(t["code_engine_calls"] / t["model_code_blocks"], 3) if t["model_code_blocks"] else None),
        "model_code_blocks": t["model_code_blocks"],
        "reward_mean": (t["reward_sum"] / t["reward_n"]) if t["reward_n"] else None,
        "rollouts_file": str(Path(cfg.output_dir) / "rollouts.jsonl"),
        "engine": cfg.engine,
        "loss_type": cfg.loss_type,
    }


def train_rl(
    cfg: GRPOATSConfig, *, sandbox: Any = None, judge: Any = None, callbacks: list[Any] | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run GRPO-ATS; returns :func:`summary` (``global_step``, ``output_dir``, ``rollouts``,
    ``masked_rollouts``, ``code_blocks``, ``code_executed_ok``, ``engine_calls_per_code_block``,
    ``reward_mean``...). ``overwrite``: start afresh in an ``output_dir`` holding an earlier run
    (:func:`thyme.train.sft.prepare_output_dir` refuses otherwise unless resuming).

    Raises:
        ThymeError / ModelLoadError: bad configuration or inputs (before any training).
    """
    from ..sft import prepare_output_dir, resolve_resume  # the SFT stage's rules: 'latest' or a checkpoint folder

    prepare_output_dir(cfg, overwrite=overwrite, stage="rl")

    own_sandbox = sandbox is None
    trainer = build_trainer(cfg, sandbox=sandbox, judge=judge, callbacks=callbacks)
    try:
        trainer.train(resume_from_checkpoint=resolve_resume(cfg))
        trainer.save_model(cfg.output_dir)  # weights + processor + chat template
        if trainer.args.should_save:
            Path(cfg.output_dir, "thyme_rl_config.yaml").write_text(yaml.safe_dump(config_record(cfg), sort_keys=False), encoding="utf-8")
        return summary(trainer, cfg)
    finally:
        if own_sandbox:
            try:
                trainer._thyme_sandbox.close()
            except Exception:
                pass
