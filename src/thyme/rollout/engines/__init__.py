"""Token-level engines: rows of token ids in, sampled ids (with log-probs) out.

- :mod:`thyme.rollout.engines.base`  :class:`Engine`, :class:`EngineRow`, :class:`EngineOutput`, :class:`SamplingSettings`
- :mod:`thyme.rollout.engines.hf`    :class:`HFEngine` (transformers ``generate``)
- :mod:`thyme.rollout.engines.vllm`  :class:`StopResubmitATS`, :class:`VLLMColocateEngine`, :class:`VLLMServerEngine`
"""

from .base import NAN, Engine, EngineOutput, EngineRow, SamplingSettings
from .hf import HFEngine
from .vllm import StopResubmitATS, VLLMColocateEngine, VLLMServerEngine

__all__ = ["NAN", "Engine", "EngineOutput", "EngineRow", "HFEngine", "SamplingSettings", "StopResubmitATS",
           "VLLMColocateEngine", "VLLMServerEngine"]
