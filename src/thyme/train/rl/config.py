"""Configuration of ``thyme train rl`` (GRPO-ATS): TRL's ``GRPOConfig`` plus Thyme's own fields.

:class:`GRPOATSConfig` *is* a ``trl.GRPOConfig`` (a subclass): every TRL / transformers training
argument keeps its name, type and TRL's own help text, and can be set in the YAML file or with
``--set`` (``--set warmup_steps=10``, ``--set vllm_importance_sampling_correction=false``). Thyme
adds only what TRL does not have (:class:`ThymeRLSettings`: the rollout protocol, the rewards,
the model loading, the sandbox and judge sections) and changes the defaults of the TRL fields
listed in :data:`TRL_DEFAULTS` to the reference's ``scripts/rl.sh`` values, each with its source.

Values: the defaults, then a YAML file (``--config``; the fields at its top level or under an
``rl:`` section, with the ``sandbox:`` and ``judge:`` sections beside them or inside), then
``--set key=value`` (YAML syntax; ``--set sandbox.allow_weaker=true`` reaches a section's field).
The sections are the same config classes ``thyme run`` / ``thyme eval`` read
(:class:`thyme.sandbox.SandboxConfig`, :class:`thyme.scoring.judge.JudgeConfig`).

The sandbox section defaults to *every* confinement layer required (:data:`RL_REQUIRED_LAYERS`:
RL runs the most model-written code of any stage): a host that lacks one stops the run before
the model loads, naming the layer; ``sandbox: {allow_weaker: true}`` is the explicit opt-out
(the sandbox then starts with what the host allows and warns, naming each missing layer).

The judge's key comes from the judge section's ``api_key`` or else the environment variable
``THYME_JUDGE_API_KEY`` (:data:`thyme.config.JUDGE_API_KEY_ENV`, the same as ``thyme eval``).

Loss normaliser: the paper's GRPO-ATS objective divides by ``sum_i |tau_i|`` over model tokens
of the whole batch. TRL's ``loss_type="dapo"`` (its default) divides by the global count of
active tokens (``completion_mask * tool_mask``), so with sandbox tokens in ``tool_mask = 0`` it
is that normaliser; ``grpo`` would average per sequence first, ``dr_grpo`` divides by
``B x max_completion_length``.

``GRPOATSConfig`` is built on first use (``from thyme.train.rl.config import GRPOATSConfig``
imports TRL); :class:`ThymeRLSettings`, :data:`TRL_DEFAULTS` and :func:`settings_help` do not.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ...config import built_once, derive_config_class, help_text, load_config, record_of, setting
from ...errors import ThymeError
from ...sandbox.config import LAYERS, SandboxConfig
from ...scoring.judge import JudgeConfig

RLSH = "reference scripts/rl.sh"

#: The sandbox layers RL requires by default: every confinement layer ``thyme sandbox doctor``
#: reports (:data:`thyme.sandbox.config.LAYERS`); ``allow_weaker: true`` opts out.
RL_REQUIRED_LAYERS: tuple[str, ...] = tuple(LAYERS)


def rl_sandbox_config() -> SandboxConfig:
    """The RL stages' default sandbox section: every confinement layer required, the
    reference's 10 s per execution (``EXEC_TIME_LIMIT``)."""
    return SandboxConfig(require=RL_REQUIRED_LAYERS)


#: Old or short keys still read: ``--set judge_model=...`` is ``--set judge.model=...``; ``None``:
#: removed (the error says what replaced it).
#: The ``agent:`` section of run / eval (:class:`thyme.agent.loop.AgentConfig`) as the RL fields
#: it maps to, so one YAML section can hold the loop settings for eval and RL alike (a key of
#: ``agent`` that RL has no use for, e.g. ``on_error``, is an error naming it).
AGENT_SECTION: dict[str, str] = {
    "max_rounds": "max_rounds",
    "max_new_tokens": "max_completion_length",
    "max_images": "max_images",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "ats": "ats",
    "prefill": "prefill",
    "feedback_separator": "feedback_separator",
    "repetition_span": "repetition_span",
    "repetition_repeats": "repetition_repeats",
    "repetition_window": "repetition_window",
    "shown_path": "shown_path",
}

