"""GRPO-ATS rollout figures on the tiny checkpoint (CPU), a corpus question, G=8, side by side.

The tiny random model writes no code, so a logits processor forces a script on it (a crop in a
``<code>`` block, then an answer): the model's forward, sampling, ATS and the stopping criteria
all run as in training, only the chosen tokens are scripted. That makes the rollouts contain
model-written code blocks (round 1), sandbox runs with an image (between rounds) and a round 2
that reads the crop.

Printed (one JSON line), all measured in this one run:

- ``rollout_s``: :meth:`RolloutRunner.run` on the G rows (engine calls, sandbox, pad counts,
  bookkeeping);
- ``same_tokens_no_sandbox_s``: the very same engine calls replayed (same rows, contexts,
  images, batch and seed, hence the same tokens), with no sandbox and no runner;
- ``rollout_over_plain`` = their ratio (target <= 1.10), with the vision cache on (the
  shipped code) and off (every pad count and prefill re-running the image processor: the
  cause of the 2.06 measured before), each with its own replay;
- the same with *staggered rows* (row b thinks about 12 x b tokens longer before its code
  block, as sampled rows diverge): each row's code started during the engine call, as soon as
  its block closes (shipped), against every block run after the call;
- ``engine_calls_per_code_block`` over the model-written blocks (HF engine: 1.0; the vLLM
  engines' stop-and-resubmit gives 2.0, see tests/rollout/test_engines.py);
- the repetition detector's cost per token against the reference's substring count per check
  (the reference runs it once per round on the last 1000 characters).

    PYTHONPATH=src python benchmarks/rollout.py [--corpus ../shared/corpus] [--group 8] [--max-pixels 12544]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import timeit
from pathlib import Path

CODE = ('<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n'
        'img.crop((0, 0, 300, 200)).save("/mnt/data/temp_processed_images/c.png")\nprint("/mnt/data/temp_processed_images/c.png")\n```\n</code>')
ANSWER = "<think>The crop shows the sign.</think>\n<answer>D</answer>"


class ScriptForcer:
    """Logits processor (placed first): every entry but the script's next token becomes -inf.

    The k-th segment after the prompt (``prompt_len`` ids) is ``segments[k]``; k is the number of
    ``</sandbox_output>`` in the context. The position inside the segment is found once per row
    per ``generate`` call (decoded prefix), then advanced by one per step.
    """

    def __init__(self, tok, prompt_len: int, segments: list[list[int]], eos: int, row_segments: list[list[list[int]]] | None = None):
        self.tok, self.P, self.segs, self.eos = tok, prompt_len, segments, eos
        self.row_segs = row_segments  # per batch row (rows of different lengths), else ``segments`` for all
        self.start = None

    def _segs(self, b: int) -> list[list[int]]:
        return self.row_segs[b % len(self.row_segs)] if self.row_segs else self.segs

    def _locate(self, ctx: list[int], segs: list[list[int]]) -> tuple[int, int]:
        text = self.tok.decode(ctx[self.P:], skip_special_tokens=False)
        k = text.count("</sandbox_output>")
        if k >= len(segs):
            return k, 0
        partial = text.rsplit("</sandbox_output>", 1)[-1] if k else text
        seg = segs[k]
        m = next((m for m in range(len(seg) + 1) if self.tok.decode(seg[:m], skip_special_tokens=False) == partial), len(seg))
        return k, m

    def __call__(self, input_ids, scores):
        import torch

        B, L = input_ids.shape
        if self.start is None:
            pad = self.tok.pad_token_id
            rows = []
            for b in range(B):
                ids = input_ids[b].tolist()
                first = next((i for i, t in enumerate(ids) if t != pad), 0)
                rows.append(self._locate(ids[first:], self._segs(b)))
            self.start = (L, rows)
        L0, rows = self.start
        out = torch.full_like(scores, float("-inf"))
        for b, (k, m) in enumerate(rows):
            pos = m + (L - L0)
            segs = self._segs(b)
            t = segs[k][pos] if k < len(segs) and pos < len(segs[k]) else self.eos
            out[b, t] = 0.0
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-pixels", type=int, default=12544)
    ap.add_argument("--repeats", type=int, default=3, help="rollout + replay pairs per mode; the median pair is printed")
    a = ap.parse_args()
    corpus = Path(a.corpus)
    if not (corpus / "thyme/trajectories.jsonl").is_file():
        print(f"corpus not found at {corpus}: skipped", file=sys.stderr)
        return 0
    import torch
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processors import load_processor
    from thyme.backends.repetition import RepetitionDetector, substring_count_reference
    from thyme.imageio import open_image
    from thyme.sandbox import Sandbox
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint
    import thyme.rollout as R
    from thyme.train.rl.data import from_rl_record, rl_record

    torch.set_num_threads(1)  # steadier figures on a shared machine
    tmp = Path(tempfile.mkdtemp())
    ck = write_tiny_checkpoint(tmp / "tiny", arch="qwen2_5_vl", seed=0)
    proc = load_processor(ck, max_pixels=a.max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(ck)
    tok = proc.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    engine = R.HFEngine(model, proc, [pad], [eos], tok.pad_token_id)
    rec = json.loads((corpus / "thyme/trajectories.jsonl").read_text().splitlines()[0])
    p = from_rl_record(rl_record(rec["question"].replace("<image>\n", ""), str(corpus / "thyme" / rec["image"][0]), rec["answer_gt"], rid=rec["id"]), rec["id"], corpus)
    segs = [tok.encode(s, add_special_tokens=False) for s in (CODE, ANSWER)]
    prompt_len = len(R.RolloutRunner(engine, proc, None, None, None, tmp).render_prompt(p.messages, [open_image(x, mode="RGB") for x in p.images]))

    orig_generate = model.generate

    # staggered rows: row b thinks b x ~12 tokens longer before its code block, as sampled rows diverge
    musing = [" ".join(f"Region {k} at x={37 * k % 101} shows nothing." for k in range(j)) for j in range(a.group)]
    staggered = [[tok.encode("<think>" + m + " " + CODE[len("<think>"):], add_special_tokens=False), segs[1]] for m in musing]
    stagger = [False]

    def forced_generate(*args, logits_processor=None, **kw):
        forcer = ScriptForcer(tok, prompt_len, segs, eos, staggered if stagger[0] else None)
        return orig_generate(*args, logits_processor=[forcer] + list(logits_processor or []), **kw)

    model.generate = forced_generate
    calls: list[tuple[list, object]] = []
    engine_s = [0.0]
    inner = engine.generate

    def recording_generate(rows, settings, on_stop=None):
        calls.append(([R.EngineRow(ids=list(r.ids), images=list(r.images), max_new_tokens=r.max_new_tokens, code_open=r.code_open) for r in rows], settings))
        t0 = time.perf_counter()
        try:
            return inner(rows, settings, on_stop=on_stop)
        finally:
            engine_s[0] += time.perf_counter() - t0

    engine.generate = recording_generate
    settings = R.SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, ats=True)
    limits = R.RolloutLimits(max_rounds=3, max_completion_length=max(len(s) for row in staggered for s in row) + 8, max_length=4096)

    def once(runner) -> dict:
        calls.clear()
        engine_s[0] = 0.0
        runner.vision = R.vision_cache(proc, reset=True)  # cold, as at the start of a training step
        t0 = time.perf_counter()
        ros = runner.run([p] * a.group, seed=1)
        t_roll = time.perf_counter() - t0
        t_engine = engine_s[0]
        replay = list(calls)
        R.vision_cache(proc, reset=True)  # the replay starts as cold as the rollout did
        t0 = time.perf_counter()
        same = [inner(rows, s) for rows, s in replay]
        t_plain = time.perf_counter() - t0
        blocks = sum(r.model_code_blocks for r in ros)
        return {
            "rollout_s": round(t_roll, 3), "engine_s_inside_rollout": round(t_engine, 3), "same_tokens_no_sandbox_s": round(t_plain, 3),
            "rollout_over_plain": round(t_roll / t_plain, 3), "engine_calls": len(replay),
            "replayed_tokens": sum(len(o.token_ids) for outs in same for o in outs),
            "model_tokens": sum(sum(r.env_mask) for r in ros), "model_code_blocks": blocks, "code_ok": sum(r.code_ok for r in ros),
            "engine_calls_per_code_block": round(sum(r.code_calls for r in ros) / blocks, 3) if blocks else None,
            "sandbox_s_summed": round(sum(r.trajectory.timings["execute_s"] for r in ros), 3),
            "images_per_rollout": sorted({len(r.images) for r in ros}), "stop_reasons": sorted({r.stop_reason for r in ros}),
        }

    def side_by_side(cache_on: bool, sb) -> dict:
        if not cache_on:  # the code before the fix: no entry survives, every use re-runs the image processor
            R.VisionCache._entry = lambda self, im: {}
        try:
            runner = R.RolloutRunner(engine, proc, sb, limits, settings, tmp / "art")
            runner.run([p] * 2, seed=0)  # warm-up (sandbox pool, first image decode)
            runs = sorted((once(runner) for _ in range(a.repeats)), key=lambda d: d["rollout_over_plain"])
        finally:
            R.VisionCache._entry = original_entry
        out = dict(runs[len(runs) // 2])
        out["rollout_over_plain_all"] = [d["rollout_over_plain"] for d in runs]
        return out

    original_entry = R.VisionCache._entry
    with Sandbox() as sb:
        on = side_by_side(True, sb)
        off = side_by_side(False, sb)
        stagger[0] = True
        try:  # rows of different lengths: a row's code starts during the call (shipped) or after it
            stag_early = side_by_side(True, sb)
            R.HFEngine.early_stops = False
            stag_after = side_by_side(True, sb)
        finally:
            R.HFEngine.early_stops = True
            stagger[0] = False
    # repetition detector per token vs the reference's substring count per check (1000 characters, no loop: its worst case)
    rng = random.Random(0)
    toks = [rng.randrange(150000) for _ in range(20000)]
    n_det = 5
    det_us = timeit.timeit(lambda: RepetitionDetector().extend(toks), number=n_det) / (n_det * len(toks)) * 1e6
    text = "".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(1000))
    n_ref = 20
    ref_ms = timeit.timeit(lambda: substring_count_reference(text), number=n_ref) / n_ref * 1e3
    figures = {
        "group": a.group, "max_pixels": a.max_pixels, "vision_cache_on": on, "vision_cache_off": off,
        "staggered_rows_code_started_during_the_call": stag_early, "staggered_rows_code_started_after_the_call": stag_after,
        "repetition_detector_us_per_token": round(det_us, 3),
        "reference_substring_count_ms_per_check_1000_chars": round(ref_ms, 3),
        "reference_us_per_token_at_one_check_per_round_of_100_tokens": round(ref_ms * 1e3 / 100, 3),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
