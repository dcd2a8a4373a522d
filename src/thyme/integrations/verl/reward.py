"""Thyme's reward as a veRL custom reward function (``reward.custom_reward_function``).

veRL 0.9.1's reward loop (``verl/experimental/reward_loop/reward_manager/naive.py``) calls
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **reward_kwargs)``
in a worker thread (``reward_kwargs`` from ``custom_reward_function.reward_kwargs``), with
``extra_info`` = the row's ``extra_info`` updated with the agent loop's ``extra_fields``. It
takes a float or a dict with ``score`` (the other keys are logged as reward extra info; every
call returns the same keys).

The score is the TRL path's (:func:`thyme.train.rl.trainer.score_rollouts`, the gated formula of
paper Sec. 3.3): ``Result * (1 + 0.5 * Consistency) + 0.5 * Format``, consistency only when the
result is right, ``wrong_result_value`` 0 (paper) or -1 (reference), the judge any
OpenAI-compatible server (``judge_base_url``, ``judge_model``, key from the environment variable
``THYME_JUDGE_API_KEY``). It reads the completion as the rewards do everywhere in the project
(:func:`thyme.rollout.completion_text`: the assistant message with sandbox images as
``<image>``), rebuilt from ``extra_info["thyme_trajectory"]`` (``thyme_agent``); without it
(another agent loop) ``solution_str`` is scored as the completion.

A rollout that ``thyme_agent`` masked (engine or sandbox failure, ``truncated``), or whose judge
call fails, scores 0.0 with ``masked: 1.0``; its ``response_mask`` is all 0 so it adds nothing
to the loss. Unlike the TRL path (reward ``None``: left out of the group's mean and std), veRL's
GRPO advantage still counts that 0 in its group's statistics.
"""

from __future__ import annotations

import threading
from typing import Any

from ...agent import Trajectory, Turn
from ...config import JUDGE_API_KEY_ENV, env_secret
from ...errors import ThymeError
from ...jsonl import loads_bounded
from ...train.rl.data import RLPrompt
from ...rollout import Rollout
from ...train.rl.trainer import score_rollouts

_judges: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()

#: Keys of every returned dict (veRL stacks them across the batch).
KEYS = ("score", "format", "result", "consistency", "masked")


def _judge(base_url: str | None, model: str | None) -> Any:
    if not base_url:
        return None
    k = (base_url, model or "")
    with _lock:
        if k not in _judges:
            from ...scoring.judge import JudgeClient, JudgeConfig

            _judges[k] = JudgeClient(JudgeConfig(base_url=base_url, model=model, api_key=env_secret(JUDGE_API_KEY_ENV)))
        return _judges[k]


def _prompt(extra: dict[str, Any], ground_truth: Any) -> RLPrompt:
    raw = extra.get("thyme")
    if raw:
        p = RLPrompt.from_json(raw) if isinstance(raw, str) else RLPrompt(**raw)
        if ground_truth is not None and str(ground_truth) != "":
            p.solution = str(ground_truth)
        return p
    return RLPrompt(str(extra.get("index", "row")), [], [], str(ground_truth), str(extra.get("question", "")), dict(extra.get("options") or {}))


def compute_score(data_source: Any = None, solution_str: str = "", ground_truth: Any = None, extra_info: dict[str, Any] | None = None, *,
                  judge_base_url: str | None = None, judge_model: str | None = None,
                  wrong_result_value: float = 0.0, format_weight: float = 0.5, consistency_weight: float = 0.5, **other: Any) -> dict[str, float]:
    """Thyme's gated reward of one veRL sample (see the module docstring).

    Args:
        data_source: the row's ``data_source`` (unused: every row is scored the Thyme way).
        solution_str: veRL's decoded response (used only without ``thyme_trajectory``).
        ground_truth: ``reward_model.ground_truth`` (the reference answer; overrides the prompt's).
        extra_info: the row's ``extra_info`` (``thyme``: :class:`RLPrompt` JSON) plus
            ``thyme_agent``'s ``extra_fields`` (``thyme_trajectory``, ``thyme_mask_reason``).
        judge_base_url / judge_model: the OpenAI-compatible judge (none: rules only); its key comes
            from the environment variable ``THYME_JUDGE_API_KEY`` (as in ``thyme eval`` and
            ``thyme train rl``).
        wrong_result_value: 0 (paper) or -1 (reference) for a decided-wrong result.

    Returns:
        ``{"score", "format", "result", "consistency", "masked"}`` floats; a component that was
        not computed (consistency of a wrong answer or without a judge, all of a masked rollout)
        is 0.0, so veRL's logged means stay finite (``masked`` tells masked rollouts apart).
    """
    if "judge_api_key_env" in other:
        raise ThymeError("reward_kwargs.judge_api_key_env was removed",
                         f"the judge's key is read from the environment variable {JUDGE_API_KEY_ENV}, as in thyme eval and thyme train rl")
    extra = dict(extra_info or {})
    out = {"score": 0.0, "format": 0.0, "result": 0.0, "consistency": 0.0, "masked": 1.0}
    if extra.get("thyme_mask_reason"):
        return out
    prompt = _prompt(extra, ground_truth)
    raw = extra.get("thyme_trajectory")
    if raw:
        traj = Trajectory.from_dict(loads_bounded(raw, what="thyme_trajectory") if isinstance(raw, str) else dict(raw))
    else:
        traj = Trajectory(id=prompt.id, question=prompt.question, images=[], turns=[Turn(0, solution_str, "stop", "answer")])
    ro = Rollout(traj.id, prompt.id, [], trajectory=traj)
    scored = score_rollouts([ro], [prompt], judge=_judge(judge_base_url, judge_model), wrong_result_value=wrong_result_value,
                            format_weight=format_weight, consistency_weight=consistency_weight)[0]
    if ro.mask_reason is not None or scored["total"] is None:
        return out
    for k in ("format", "result", "consistency"):
        out[k] = 0.0 if scored[k] is None else float(scored[k])
    out["score"], out["masked"] = float(scored["total"]), 0.0
    return out
