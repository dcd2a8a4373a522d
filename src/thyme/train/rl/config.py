"""Configuration of ``thyme train rl`` (GRPO-ATS): one dataclass, every field with its help and source.

Values: dataclass defaults (the reference's ``scripts/rl.sh`` unless a field says otherwise),
then a YAML file (``--config``; top-level keys or an ``rl:`` section), then ``--set key=value``
(YAML syntax). Keys take TRL ``GRPOConfig`` names where TRL has the concept
(``num_generations``, ``max_completion_length``, ``temperature``, ``beta``, ``epsilon``,
``loss_type``, ``learning_rate``, ``per_device_train_batch_size``...). ``field(metadata=...)``
carries ``help`` and ``source`` for each; ``thyme train rl --help`` lists them.

Loss normaliser: the paper's GRPO-ATS objective divides by ``sum_i |tau_i|`` over model tokens
of the whole batch. TRL's ``loss_type="dapo"`` (its default) divides by the global count of
active tokens (``completion_mask * tool_mask``), so with sandbox tokens in ``tool_mask = 0`` it
is that normaliser; ``grpo`` would average per sequence first, ``dr_grpo`` divides by
``B x max_completion_length``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ...config import load_config, setting
from ...errors import ThymeError

RLSH = "reference scripts/rl.sh"


def _f(default: Any, help: str, source: str) -> Any:
    """:func:`thyme.config.setting` in the positional shape this long table reads best in."""
    if isinstance(default, (list, dict)):
        return setting(default_factory=lambda d=default: type(d)(d), help=help, source=source)
    return setting(default, help=help, source=source)


@dataclass
class GRPOATSConfig:
    """Everything ``thyme train rl`` needs (see the module docstring; per-field ``metadata``)."""

    # ---- data and model
    model: str = _f("Kwai-Keye/Thyme-SFT", "policy checkpoint to start from (the SFT model; hub id or folder)", "paper Sec. 3.3: RL starts from the SFT model")
    train_files: list = _f([], "JSONL files: RL records (messages, images, solution, question) or benchmark rows (question, options, answer, image)", "thyme data convert output / benchmark annotations")
    images_root: str | None = _f(None, "folder relative image paths start from (default: each file's folder)", "ours")
    output_dir: str = _f("runs/rl_grpo_ats", "checkpoints, rollouts.jsonl, final model with processor and chat template", "ours")
    max_pixels: int | None = _f(2408448, "per-image pixel budget, input and sandbox images, rollout and training forward alike", RLSH + " --max_pixels")
    min_pixels: int | None = _f(None, "per-image lower pixel bound (None: the processor's)", "processor default")
    shown_path: str | None = _f(None, "image path shown in the prompt ({name}, {path}); None: the real path", "reference: real paths")
    check_images: bool = _f(True, "before the model loads, decode every train image fully (a missing image is always an error: its rollouts would be masked at every step)", "ours (as thyme run / thyme eval check their inputs)")

    # ---- rollouts
    num_generations: int = _f(4, "rollouts per prompt (group size G)", RLSH + " --num_generations 4")
    max_completion_length: int = _f(3196, "tokens per engine call (per-round scope, as the reference)", RLSH + " --max_completion_length 3196; completion_length_limit_scope=per_round")
    max_length: int = _f(10240, "total tokens of a rollout (prompt, images and completion)", RLSH + " --max_length 10240")
    max_rounds: int = _f(4, "engine calls (generation rounds) per rollout", "reference GEN_ITER_LIMIT=4")
    max_images: int = _f(6, "images per rollout, input included", RLSH + " vllm_limit_mm_per_prompt image=6")
    temperature: float = _f(1.0, "sampling temperature outside code blocks (and of the training forward)", RLSH + " --temperature 1.0")
    top_p: float = _f(0.9, "nucleus sampling; set 1.0 with vLLM importance sampling (logprob mismatch otherwise)", RLSH + " --top_p 0.9")
    top_k: int = _f(50, "top-k sampling (0: off); set 0 with vLLM importance sampling", RLSH + " --top_k 50")
    repetition_penalty: float = _f(1.05, "repetition penalty of the rollouts; 1.0 with vLLM importance sampling", RLSH + " --repetition_penalty 1.05")
    ats: bool = _f(True, "adaptive temperature sampling: tokens inside an open <code> block greedy, others at temperature", "paper Sec. 3.3 (GRPO-ATS)")
    ats_code_tokens: str = _f("train", "greedy code tokens: 'train' (in the loss, as the reference) or 'mask' (out of loss, KL and normaliser); their sampling log-probs are NaN either way", "reference trains them; mask: ours")
    mask_truncated: bool = _f(False, "drop rollouts that hit a cap (length, token_cap, image_cap, max_rounds, repetition) from the loss (Mini-o3's exceed mask)", "reference: off (overlong_filter is inert in O3 mode)")
    repetition_span: int = _f(32, "rolling-hash loop rule: span of tokens", "paper Sec. 3.3 Rabin-Karp; rule ours")
    repetition_repeats: int = _f(3, "rolling-hash loop rule: occurrences of one span that stop a segment", "ours")
    repetition_window: int = _f(1024, "rolling-hash loop rule: tokens looked back over", "ours")
    prefill: str = _f("", "text every rollout's assistant message starts with (given: out of the loss); a code segment ending in </code> runs before the first call", "ours (thyme run --prefill)")
    sandbox_timeout: float = _f(10.0, "seconds per code execution", "reference EXEC_TIME_LIMIT=10")
    feedback_separator: str = _f("\n", "text between </code> and <sandbox_output>", "released Thyme records")
    engine: str = _f("hf", "generation engine: hf (transformers generate; CPU / one GPU), vllm_colocate, vllm_server", "ours (reference: vLLM colocate)")
    kv_cache: bool = _f(False, "engine hf: keep each rollout's KV cache across rounds (round k prefills only the sandbox feedback); off by default because rows then generate one at a time instead of in one batch, which is slower for GRPO groups on a GPU; cleared after every optimiser step", "ours (issue 14: HF KV cache across rounds)")
    vllm_gpu_memory_utilization: float = _f(0.55, "vLLM colocate memory share", RLSH + " --vllm_gpu_memory_utilization 0.55")
    vllm_server_base_url: str | None = _f(None, "vLLM server URL (engine vllm_server), e.g. http://host:8000", "TRL vllm_server_base_url")
    vllm_enable_sleep_mode: bool = _f(False, "offload vLLM weights between generations (saves memory, colocate)", "TRL vllm_enable_sleep_mode")

    # ---- rewards
    wrong_result_value: float = _f(0.0, "Result of a wrong answer: 0 (paper) or -1 (reference judge default VQA_NORM=1)", "paper Sec. 3.3 / reference agent_rm.py")
    format_weight: float = _f(0.5, "weight of the format reward", "paper; reference FMT_WEIGHT=0.5")
    consistency_weight: float = _f(0.5, "bonus factor for consistent reasoning on correct answers", "paper; reference CST_WEIGHT=0.5")
    judge_base_url: str | None = _f(None, "OpenAI-compatible judge server (None: rules only, no consistency)", "reference REWARD_API_ADDRESS (Qwen2.5-VL-72B-AWQ)")
    judge_model: str | None = _f(None, "judge model name on that server", "reference: Qwen2.5-VL-72B-Instruct-AWQ")
    judge_api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the judge's API key (if any)", "ours")

    # ---- optimisation (TRL GRPOConfig names)
    learning_rate: float = _f(5e-7, "peak learning rate", RLSH + " --learning_rate 5e-7")
    lr_scheduler_type: str = _f("cosine_with_min_lr", "schedule after warm-up", RLSH + " --lr_scheduler_type cosine_with_min_lr")
    min_lr_rate: float = _f(0.1, "final learning rate as a fraction of the peak", RLSH + " min_lr_rate 0.1")
    warmup_ratio: float = _f(0.03, "warm-up fraction of the steps", RLSH + " --warmup_ratio 0.03")
    num_train_epochs: float = _f(2.0, "epochs over the prompts", RLSH + " --num_train_epochs 2")
    per_device_train_batch_size: int = _f(1, "rollouts per device per micro-step", RLSH + " --per_device_train_batch_size 1")
    gradient_accumulation_steps: int = _f(5, "micro-steps per optimizer step", RLSH + " --gradient_accumulation_steps 5")
    steps_per_generation: int | None = _f(None, "micro-steps per generation batch (None: gradient_accumulation_steps, or the smallest count whose batch holds whole groups)", "TRL steps_per_generation")
    num_iterations: int = _f(1, "optimisation passes per generation batch", RLSH + " --num_iterations 1")
    beta: float = _f(0.01, "KL coefficient (paper text: 0.001; the script: 0.01)", RLSH + " --beta 0.01")
    epsilon: float = _f(0.2, "PPO clip range", "swift GRPOArgumentsMixin default 0.2")
    loss_type: str = _f("dapo", "TRL loss; dapo divides by the global count of model tokens = the paper's 1/sum|tau_i| (sandbox tokens excluded)", "paper Sec. 3.3 normaliser; TRL 1.16 default")
    scale_rewards: str = _f("group", "advantage scaling: group std (reference scale_rewards True), batch or none", "reference default")
    max_grad_norm: float = _f(1.0, "gradient clipping", "transformers default")
    weight_decay: float = _f(0.1, "AdamW weight decay", "ms-swift default")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run the epochs)", "ours")
    seed: int = _f(42, "seed of sampling and initialisation", "ms-swift default")

    # ---- model
    freeze_vision_tower: bool = _f(True, "freeze the vision encoder (merger too unless train_merger)", "paper: ViT frozen")
    train_merger: bool = _f(True, "keep the vision-language merger trainable", RLSH + " --freeze_aligner false")
    dtype: str = _f("auto", "weights dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32", RLSH + " bf16")
    bf16: bool | None = _f(None, "bf16 mixed precision (None: on with CUDA)", RLSH + " --torch_dtype bfloat16")
    attn_implementation: str | None = _f(None, "sdpa, flash_attention_2, eager", "ours")
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward pass", RLSH)

    # ---- logging and checkpoints
    logging_steps: int = _f(1, "log every this many optimizer steps", RLSH + " --logging_steps 1")
    save_strategy: str = _f("steps", "steps, epoch or no", RLSH)
    save_steps: int = _f(100, "checkpoint every this many steps", RLSH + " --save_steps 100")
    save_total_limit: int | None = _f(5, "checkpoints kept", "ours")
    report_to: list = _f(["none"], "tensorboard, wandb, none...", "ours")
    run_name: str | None = _f(None, "tracker run name", "ours")
    resume_from_checkpoint: str | None = _f(None, "latest, a checkpoint folder, or None", "ours")
    deepspeed: str | None = _f(None, "DeepSpeed JSON (configs/deepspeed_zero3.json) under accelerate launch", RLSH + " --deepspeed zero3")
    dataloader_num_workers: int = _f(0, "data-loading processes", "ours")

    def __post_init__(self) -> None:
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if self.save_strategy is False:
            self.save_strategy = "no"
        checks = [
            (self.ats_code_tokens in ("train", "mask"), "ats_code_tokens must be train or mask"),
            (self.engine in ("hf", "vllm_colocate", "vllm_server"), "engine must be hf, vllm_colocate or vllm_server"),
            (self.wrong_result_value in (0, -1, 0.0, -1.0), "wrong_result_value must be 0 or -1"),
            (self.num_generations >= 2, "num_generations must be >= 2 (advantages are group-relative)"),
            (self.max_rounds >= 1 and self.max_images >= 1, "max_rounds and max_images must be >= 1"),
            (self.max_completion_length >= 1 and self.max_length > 0, "max_completion_length and max_length must be positive"),
            (self.engine != "vllm_server" or bool(self.vllm_server_base_url), "engine vllm_server needs vllm_server_base_url"),
            (self.save_strategy in ("steps", "epoch", "no"), "save_strategy must be steps, epoch or no"),
            (self.dtype in ("auto", "bfloat16", "float16", "float32"), "dtype must be auto, bfloat16, float16 or float32"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ThymeError(f"RL config: {msg}")


def load_rl_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> GRPOATSConfig:
    """Defaults <- YAML (top level or an ``rl:`` section) <- ``overrides`` (:func:`thyme.config.load_config`).

    Raises:
        ThymeError: unknown keys (naming them), bad values.
    """
    return load_config(GRPOATSConfig, path, overrides, section="rl")
