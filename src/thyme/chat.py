"""The Qwen VL chat format's special tokens, named once (ground floor).

Every module that needs a special token of the chat template (the HF backend, the rollout
driver and engines, the veRL agent loop, the loss masks, the RL runner) takes its string and
its id from here, so a new base model's format is one edit, not seven.

Source: the chat templates of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (the released Thyme checkpoints
are Qwen2.5-VL-7B): each image is rendered as ``<|vision_start|><|image_pad|><|vision_end|>``,
and the processor expands the single ``<|image_pad|>`` to one pad per merged patch
(``grid_t * grid_h * grid_w / merge_size**2``); a turn ends with ``<|im_end|>``.
"""

from __future__ import annotations

from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

#: What the chat template renders for one image part.
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END

#: Pad tokens that stand for vision features: a policy must never sample one (a sampled pad
#: makes the rollout's pad count disagree with its images).
PLACEHOLDER_TOKENS = (IMAGE_PAD, VIDEO_PAD)

#: Tokens a policy never samples: the placeholders and the vision block's delimiters.
NEVER_SAMPLED_TOKENS = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` in ``tokenizer``, or None when the tokenizer does not know it (an
    unknown token maps to the unk id, or fails, depending on the tokenizer)."""
    try:
        i = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # noqa: BLE001 - a tokenizer without the token simply lacks it
        return None
    if not isinstance(i, int) or i < 0 or i == getattr(tokenizer, "unk_token_id", None):
        return None
    return i


def _ids(tokenizer: Any, tokens: tuple[str, ...], owners: tuple[Any, ...]) -> list[int]:
    out = {i for i in (token_id(tokenizer, t) for t in tokens) if i is not None}
    for owner in owners:  # the model config / processor may name the ids themselves
        for attr in ("image_token_id", "video_token_id"):
            v = getattr(owner, attr, None)
            if isinstance(v, int) and v >= 0:
                out.add(v)
    return sorted(out)


def placeholder_ids(tokenizer: Any, *owners: Any) -> list[int]:
    """Sorted ids of the vision pad tokens (:data:`PLACEHOLDER_TOKENS`) that ``tokenizer`` knows,
    plus the ``image_token_id`` / ``video_token_id`` that ``owners`` (a model config, a processor)
    declare; empty for a text-only tokenizer."""
    return _ids(tokenizer, PLACEHOLDER_TOKENS, owners)


def never_sampled_ids(tokenizer: Any, *owners: Any) -> list[int]:
    """Sorted ids a policy must never sample: :func:`placeholder_ids` plus ``<|vision_start|>`` and
    ``<|vision_end|>`` (the RL engines suppress them; a sampled one breaks the pad count)."""
    return _ids(tokenizer, NEVER_SAMPLED_TOKENS, owners)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn: ``<|im_end|>``, then the tokenizer's EOS when it differs."""
    out = [i for i in (token_id(tokenizer, IM_END),) if i is not None]
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and eos not in out:
        out.append(eos)
    return out
