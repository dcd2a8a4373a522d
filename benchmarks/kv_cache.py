"""KV cache across rounds against the full re-encode, side by side in one run (tiny checkpoint, CPU).

One 3-round greedy trajectory of a Thyme rollout's shape: round 1 from the prompt (system +
user turn with a large input image); after it, feedback with a new image (a crop) and text;
round 2; again; round 3. Two ways to generate each round, on the same ids and images:

- ``reencode``: today's path, ``model.generate`` on the whole sequence with every image's
  ``pixel_values`` (vision tower on all images and prefill of all tokens, every round);
- ``cache``: :class:`thyme.backends.kv_cache.KVCacheSession`, which prefills only the new suffix
  (the last sampled token, the feedback text and the new image's vision tokens).

Image-processor results are computed once per image and shared by both paths (as the RL
rollout's vision cache does), so the figures compare model work only. The trajectories are
run ``--repeats`` times, alternating the paths; medians are printed: the latency of rounds 2
and 3, the whole trajectory, and cache / re-encode ratios for each (wall clock and process CPU
time: the latter is steadier on a shared machine), plus the prefill token counts and whether
both paths produced the same tokens (they must; the exit status is 1 otherwise).

    PYTHONPATH=src python benchmarks/kv_cache.py [--arch qwen2_5_vl] [--max-pixels 2408448] [--new-tokens 24] [--repeats 3] [--no-agent]

Then the same comparison through the path ``thyme run`` / ``thyme eval --model`` take
(``--no-agent`` skips it): :class:`thyme.agent.Agent` with :class:`thyme.backends.hf.HFBackend`
and the real sandbox, ``kv_cache`` on (token ids kept per trajectory, suffix prefill) against
off (the whole conversation re-encoded by the processor every round, image processor included).
A tiny random model writes no code, so rounds 1 and 2 are forced (a logits processor added to
each ``generate`` call makes it emit a fixed crop segment, the same in both runs); round 3 is free
greedy decoding. Printed: rounds 2 and 3 generate latency, generate time of the trajectory and
total trajectory time (sandbox included), cache / re-encode ratios, and whether both produced
the same text.

The input image is the corpus photo ``thyme/images/case1-1.jpg`` (2419 x 4032) when
``--corpus`` has it, else a generated photo-sized image; ``--max-pixels`` sets the budget
(default 2408448, ``configs/rl_grpo_ats.yaml``'s: ~3000 vision tokens for the Qwen2.5-VL patch
14 x merge 2). About 20 s of CPU, 0.7 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


class Pixels:
    """Image-processor results per image object, computed once (``pixels(images)`` like the rollout's VisionCache)."""

    def __init__(self, image_processor):
        self.ip, self.memo = image_processor, {}

    def one(self, im):
        if id(im) not in self.memo:
            out = self.ip(images=[im], return_tensors="pt")
            self.memo[id(im)] = (im, out["pixel_values"], out["image_grid_thw"])
        return self.memo[id(im)][1:]

    def pixels(self, images):
        import torch

        pairs = [self.one(im) for im in images]
        return torch.cat([p for p, _ in pairs]), torch.cat([g for _, g in pairs])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen2_vl", "qwen3_vl"))
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "corpus"))
    ap.add_argument("--max-pixels", type=int, default=2408448, help="per-image pixel budget of the processor (default: the RL config's)")
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens generated per round (EOS suppressed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable figures on a shared machine)")
    ap.add_argument(
        "--agent", action=argparse.BooleanOptionalAction, default=True, help="also measure through Agent + HFBackend (thyme run's path)"
    )
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from thyme.backends.kv_cache import KVCacheSession
    from thyme.backends.processors import load_processor
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    path = write_tiny_checkpoint(Path(tmp.name) / args.arch, arch=args.arch, seed=0)
    proc = load_processor(path, max_pixels=args.max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tok = proc.tokenizer
    pad, vs, ve = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]

    photo = Path(args.corpus) / "thyme" / "images" / "case1-1.jpg"
    if photo.is_file():
        with Image.open(photo) as im:
            im0, source = im.convert("RGB"), str(photo)
    else:
        im0, source = Image.fromarray((np.random.RandomState(0).rand(4032, 2419, 3) * 255).astype("uint8")), "generated 2419x4032"
    crops = [im0.crop((400, 600, 1000, 1200)).resize((448, 448)), im0.crop((1200, 2000, 1800, 2400))]
    vision = Pixels(proc.image_processor)
    for im in [im0] + crops:
        vision.one(im)  # image processor once, outside every timing

    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant that reasons with Python code."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written on the sign? Crop and zoom if needed."}]},
    ]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids0 = tok(text, add_special_tokens=True)["input_ids"]

    def expand(ids, im):
        g = vision.one(im)[1][0]
        k = ids.index(pad)
        return ids[:k] + [pad] * (int(g.prod()) // 4) + ids[k + 1 :]

    def feedback(im, r):
        g = vision.one(im)[1][0]
        text = f"Saved /mnt/data/temp_processed_images/crop_{r}.png (600x600)\n</sandbox_output>"
        return (
            tok.encode("\n<sandbox_output>", add_special_tokens=False)
            + [vs]
            + [pad] * (int(g.prod()) // 4)
            + [ve]
            + tok.encode(text, add_special_tokens=False)
        )

    prompt = expand(ids0, im0)
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.new_tokens,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=eos[1],
        suppress_tokens=eos + [pad, vs, ve],
    )

    def reencode(ids, images):
        x = torch.tensor([ids])
        pv, grid = vision.pixels(images)
        with torch.no_grad():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                mm_token_type_ids=(x == pad).long(),
                pixel_values=pv,
                image_grid_thw=grid,
                generation_config=gc,
            )
        return out[0, len(ids) :].tolist()

    def trajectory(kind):
        sess = KVCacheSession(model, proc, vision=vision, match_images="identity") if kind == "cache" else None
        ids, images, times, cpu, toks, prefill = list(prompt), [im0], [], [], [], []
        t_all, c_all = time.perf_counter(), time.process_time()
        for r in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            if sess is not None:
                g = sess.generate(ids, images, args.new_tokens, generation_config=gc)
                new, fed = g.token_ids, g.prefill_tokens
            else:
                new, fed = reencode(ids, images), len(ids)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            toks.append(new)
            prefill.append(fed)
            if r < 2:
                ids = ids + new + feedback(crops[r], r)
                images = images + [crops[r]]
        return {
            "rounds_s": times,
            "total_s": time.perf_counter() - t_all,
            "rounds_cpu_s": cpu,
            "total_cpu_s": time.process_time() - c_all,
            "tokens": toks,
            "prefill": prefill,
            "context": len(ids),
        }

    trajectory("cache")  # warm-up (allocator, first-call paths), not timed
    runs = {"cache": [], "reencode": []}
    for _ in range(args.repeats):
        for kind in ("reencode", "cache"):
            runs[kind].append(trajectory(kind))

    def med(kind, key, r=None):
        vals = [x[key][r] if r is not None else x[key] for x in runs[kind]]
        return statistics.median(vals)

    same = all(a["tokens"] == b["tokens"] for a in runs["cache"] for b in runs["reencode"])
    res = {
        "arch": args.arch,
        "input_image": source,
        "max_pixels": args.max_pixels,
        "threads": args.threads,
        "repeats": args.repeats,
        "new_tokens_per_round": args.new_tokens,
        "prompt_tokens": len(prompt),
        "final_context_tokens": runs["cache"][0]["context"],
        "prefill_tokens": {k: runs[k][0]["prefill"] for k in runs},
        "same_tokens": same,
    }
    keys = ("round1_s", "round2_s", "round3_s", "total_s")
    for kind in runs:
        res[kind] = {
            "wall": dict(zip(keys, [med(kind, "rounds_s", 0), med(kind, "rounds_s", 1), med(kind, "rounds_s", 2), med(kind, "total_s")])),
            "cpu": dict(
                zip(
                    keys,
                    [med(kind, "rounds_cpu_s", 0), med(kind, "rounds_cpu_s", 1), med(kind, "rounds_cpu_s", 2), med(kind, "total_cpu_s")],
                )
            ),
        }
    res["ratio_cache_over_reencode"] = {
        clock: {k: res["cache"][clock][k] / res["reencode"][clock][k] for k in keys} for clock in ("wall", "cpu")
    }

    print(
        f"KV cache vs full re-encode: {args.arch} tiny checkpoint, input image {source} at max_pixels={args.max_pixels}, "
        f"{args.new_tokens} tokens/round, median of {args.repeats}, {args.threads} thread(s)"
    )
    print(
        f"prompt {len(prompt)} tokens, final context {res['final_context_tokens']} tokens; prefill tokens per round: "
        f"cache {res['prefill_tokens']['cache']}, re-encode {res['prefill_tokens']['reencode']}; same tokens: {same}"
    )
    for clock in ("wall", "cpu"):
        print(f"{clock + ' s':10s}{'round 1':>10s}{'round 2':>10s}{'round 3':>10s}{'total':>10s}")
        for kind in ("reencode", "cache"):
            r = res[kind][clock]
            print(f"{kind:10s}" + "".join(f"{r[k]:10.3f}" for k in keys))
        q = res["ratio_cache_over_reencode"][clock]
        print(f"{'ratio':10s}" + "".join(f"{q[k]:10.2f}" for k in keys) + "   (cache / re-encode)")
    print(json.dumps(res))
    ok = same
    if args.agent:
        ok = agent_benchmark(args, path, photo if photo.is_file() else None) and ok
    tmp.cleanup()
    return 0 if ok else 1


