"""``GRPOTrainer`` (TRL 1.16, pinned) with Thyme's token-level sandbox rollouts, gated rewards and masks.

Overrides, and why (as little as possible):

- :meth:`ThymeGRPOTrainer._generate`: runs :class:`thyme.rollout.RolloutRunner` on the
  rows of the step instead of TRL's single-turn generation, scores them
  (:func:`score_rollouts`), and returns TRL's tuple: ``tool_mask`` = our ``env_mask`` (sandbox
  tokens, prefill and failed rollouts at 0: out of the policy loss, the KL term and the
  ``dapo`` normaliser), sampling log-probs (NaN for ATS code tokens: TRL's importance-sampling
  ratio is then 1 there), and every rollout image (input, then sandbox outputs, in token order)
  as both ``images`` and ``tool_images`` so TRL's completion-image branch builds
  ``pixel_values`` / ``image_grid_thw`` with the same image processor and ``mm_token_type_ids``
  from the pad positions of the full sequence.
- Before returning, each rollout's pad-token count is checked against its images' features
  (:func:`trainer_rows`). A masked rollout whose counts disagree (its images failed, or its
  tokens did) is replaced by an empty row (``<|im_end|>`` prompt and completion, no image, all
  masked): it is out of the loss anyway and never ends the step. An unmasked one raises
  :class:`RolloutImageError` naming the rollout (the runner's and the trainer's pad counts
  disagree: TRL would silently drop every image of the batch). :meth:`_get_per_token_logps_and_entropies` raises if images are expected
  but no ``pixel_values`` arrive (the same silent drop, caught at the forward).
- :meth:`_generate_and_score_completions`: keeps the dataset rows for :meth:`_generate` and,
  after TRL computed the advantages, writes ``rollouts.jsonl`` (trajectory, reward components,
  advantage, mask reason) and the Thyme metrics (``thyme/crop_hit_rate`` among them when the
  step's prompts carry a target box: :func:`crop_hit_metrics`).

Failure isolation: a masked rollout has reward ``None`` (TRL: NaN, excluded from the group's
mean and std, advantage 0; an all-masked group contributes nothing) and an all-zero
``env_mask``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ...errors import ThymeError
from ...rollout import CAP_REASONS, Rollout, RolloutRunner, completion_text

logger = logging.getLogger(__name__)


class RolloutImageError(ThymeError):
    """A rollout's image pad tokens and image features disagree (names the rollout)."""


def crop_hit_metrics(rollouts: Sequence[Rollout], prompts: Sequence[Any]) -> dict[str, float]:
    """``thyme/crop_hit_rate`` of one step: did the rollouts' crops find their prompt's target box?

    Over the rollouts whose prompt carries a ``bbox`` (``[x1, y1, x2, y2]`` pixels of the
    original input image, from ``thyme data annotate import`` records; read with
    :func:`thyme.scoring.crops.target_box`): the share whose code cropped the input image
    covering at least half of the box (:func:`thyme.scoring.crops.crop_hit`, issue 19), and
    ``thyme/crop_hit_rate_code`` the same over those of them that ran code. ``rollouts[i]``
    belongs to ``prompts[i]``; the coverage is measured in the pixels of ``prompt.images[0]``.

    Returns:
        ``{}`` when no prompt of the step has a box (nothing is logged), else both keys
        (``thyme/crop_hit_rate_code`` is 0.0 when no rollout with a box ran code, as
        ``thyme/code_execution_rate`` without code). Never raises: an unreadable image or a
        malformed box counts as no box.
    """
    from ...imageio import image_size
    from ...scoring.crops import crop_hit, target_box

    sizes: dict[str, tuple[int, int] | None] = {}
    n = hits = coded = 0
    for r, p in zip(rollouts, prompts):
        box = target_box(getattr(p, "bbox", None))
        images = getattr(p, "images", None) or r.trajectory.images
        if box is None or not images:
            continue
        path = str(images[0])
        if path not in sizes:
            try:
                sizes[path] = image_size(path)
            except (ThymeError, OSError):
                sizes[path] = None
        if sizes[path] is None:
            continue
        h = crop_hit(r.trajectory, box, sizes[path])
        n += 1
        hits += h.hit
        coded += h.used_code
    if not n:
        return {}
    return {"thyme/crop_hit_rate": hits / n, "thyme/crop_hit_rate_code": hits / coded if coded else 0.0}


