"""Test and development support, out of the runtime's import path (extra ``testing``).

- :mod:`thyme.testing.tiny_checkpoint`  tiny random checkpoints of the real architectures
  (Qwen2.5-VL, Qwen2-VL, Qwen3-VL) with a locally trained tokenizer, for offline CPU tests
- :mod:`thyme.testing.openai_server`    an OpenAI-compatible server over the hf backend
  (vLLM's request fields) and a `transformers serve` launcher, both on loopback only
- :mod:`thyme.testing.fake_upstream`   an instant scripted OpenAI-compatible upstream with
  injected failures, hangs and holds (load tests and benchmarks of ``thyme serve --base-url``)
- :mod:`thyme.testing.serve_load`      a fault-injected load run against ``thyme serve`` in its
  own process, and what it leaves behind (processes, folders, RSS)

Command line: ``thyme dev tiny-checkpoint``, ``thyme dev serve``, ``thyme dev transformers-serve``.
Nothing in the runtime (protocol, sandbox, backends, agent, data, evaluate, train, report)
imports this package; only :mod:`thyme.cli.dev` and the tests do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ARCHS", "write_tiny_checkpoint"]


def __getattr__(name: str) -> Any:  # lazy: importing the package loads no model code
    if name in __all__:
        from . import tiny_checkpoint

        return getattr(tiny_checkpoint, name)
    raise AttributeError(name)
