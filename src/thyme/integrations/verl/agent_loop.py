"""``thyme_agent``: Thyme's rollout protocol as a veRL 0.9 agent loop.

One veRL sample is one Thyme rollout, run by the project's own rollout core
(:class:`thyme.rollout.RolloutRunner`, the same code as ``thyme train rl``) on
:class:`thyme.integrations.verl.engine.VerlServerEngine` (veRL's ``server_manager``):

- the prompt is the Thyme system prompt and user turn of the row's ``extra_info["thyme"]``
  (:class:`thyme.train.rl.data.RLPrompt` JSON, written by :mod:`thyme.integrations.verl.data`),
  rendered once by veRL's processor (image pads expanded);
- the assistant message is continued in place (in-message continuation): each segment's ids as
  sampled (``response_mask`` 1), the sandbox feedback (``<sandbox_output>``, ``<|vision_start|>``
  + ``n`` x ``<|image_pad|>`` + ``<|vision_end|>`` per new image, printed text) as token ids with
  ``response_mask`` 0, ``<|im_end|>`` appended after ``</answer>``;
- ATS by stop-and-resubmit with per-call sampling parameters (stop at ``<code>``, temperature 0
  until ``</code>``), the same caps (engine calls, tokens per call, total length, images), the
  rolling-hash repetition stop and the same failure masking as the TRL path: a rollout whose
  engine call or sandbox fails gets ``response_mask`` all 0 and ``extra_fields["thyme_mask_reason"]``.

Output (:class:`verl.experimental.agent_loop.agent_loop.AgentLoopOutput`): ``prompt_ids``,
``response_ids`` (= the rollout's completion ids), ``response_mask``, ``response_logprobs``
(when ``rollout.calculate_log_probs``; 0.0 for tokens not sampled at the rollout temperature:
ATS-greedy code tokens, which the behaviour policy chose with probability 1, appended
``<|im_end|>`` and sandbox tokens, which are out of the loss), ``multi_modal_data={"images":
[PIL...]}`` (input image, then each sandbox image, in token order), ``num_turns`` (1 + engine
segments), ``metrics`` and ``extra_fields`` (``thyme_trajectory``: the :class:`Trajectory` as
JSON, read by :func:`thyme.integrations.verl.reward.compute_score`; stop and mask reasons,
counters).

Settings: the ``thyme:`` section of the veRL config
(:class:`thyme.integrations.verl.settings.VerlAgentSettings`): the rollout keys ``thyme train rl``
has too (``max_rounds``, ``max_completion_length``, ``max_length``, ``max_images``, ``ats``,
``ats_code_tokens``, ``repetition_*``, ``prefill``, ``feedback_separator``, ``mask_truncated``,
``output_dir``), the ``sandbox`` section (a :class:`thyme.sandbox.SandboxConfig`; by default
every confinement layer required: the sandbox starts when the agent loop is built, so a host
that lacks a layer stops the worker before any rollout, naming it; ``allow_weaker: true`` opts
out with a warning), plus ``rollout_threads`` (worker threads per veRL agent-loop worker,
default 256) and ``call_timeout_s`` (one server call, default none) and ``keep_rollout_images``
(default false: a sample's sandbox image files are deleted once the rollout holds them decoded,
so a long run does not fill the disk; true keeps them under
``output_dir/rollout_images/<request id>``, where ``thyme_trajectory`` points). Sampling
(``temperature``, ``top_p``, ``top_k``) comes from veRL's ``actor_rollout_ref.rollout``.
``max_length`` is also capped by
``len(prompt) + rollout.response_length`` so a rollout always fits veRL's response tensor (a
cap ends the rollout at a token boundary, never inside an image block, with ``stop_reason``
``token_cap``); a prompt over ``rollout.prompt_length`` is an error (veRL's own rule for
multimodal prompts).

Registered as ``thyme_agent`` on import (``verl.experimental.agent_loop.agent_loop.register``);
``configs/verl_agent_loop.yaml`` names this class for ``rollout.agent.agent_loop_config_path``
so veRL's worker processes import it.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

from ... import protocol
from ...backends.repetition import RepetitionRule
from ...chat import end_of_turn_ids, never_sampled_ids
from ...errors import ThymeError
from ...train.rl.data import RLPrompt
from ...rollout import CAP_REASONS, Rollout, RolloutLimits, RolloutRunner, SamplingSettings
from .engine import VerlServerEngine
from .settings import VerlAgentSettings, load_agent_settings

logger = logging.getLogger(__name__)

#: Pixel-budget keys veRL could pass to its processor at the training forward only.
_PIXEL_KEYS = ("min_pixels", "max_pixels", "size")


def thyme_settings(section: Any) -> tuple[VerlAgentSettings, dict[str, Any]]:
    """The ``thyme:`` section of a veRL config -> (:class:`VerlAgentSettings`, loop options
    ``rollout_threads``, ``call_timeout_s``, ``keep_rollout_images``).

    Raises:
        ThymeError: unknown keys (naming them) or bad values, as ``thyme train rl --set`` does.
    """
    cfg = load_agent_settings(section)
    return cfg, cfg.options()


class _Shared:
    """Per-process resources of every ``thyme_agent`` instance (veRL builds one per sample)."""

    lock = threading.Lock()
    sandbox: Any = None
    executor: ThreadPoolExecutor | None = None
    #: tests and embedders may inject a sandbox factory: ``factory(cfg) -> Sandbox``
    sandbox_factory: Any = None

    @classmethod
    def get(cls, cfg: VerlAgentSettings, threads: int) -> tuple[Any, ThreadPoolExecutor]:
        with cls.lock:
            if cls.sandbox is None:
                if cls.sandbox_factory is not None:
                    cls.sandbox = cls.sandbox_factory(cfg)
                else:
                    from ...sandbox import Sandbox

                    cls.sandbox = Sandbox(cfg.sandbox)  # ConfinementError: a required layer is missing here
                    atexit.register(cls.close)
            if cls.executor is None:
                # our own threads: a rollout blocks its thread while it waits on the event loop,
                # so it must never take the loop's default executor (veRL tokenises there)
                cls.executor = ThreadPoolExecutor(max_workers=max(1, int(threads)), thread_name_prefix="thyme-rollout")
            return cls.sandbox, cls.executor

    @classmethod
    def close(cls) -> None:
        with cls.lock:
            sb, cls.sandbox = cls.sandbox, None
            ex, cls.executor = cls.executor, None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
        if sb is not None and hasattr(sb, "close"):
            try:
                sb.close()
            except Exception:
                pass


def rollout_to_output(ro: Rollout, *, mask_truncated: bool = False, with_logprobs: bool = True,
                      generate_s: float = 0.0, tool_s: float = 0.0) -> AgentLoopOutput:
    """One :class:`Rollout` -> veRL's ``AgentLoopOutput`` (see the module docstring).

    ``response_mask`` is the rollout's ``env_mask`` (1 model tokens, 0 sandbox tokens and
    prefill), all 0 when the rollout is masked (``mask_reason``; with ``mask_truncated`` also a
    rollout that hit a cap: ``truncated``, as Mini-o3's exceed mask).
    """
    if mask_truncated and ro.mask_reason is None and ro.stop_reason in CAP_REASONS:
        ro.mask_reason = "truncated"
    ids = list(ro.completion_ids)
    mask = [0] * len(ids) if ro.mask_reason is not None else [int(m) for m in ro.env_mask]
    lps = None
    if with_logprobs:
        lps = [0.0 if (x != x) else float(x) for x in ro.logprobs]  # NaN: not sampled at T (see docstring)
    traj = ro.trajectory
    extra = {
        "thyme_trajectory": json.dumps(traj.to_dict(), ensure_ascii=False) if traj is not None else "",
        "thyme_stop_reason": ro.stop_reason or "",
        "thyme_mask_reason": ro.mask_reason or "",
        "thyme_code_blocks": int(ro.code_blocks),
        "thyme_code_ok": int(ro.code_ok),
        "thyme_engine_calls": int(ro.engine_calls),
        "thyme_code_calls": int(ro.code_calls),
        "thyme_model_code_blocks": int(ro.model_code_blocks),
    }
    return AgentLoopOutput(
        prompt_ids=list(ro.prompt_ids), response_ids=ids, response_mask=mask, response_logprobs=lps,
        multi_modal_data={"images": list(ro.images)} if ro.images else {},
        num_turns=1 + (len(traj.turns) if traj is not None else 0),
        metrics=AgentLoopMetrics(generate_sequences=float(generate_s), tool_calls=float(tool_s)),
        extra_fields=extra,
    )


class _SampleRunner(RolloutRunner):
    """The rollout core for one veRL sample: once the prompt is rendered, the total-length cap
    becomes ``min(max_length, len(prompt) + response_length)`` (so the completion fits veRL's
    response tensor), and a prompt over ``prompt_length`` fails before any generation."""

    prompt_length: int = 0
    response_length: int = 0

    def render_prompt(self, messages: list[dict[str, Any]], images: list[Any]) -> list[int]:
        ids = super().render_prompt(messages, images)
        if len(ids) > self.prompt_length:
            raise ThymeError(f"prompt has {len(ids)} tokens > rollout.prompt_length={self.prompt_length}",
                             "raise actor_rollout_ref.rollout.prompt_length or lower the checkpoint's max_pixels")
        self.limits = replace(self.limits, max_length=min(self.limits.max_length, len(ids) + self.response_length))
        return ids


@register("thyme_agent")
class ThymeAgentLoop(AgentLoopBase):
    """Thyme's rollout as a veRL agent loop (see the module docstring).

    Constructed by veRL (``hydra.utils.instantiate``) once per sample with
    ``(trainer_config, server_manager, tokenizer, processor, dataset_cls, data_config, ...)``.

    Raises (from :meth:`run`):
        ThymeError: the row has no ``extra_info["thyme"]`` (convert the data with
            ``python -m thyme.integrations.verl.data``), its input cannot be read, its prompt
            exceeds ``rollout.prompt_length``, or ``data.mm_processor_kwargs`` sets a pixel budget
            (set it in the checkpoint's ``preprocessor_config.json`` instead, so rollout pads
            and training features agree).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cfg, self.options = thyme_settings(self.config.get("thyme", None))
        self.prompt_length = int(self.rollout_config.prompt_length)
        self.response_length = int(self.rollout_config.response_length)
        if any(k in (self.mm_processor_kwargs or {}) for k in _PIXEL_KEYS):
            raise ThymeError("data.mm_processor_kwargs sets a pixel budget that thyme_agent's image pads would not see",
                             "set min_pixels / max_pixels in the checkpoint's preprocessor_config.json instead")
        self.artifacts_dir = Path(self.cfg.output_dir or os.path.join(tempfile.gettempdir(), "thyme-verl")) / "rollout_images"
        # the sandbox now, not at the first rollout: a layer the thyme.sandbox section requires
        # but this host lacks stops the worker here, naming it
        _Shared.get(self.cfg, self.options["rollout_threads"])

    def runner(self, engine: Any, sampling_params: dict[str, Any]) -> RolloutRunner:
        """The project's rollout core for this sample (limits from ``thyme:``; sampling from veRL)."""
        cfg = self.cfg
        sandbox, _ = _Shared.get(cfg, self.options["rollout_threads"])
        limits = RolloutLimits(cfg.max_rounds, cfg.max_completion_length, cfg.max_length,
                               cfg.max_images, cfg.ats_code_tokens, protocol.FeedbackConfig(separator=cfg.feedback_separator), cfg.prefill)
        top_k = int(sampling_params.get("top_k", 0) or 0)
        settings = SamplingSettings(float(sampling_params.get("temperature", cfg.temperature)), float(sampling_params.get("top_p", 1.0)),
                                    top_k if top_k > 0 else 0, float(sampling_params.get("repetition_penalty", 1.0)), cfg.ats,
                                    repetition=RepetitionRule(cfg.repetition_span, cfg.repetition_repeats, cfg.repetition_window))
        runner = _SampleRunner(engine, self.processor, sandbox, limits, settings, self.artifacts_dir / engine.request_id)
        runner.prompt_length, runner.response_length = self.prompt_length, self.response_length
        return runner

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        extra = kwargs.get("extra_info") or {}
        if "thyme" not in extra:
            raise ThymeError("thyme_agent: the row has no extra_info['thyme']",
                             "convert the data with: python -m thyme.integrations.verl.data OUT.parquet RECORDS.jsonl")
        prompt = RLPrompt.from_json(extra["thyme"]) if isinstance(extra["thyme"], str) else RLPrompt(**extra["thyme"])
        _, executor = _Shared.get(self.cfg, self.options["rollout_threads"])
        loop = asyncio.get_running_loop()
        engine = VerlServerEngine(self.server_manager, self.tokenizer, loop, uuid.uuid4().hex, eos_ids=end_of_turn_ids(self.tokenizer),
                                  suppress_ids=never_sampled_ids(self.tokenizer), logprobs=bool(sampling_params.get("logprobs", True)),
                                  timeout_s=self.options["call_timeout_s"])
        runner = self.runner(engine, sampling_params)
        t0 = time.perf_counter()
        seed = sampling_params.get("seed")
        try:
            ro = (await loop.run_in_executor(executor, lambda: runner.run([prompt], seed=seed)))[0]
        finally:
            if not self.options["keep_rollout_images"]:
                shutil.rmtree(runner.artifacts_dir, ignore_errors=True)  # the rollout holds its images decoded
        if ro.mask_reason == "input_error":
            raise ThymeError(f"thyme_agent: input of {prompt.id} unusable: {ro.trajectory.error}")
        timings = ro.trajectory.timings or {}
        return rollout_to_output(ro, mask_truncated=self.cfg.mask_truncated, with_logprobs=bool(sampling_params.get("logprobs", True)),
                                 generate_s=timings.get("generate_s", time.perf_counter() - t0), tool_s=timings.get("execute_s", 0.0))