def _crop_segment(box, name, lead):
    return (
        f"{lead}<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
        f"crop = img.crop({box}).resize((448, 448))\npath = '/mnt/data/temp_processed_images/{name}.png'\n"
        "crop.save(path)\nprint(path)\n```\n</code>\n"
    )


def agent_benchmark(args, path, photo) -> bool:
    """Agent + HFBackend, kv_cache on against off (see the module docstring). Returns whether
    both runs produced the same trajectory text."""
    import numpy as np
    import torch
    from PIL import Image

    from thyme.agent import Agent, AgentConfig
    from thyme.backends.hf import HFBackend
    from thyme.sandbox import Sandbox

    tmp = tempfile.TemporaryDirectory()
    if photo is None:
        photo = Path(tmp.name) / "photo.png"
        Image.fromarray((np.random.RandomState(0).rand(4032, 2419, 3) * 255).astype("uint8")).save(photo)
    backend = HFBackend(str(path), dtype="float32", max_pixels=args.max_pixels, seed=0)
    tok = backend.tokenizer
    segments = [
        _crop_segment((400, 600, 1000, 1200), "crop1", "<think>Zoom in."),
        _crop_segment((1200, 2000, 1800, 2400), "crop2", " Once more."),
    ]
    scripts = [tok.encode(s, add_special_tokens=False) for s in segments]
    orig = backend.model.generate

    class Force:
        def __init__(self, script):
            self.script, self.start = script, None

        def __call__(self, input_ids, scores):
            self.start = input_ids.shape[1] if self.start is None else self.start
            n = input_ids.shape[1] - self.start
            if n < len(self.script):
                scores = torch.full_like(scores, -float("inf"))
                scores[:, self.script[n]] = 0.0
            return scores

    calls = {"n": 0}

    def generate(*a, logits_processor=None, **kw):
        k, calls["n"] = calls["n"], calls["n"] + 1
        procs = list(logits_processor or []) + ([Force(scripts[k])] if k < len(scripts) else [])
        return orig(*a, logits_processor=procs, **kw)

    backend.model.generate = generate
    cfg = AgentConfig(max_new_tokens=max(args.new_tokens, max(len(s) for s in scripts) + 8), max_rounds=3)
    runs = {"cache": [], "reencode": []}

    def one(kind):
        backend.kv_cache = kind == "cache"
        calls["n"] = 0
        with Sandbox() as sandbox, Agent(backend, sandbox, cfg, artifacts_dir=Path(tmp.name) / kind) as agent:
            traj = agent.run("What is written on the sign?", [str(photo)], id="bench")
        gen = [t.generate_s for t in traj.turns]
        return {
            "rounds_s": gen,
            "generate_s": sum(gen),
            "total_s": traj.timings["total_s"],
            "texts": [t.text for t in traj.turns],
            "stop": traj.stop_reason,
            "error": traj.error,
        }

    one("cache")  # warm-up
    for _ in range(args.repeats):
        for kind in ("reencode", "cache"):
            runs[kind].append(one(kind))
    del backend.model.generate
    stats = backend.kv_cache_stats()
    first = runs["cache"][0]
    same = all(r["texts"] == first["texts"] and r["error"] is None and len(r["rounds_s"]) == 3 for k in runs for r in runs[k])
    keys = ("round2_s", "round3_s", "generate_s", "total_s")

    def med(kind):
        rs = runs[kind]
        return dict(
            zip(
                keys,
                [
                    statistics.median(r["rounds_s"][1] for r in rs),
                    statistics.median(r["rounds_s"][2] for r in rs),
                    statistics.median(r["generate_s"] for r in rs),
                    statistics.median(r["total_s"] for r in rs),
                ],
            )
        )

    res = {
        "path": "Agent + HFBackend (thyme run)",
        "repeats": args.repeats,
        "same_text": same,
        "stop_reason": first["stop"],
        "cache": med("cache"),
        "reencode": med("reencode"),
        "kv_cache_stats": stats,
    }
    res["ratio_cache_over_reencode"] = {k: res["cache"][k] / res["reencode"][k] for k in keys}
    print(
        f"\nthyme run path (Agent + HFBackend + sandbox), kv_cache on vs off: rounds 1-2 forced crops, round 3 free; "
        f"median of {args.repeats}; same text: {same}"
    )
    print(f"{'wall s':10s}{'round 2':>10s}{'round 3':>10s}{'generate':>10s}{'total':>10s}")
    for kind in ("reencode", "cache"):
        print(f"{kind:10s}" + "".join(f"{res[kind][k]:10.3f}" for k in keys))
    print(f"{'ratio':10s}" + "".join(f"{res['ratio_cache_over_reencode'][k]:10.2f}" for k in keys) + "   (cache / re-encode)")
    print(json.dumps(res))
    backend.close()
    tmp.cleanup()
    return same


if __name__ == "__main__":
    raise SystemExit(main())
