"""GRPO-ATS rollout figures on the tiny checkpoint (CPU), corpus questions, G=8.

Prints: rollout wall time vs generating the same number of tokens with no sandbox (target
<= 1.10), engine calls per model-written code block (HF engine: 1.0 by construction), and the
repetition detector's cost per token against the reference's substring count.

    PYTHONPATH=src python benchmarks/rollout.py [--corpus ../shared/corpus] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--group", type=int, default=8)
    a = ap.parse_args()
    corpus = Path(a.corpus)
    if not (corpus / "thyme/trajectories.jsonl").is_file():
        print(f"corpus not found at {corpus}: skipped", file=sys.stderr)
        return 0
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processors import load_processor
    from thyme.backends.repetition import RepetitionDetector, substring_count_reference
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint
    from thyme.sandbox import Sandbox
    from thyme.train.rl.data import from_rl_record, rl_record
    from thyme.train.rl.rollout import EngineRow, HFEngine, RolloutLimits, RolloutRunner, SamplingSettings

    tmp = Path(tempfile.mkdtemp())
    ck = write_tiny_checkpoint(tmp / "tiny", arch="qwen2_5_vl", seed=0)
    proc = load_processor(ck, max_pixels=12544)
    model = AutoModelForImageTextToText.from_pretrained(ck)
    tok = proc.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    engine = HFEngine(model, proc, [pad], eos, tok.pad_token_id)
    rec = json.loads((corpus / "thyme/trajectories.jsonl").read_text().splitlines()[1])
    p = from_rl_record(rl_record(rec["question"].replace("<image>\n", ""), str(corpus / "thyme" / rec["image"][0]), rec["answer_gt"], rid=rec["id"]), rec["id"], corpus)
    prefill = ('<think>Zoom.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n'
               'img.crop((0, 0, 300, 200)).save("/mnt/data/temp_processed_images/c.png")\nprint("/mnt/data/temp_processed_images/c.png")\n```\n</code>')
    settings = SamplingSettings(1.0, 1.0, 0, 1.0, True)
    with Sandbox() as sb:
        runner = RolloutRunner(engine, proc, sb, RolloutLimits(max_rounds=2, max_completion_length=a.tokens, max_length=4096, prefill=prefill), settings, tmp / "art")
        runner.run([p] * 2, seed=0)  # warm-up
        t0 = time.perf_counter()
        ros = runner.run([p] * a.group, seed=1)
        t_roll = time.perf_counter() - t0
    gen_tokens = sum(sum(r.env_mask) for r in ros)
    # the same number of new tokens, no sandbox: one batch continuing the prompts
    rows = [EngineRow(r.prompt_ids, r.images[:1], max(1, sum(r.env_mask))) for r in ros]
    t0 = time.perf_counter()
    engine.generate(rows, SamplingSettings(1.0, 1.0, 0, 1.0, False, stop=("\x00never",)))
    t_gen = time.perf_counter() - t0
    code_blocks = sum(r.model_code_blocks for r in ros)
    calls = sum(r.code_calls for r in ros)
    # repetition detector cost per token vs the reference's substring count per round
    rng = random.Random(0)
    toks = [rng.randrange(150000) for _ in range(20000)]
    t0 = time.perf_counter()
    RepetitionDetector().extend(toks)
    det_us = (time.perf_counter() - t0) / len(toks) * 1e6
    text = "".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(1000))
    t0 = time.perf_counter()
    substring_count_reference(text)
    ref_s = time.perf_counter() - t0
    figures = {
        "group": a.group, "model_tokens": gen_tokens, "rollout_s": round(t_roll, 3), "same_tokens_no_sandbox_s": round(t_gen, 3),
        "rollout_over_plain": round(t_roll / t_gen, 3) if t_gen else None,
        "engine_calls_per_code_block": round(calls / code_blocks, 3) if code_blocks else None, "model_code_blocks": code_blocks,
        "repetition_detector_us_per_token": round(det_us, 3),
        "reference_substring_count_s_per_check_1000_chars": round(ref_s, 4),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