def score_rollouts(
    rollouts: Sequence[Rollout],
    prompts: Sequence[Any],
    *,
    judge: Any = None,
    wrong_result_value: float = 0.0,
    format_weight: float = 0.5,
    consistency_weight: float = 0.5,
) -> list[dict[str, Any]]:
    """Thyme's reward per rollout: ``Result * (1 + w_c * Consistency) + w_f * Format`` (paper Sec. 3.3).

    Uses :func:`thyme.rewards.compute_rewards` (rules, then the judge). ``wrong_result_value``
    (0 paper, -1 reference) replaces a decided-wrong Result (not a missing answer, which stays 0,
    as the reference). Masked rollouts are not scored. A judge failure masks the rollout
    (``mask_reason = "judge_failed"``, with the judge's error in the trajectory).

    Returns:
        One dict per rollout: ``format``, ``result``, ``consistency`` (values or ``None``),
        ``methods``, ``total`` (``None`` when masked).
    """
    from ..rewards import RewardConfig, RewardInput, RewardScore, combine, compute_rewards

    cfg = RewardConfig(format_weight=format_weight, consistency_weight=consistency_weight)
    idx = [i for i, r in enumerate(rollouts) if r.mask_reason is None]
    items = [RewardInput(completion_text(rollouts[i]), prompts[i].solution, prompts[i].question, dict(prompts[i].options)) for i in idx]
    out: list[dict[str, Any]] = [{"format": None, "result": None, "consistency": None, "methods": {}, "total": None} for _ in rollouts]
    try:
        scored = compute_rewards(items, judge=judge, config=cfg) if items else []
    except Exception as e:  # the judge refuses our requests: mask, log, go on
        logger.error("reward computation failed for %d rollouts: %s", len(items), e)
        for i in idx:
            rollouts[i].mask_reason = "judge_failed"
            rollouts[i].trajectory.error = f"judge_failed: {e}"
        return out
    for i, b in zip(idx, scored):
        result = b.result
        if result.valid and result.value == 0.0 and result.method != "no_answer" and wrong_result_value:
            result = RewardScore(float(wrong_result_value), True, result.method, result.detail)
        total = combine(b.format.value or 0.0, result, b.consistency, cfg)
        out[i] = {
            "format": b.format.value,
            "result": result.value,
            "consistency": b.consistency.value,
            "methods": {"result": result.method, "consistency": b.consistency.method},
            "total": total,
        }
        if total is None:  # a judge call failed (retries and re-asks spent): masked, never a silent 0
            failed = [f"{name}: {sc.detail}" for name, sc in (("result", result), ("consistency", b.consistency)) if not sc.valid]
            rollouts[i].mask_reason = "judge_failed"
            rollouts[i].trajectory.error = "judge_failed: " + "; ".join(failed)
            logger.warning("rollout %s: judge failed (%s)", rollouts[i].id, "; ".join(failed)[:300])
    return out


