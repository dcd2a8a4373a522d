"""Thyme SFT on TRL's ``SFTTrainer`` with our collator (``thyme train sft``).

One function, :func:`train_sft`, runs a stage from a :class:`~thyme.train.sft_config.SFTRunConfig`:
load the processor (pixel budget applied) and the model, freeze the vision tower, index the
records (dropping over-long and malformed ones), then train with ``SFTTrainer`` fed by
:class:`~thyme.train.collator.ThymeSFTCollator` (labels from :mod:`thyme.data.masks`), packing
and padding-free off (TRL refuses them for vision data), batches grouped by modality when asked
(stage 2). Checkpoints carry the processor and its chat template (``Trainer`` saves the
processing class beside the weights), so ``thyme run --model <output_dir>`` loads the result.

Single process: ``thyme train sft --config configs/sft_stage1.yaml``. Several GPUs / nodes:
``accelerate launch --config_file configs/accelerate_zero2.yaml -m thyme.cli train
--config configs/sft_stage1.yaml`` (ZeRO-3: ``accelerate_zero3.yaml``); the world size enters
the gradient-accumulation steps (see :mod:`thyme.train.sft_config`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..data.masks import MaskConfig, prepare_processor
from ..errors import ThymeError
from .collator import IndexStats, ModalityGroupedSampler, ThymeSFTCollator, build_index
from .sft_config import SFTRunConfig, config_record

logger = logging.getLogger(__name__)

_REPORTERS = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "wandb": ("wandb", "wandb")}


def mask_config(cfg: SFTRunConfig) -> MaskConfig:
    """The masking settings of a run."""
    return MaskConfig(
        last_round_only=cfg.last_round_only, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, system_prompt=cfg.system_prompt
    )


def check_reporters(report_to: list[str]) -> None:
    """Fail before loading a model when a logging integration is not installed.

    Raises:
        ThymeError: naming the integration and the package to install.
    """
    import importlib.util

    for r in report_to:
        if r in _REPORTERS and importlib.util.find_spec(_REPORTERS[r][0]) is None:
            raise ThymeError(
                f"report_to includes {r!r} but the {_REPORTERS[r][0]} package is not installed",
                f"pip install {_REPORTERS[r][1]}, or set report_to: [none]",
            )


def freeze_vision(model: Any, *, train_merger: bool = False) -> int:
    """Freeze the vision tower (optionally keeping its merger trainable); returns frozen parameters.

    Raises:
        ThymeError: the model has no recognisable vision tower.
    """
    from ..backends.hf import vision_tower

    try:
        tower = vision_tower(model)
    except AttributeError as e:
        raise ThymeError(f"cannot freeze the vision tower: {e}") from None
    n = 0
    for name, p in tower.named_parameters():
        if train_merger and name.startswith("merger."):
            continue
        p.requires_grad_(False)
        n += p.numel()
    return n


def _dtype(cfg: SFTRunConfig) -> Any:
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def load_model(cfg: SFTRunConfig) -> Any:
    """The model to train (weights in ``cfg.dtype``), vision tower frozen as configured.

    Raises:
        ModelLoadError: the checkpoint cannot be loaded.
    """
    from transformers import AutoModelForImageTextToText

    from ..backends.processors import check_model_source, hub_kwargs, load_error

    check_model_source(cfg.model)
    kw: dict[str, Any] = {"dtype": _dtype(cfg), **hub_kwargs(cfg.model)}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(cfg.model, **kw)
    except Exception as e:
        raise load_error("model", cfg.model, e) from e
    if cfg.freeze_vision_tower:
        freeze_vision(model, train_merger=cfg.train_merger)
    return model


def check_dropped(stats: IndexStats, cfg: SFTRunConfig, *, log: Any = None) -> None:
    """Say why records were dropped (count per reason, the first ids) and stop when more than
    ``cfg.max_dropped_fraction`` of them were.

    Raises:
        ThymeError: too many records dropped (before the model is loaded).
    """
    import sys

    log = log or (lambda s: print(s, file=sys.stderr))
    dropped = stats.records - stats.kept
    if not dropped:
        return
    reasons = stats.reasons or {k: v for k, v in (("longer than max_length", stats.too_long), ("malformed", stats.malformed)) if v}
    why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    ids = ", ".join(stats.dropped_ids[:5]) + (" ..." if dropped > 5 else "")
    frac = dropped / max(1, stats.records)
    text = f"{dropped} of {stats.records} record(s) dropped ({frac:.1%}): {why}; first: {ids}"
    if stats.examples:
        text += f"\n  e.g. {stats.examples[0]}"
    log(f"warning: {text}")
    if frac > cfg.max_dropped_fraction:
        raise ThymeError(
            f"too many training records dropped: {text}",
            f"fix the records (thyme data verify), raise max_length, or allow it: --set max_dropped_fraction={min(1.0, round(frac + 0.005, 3))} (now {cfg.max_dropped_fraction})",
        )


def _trainer_class() -> type:
    from trl import SFTTrainer

    class ThymeSFTTrainer(SFTTrainer):
        """``SFTTrainer`` whose training sampler can group batches by modality."""

        def __init__(self, *args: Any, has_image: list[bool] | None = None, **kwargs: Any):
            self._has_image = has_image
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if self._has_image is not None:
                return ModalityGroupedSampler(self._has_image, self.args.per_device_train_batch_size, seed=self.args.seed)
            return super()._get_train_sampler(train_dataset)

    return ThymeSFTTrainer


def build_trainer(cfg: SFTRunConfig, *, callbacks: list[Any] | None = None, show_progress: bool = True) -> tuple[Any, IndexStats]:
    """Everything up to ``trainer.train()``: processor, model, index, ``SFTConfig``, trainer.

    Returns:
        ``(trainer, index stats)``.

    Raises:
        ThymeError / ModelLoadError: bad configuration, missing files, model not loadable.
    """
    import datasets
    from accelerate import PartialState

    from ..backends.processors import load_processor

    if not cfg.train_files:
        raise ThymeError("no train_files in the SFT config", "list JSONL files of Thyme SFT records under train_files")
    check_reporters(cfg.report_to)
    if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
        raise ThymeError(f"DeepSpeed config not found: {cfg.deepspeed}", "use configs/deepspeed_zero2.json or configs/deepspeed_zero3.json")
    state = PartialState()
    world = state.num_processes
    accum = cfg.accumulation_steps(world)
    from ..jsonl import ensure_writable

    ensure_writable(cfg.output_dir, what="output_dir", folder=True)
    mask = mask_config(cfg)
    processor = prepare_processor(load_processor(cfg.model, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels), mask)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with state.main_process_first():  # rank 0 builds the index, the others read its cache
        cols, stats = build_index(
            cfg.train_files,
            processor,
            mask,
            model=cfg.model,
            images_root=cfg.images_root,
            allow_absolute_paths=cfg.allow_absolute_paths,
            max_length=cfg.max_length,
            cache_dir=cfg.output_dir,
            show_progress=show_progress and state.is_main_process,
        )
    logger.info("index: %s", stats)
    check_dropped(stats, cfg, log=None if state.is_main_process else (lambda s: None))
    model = load_model(cfg)
    dataset = datasets.Dataset.from_dict({k: cols[k] for k in ("file", "offset", "has_image", "length")})
    args = trainer_args(cfg, accum)
    peft_config = None
    if cfg.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
    collator = ThymeSFTCollator(
        processor,
        mask,
        cfg.train_files,
        images_root=cfg.images_root,
        max_length=cfg.max_length,
        allow_absolute_paths=cfg.allow_absolute_paths,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
        has_image=list(cols["has_image"]) if cfg.group_by_modality else None,
    )
    return trainer, stats


def trainer_args(cfg: SFTRunConfig, accumulation: int) -> Any:
    """The ``SFTConfig`` the trainer gets: ``cfg`` itself (a ``trl.SFTConfig``), copied with the
    accumulation steps of this world size and TRL's ``max_length`` unset (Thyme's drops longer
    samples while indexing; TRL's would truncate)."""
    import copy

    args = copy.copy(cfg)
    args.gradient_accumulation_steps = int(accumulation)
    args.max_length = None
    return args


