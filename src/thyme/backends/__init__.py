"""Backends: messages in, the next assistant segment out.

- :mod:`thyme.backends.base`        the interface (:class:`~thyme.backends.base.Backend`,
  :class:`~thyme.backends.base.Capabilities`, :class:`~thyme.backends.base.BatchGenerationError`)
- :mod:`thyme.backends.hf`          transformers ``generate`` (CPU, one GPU)
- :mod:`thyme.backends.openai`      any OpenAI-compatible chat-completions server (vLLM, SGLang)
- :mod:`thyme.backends.replay`      recorded responses
- :mod:`thyme.backends.processors`  loading processors (without torchvision too), pixel budgets
- :mod:`thyme.backends.ats`         greedy-inside-``<code>`` logits processor (GRPO-ATS)
- :mod:`thyme.backends.repetition`  the rolling-hash repetition detector

Commands build them by name through :func:`thyme.rollout.registry.build_backend`
(``"hf"``, ``"openai"``, ``"replay"``; plugins: :func:`thyme.rollout.registry.register_backend`).

Floor 2: knows the protocol's stop strings, nothing of the sandbox; must not import the agent
or anything above it.
"""
