"""The token driver and its engines (floor 4: above the agent, below data/evaluate/train).

- :mod:`thyme.rollout.engines`  engines keeping sampled ids: HF, vLLM colocate / server
- :mod:`thyme.rollout.vision`   :class:`VisionCache` (image-processor results per image, once)
- :mod:`thyme.rollout.driver`   :class:`RolloutRunner`: multi-turn rollouts on token ids, each
  finished segment read by the one step decision (:mod:`thyme.agent.step`), as the message
  driver (:class:`thyme.agent.Agent`) reads it

Used by ``thyme train rl``, the veRL agent loop and anything else that needs sampled ids,
without importing the trainer: nothing here imports :mod:`thyme.train`.
"""

from .driver import CAP_REASONS, Rollout, RolloutLimits, RolloutRunner, completion_text, is_nan
from .engines import NAN, Engine, EngineOutput, EngineRow, HFEngine, SamplingSettings, StopResubmitATS, VLLMColocateEngine, VLLMServerEngine
from .vision import VisionCache, vision_cache

__all__ = [
    "CAP_REASONS",
    "NAN",
    "Engine",
    "EngineOutput",
    "EngineRow",
    "HFEngine",
    "Rollout",
    "RolloutLimits",
    "RolloutRunner",
    "SamplingSettings",
    "StopResubmitATS",
    "VLLMColocateEngine",
    "VLLMServerEngine",
    "VisionCache",
    "completion_text",
    "is_nan",
    "vision_cache",
]