#: What a finished (or interrupted) training run leaves in its ``output_dir`` (TRL's checkpoints,
#: the saved model with its processor, Thyme's config record and RL rollouts): the files
#: ``--overwrite`` removes. Anything else in the folder is the user's and is never touched.
RUN_DIRS = ("checkpoint-*", "merged", "rollout_images")
RUN_FILES = (
    "thyme_sft_config.yaml",
    "thyme_rl_config.yaml",
    "rollouts.jsonl",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "training_args.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
#: The files whose presence means "a run was here" (a model alone may be a hand-placed base
#: checkpoint; these are written only by a training run).
_RUN_MARKERS = ("checkpoint-*", "thyme_sft_config.yaml", "thyme_rl_config.yaml", "rollouts.jsonl", "training_args.bin")


def earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """The names in ``output_dir`` that show an earlier training run (sorted; empty: none)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted({p.name for pat in _RUN_MARKERS for p in d.glob(pat)})


def prepare_output_dir(cfg: Any, *, overwrite: bool = False, stage: str = "sft") -> None:
    """Refuse to train into an ``output_dir`` holding an earlier run unless resuming or told to
    start afresh (``cfg``: a stage config with ``output_dir``, ``resume_from_checkpoint`` and
    ``model``). Runs before anything loads.

    A new run there would overwrite the old model silently, leave the old checkpoints beside the
    new ones (a later ``--resume latest`` would pick the old run) and append to ``rollouts.jsonl``.
    With ``overwrite`` the old run's files (:data:`RUN_DIRS`, :data:`RUN_FILES`, the Trainer's
    ``runs/*`` TensorBoard event folders and its model card ``README.md``) are removed first (by
    the main process only); the folder's other content is kept.

    Raises:
        ThymeError: an earlier run is there (naming what was found, ``--resume`` and
            ``--overwrite``); ``overwrite`` together with a resume; ``overwrite`` of the folder
            the model is loaded from.
    """
    import shutil

    out = Path(cfg.output_dir)
    if overwrite and cfg.resume_from_checkpoint:
        raise ThymeError("--overwrite and --resume contradict each other", "pass one of them")
    found = earlier_run(out)
    if not found or cfg.resume_from_checkpoint:
        return
    if not overwrite:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ThymeError(
            f"output_dir {out} holds an earlier training run ({shown}); a new run would overwrite its model"
            " and mix its checkpoints" + (" and rollouts" if stage == "rl" else ""),
            "pass --resume to continue it, --overwrite to start afresh in this folder (removes the old run's checkpoints,"
            " model files and rollouts), or a new --output-dir",
        )
    if Path(str(cfg.model)).is_dir() and Path(str(cfg.model)).resolve() == out.resolve():
        raise ThymeError(
            f"--overwrite would remove the model this run starts from ({cfg.model} is the output_dir)",
            "pass a new --output-dir, or copy the model elsewhere first",
        )
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return  # the main process clears the folder
    for pat in RUN_DIRS:
        for p in out.glob(pat):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
    for pat in RUN_FILES:
        for p in out.glob(pat):
            if p.is_file() or p.is_symlink():
                p.unlink()
    logs = out / "runs"  # the Trainer's TensorBoard logs: a folder per run holding only event files
    for d in logs.glob("*") if logs.is_dir() and not logs.is_symlink() else ():
        if d.is_dir() and not d.is_symlink() and all(f.name.startswith("events.out.tfevents.") for f in d.iterdir()):
            shutil.rmtree(d)
    card = out / "README.md"  # the model card the Trainer writes (a user's README is kept)
    if card.is_file() and not card.is_symlink() and "generated_from_trainer" in card.read_text(encoding="utf-8", errors="replace")[:2000]:
        card.unlink()
    logger.info("--overwrite: removed the earlier run's files from %s", out)


def resolve_resume(cfg: Any) -> str | None:
    """The checkpoint to resume from (``cfg``: a stage config with ``resume_from_checkpoint`` and
    ``output_dir``; SFT and RL alike): ``latest`` -> newest ``checkpoint-*`` in ``output_dir`` (or none).

    Raises:
        ThymeError: a named checkpoint folder does not exist.
    """
    r = cfg.resume_from_checkpoint
    if not r:
        return None
    if r == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(cfg.output_dir) if Path(cfg.output_dir).is_dir() else None
    if not Path(r).is_dir():
        raise ThymeError(f"checkpoint to resume from not found: {r}", "pass a checkpoint-* folder or 'latest'")
    return r


def train_sft(
    cfg: SFTRunConfig, *, callbacks: list[Any] | None = None, show_progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Run one SFT stage; see the module docstring.

    Returns:
        ``{"output_dir", "global_step", "train_loss", "records", "dropped_too_long",
        "dropped_malformed", "with_image", "text_only", "gradient_accumulation_steps",
        "effective_batch_size", "merged_dir"}``.

    ``overwrite``: start afresh in an ``output_dir`` holding an earlier run (see
    :func:`prepare_output_dir`, which refuses otherwise unless resuming).

    Raises:
        ThymeError / ModelLoadError: bad configuration or inputs (before any training).
    """
    prepare_output_dir(cfg, overwrite=overwrite, stage="sft")
    trainer, stats = build_trainer(cfg, callbacks=callbacks, show_progress=show_progress)
    resume = resolve_resume(cfg)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(cfg.output_dir)  # weights (or adapter) + processor + chat template
    merged_dir = None
    if trainer.args.should_save:
        Path(cfg.output_dir, "thyme_sft_config.yaml").write_text(yaml.safe_dump(config_record(cfg), sort_keys=False), encoding="utf-8")
        if cfg.use_lora and cfg.merge_lora:
            merged_dir = str(Path(cfg.output_dir) / "merged")
            model = trainer.accelerator.unwrap_model(trainer.model)
            merged = model.merge_and_unload()
            merged.save_pretrained(merged_dir)
            trainer.processing_class.save_pretrained(merged_dir)
    world = trainer.args.world_size
    return {
        "output_dir": cfg.output_dir,
        "global_step": int(trainer.state.global_step),
        "train_loss": float(result.training_loss) if result.training_loss is not None and math.isfinite(result.training_loss) else None,
        "records": stats.kept,
        "dropped_too_long": stats.too_long,
        "dropped_malformed": stats.malformed,
        "with_image": stats.with_image,
        "text_only": stats.text_only,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "effective_batch_size": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps * world,
        "merged_dir": merged_dir,
    }


def summary_json(d: dict[str, Any]) -> str:
    return json.dumps(d, ensure_ascii=False)