RL_ALIASES: dict[str, str | None] = {
    "judge_base_url": "judge.base_url",
    "judge_model": "judge.model",
    "sandbox_timeout": "sandbox.timeout_s",
    "judge_api_key_env": None,
    **{f"agent.{k}": v for k, v in AGENT_SECTION.items()},
}


def _f(default: Any, help: str, source: str) -> Any:
    """:func:`thyme.config.setting` in the positional shape this long table reads best in."""
    if isinstance(default, (list, dict)):
        return setting(default_factory=lambda d=default: type(d)(d), help=help, source=source)
    return setting(default, help=help, source=source)


@dataclass
class RLRolloutSettings:
    """The rollout protocol and the sandbox: what ``thyme train rl`` and the veRL agent loop share
    (per-field help and source in the metadata)."""

    max_length: int = _f(10240, "total tokens of a rollout (prompt, images and completion)", RLSH + " --max_length 10240")
    max_rounds: int = _f(4, "engine calls (generation rounds) per rollout", "reference GEN_ITER_LIMIT=4")
    max_images: int = _f(6, "images per rollout, input included", RLSH + " vllm_limit_mm_per_prompt image=6")
    ats: bool = _f(
        True, "adaptive temperature sampling: tokens inside an open <code> block greedy, others at temperature", "paper Sec. 3.3 (GRPO-ATS)"
    )
    ats_code_tokens: str = _f(
        "train",
        "greedy code tokens: 'train' (in the loss, as the reference) or 'mask' (out of loss, KL and normaliser); their sampling log-probs are NaN either way",
        "reference trains them; mask: ours",
    )
    mask_truncated: bool = _f(
        False,
        "drop rollouts that hit a cap (length, token_cap, image_cap, max_rounds, repetition) from the loss (Mini-o3's exceed mask)",
        "reference: off (overlong_filter is inert in O3 mode)",
    )
    repetition_span: int = _f(32, "rolling-hash loop rule: span of tokens", "paper Sec. 3.3 Rabin-Karp; rule ours")
    repetition_repeats: int = _f(3, "rolling-hash loop rule: occurrences of one span that stop a segment", "ours")
    repetition_window: int = _f(1024, "rolling-hash loop rule: tokens looked back over", "ours")
    prefill: str = _f(
        "",
        "text every rollout's assistant message starts with (given: out of the loss); a code segment ending in </code> runs before the first call",
        "ours (thyme run --prefill)",
    )
    feedback_separator: str = _f("\n", "text between </code> and <sandbox_output>", "released Thyme records")
    sandbox: SandboxConfig = setting(
        default_factory=rl_sandbox_config,
        help="the sandbox section (fields of thyme.sandbox.SandboxConfig, as in thyme run / eval configs): require lists the layers that must be active, "
        "else the run stops before the model loads naming the layer; allow_weaker: true accepts a weaker sandbox with a warning; timeout_s: seconds per code execution",
        source="ours (reference EXEC_TIME_LIMIT=10 s)",
        show_default="every confinement layer required, timeout_s 10",
    )

    def __post_init__(self) -> None:
        if isinstance(self.sandbox, dict):  # keyword construction with a plain mapping
            self.sandbox = dataclasses.replace(rl_sandbox_config(), **self.sandbox)
        checks = [
            (self.ats_code_tokens in ("train", "mask"), "ats_code_tokens must be train or mask"),
            (self.max_rounds >= 1 and self.max_images >= 1, "max_rounds and max_images must be >= 1"),
            (self.max_length > 0, "max_length must be positive"),
            (isinstance(self.sandbox, SandboxConfig), "sandbox must be a sandbox section (thyme.sandbox.SandboxConfig)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ThymeError(f"RL config: {msg}")


@dataclass
class ThymeRLSettings(RLRolloutSettings):
    """Thyme's fields of ``thyme train rl`` (those TRL's ``GRPOConfig`` does not have)."""

    # ---- data and model
    model: str = _f(
        "Kwai-Keye/Thyme-SFT",
        "policy checkpoint to start from (the SFT model; hub id or folder)",
        "paper Sec. 3.3: RL starts from the SFT model",
    )
    train_files: list = _f(
        [],
        "JSONL files: RL records (messages, images, solution, question) or benchmark rows (question, options, answer, image)",
        "thyme data convert output / benchmark annotations",
    )
    images_root: str | None = _f(None, "folder relative image paths start from (default: each file's folder)", "ours")
    allow_absolute_paths: bool = _f(
        False,
        "accept image paths that leave images_root (absolute, .., symlinks pointing out); only for train files you trust (README: Paths in data)",
        "ours",
    )
    max_pixels: int | None = _f(
        2408448, "per-image pixel budget, input and sandbox images, rollout and training forward alike", RLSH + " --max_pixels"
    )
    min_pixels: int | None = _f(None, "per-image lower pixel bound (None: the processor's)", "processor default")
    shown_path: str | None = _f(None, "image path shown in the prompt ({name}, {path}); None: the real path", "reference: real paths")
    check_images: bool = _f(
        True,
        "before the model loads, decode every train image fully (a missing image is always an error: its rollouts would be masked at every step)",
        "ours (as thyme run / thyme eval check their inputs)",
    )

    # ---- generation engine
    engine: str = _f(
        "hf",
        "generation engine: hf (transformers generate; CPU / one GPU), vllm_colocate, vllm_server (sets TRL's use_vllm and vllm_mode)",
        "ours (reference: vLLM colocate)",
    )
    ats_engine: str = _f(
        "auto",
        "how the vLLM engines do ATS: 'processor' (thyme's vLLM logits processor, one engine call per code block; vLLM loads it where thyme is installed), 'resubmit' (stop at <code>, resubmit at temperature 0: two calls per block), 'auto' (vllm_colocate: processor when this environment registers it; vllm_server: resubmit)",
        "resubmit: reference; processor: ours (issue 17)",
    )
    kv_cache: bool = _f(
        False,
        "engine hf: keep each rollout's KV cache across rounds (round k prefills only the sandbox feedback); off by default because rows then generate one at a time instead of in one batch, which is slower for GRPO groups on a GPU; cleared after every optimiser step",
        "ours (issue 14: HF KV cache across rounds)",
    )

    # ---- rewards
    wrong_result_value: float = _f(
        0.0, "Result of a wrong answer: 0 (paper) or -1 (reference judge default VQA_NORM=1)", "paper Sec. 3.3 / reference agent_rm.py"
    )
    format_weight: float = _f(0.5, "weight of the format reward", "paper; reference FMT_WEIGHT=0.5")
    consistency_weight: float = _f(0.5, "bonus factor for consistent reasoning on correct answers", "paper; reference CST_WEIGHT=0.5")
    judge: JudgeConfig = setting(
        default_factory=JudgeConfig,
        help="the judge section (fields of thyme.scoring.judge.JudgeConfig, as in thyme eval configs): base_url (none: rules only, no consistency), model, "
        "api_key (else the environment variable THYME_JUDGE_API_KEY), timeouts and retries; judge_base_url / judge_model are short for judge.base_url / judge.model",
        source="reference REWARD_API_ADDRESS (Qwen2.5-VL-72B-Instruct-AWQ)",
        show_default="no judge",
    )

    # ---- optimisation (what TRL names differently)
    min_lr_rate: float = _f(
        0.1,
        "final learning rate as a fraction of the peak (lr_scheduler_type cosine_with_min_lr; TRL's lr_scheduler_kwargs win when given)",
        RLSH + " min_lr_rate 0.1",
    )
    warmup_ratio: float | None = _f(
        0.03, "warm-up fraction of the steps (TRL's warmup_steps wins when set; null: warmup_steps)", RLSH + " --warmup_ratio 0.03"
    )

    # ---- model
    freeze_vision_tower: bool = _f(True, "freeze the vision encoder (merger too unless train_merger)", "paper: ViT frozen")
    train_merger: bool = _f(True, "keep the vision-language merger trainable", RLSH + " --freeze_aligner false")
    dtype: str = _f("auto", "weights dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32", RLSH + " bf16")
    attn_implementation: str | None = _f(None, "sdpa, flash_attention_2, eager", "ours")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.judge, dict):
            self.judge = JudgeConfig(**self.judge)
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        checks = [
            (self.engine in ("hf", "vllm_colocate", "vllm_server"), "engine must be hf, vllm_colocate or vllm_server"),
            (self.ats_engine in ("auto", "processor", "resubmit"), "ats_engine must be auto, processor or resubmit"),
            (self.wrong_result_value in (0, -1, 0.0, -1.0), "wrong_result_value must be 0 or -1"),
            (self.dtype in ("auto", "bfloat16", "float16", "float32"), "dtype must be auto, bfloat16, float16 or float32"),
            (isinstance(self.judge, JudgeConfig), "judge must be a judge section (thyme.scoring.judge.JudgeConfig)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ThymeError(f"RL config: {msg}")


#: TRL ``GRPOConfig`` fields whose default Thyme sets: ``name: (default, source, help)``; ``help``
#: ``None`` keeps TRL's own text (the meaning is TRL's), a text replaces it where Thyme's
#: meaning differs (``bf16: None`` is "on with CUDA", TRL's is "on unless fp16").
TRL_DEFAULTS: dict[str, tuple[Any, str, str | None]] = {
    "output_dir": ("runs/rl_grpo_ats", "ours", "checkpoints, rollouts.jsonl, final model with processor and chat template"),
    "num_generations": (4, RLSH + " --num_generations 4", None),
    "max_completion_length": (
        3196,
        RLSH + " --max_completion_length 3196; completion_length_limit_scope=per_round",
        "tokens per engine call (per-round scope, as the reference); the whole rollout is capped by max_length",
    ),
    "temperature": (1.0, RLSH + " --temperature 1.0", "sampling temperature outside code blocks (and of the training forward)"),
    "top_p": (0.9, RLSH + " --top_p 0.9", "nucleus sampling; set 1.0 with vLLM importance sampling (logprob mismatch otherwise)"),
    "top_k": (50, RLSH + " --top_k 50", "top-k sampling (0: off); set 0 with vLLM importance sampling"),
    "repetition_penalty": (
        1.05,
        RLSH + " --repetition_penalty 1.05",
        "repetition penalty of the rollouts; 1.0 with vLLM importance sampling",
    ),
    "vllm_gpu_memory_utilization": (0.55, RLSH + " --vllm_gpu_memory_utilization 0.55", None),
    "learning_rate": (5e-7, RLSH + " --learning_rate 5e-7", None),
    "lr_scheduler_type": ("cosine_with_min_lr", RLSH + " --lr_scheduler_type cosine_with_min_lr", None),
    "num_train_epochs": (2.0, RLSH + " --num_train_epochs 2", None),
    "per_device_train_batch_size": (1, RLSH + " --per_device_train_batch_size 1", None),
    "gradient_accumulation_steps": (5, RLSH + " --gradient_accumulation_steps 5", None),
    "steps_per_generation": (
        None,
        "TRL steps_per_generation; the whole-groups rule: ours",
        "micro-steps per generation batch (None: gradient_accumulation_steps, or the smallest count whose batch holds whole groups)",
    ),
    "num_iterations": (1, RLSH + " --num_iterations 1", None),
    "beta": (0.01, RLSH + " --beta 0.01 (paper text: 0.001)", None),
    "epsilon": (0.2, "swift GRPOArgumentsMixin default 0.2", None),
    "loss_type": (
        "dapo",
        "paper Sec. 3.3 normaliser; TRL 1.16 default",
        "TRL loss; dapo divides by the global count of model tokens = the paper's 1/sum|tau_i| (sandbox tokens excluded)",
    ),
    "scale_rewards": ("group", "reference default (scale_rewards True)", None),
    "max_grad_norm": (1.0, "transformers default", None),
    "weight_decay": (0.1, "ms-swift default", None),
    "max_steps": (-1, "ours", None),
    "seed": (42, "ms-swift default", None),
    "bf16": (None, RLSH + " --torch_dtype bfloat16", "bf16 mixed precision (None: on with CUDA)"),
    "gradient_checkpointing": (True, RLSH, None),
    "logging_steps": (1, RLSH + " --logging_steps 1", None),
    "save_strategy": ("steps", RLSH, None),
    "save_steps": (100, RLSH + " --save_steps 100", None),
    "save_total_limit": (5, "ours", None),
    "report_to": (["none"], "ours", None),
    "dataloader_num_workers": (0, "ours", None),
    "remove_unused_columns": (False, "ours: Thyme's trainer reads the prompt columns", None),
    "log_completions": (False, "ours: rollouts.jsonl keeps every rollout", None),
}

#: TRL fields Thyme's trainer needs at one value (a config that sets another is refused).
TRL_FIXED: dict[str, tuple[Any, str]] = {
    "remove_unused_columns": (False, "Thyme's trainer reads the prompt columns"),
    "mask_truncated_completions": (False, "use mask_truncated (Thyme's rule over the rollout's stop reasons)"),
}


def generation_steps(per_device: int, accumulation: int, num_generations: int, world: int, explicit: int | None = None) -> int:
    """Micro-steps per generation batch: ``accumulation`` when its batch holds whole groups (the
    reference: 8 GPUs x 1 x 5 = 40 = 10 groups of 4), else the smallest count that does (1 process
    x 1 x 4 = one group of 4); an ``explicit`` count wins."""
    if explicit:
        return int(explicit)
    per = per_device * max(1, world)
    if (per * accumulation) % num_generations == 0:
        return accumulation
    s = 1
    while (per * s) % num_generations:
        s += 1
    return s


def _world_size() -> int:
    """Processes of this run as the launcher says (accelerate / torchrun set ``WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _grpo_ats_post_init(self: Any) -> None:
    """Thyme's checks and TRL values Thyme derives, then ``GRPOConfig.__post_init__``."""
    from trl import GRPOConfig

    ThymeRLSettings.__post_init__(self)
    if isinstance(self.report_to, str) and self.report_to != "none":
        self.report_to = [self.report_to]
    if self.save_strategy is False:  # YAML 1.1 reads a bare `no` as false
        self.save_strategy = "no"
    checks = [
        (self.num_generations is not None and self.num_generations >= 2, "num_generations must be >= 2 (advantages are group-relative)"),
        (self.max_completion_length is not None and self.max_completion_length >= 1, "max_completion_length must be positive"),
        (self.engine != "vllm_server" or bool(self.vllm_server_base_url), "engine vllm_server needs vllm_server_base_url"),
        (
            str(getattr(self.save_strategy, "value", self.save_strategy)) in ("steps", "epoch", "no", "best"),
            "save_strategy must be steps, epoch or no",
        ),
    ]
    for name, (value, why) in TRL_FIXED.items():
        checks.append((getattr(self, name, value) == value, f"{name} must be {value}: {why}"))
    for ok, msg in checks:
        if not ok:
            raise ThymeError(f"RL config: {msg}")
    import torch

    cuda = torch.cuda.is_available()
    if self.bf16 is None:
        self.bf16 = cuda
    if not cuda:
        self.dataloader_pin_memory = False
    if self.warmup_ratio is not None and not self.warmup_steps:
        self.warmup_steps = float(self.warmup_ratio)  # transformers 5: a float < 1 is a ratio
    if str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) == "cosine_with_min_lr" and not self.lr_scheduler_kwargs:
        self.lr_scheduler_kwargs = {"min_lr_rate": self.min_lr_rate}
    if self.gradient_checkpointing and not self.gradient_checkpointing_kwargs:
        self.gradient_checkpointing_kwargs = {"use_reentrant": False}
    self.use_vllm = self.engine != "hf"
    if self.engine == "vllm_colocate":
        self.vllm_mode = "colocate"
        if self.vllm_max_model_length is None:
            self.vllm_max_model_length = self.max_length
    elif self.engine == "vllm_server":
        self.vllm_mode = "server"
    world = _world_size()
    if (
        self.generation_batch_size is not None
        and self.steps_per_generation is not None
        and self.generation_batch_size == self.per_device_train_batch_size * world * self.steps_per_generation
    ):
        self.generation_batch_size = None  # both derived by an earlier __post_init__ (a copy): derive again
    if self.generation_batch_size is None:
        self.steps_per_generation = generation_steps(
            self.per_device_train_batch_size, self.gradient_accumulation_steps, self.num_generations, world, self.steps_per_generation
        )
    GRPOConfig.__post_init__(self)


def config_record(cfg: Any) -> dict[str, Any]:
    """What a run writes to ``thyme_rl_config.yaml``: Thyme's fields (sections as mappings) and
    every TRL field that Thyme sets or that differs from TRL's default; the judge's ``api_key``
    is never written (:func:`thyme.config.config_record`)."""
    from trl import GRPOConfig

    return record_of(cfg, ThymeRLSettings, GRPOConfig, TRL_DEFAULTS, redact=("judge.api_key",))


def _build_grpo_ats_config_class() -> type:
    """``GRPOATSConfig``: a dataclass subclass of ``trl.GRPOConfig`` and :class:`ThymeRLSettings`,
    with :data:`TRL_DEFAULTS` applied (built once; imports TRL)."""
    from trl import GRPOConfig

    doc = (
        "Everything ``thyme train rl`` needs: a ``trl.GRPOConfig`` (TRL's fields, help and checks) with "
        "Thyme's fields (:class:`ThymeRLSettings`) and Thyme's defaults for the TRL fields in :data:`TRL_DEFAULTS`."
    )
    return derive_config_class(
        "GRPOATSConfig", ThymeRLSettings, GRPOConfig, TRL_DEFAULTS, post_init=_grpo_ats_post_init, module=__name__, doc=doc
    )


grpo_ats_config_class = built_once(_build_grpo_ats_config_class)


def __getattr__(name: str) -> Any:  # PEP 562: ``from thyme.train.rl.config import GRPOATSConfig``
    if name == "GRPOATSConfig":
        return grpo_ats_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def settings_help() -> str:
    """The settings ``thyme train rl --help`` lists (without importing TRL): Thyme's fields, then
    the TRL fields whose default Thyme sets; every other ``trl.GRPOConfig`` field is accepted too."""
    lines = []
    for f in dataclasses.fields(ThymeRLSettings):
        lines.append(f"  {f.name}: {help_text(f)}")
    lines.append(
        "  TRL GRPOConfig fields with Thyme's defaults (any other GRPOConfig / TrainingArguments field is accepted too; TRL's docs):"
    )
    for name, (default, source, own_help) in TRL_DEFAULTS.items():
        shown = "none" if default is None else repr(default) if isinstance(default, str) else str(default)
        lines.append(f"  {name}: {own_help + ' ' if own_help else ''}(default {shown}; {source})")
    return "\n".join(lines)


def load_rl_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """``GRPOATSConfig`` from defaults <- YAML (top level or an ``rl:`` section, with ``sandbox:``
    and ``judge:`` sections) <- ``overrides`` (``--set``; dotted keys reach a section's fields).

    Raises:
        ThymeError: unknown keys (naming them), bad values (Thyme's or TRL's checks).
    """
    return load_config(grpo_ats_config_class(), path, overrides, section="rl", aliases=RL_ALIASES)
