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

import os
from dataclasses import dataclass
from typing import Any


from ..config import load_config, setting
from ..constants import MAX_PIXELS
from ..errors import ThymeError

#: LoRA targets: the language model's attention and MLP projections (the vision tower stays as it is).
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class SFTRunConfig:
    """Everything ``thyme train sft`` needs (YAML keys: the field names; ``--set KEY=VALUE``).
    Every field has the paper's / reference's value; each field's meaning, default and source
    is in its metadata (``thyme train sft --help`` lists them).
    """

    model: str = setting("Qwen/Qwen2.5-VL-7B-Instruct", help="base checkpoint (hub id or folder); stage 2 starts from stage 1's output_dir.", source='ours')
    train_files: list[str] = setting(default_factory=list, help='JSONL files of Thyme SFT records (thyme data convert / verify output).', source='ours')
    images_root: str | None = setting(None, help="folder relative image paths start from (default: each file's folder).", source='ours')
    allow_absolute_paths: bool = setting(False, help="accept image paths that leave images_root (absolute, .., symlinks pointing out); only for records you trust (README: Paths in data).", source='ours')
    output_dir: str = setting("runs/sft_stage1", help='checkpoints, logs and the final model (with processor and chat template).', source='ours')
    last_round_only: bool = setting(True, help='mask everything up to the second-to-last </sandbox_output> for records with two or more sandbox outputs (reference; see :mod:`thyme.data.masks`).', source='reference')
    max_pixels: int | None = setting(MAX_PIXELS, help='per-image pixel budget, every image of a record.', source='reference')
    min_pixels: int | None = setting(None, help="per-image lower bound (none: the processor's, 3136).", source='ours')
    system_prompt: str | None = setting(None, help="system prompt (none: Thyme's, byte for byte).", source='ours')
    max_length: int | None = setting(10240, help="samples longer than this many tokens (image tokens included) are dropped, as the reference's trainer did; dropped samples are counted in the log.", source='paper / reference stage 1')
    max_dropped_fraction: float = setting(0.01, help="stop before training when more than this fraction of the records is dropped (too long, malformed, images missing); the reasons and the first ids are printed either way (1.0 never stops).", source="ours")

    learning_rate: float = setting(1e-5, help='peak learning rate (stage 2: 1e-6).', source='paper / reference stage 1')
    num_train_epochs: float = setting(3.0, help='epochs (both stages).', source='paper / reference stage 1')
    effective_batch_size: int | None = setting(128, help='global batch in samples, see the module docstring.', source='paper / reference stage 1')
    per_device_train_batch_size: int = setting(1, help='samples per device per micro-step.', source='reference')
    gradient_accumulation_steps: int | None = setting(None, help='micro-steps per optimizer step (none: derived from effective_batch_size).', source='ours')
    warmup_ratio: float = setting(0.05, help='linear warm-up fraction.', source='reference')
    lr_scheduler_type: str = setting("cosine", help="schedule after warm-up.", source='ms-swift default')
    weight_decay: float = setting(0.1, help="AdamW weight decay (the reference's scripts kept it).", source='ms-swift default')
    max_grad_norm: float = setting(1.0, help='gradient clipping.', source='ours')
    max_steps: int = setting(-1, help='stop after this many optimizer steps (-1: run the epochs).', source='ours')
    seed: int = setting(42, help='seed of sampling and initialisation.', source='ours')

    freeze_vision_tower: bool = setting(True, help="freeze the vision encoder (reference --freeze_vit true, with ms-swift's default that also freezes the merger / aligner).", source='paper / reference stage 1')
    train_merger: bool = setting(False, help='keep the vision-language merger trainable even when the tower is frozen.', source='ours')
    dtype: str = setting("auto", help="weights' dtype: auto (bfloat16 with a CUDA GPU, float32 otherwise), bfloat16, float16, float32.", source='ours')
    bf16: bool | None = setting(None, help='bf16 mixed precision (none: on with a CUDA GPU, as the reference).', source='reference')
    attn_implementation: str | None = setting(None, help="sdpa, flash_attention_2 (the reference's), eager or None.", source='reference')
    gradient_checkpointing: bool = setting(True, help='recompute activations in the backward pass (saves memory).', source='ours')

    use_lora: bool = setting(False, help='train LoRA adapters instead of the full model.', source='ours')
    lora_r: int = setting(8, help="LoRA adapter rank.", source='ms-swift default')
    lora_alpha: int = setting(32, help="LoRA adapter scale (alpha).", source='ms-swift default')
    lora_dropout: float = setting(0.05, help="LoRA adapter dropout.", source='ms-swift default')
    lora_target_modules: Any = setting(LANGUAGE_MODEL_LINEAR, help="regex or list of module names.", source='ours', show_default="the language model's linear layers")
    merge_lora: bool = setting(True, help='at the end, also save the merged full model to <output_dir>/merged (loads in thyme run).', source='ours')

    group_by_modality: bool = setting(False, help='batches hold only image samples or only text-only samples (stage 2).', source='ours')
    dataloader_num_workers: int = setting(4, help='data-loading processes (rendering and image processing).', source='ours')

    logging_steps: int = setting(5, help='log every this many optimizer steps.', source='reference')
    save_strategy: str = setting("epoch", help='epoch (reference), steps or no.', source='reference')
    save_steps: int | None = setting(None, help='with save_strategy: steps.', source='ours')
    save_total_limit: int | None = setting(5, help='checkpoints kept.', source='reference')
    report_to: list[str] = setting(default_factory=lambda: ["none"], help="[tensorboard], [wandb], [none]... (transformers' integrations).", source='ours')
    run_name: str | None = setting(None, help='run name for the trackers.', source='ours')
    resume_from_checkpoint: str | None = setting(None, help='latest (the newest checkpoint in output_dir), a checkpoint folder, or None.', source='ours')
    deepspeed: str | None = setting(None, help='DeepSpeed JSON (configs/deepspeed_zero2.json / _zero3.json), used under accelerate launch.', source='ours')

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


def load_sft_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> SFTRunConfig:
    """Defaults <- YAML file (top-level keys or an ``sft:`` section) <- ``overrides``
    (:func:`thyme.config.load_config`).

    Relative paths in the YAML (``train_files``, ``output_dir``, ``images_root``, ``deepspeed``,
    ``model`` when it names an existing folder) stay relative to the current folder, as the
    configs in ``configs/`` are written for runs from the repository root.

    Raises:
        ThymeError: unknown keys (naming them), bad values, unreadable file.
    """
    return load_config(SFTRunConfig, path, overrides, section="sft")
