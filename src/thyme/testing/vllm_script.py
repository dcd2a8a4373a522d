"""A vLLM logits processor that makes a (random, tiny) model write a given script: tests and
benchmarks of multi-round rollouts on the real engine.

A tiny random checkpoint writes no ``<code>`` block by itself; with this processor vLLM's
forward, sampling, stop strings, ATS and the prompt handling all run as for a real model, only
the chosen tokens are scripted (:class:`thyme.testing.scripted.ScriptCursor`). Per request:
``SamplingParams.extra_args = {"thyme_script": [segment_0, segment_1, ...]}`` (``vllm_xargs``
over HTTP), ``segment_k`` being what the model writes after ``k`` sandbox outputs.

Load it with ``LLM(logits_processors=[ScriptedLogitsProcessor])`` or ``--logits-processors
thyme.testing.vllm_script:ScriptedLogitsProcessor``. Order with the ATS processor does not
matter: the scripted token gets logit 0 and every other ``-inf``. Imports vLLM at import time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from .scripted import ScriptCursor

SCRIPT_XARG = "thyme_script"


class ScriptedLogitsProcessor(AdapterLogitsProcessor):
    """vLLM V1 logits processor forcing per-request scripts (see the module docstring)."""

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._model_config = getattr(vllm_config, "model_config", None)
        self._tokenizer: Any = None

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        segs = (getattr(params, "extra_args", None) or {}).get(SCRIPT_XARG)
        if not segs:
            return None
        cursor = ScriptCursor(self.tokenizer(), [str(s) for s in segs])

        def force(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            t = cursor.next_token(list(prompt_ids) + list(output_ids))
            if t is None:
                return logits
            out = torch.full_like(logits, -math.inf)
            out[t] = 0.0
            return out

        return force

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            mc = self._model_config
            self._tokenizer = AutoTokenizer.from_pretrained(getattr(mc, "tokenizer", None) or getattr(mc, "model", None))
        return self._tokenizer