@dataclass
class TrainerRow:
    """What TRL receives for one rollout: ``prompt_ids``, ``completion_ids``, ``env_mask`` (TRL's
    ``tool_mask``), sampling ``logprobs`` (NaN where not sampled), ``images`` (PIL, in token order)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    env_mask: list[int]
    logprobs: list[float]
    images: list[Any]


def trainer_rows(rollouts: Sequence[Rollout], *, im_end: int, image_pad: int, pad_count: Callable[[Any], int]) -> list[TrainerRow]:
    """One :class:`TrainerRow` per rollout, each with as many image pad tokens as its images'
    features (``pad_count(image)`` each).

    A masked rollout keeps its tokens (all ``env_mask`` 0) when its counts agree, else it
    becomes an empty row (``[im_end]`` prompt and completion, mask 0, no image): it is out of
    the loss either way, and one broken rollout never ends the step (issue 15).

    Raises:
        RolloutImageError: an unmasked rollout whose counts disagree (names it).
    """
    rows = []
    for r in rollouts:
        ids = list(r.completion_ids) or [im_end]
        mask = list(r.env_mask) or [0]
        lps = list(r.logprobs) or [float("nan")]
        images = list(r.images) if r.mask_reason != "input_error" else []
        prompt = list(r.prompt_ids) or [im_end]
        if r.mask_reason is not None:
            mask = [0] * len(ids)
        try:
            want = sum(pad_count(im) for im in images)
        except Exception as e:  # noqa: BLE001 - an image the processor refuses
            if r.mask_reason is None:
                raise RolloutImageError(f"rollout {r.id}: its images cannot be processed: {type(e).__name__}: {e}") from e
            want = -1
        have = sum(1 for t in prompt + ids if t == image_pad)
        if want != have:
            if r.mask_reason is None:
                raise RolloutImageError(
                    f"rollout {r.id}: {have} image pad tokens but {want} image features ({len(images)} images)",
                    "the pad counts must come from the trainer's image processor (same max_pixels)",
                )
            logger.warning(
                "rollout %s (masked: %s): %d image pad tokens but %d image features; sent as an empty row", r.id, r.mask_reason, have, want
            )
            prompt, ids, mask, lps, images = [im_end], [im_end], [0], [float("nan")], []
        rows.append(TrainerRow(prompt_ids=prompt, completion_ids=ids, env_mask=mask, logprobs=lps, images=images))
    return rows


def _thyme_reward(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float | None]:
    """TRL reward function: the totals computed during the rollout (``None`` for masked rollouts)."""
    return list(kwargs["thyme_reward"])


_thyme_reward.__name__ = "thyme"


def trainer_class() -> type:
    """Build the subclass lazily (TRL is imported on first use)."""
    import torch
    from trl import GRPOTrainer

    class ThymeGRPOTrainer(GRPOTrainer):
        """See the module docstring. Extra arguments: ``runner_factory(trainer) -> RolloutRunner``,
        ``judge``, ``reward_options`` (dict for :func:`score_rollouts`), ``mask_truncated``, ``rollouts_path``."""

        def __init__(
            self,
            *args: Any,
            runner_factory: Any,
            judge: Any = None,
            reward_options: dict | None = None,
            mask_truncated: bool = False,
            rollouts_path: str | None = None,
            **kwargs: Any,
        ):
            kwargs.setdefault("reward_funcs", [_thyme_reward])
            super().__init__(*args, **kwargs)
            self._runner_factory = runner_factory
            self._runner: RolloutRunner | None = None
            self.judge = judge
            self.reward_options = dict(reward_options or {})
            self.mask_truncated = mask_truncated
            self.rollouts_path = Path(rollouts_path) if rollouts_path else Path(self.args.output_dir) / "rollouts.jsonl"
            # A non-empty tool list turns on TRL's completion-image forward branch (pixel values of every
            # rollout image, mm_token_type_ids from the pads of the full sequence). No tool is ever called.
            self.tools = [_thyme_reward]
            self._standalone_tools = []
            self._rows: list[dict[str, Any]] = []
            self._last: list[Rollout] = []
            self._last_rewards: list[dict[str, Any]] = []
            self.totals = {
                "rollouts": 0,
                "masked_rollouts": 0,
                "code_blocks": 0,
                "code_executed_ok": 0,
                "engine_calls": 0,
                "code_engine_calls": 0,
                "model_code_blocks": 0,
                "reward_sum": 0.0,
                "reward_n": 0,
                "mask_reasons": {},
                "stop_reasons": {},
            }

        @property
        def runner(self) -> RolloutRunner:
            if self._runner is None:
                self._runner = self._runner_factory(self)
            return self._runner

        # ------------------------------------------------------------ generation
        def _generate_and_score_completions(self, inputs):
            self._rows = inputs
            out = super()._generate_and_score_completions(inputs)
            self._write_rollouts(out["advantages"].tolist())
            return out

        def _generate(self, prompts):
            from .data import RLPrompt

            device = self.accelerator.device
            mode = "train" if self.model.training else "eval"
            if self.use_vllm and self.state.global_step != self._last_loaded_step:
                self.vllm_generation.sync_weights()
                self._last_loaded_step = self.state.global_step
            rows = [RLPrompt.from_json(x["thyme"]) for x in self._rows]
            seed = (
                None
                if self.args.seed is None
                else int(self.args.seed) * 100003 + int(self.state.global_step) * 101 + self.accelerator.process_index
            )
            clear_kv = getattr(self.runner.engine, "clear_kv_cache", None)  # HF engine with kv_cache: caches of the old weights
            if clear_kv is not None:
                clear_kv()
            try:
                rollouts = self.runner.run(rows, seed=seed)
            finally:
                if clear_kv is not None:
                    clear_kv()  # the next optimiser step changes the weights; free the memory for the training forward
            rewards = score_rollouts(rollouts, rows, judge=self.judge, **self.reward_options)
            for r in rollouts:
                if self.mask_truncated and r.mask_reason is None and r.stop_reason in CAP_REASONS:
                    r.mask_reason = "truncated"
            runner = self.runner
            rows_out = trainer_rows(rollouts, im_end=runner.im_end, image_pad=runner.image_pad, pad_count=runner.pad_count)
            prompt_ids = [x.prompt_ids for x in rows_out]
            completion_ids = [x.completion_ids for x in rows_out]
            env_mask = [x.env_mask for x in rows_out]
            logprobs = [x.logprobs for x in rows_out]
            images = [x.images for x in rows_out]
            totals = [None if r.mask_reason not in (None, "truncated") else rw["total"] for r, rw in zip(rollouts, rewards)]
            completions = [completion_text(r) for r in rollouts]
            self._last, self._last_rewards = rollouts, rewards
            m = self._metrics[mode]
            n = len(rollouts)
            lens = torch.tensor([float(sum(x)) for x in env_mask], device=device)
            m["completions/mean_length"].append(self.accelerator.gather(lens).mean().item())
            for name, val in self._rollout_metrics(rollouts, rewards, rows).items():
                m[name].append(val)
            any_images = [imgs if imgs else [] for imgs in images]
            has_images = any(any_images)
            if mode == "train":
                self.state.num_input_tokens_seen += sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
            return (
                prompt_ids,
                completion_ids,
                env_mask,
                completions,
                logprobs,
                {"thyme_reward": totals},
                (any_images if has_images else None),
                (any_images if has_images else [[] for _ in range(n)]),
            )

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, *args, **kwargs):
            n = kwargs.get("num_images")
            if n and sum(n) > 0 and kwargs.get("pixel_values") is None:
                raise RolloutImageError(f"{sum(n)} rollout images expected in the training forward but no pixel_values arrived")
            if kwargs.get("pixel_values") is not None and self.runner is not None:
                pads = int((input_ids == self.runner.image_pad).sum().item())
                merge = self.runner.merge**2
                feats = int(kwargs["image_grid_thw"].prod(-1).sum().item()) // merge if kwargs.get("image_grid_thw") is not None else pads
                if pads != feats:
                    raise RolloutImageError(f"training forward: {pads} image pad tokens but {feats} image features")
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs)

        # ------------------------------------------------------------ bookkeeping
        def _rollout_metrics(self, rollouts: list[Rollout], rewards: list[dict[str, Any]], prompts: Sequence[Any] = ()) -> dict[str, float]:
            t = self.totals
            n = len(rollouts)
            masked = [r for r in rollouts if r.mask_reason is not None]
            t["rollouts"] += n
            t["masked_rollouts"] += len(masked)
            for r in rollouts:
                t["code_blocks"] += r.code_blocks
                t["code_executed_ok"] += r.code_ok
                t["engine_calls"] += r.engine_calls
                t["code_engine_calls"] += r.code_calls
                t["model_code_blocks"] += r.model_code_blocks
                if r.mask_reason:
                    t["mask_reasons"][r.mask_reason] = t["mask_reasons"].get(r.mask_reason, 0) + 1
                    logger.warning("rollout %s masked: %s", r.id, (r.trajectory.error or r.mask_reason).splitlines()[0])
                t["stop_reasons"][r.stop_reason] = t["stop_reasons"].get(r.stop_reason, 0) + 1
            vals = [rw["total"] for rw in rewards if rw["total"] is not None]
            t["reward_sum"] += sum(vals)
            t["reward_n"] += len(vals)

            def mean(xs):
                xs = [x for x in xs if x is not None]
                return float(sum(xs) / len(xs)) if xs else 0.0

            code = sum(r.code_blocks for r in rollouts)
            return {
                "thyme/rewards/format": mean([rw["format"] for rw in rewards]),
                "thyme/rewards/result": mean([rw["result"] for rw in rewards]),
                "thyme/rewards/consistency": mean([rw["consistency"] for rw in rewards]),
                "thyme/code_execution_rate": (sum(r.code_ok for r in rollouts) / code) if code else 0.0,
                "thyme/tool_use_rate": sum(1 for r in rollouts if r.code_blocks) / max(1, n),
                "thyme/rounds": mean([float(len(r.trajectory.turns)) for r in rollouts]),
                "thyme/repetition_stops": float(sum(1 for r in rollouts if r.stop_reason == "repetition")),
                "thyme/masked_rollouts": float(len(masked)),
                **crop_hit_metrics(rollouts, prompts),  # only when some prompt of the step has a target box
            }

        def _write_rollouts(self, advantages: list[float]) -> None:
            if not self.accelerator.is_main_process and self.accelerator.num_processes > 1:
                path = self.rollouts_path.with_name(f"rollouts.rank{self.accelerator.process_index}.jsonl")
            else:
                path = self.rollouts_path
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                for r, rw, adv in zip(self._last, self._last_rewards, advantages):
                    line = {
                        "step": int(self.state.global_step),
                        "id": r.id,
                        "group": r.group,
                        "trajectory": r.trajectory.to_dict(),
                        "reward": rw,
                        "advantage": float(adv),
                        "mask_reason": r.mask_reason,
                        "stop_reason": r.stop_reason,
                        "engine_calls": r.engine_calls,
                        "model_tokens": int(sum(r.env_mask)),
                        "sandbox_tokens": int(len(r.env_mask) - sum(r.env_mask)),
                        "images": len(r.images),
                    }
                    f.write(json.dumps(line, ensure_ascii=False, default=_json_default) + "\n")

    return ThymeGRPOTrainer


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
