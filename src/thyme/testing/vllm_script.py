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


def colocate_llm(model: str, *, dtype: str = "bfloat16", max_model_len: int = 8192, max_images: int = 6) -> Any:
    """An in-process ``vllm.LLM`` built as TRL 1.16's colocate mode builds it (one process,
    ``distributed_executor_backend="external_launcher"``, ``max_num_batched_tokens`` 4096,
    eager), with :class:`ScriptedLogitsProcessor` loaded; the single-rank ``torch.distributed``
    variables, ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and 2 GiB of CPU KV cache are set unless
    already set. For tests and benchmarks on vLLM's CPU build (``dtype="float32"`` to compare
    greedy decoding with transformers)."""
    import os

    from vllm import LLM

    from .vllm_server import free_port

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return LLM(
        model=str(model),
        max_model_len=max_model_len,
        enforce_eager=True,
        distributed_executor_backend="external_launcher",
        seed=0,
        max_num_batched_tokens=4096,
        dtype=dtype,
        limit_mm_per_prompt={"image": max_images},
        logits_processors=[ScriptedLogitsProcessor],
    )
