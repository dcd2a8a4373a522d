"""Thyme RL data -> veRL parquet rows for ``thyme_agent``.

``python -m thyme.integrations.verl.data OUT.parquet IN.jsonl [IN2.jsonl ...] [--images-root DIR]``

Reads what ``thyme train rl`` reads (:func:`thyme.train.rl.data.load_prompts`: RL records in
the released schema, or benchmark rows wrapped in the Thyme prompt) and writes one veRL row per
prompt (``verl.utils.dataset.RLHFDataset`` columns):

- ``data_source``: ``"thyme"``; ``agent_name``: ``"thyme_agent"``;
- ``prompt``: the chat (system, user with one ``<image>`` per input image), for veRL's prompt
  length filter and logs; ``images``: the input image paths (absolute: every node must see them,
  e.g. on a shared filesystem);
- ``reward_model``: ``{"style": "rule", "ground_truth": solution}``;
- ``extra_info``: ``{"index", "question", "thyme": RLPrompt JSON}``: what the agent loop rolls
  out (the Thyme system prompt and user turn byte for byte) and the reward reads.

Raises ``ThymeError`` for unreadable inputs (naming file and line), as ``thyme train rl`` does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from ... import protocol
from ...train.rl.data import RLPrompt, load_prompts


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")


def verl_row(p: RLPrompt, index: int) -> dict[str, Any]:
    """One veRL dataset row of ``p`` (see the module docstring)."""
    system = next((m for m in p.messages if m.get("role") == "system"), None)
    user = next(m for m in p.messages if m.get("role") == "user")
    n_img = sum(1 for c in user["content"] if isinstance(c, dict) and c.get("type") == "image") if isinstance(user["content"], list) else 0
    chat = []
    if system is not None:
        chat.append({"role": "system", "content": _text(system["content"])})
    chat.append({"role": "user", "content": protocol.IMAGE_PLACEHOLDER * n_img + ("\n" if n_img else "") + _text(user["content"])})
    return {
        "data_source": "thyme",
        "agent_name": "thyme_agent",
        "prompt": chat,
        "images": list(p.images),
        "reward_model": {"style": "rule", "ground_truth": p.solution},
        "extra_info": {"index": index, "question": p.question, "thyme": p.to_json()},
    }


def write_parquet(prompts: Sequence[RLPrompt], out: str | Path) -> Path:
    """Write the rows of ``prompts`` to ``out`` (parquet, through pandas/pyarrow, veRL's own deps)."""
    import pandas as pd

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([verl_row(p, i) for i, p in enumerate(prompts)]).to_parquet(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    root = None
    if "--images-root" in args:
        i = args.index("--images-root")
        root = args[i + 1] if i + 1 < len(args) else None
        del args[i : i + 2]
    if len(args) < 2 or any(a.startswith("-") for a in args) or root == "":
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    prompts = load_prompts(args[1:], images_root=root)
    path = write_parquet(prompts, args[0])
    print(f"{len(prompts)} rows -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
