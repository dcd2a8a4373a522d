"""The ``thyme:`` section of a veRL config: what ``thyme_agent`` reads (imports no veRL, no TRL).

Keys: the rollout fields ``thyme train rl`` has too (:class:`thyme.train.rl.config.RLRolloutSettings`:
``max_rounds``, ``max_length``, ``max_images``, ``ats``, ``ats_code_tokens``, ``repetition_*``,
``prefill``, ``feedback_separator``, ``mask_truncated`` and the ``sandbox`` section), TRL's names
for the per-call token cap and the fallback temperature (``max_completion_length``,
``temperature``), ``output_dir``, and the loop's own options (``rollout_threads``,
``call_timeout_s``, ``keep_rollout_images``). Unknown keys are errors, as in ``thyme train rl``.

The ``sandbox`` section is a :class:`thyme.sandbox.SandboxConfig` and defaults, as in ``thyme
train rl``, to every confinement layer required: a worker on a host that lacks one stops when the
agent loop starts (before any rollout), naming the layer; ``sandbox: {allow_weaker: true}`` (on
the command line ``thyme.sandbox.allow_weaker=true``) is the explicit opt-out, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import load_config, setting
from ...errors import ThymeError
from ...train.rl.config import RL_ALIASES, TRL_DEFAULTS, RLRolloutSettings


@dataclass
class VerlAgentSettings(RLRolloutSettings):
    """Settings of ``thyme_agent`` (the ``thyme:`` section; per-field help and source)."""

    max_completion_length: int = setting(TRL_DEFAULTS["max_completion_length"][0], help="tokens per engine call (per-round scope, as the reference)",
                                         source=TRL_DEFAULTS["max_completion_length"][1])
    temperature: float = setting(TRL_DEFAULTS["temperature"][0], help="sampling temperature outside code blocks when veRL's sampling parameters give none",
                                 source=TRL_DEFAULTS["temperature"][1])
    output_dir: str | None = setting(None, help="sandbox images kept under output_dir/rollout_images (keep_rollout_images); none: a temporary folder",
                                     source="ours", show_default="a temporary folder")
    rollout_threads: int = setting(256, help="rollouts in flight per agent-loop worker (threads; each waits on the server)", source="ours")
    call_timeout_s: float | None = setting(None, help="seconds one server call may take before the rollout is masked (none: no limit)", source="ours")
    keep_rollout_images: bool = setting(False, help="keep sandbox image files under output_dir/rollout_images/<request id> (default: deleted once decoded)", source="ours")

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rollout_threads) < 1:
            raise ThymeError("thyme_agent: rollout_threads must be >= 1")
        if int(self.max_completion_length) < 1:
            raise ThymeError("thyme_agent: max_completion_length must be positive")

    #: the loop options, as :func:`thyme.integrations.verl.agent_loop.thyme_settings` returns them
    def options(self) -> dict[str, Any]:
        return {"rollout_threads": int(self.rollout_threads), "call_timeout_s": self.call_timeout_s, "keep_rollout_images": bool(self.keep_rollout_images)}


def load_agent_settings(section: Any) -> VerlAgentSettings:
    """The ``thyme:`` section (a mapping or an OmegaConf node; ``None``: all defaults) ->
    :class:`VerlAgentSettings`.

    Raises:
        ThymeError: unknown keys (naming them) or bad values, as ``thyme train rl --set`` does.
    """
    if section is not None and not isinstance(section, dict):
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(section, resolve=True)
    if section is not None and not isinstance(section, dict):
        raise ThymeError(f"the veRL config's thyme: section must be a mapping, got {type(section).__name__}")
    return load_config(VerlAgentSettings, None, dict(section or {}), section="thyme", aliases=RL_ALIASES,
                       overrides_source="the veRL config's thyme: section")
