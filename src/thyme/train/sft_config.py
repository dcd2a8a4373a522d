"""Configuration of Thyme SFT (``thyme train sft``): one dataclass, the paper's defaults.

Stage 1 (paper Sec. 3.2; reference ``scripts/sft_stage1.sh``): Qwen2.5-VL-7B-Instruct, full
fine-tune, lr 1e-5, 3 epochs, global batch 128, max length 10240 tokens, per-image pixel budget
3211264, vision tower frozen, bf16, ZeRO-2, warm-up 5 %. Stage 2 (math annealing, reference
``scripts/sft_stage2.sh``): from the stage-1 checkpoint, computation data, lr 1e-6, 3 epochs,
image and text-only samples in separate batches.

Values come from the dataclass defaults, then a YAML file (``thyme train sft --config``; keys
are the field names, at the top level or under a ``sft:`` section), then ``--set key=value``
flags (YAML syntax for the value: ``--set learning_rate=2e-5``, ``--set report_to=[wandb]``).

Effective batch: ``per_device_train_batch_size x gradient_accumulation_steps x world size``. Set
``effective_batch_size`` (128, the paper's) and leave ``gradient_accumulation_steps`` empty:
the trainer derives it from the world size at launch (8 GPUs x 1 x 16 = 128, as the reference
ran; 1 GPU x 1 x 128 on one GPU). Or set ``gradient_accumulation_steps`` and
``effective_batch_size: null``; the effective batch is then logged.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import load_yaml
from ..errors import ThymeError

#: LoRA targets: the language model's attention and MLP projections (the vision tower stays as it is).
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class SFTRunConfig:
    """Everything ``thyme train sft`` needs. Every field has the paper's / reference's value.

    Data and masks:
        model: base checkpoint (hub id or folder); stage 2 starts from stage 1's ``output_dir``.
        train_files: JSONL files of Thyme SFT records (``thyme data convert`` / ``verify`` output).
        images_root: folder relative image paths start from (default: each file's folder).
        output_dir: checkpoints, logs and the final model (with processor and chat template).
        last_round_only: mask everything up to the second-to-last ``</sandbox_output>`` for
            records with two or more sandbox outputs (reference; see :mod:`thyme.data.masks`).
        max_pixels: per-image pixel budget, every image of a record (reference 3211264).
        min_pixels: per-image lower bound (``None``: the processor's, 3136).
        system_prompt: system prompt (``None``: Thyme's, byte for byte).
        max_length: samples longer than this many tokens (image tokens included) are dropped,
            as the reference's trainer did (10240); dropped samples are counted in the log.

    Optimisation:
        max_dropped_fraction: stop before training when more than this fraction of the records
            is dropped (too long, malformed, images missing); the reasons and the first ids are
            printed either way (default 0.01: 1%; 1.0 never stops).
        learning_rate: peak learning rate (stage 1: 1e-5; stage 2: 1e-6).
        num_train_epochs: epochs (3 in both stages).
        effective_batch_size: global batch in samples (128), see the module docstring.
        per_device_train_batch_size: samples per device per micro-step (reference: 1).
        gradient_accumulation_steps: micro-steps per optimizer step (``None``: derived).
        warmup_ratio: linear warm-up fraction (reference 0.05).
        lr_scheduler_type: schedule after warm-up (ms-swift's default, cosine).
        weight_decay: AdamW weight decay (ms-swift's default 0.1; the scripts kept it).
        max_grad_norm: gradient clipping (1.0).
        max_steps: stop after this many optimizer steps (-1: run the epochs).
        seed: seed of sampling and initialisation.

    Model:
        freeze_vision_tower: freeze the vision encoder (reference ``--freeze_vit true``, with
            ms-swift's default that also freezes the merger / aligner).
        train_merger: keep the vision-language merger trainable even when the tower is frozen.
        dtype: weights' dtype: ``auto`` (bfloat16 with a CUDA GPU, float32 otherwise),
            ``bfloat16``, ``float16``, ``float32``.
        bf16: bf16 mixed precision (``None``: on with a CUDA GPU, as the reference).
        attn_implementation: ``sdpa``, ``flash_attention_2`` (the reference's), ``eager`` or ``None``.
        gradient_checkpointing: recompute activations in the backward pass (saves memory).

    LoRA (through peft; off: full fine-tuning as the paper):
        use_lora: train LoRA adapters instead of the full model.
        lora_r, lora_alpha, lora_dropout: adapter rank, scale and dropout (ms-swift's 8 / 32 / 0.05).
        lora_target_modules: regex or list of module names (default: the language model's linear layers).
        merge_lora: at the end, also save the merged full model to ``<output_dir>/merged`` (loads in ``thyme run``).

    Batches:
        group_by_modality: batches hold only image samples or only text-only samples (stage 2).
        dataloader_num_workers: data-loading processes (rendering and image processing).

    Logging and checkpoints:
        logging_steps: log every this many optimizer steps (reference 5).
        save_strategy: ``epoch`` (reference), ``steps`` or ``no``.
        save_steps: with ``save_strategy: steps``.
        save_total_limit: checkpoints kept (reference 5).
        report_to: ``[tensorboard]``, ``[wandb]``, ``[none]``... (transformers' integrations).
        run_name: run name for the trackers.
        resume_from_checkpoint: ``latest`` (the newest checkpoint in ``output_dir``), a
            checkpoint folder, or ``None``.
        deepspeed: DeepSpeed JSON (``configs/deepspeed_zero2.json`` / ``_zero3.json``), used
            under ``accelerate launch``.
    """

    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    train_files: list[str] = field(default_factory=list)
    images_root: str | None = None
    output_dir: str = "runs/sft_stage1"
    last_round_only: bool = True
    max_pixels: int | None = 3211264
    min_pixels: int | None = None
    system_prompt: str | None = None
    max_length: int | None = 10240
    max_dropped_fraction: float = 0.01

    learning_rate: float = 1e-5
    num_train_epochs: float = 3.0
    effective_batch_size: int | None = 128
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int | None = None
    warmup_ratio: float = 0.05
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int = -1
    seed: int = 42

    freeze_vision_tower: bool = True
    train_merger: bool = False
    dtype: str = "auto"
    bf16: bool | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = True

    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Any = LANGUAGE_MODEL_LINEAR
    merge_lora: bool = True

    group_by_modality: bool = False
    dataloader_num_workers: int = 4

    logging_steps: int = 5
    save_strategy: str = "epoch"
    save_steps: int | None = None
    save_total_limit: int | None = 5
    report_to: list[str] = field(default_factory=lambda: ["none"])
    run_name: str | None = None
    resume_from_checkpoint: str | None = None
    deepspeed: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for name in ("learning_rate", "num_train_epochs"):
            if not float(getattr(self, name)) > 0:
                raise ThymeError(f"SFT config: {name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.max_dropped_fraction) <= 1.0:
            raise ThymeError(f"SFT config: max_dropped_fraction must be in [0, 1], got {self.max_dropped_fraction!r}")
        if self.per_device_train_batch_size < 1:
            raise ThymeError("SFT config: per_device_train_batch_size must be >= 1")
        if self.effective_batch_size is None and self.gradient_accumulation_steps is None:
            raise ThymeError("SFT config: set effective_batch_size or gradient_accumulation_steps")
        if self.save_strategy is False:  # YAML 1.1 reads a bare `no` as false
            self.save_strategy = "no"
        if self.save_strategy not in ("epoch", "steps", "no"):
            raise ThymeError(f"SFT config: save_strategy must be epoch, steps or no, got {self.save_strategy!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ThymeError(f"SFT config: dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")

    def accumulation_steps(self, world_size: int) -> int:
        """Gradient-accumulation steps for ``world_size`` processes.

        Raises:
            ThymeError: ``effective_batch_size`` is not a multiple of per-device batch x world size.
        """
        if self.gradient_accumulation_steps is not None:
            return int(self.gradient_accumulation_steps)
        per_step = self.per_device_train_batch_size * max(1, world_size)
        if self.effective_batch_size % per_step:
            raise ThymeError(
                f"effective_batch_size {self.effective_batch_size} is not a multiple of per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) x world size ({world_size})",
                "change per_device_train_batch_size, the number of processes, or set gradient_accumulation_steps",
            )
        return max(1, self.effective_batch_size // per_step)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: YAML-parsed value}``.

    Raises:
        ThymeError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ThymeError(f"--set expects key=value, got {item!r}", "e.g. --set learning_rate=2e-5")
        try:
            out[key.strip()] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_sft_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> SFTRunConfig:
    """Defaults <- YAML file (top-level keys or an ``sft:`` section) <- ``overrides``.

    Relative paths in the YAML (``train_files``, ``output_dir``, ``images_root``, ``deepspeed``,
    ``model`` when it names an existing folder) stay relative to the current folder, as the
    configs in ``configs/`` are written for runs from the repository root.

    Raises:
        ThymeError: unknown keys (naming them), bad values, unreadable file.
    """
    data = load_yaml(path)
    if "sft" in data and isinstance(data["sft"], dict):
        extra = set(data) - {"sft"}
        if extra:
            raise ThymeError(f"{path}: unknown section(s) {sorted(extra)} beside 'sft'")
        data = data["sft"]
    values: dict[str, Any] = {}
    _apply(values, data, f"config file {path}")
    _apply(values, overrides or {}, "--set")
    try:
        return SFTRunConfig(**values)
    except TypeError as e:
        raise ThymeError(f"SFT config: {e}") from None


def _apply(values: dict[str, Any], new: dict[str, Any], source: str) -> None:
    """Copy ``new`` into ``values`` (explicit ``null`` kept: it can switch a setting off)."""
    names = {f.name for f in dataclasses.fields(SFTRunConfig)}
    unknown = [k for k in new if k not in names]
    if unknown:
        raise ThymeError(f"{source}: unknown setting(s) {unknown} for SFTRunConfig", f"known settings: {sorted(names)}")
    hints = typing.get_type_hints(SFTRunConfig)
    for k, v in new.items():
        values[k] = _coerce(k, v, hints[k], source)


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Numbers written the YAML 1.1 way (``1e-5`` reads as a string) become numbers."""
    if not isinstance(value, str):
        return value
    args = set(typing.get_args(hint)) or {hint}
    for typ in (int, float):
        if typ in args:
            try:
                return typ(value)
            except ValueError:
                if typ is float or float not in args:
                    raise ThymeError(f"{source}: {name} must be a number, got {value!r}") from None
    return value
