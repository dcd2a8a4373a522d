"""Configuration of Thyme SFT (``thyme train sft``): TRL's ``SFTConfig`` plus Thyme's fields.

:class:`SFTRunConfig` *is* a ``trl.SFTConfig`` (a subclass): every TRL / transformers training
argument keeps its name, type and TRL's help, and can be set in the YAML file or with ``--set``.
Thyme adds only its own fields (:class:`ThymeSFTSettings`: data, masks, the pixel budget, the
effective batch, model loading, LoRA) and sets the defaults of the TRL fields in
:data:`TRL_DEFAULTS`, each with its source. ``max_length`` is Thyme's (samples longer are
dropped, not truncated; the trainer gets TRL's ``max_length`` unset). ``SFTRunConfig`` is built
on first use (importing it imports TRL); :class:`ThymeSFTSettings` does not import TRL.

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

from ..config import built_once, derive_config_class, load_config, record_of, setting
from ..constants import MAX_PIXELS
from ..errors import ThymeError

#: LoRA targets: the language model's attention and MLP projections (the vision tower stays as it is).
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ThymeSFTSettings:
    """Thyme's fields of ``thyme train sft`` (YAML keys: the field names; ``--set KEY=VALUE``).
    Every field has the paper's / reference's value; each field's meaning, default and source
    is in its metadata (``thyme train sft --help`` lists them).
    """

    model: str = setting(
        "Qwen/Qwen2.5-VL-7B-Instruct", help="base checkpoint (hub id or folder); stage 2 starts from stage 1's output_dir.", source="ours"
    )
    train_files: list[str] = setting(
        default_factory=list, help="JSONL files of Thyme SFT records (thyme data convert / verify output).", source="ours"
    )
    images_root: str | None = setting(None, help="folder relative image paths start from (default: each file's folder).", source="ours")
    allow_absolute_paths: bool = setting(
        False,
        help="accept image paths that leave images_root (absolute, .., symlinks pointing out); only for records you trust (README: Paths in data).",
        source="ours",
    )
    last_round_only: bool = setting(
        True,
        help="mask everything up to the second-to-last </sandbox_output> for records with two or more sandbox outputs (reference; see :mod:`thyme.data.masks`).",
        source="reference",
    )
    max_pixels: int | None = setting(MAX_PIXELS, help="per-image pixel budget, every image of a record.", source="reference")
    min_pixels: int | None = setting(None, help="per-image lower bound (none: the processor's, 3136).", source="ours")
    system_prompt: str | None = setting(None, help="system prompt (none: Thyme's, byte for byte).", source="ours")
    max_length: int | None = setting(
        10240,
        help="samples longer than this many tokens (image tokens included) are dropped, as the reference's trainer did; dropped samples are counted in the log.",
        source="paper / reference stage 1",
    )
    max_dropped_fraction: float = setting(
        0.01,
        help="stop before training when more than this fraction of the records is dropped (too long, malformed, images missing); the reasons and the first ids are printed either way (1.0 never stops).",
        source="ours",
    )

    effective_batch_size: int | None = setting(
        128, help="global batch in samples, see the module docstring.", source="paper / reference stage 1"
    )
    warmup_ratio: float | None = setting(
        0.05, help="linear warm-up fraction (TRL's warmup_steps wins when set; null: warmup_steps).", source="reference"
    )

    freeze_vision_tower: bool = setting(
        True,
        help="freeze the vision encoder (reference --freeze_vit true, with ms-swift's default that also freezes the merger / aligner).",
        source="paper / reference stage 1",
    )
    train_merger: bool = setting(False, help="keep the vision-language merger trainable even when the tower is frozen.", source="ours")
    dtype: str = setting(
        "auto", help="weights' dtype: auto (bfloat16 with a CUDA GPU, float32 otherwise), bfloat16, float16, float32.", source="ours"
    )
    attn_implementation: str | None = setting(None, help="sdpa, flash_attention_2 (the reference's), eager or None.", source="reference")

    use_lora: bool = setting(False, help="train LoRA adapters instead of the full model.", source="ours")
    lora_r: int = setting(8, help="LoRA adapter rank.", source="ms-swift default")
    lora_alpha: int = setting(32, help="LoRA adapter scale (alpha).", source="ms-swift default")
    lora_dropout: float = setting(0.05, help="LoRA adapter dropout.", source="ms-swift default")
    lora_target_modules: Any = setting(
        LANGUAGE_MODEL_LINEAR, help="regex or list of module names.", source="ours", show_default="the language model's linear layers"
    )
    merge_lora: bool = setting(
        True, help="at the end, also save the merged full model to <output_dir>/merged (loads in thyme run).", source="ours"
    )

    group_by_modality: bool = setting(False, help="batches hold only image samples or only text-only samples (stage 2).", source="ours")

    def __post_init__(self) -> None:
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if not 0.0 <= float(self.max_dropped_fraction) <= 1.0:
            raise ThymeError(f"SFT config: max_dropped_fraction must be in [0, 1], got {self.max_dropped_fraction!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ThymeError(f"SFT config: dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")


#: TRL ``SFTConfig`` fields whose default Thyme sets: ``name: (default, source, help)`` (help
#: ``None``: TRL's own text; a text where Thyme's meaning differs).
TRL_DEFAULTS: dict[str, tuple[Any, str, str | None]] = {
    "output_dir": ("runs/sft_stage1", "ours", "checkpoints, logs and the final model (with processor and chat template)."),
    "learning_rate": (1e-5, "paper / reference stage 1", "peak learning rate (stage 2: 1e-6)."),
    "num_train_epochs": (3.0, "paper / reference stage 1", None),
    "per_device_train_batch_size": (1, "reference", None),
    "gradient_accumulation_steps": (
        None,
        "ours",
        "micro-steps per optimizer step (none: derived from effective_batch_size and the world size).",
    ),
    "lr_scheduler_type": ("cosine", "ms-swift default", None),
    "weight_decay": (0.1, "ms-swift default", None),
    "max_grad_norm": (1.0, "ours", None),
    "max_steps": (-1, "ours", None),
    "seed": (42, "ours", None),
    "bf16": (None, "reference", "bf16 mixed precision (none: on with a CUDA GPU, as the reference)."),
    "gradient_checkpointing": (True, "ours", "recompute activations in the backward pass (saves memory)."),
    "dataloader_num_workers": (4, "ours", None),
    "logging_steps": (5, "reference", None),
    "logging_first_step": (True, "ours", None),
    "save_strategy": ("epoch", "reference", None),
    "save_steps": (None, "ours", "with save_strategy: steps (none: 500)."),
    "save_total_limit": (5, "reference", None),
    "report_to": (["none"], "ours", None),
    "remove_unused_columns": (False, "ours: the collator reads the index columns", None),
    "dataset_kwargs": ({"skip_prepare_dataset": True}, "ours: the collator renders and masks the records", None),
}

#: TRL fields Thyme's trainer needs at one value (a config that sets another is refused).
TRL_FIXED: dict[str, tuple[Any, str]] = {
    "remove_unused_columns": (False, "the collator reads the index columns"),
    "packing": (False, "TRL refuses packing for vision data"),
    "padding_free": (False, "TRL refuses padding-free batches for vision data"),
}


def _world_size() -> int:
    """Processes of this run as the launcher says (accelerate / torchrun set ``WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def accumulation_steps(self: Any, world_size: int) -> int:
    """Gradient-accumulation steps for ``world_size`` processes (``gradient_accumulation_steps``
    when the config gives it, else ``effective_batch_size / (per_device x world)``).

    Raises:
        ThymeError: ``effective_batch_size`` is not a multiple of per-device batch x world size.
    """
    if getattr(self, "_accumulation_given", self.gradient_accumulation_steps is not None):
        return int(self.gradient_accumulation_steps)
    per_step = self.per_device_train_batch_size * max(1, world_size)
    if self.effective_batch_size % per_step:
        raise ThymeError(
            f"effective_batch_size {self.effective_batch_size} is not a multiple of per_device_train_batch_size "
            f"({self.per_device_train_batch_size}) x world size ({world_size})",
            "change per_device_train_batch_size, the number of processes, or set gradient_accumulation_steps",
        )
    return max(1, self.effective_batch_size // per_step)


def _sft_post_init(self: Any) -> None:
    """Thyme's checks and the TRL values Thyme derives, then ``SFTConfig.__post_init__``."""
    from trl import SFTConfig

    ThymeSFTSettings.__post_init__(self)
    if isinstance(self.report_to, str) and self.report_to != "none":
        self.report_to = [self.report_to]
    for name in ("learning_rate", "num_train_epochs"):
        if not float(getattr(self, name)) > 0:
            raise ThymeError(f"SFT config: {name} must be > 0, got {getattr(self, name)!r}")
    if self.per_device_train_batch_size < 1:
        raise ThymeError("SFT config: per_device_train_batch_size must be >= 1")
    if self.effective_batch_size is None and self.gradient_accumulation_steps is None:
        raise ThymeError("SFT config: set effective_batch_size or gradient_accumulation_steps")
    if self.save_strategy is False:  # YAML 1.1 reads a bare `no` as false
        self.save_strategy = "no"
    if str(getattr(self.save_strategy, "value", self.save_strategy)) not in ("epoch", "steps", "no"):
        raise ThymeError(f"SFT config: save_strategy must be epoch, steps or no, got {self.save_strategy!r}")
    for name, (value, why) in TRL_FIXED.items():
        if getattr(self, name, value) != value:
            raise ThymeError(f"SFT config: {name} must be {value}: {why}")
    if not hasattr(self, "_accumulation_given"):
        self._accumulation_given = self.gradient_accumulation_steps is not None
    if not self._accumulation_given:
        self.gradient_accumulation_steps = accumulation_steps(self, _world_size())
    import torch

    cuda = torch.cuda.is_available()
    if self.bf16 is None:
        self.bf16 = cuda
    if not cuda:
        self.dataloader_pin_memory = False
    if self.warmup_ratio is not None and not self.warmup_steps:
        self.warmup_steps = float(self.warmup_ratio)  # transformers 5: a float < 1 is a ratio
    if self.save_steps is None:
        self.save_steps = 500
    if (
        getattr(self, "activation_checkpointing", None) is None
        and "activation_checkpointing" in type(self).__dataclass_fields__
        and self.gradient_checkpointing is not None
    ):
        # transformers >= 5.11 names it activation_checkpointing (gradient_checkpointing: a deprecated alias)
        self.activation_checkpointing, self.gradient_checkpointing = bool(self.gradient_checkpointing), None
    SFTConfig.__post_init__(self)


def _build_sft_config_class() -> type:
    """``SFTRunConfig``: a dataclass subclass of ``trl.SFTConfig`` and :class:`ThymeSFTSettings`,
    with :data:`TRL_DEFAULTS` applied (built once; imports TRL)."""
    from trl import SFTConfig

    doc = (
        "Everything ``thyme train sft`` needs: a ``trl.SFTConfig`` (TRL's fields, help and checks) with "
        "Thyme's fields (:class:`ThymeSFTSettings`) and Thyme's defaults for the TRL fields in :data:`TRL_DEFAULTS`."
    )
    cls = derive_config_class("SFTRunConfig", ThymeSFTSettings, SFTConfig, TRL_DEFAULTS, post_init=_sft_post_init, module=__name__, doc=doc)
    cls.accumulation_steps = accumulation_steps
    return cls


sft_config_class = built_once(_build_sft_config_class)


def __getattr__(name: str) -> Any:  # PEP 562: ``from thyme.train.sft_config import SFTRunConfig``
    if name == "SFTRunConfig":
        return sft_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def settings_help() -> str:
    """The settings ``thyme train sft --help`` lists (without importing TRL)."""
    import dataclasses

    from ..config import help_text

    lines = [f"  {f.name}: {help_text(f)}" for f in dataclasses.fields(ThymeSFTSettings)]
    lines.append(
        "  TRL SFTConfig fields with Thyme's defaults (any other SFTConfig / TrainingArguments field is accepted too; TRL's docs):"
    )
    for name, (default, source, own_help) in TRL_DEFAULTS.items():
        shown = "none" if default is None else repr(default) if isinstance(default, str) else str(default)
        lines.append(f"  {name}: {own_help + ' ' if own_help else ''}(default {shown}; {source})")
    return "\n".join(lines)


def config_record(cfg: Any) -> dict[str, Any]:
    """What a run writes to ``thyme_sft_config.yaml``: Thyme's fields and the TRL fields Thyme
    sets or that differ from TRL's defaults (YAML-safe)."""
    from trl import SFTConfig

    return record_of(cfg, ThymeSFTSettings, SFTConfig, TRL_DEFAULTS)


def load_sft_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """``SFTRunConfig`` from defaults <- YAML file (top-level keys or an ``sft:`` section) <-
    ``overrides`` (:func:`thyme.config.load_config`).

    Relative paths in the YAML (``train_files``, ``output_dir``, ``images_root``, ``deepspeed``,
    ``model`` when it names an existing folder) stay relative to the current folder, as the
    configs in ``configs/`` are written for runs from the repository root.

    Raises:
        ThymeError: unknown keys (naming them), bad values, unreadable file.
    """
    return load_config(sft_config_class(), path, overrides, section="sft")
