"""``thyme train rl``: build everything from a :class:`~thyme.train.rl.config.GRPOATSConfig` and train.

:func:`train_rl` loads the processor (pixel budget applied: the rollouts' pad counts and the
training forward share it) and the policy (vision tower frozen, merger trainable as the
reference), reads the prompts (:mod:`thyme.train.rl.data`), starts the warm sandbox pool and the
judge client, builds TRL's ``GRPOConfig`` from the config (TRL names pass through), picks the
engine (``hf`` | ``vllm_colocate`` | ``vllm_server``), trains :class:`ThymeGRPOTrainer`, saves
the final model with processor and chat template (``thyme run --model <output_dir>`` loads it)
and returns the summary dict that ``--json`` prints.

Single process: ``thyme train rl --config configs/rl_grpo_ats.yaml``. Many GPUs:
``accelerate launch --config_file configs/accelerate_zero3.yaml -m thyme.cli train rl
--config configs/rl_grpo_ats.yaml`` (see the README).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from ...errors import ThymeError
from .config import GRPOATSConfig

logger = logging.getLogger(__name__)


def _dtype(cfg: GRPOATSConfig) -> Any:
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def steps_per_generation(cfg: GRPOATSConfig, world: int) -> int:
    """Micro-steps per generation batch: ``gradient_accumulation_steps`` when its batch holds whole
    groups (the reference: 8 GPUs x 1 x 5 = 40 = 10 groups of 4), else the smallest count that does
    (1 process x 1 x 4 = one group of 4); an explicit ``steps_per_generation`` wins."""
    if cfg.steps_per_generation:
        return int(cfg.steps_per_generation)
    per = cfg.per_device_train_batch_size * max(1, world)
    if (per * cfg.gradient_accumulation_steps) % cfg.num_generations == 0:
        return cfg.gradient_accumulation_steps
    s = 1
    while (per * s) % cfg.num_generations:
        s += 1
    return s


def grpo_args(cfg: GRPOATSConfig, world: int) -> Any:
    """TRL ``GRPOConfig`` of a run (TRL-named fields pass through)."""
    import torch
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda
    kw: dict[str, Any] = dict(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, steps_per_generation=steps_per_generation(cfg, world),
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
        beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, num_iterations=cfg.num_iterations,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_rate} if cfg.lr_scheduler_type == "cosine_with_min_lr" else None,
        warmup_steps=cfg.warmup_ratio, num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, seed=cfg.seed,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, bf16=bf16,
        gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=cfg.logging_steps, save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, report_to=cfg.report_to, run_name=cfg.run_name,
        deepspeed=cfg.deepspeed, remove_unused_columns=False, dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=cuda, mask_truncated_completions=False, log_completions=False,
        use_vllm=cfg.engine != "hf",
    )
    if cfg.engine == "vllm_colocate":
        kw.update(vllm_mode="colocate", vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, vllm_enable_sleep_mode=cfg.vllm_enable_sleep_mode,
                  vllm_max_model_length=cfg.max_length)
    elif cfg.engine == "vllm_server":
        kw.update(vllm_mode="server", vllm_server_base_url=cfg.vllm_server_base_url)
    if kw["gradient_checkpointing"]:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return GRPOConfig(**kw)


def make_runner_factory(cfg: GRPOATSConfig, processor: Any, sandbox: Any) -> Any:
    """``factory(trainer) -> RolloutRunner`` on the configured engine (built once the trainer exists)."""
    from ... import protocol
    from ...backends.hf import _placeholder_token_ids
    from ...backends.repetition import RepetitionRule
    from ...rollout import HFEngine, RolloutLimits, RolloutRunner, SamplingSettings, VLLMColocateEngine, VLLMServerEngine

    def factory(trainer: Any) -> RolloutRunner:
        model = trainer.accelerator.unwrap_model(trainer.model)
        tok = processor.tokenizer
        suppress = _placeholder_token_ids(processor, model)
        for t in ("<|vision_start|>", "<|vision_end|>"):
            v = tok.convert_tokens_to_ids(t)
            if isinstance(v, int) and v != tok.unk_token_id:
                suppress.append(v)
        eos = [tok.convert_tokens_to_ids("<|im_end|>")]
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        if cfg.engine == "hf":
            engine: Any = HFEngine(model, processor, suppress, eos, pad, kv_cache=cfg.kv_cache)
        elif cfg.engine == "vllm_colocate":
            engine = VLLMColocateEngine(trainer.vllm_generation.llm, tok, suppress)
        else:
            engine = VLLMServerEngine(trainer.vllm_generation.vllm_client, tok, eos)
        limits = RolloutLimits(cfg.max_rounds, cfg.max_completion_length, cfg.max_length, cfg.max_images, cfg.ats_code_tokens,
                               protocol.FeedbackConfig(separator=cfg.feedback_separator), cfg.prefill)
        settings = SamplingSettings(cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty, cfg.ats,
                                    repetition=RepetitionRule(cfg.repetition_span, cfg.repetition_repeats, cfg.repetition_window))
        return RolloutRunner(engine, processor, sandbox, limits, settings, Path(cfg.output_dir) / "rollout_images")

    return factory


def build_trainer(cfg: GRPOATSConfig, *, sandbox: Any = None, judge: Any = None, callbacks: list[Any] | None = None) -> Any:
    """Everything up to ``trainer.train()``. ``sandbox`` / ``judge`` may be injected (tests)."""
    import datasets
    from accelerate import PartialState
    from transformers import AutoModelForImageTextToText

    from ...backends.processors import check_model_source, hub_kwargs, load_error, load_processor
    from ..sft import check_reporters, freeze_vision
    from .data import check_prompt_images, load_prompts, to_dataset_rows
    from .trainer import trainer_class

    if not cfg.train_files:
        raise ThymeError("no train_files in the RL config", "pass --train-file RECORDS.jsonl (RL records or benchmark rows)")
    check_reporters(cfg.report_to)
    prompts = load_prompts(cfg.train_files, images_root=cfg.images_root, shown_path=cfg.shown_path)
    check_prompt_images(prompts, images_root=cfg.images_root, decode=cfg.check_images)
    state = PartialState()
    processor = load_processor(cfg.model, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    check_model_source(cfg.model)
    try:
        model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=_dtype(cfg), **hub_kwargs(cfg.model),
                                                            **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}))
    except Exception as e:
        raise load_error("model", cfg.model, e) from e
    if cfg.freeze_vision_tower:
        freeze_vision(model, train_merger=cfg.train_merger)
    if sandbox is None:
        from ...sandbox import Sandbox

        sandbox = Sandbox(timeout_s=cfg.sandbox_timeout)
    if judge is None and cfg.judge_base_url:
        from ...scoring.judge import JudgeClient, JudgeConfig

        judge = JudgeClient(JudgeConfig(base_url=cfg.judge_base_url, model=cfg.judge_model, api_key=os.environ.get(cfg.judge_api_key_env)))
    os.makedirs(cfg.output_dir, exist_ok=True)
    args = grpo_args(cfg, state.num_processes)
    dataset = datasets.Dataset.from_dict(to_dataset_rows(prompts))
    trainer = trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=processor, callbacks=callbacks,
        runner_factory=make_runner_factory(cfg, processor, sandbox), judge=judge,
        reward_options={"wrong_result_value": cfg.wrong_result_value, "format_weight": cfg.format_weight, "consistency_weight": cfg.consistency_weight},
        mask_truncated=cfg.mask_truncated, rollouts_path=str(Path(cfg.output_dir) / "rollouts.jsonl"),
    )
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


def train_rl(cfg: GRPOATSConfig, *, sandbox: Any = None, judge: Any = None, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Run GRPO-ATS; returns :func:`summary` (``global_step``, ``output_dir``, ``rollouts``,
    ``masked_rollouts``, ``code_blocks``, ``code_executed_ok``, ``engine_calls_per_code_block``,
    ``reward_mean``...).

    Raises:
        ThymeError / ModelLoadError: bad configuration or inputs (before any training).
    """
    from ..sft import resolve_resume  # the SFT stage's rule: 'latest' or a checkpoint folder

    own_sandbox = sandbox is None
    trainer = build_trainer(cfg, sandbox=sandbox, judge=judge, callbacks=callbacks)
    try:
        trainer.train(resume_from_checkpoint=resolve_resume(cfg))
        trainer.save_model(cfg.output_dir)  # weights + processor + chat template
        if trainer.args.should_save:
            Path(cfg.output_dir, "thyme_rl_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")
        return summary(trainer, cfg)
    finally:
        if own_sandbox:
            try:
                trainer._thyme_sandbox.close()
            except Exception:
                pass
