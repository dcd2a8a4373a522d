"""GRPO-ATS rollouts on the real in-process vLLM (CPU build): ATS as a logits processor against
stop-and-resubmit, side by side in one run.

A tiny random checkpoint (head size 32, vLLM's CPU attention) writes a script through
:mod:`thyme.testing.vllm_script` (think, a crop in a ``<code>`` block, then, after the sandbox
image, an answer): vLLM's forward, sampling, stop strings and the ATS processor run as in
training, only the chosen tokens are scripted. Both modes roll out the same G rows with the real
sandbox (same seed, same tokens: checked).

Printed (one JSON line), measured in this one run:

- ``engine_calls_per_code_block``: engine calls spent on model-written code blocks per block
  (processor: 1.0, one call through ``</code>``; resubmit: 2.0, stop at ``<code>`` and
  resubmit at temperature 0 until ``</code>``), and ``engine_calls`` in all;
- ``rollout_s`` of each mode (best of ``--repeats``, after one untimed warm-up run) and their ratio (on a CPU with a tiny model the engine step cost
  dominates less than on a GPU with a 7B model; the count of calls is the portable figure);
- ``same_tokens``: the two modes produced the same completion ids.

Run it in the vLLM environment (``make venv-vllm``)::

    .venv-vllm/bin/python benchmarks/rollout_vllm.py [--group 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CODE = (
    "<think>Zoom in on the top left.</think>\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    'img.crop((0, 0, 64, 48)).save("/mnt/data/temp_processed_images/c.png")\nprint("/mnt/data/temp_processed_images/c.png")\n```\n</code>'
)
ANSWER = "<think>The crop shows the sign.</think>\n<answer>B</answer>"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", type=int, default=8, help="rollouts (G rows of one prompt)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per mode (the best is printed)")
    ap.add_argument("--max-pixels", type=int, default=12544)
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    from thyme import protocol
    from thyme.backends.processors import load_processor
    from thyme.chat import never_sampled_ids
    from thyme.rollout import RolloutLimits, RolloutRunner, SamplingSettings, VLLMColocateEngine
    from thyme.rollout.engines.vllm import ats_processor_installed, vllm_pixel_budget
    from thyme.sandbox import Sandbox
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint
    from thyme.testing.vllm_script import colocate_llm
    from thyme.train.rl.data import RLPrompt

    if not ats_processor_installed():
        raise SystemExit("thyme's vLLM ATS processor is not registered here: install thyme into the vLLM environment (make venv-vllm)")
    d = Path(tempfile.mkdtemp(prefix="thyme-bench-vllm-"))
    ckpt = write_tiny_checkpoint(d / "tiny", head_dim=32)
    img = d / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(img)
    proc = load_processor(str(ckpt), max_pixels=args.max_pixels)
    tok = proc.tokenizer
    t0 = time.perf_counter()
    llm = colocate_llm(str(ckpt))
    build_s = time.perf_counter() - t0
    q = "What is written on the sign?"
    prompt = RLPrompt(id="q", messages=protocol.build_messages(q, [str(img)]), images=[str(img)], solution="B", question=q)
    out: dict = {"group": args.group, "llm_build_s": round(build_s, 1)}
    comps = {}
    with Sandbox() as sb:
        for mode in ("processor", "resubmit"):
            eng = VLLMColocateEngine(
                llm,
                tok,
                never_sampled_ids(tok),
                mm_processor_kwargs=vllm_pixel_budget(proc),
                ats=mode,
                extra_args={"thyme_script": [CODE, ANSWER]},
            )
            runner = RolloutRunner(
                eng,
                proc,
                sb,
                RolloutLimits(max_rounds=3, max_completion_length=256, max_length=8192),
                SamplingSettings(temperature=1.0, ats=True),
                d / mode,
            )
            if mode == "processor":
                runner.run([prompt] * args.group, seed=7)  # warm-up (first requests, sandbox pool): untimed
            best = None
            for _ in range(args.repeats):
                t = time.perf_counter()
                ros = runner.run([prompt] * args.group, seed=7)
                dt = time.perf_counter() - t
                best = dt if best is None else min(best, dt)
            bad = [r.trajectory.error for r in ros if r.mask_reason]
            if bad:
                raise SystemExit(f"{mode}: masked rollouts: {bad[0]}")
            blocks = sum(r.model_code_blocks for r in ros)
            out[mode] = {
                "engine_calls_per_code_block": round(sum(r.code_calls for r in ros) / blocks, 3) if blocks else None,
                "engine_calls": sum(r.engine_calls for r in ros),
                "code_blocks": blocks,
                "rollout_s": round(best, 3),
            }
            comps[mode] = [r.completion_ids for r in ros]
    out["resubmit_over_processor_s"] = round(out["resubmit"]["rollout_s"] / out["processor"]["rollout_s"], 3)
    out["same_tokens"] = comps["processor"] == comps["resubmit"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
