"""Thyme SFT on TRL: configs, collator, modality batches, a CPU run of the tiny checkpoint, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from thyme.errors import ThymeError
from thyme.train.collator import ModalityGroupedSampler
from thyme.config import parse_set
from thyme.train.sft_config import SFTRunConfig, load_sft_config

from ..conftest import CORPUS, REPO, corpus_records, needs_corpus

CONFIGS = REPO / "configs"


def run_module(module: str, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def corpus_jsonl(path: Path, ids: list[str]) -> Path:
    with path.open("w") as f:
        for r in corpus_records():
            if r["id"] in ids:
                r = dict(r, image=[str(CORPUS / "thyme" / p) for p in r["image"]])
                f.write(json.dumps(r) + "\n")
    return path


def tiny_cfg(model, files, out, **kw) -> SFTRunConfig:
    base = dict(
        model=str(model), train_files=[str(f) for f in files], output_dir=str(out), max_pixels=12544, learning_rate=5e-3,
        effective_batch_size=2, per_device_train_batch_size=1, gradient_checkpointing=False, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", warmup_ratio=0.0, report_to=["none"], seed=0,
        allow_absolute_paths=True,  # corpus_jsonl names the corpus images by absolute paths outside tmp_path
    )
    base.update(kw)
    return SFTRunConfig(**base)


# --------------------------------------------------------------------------- configs


def test_stage_configs_carry_the_paper_defaults():
    s1 = load_sft_config(CONFIGS / "sft_stage1.yaml")
    assert (s1.learning_rate, s1.num_train_epochs, s1.effective_batch_size, s1.max_length, s1.max_pixels) == (1e-5, 3, 128, 10240, 3211264)
    assert s1.freeze_vision_tower and s1.last_round_only and not s1.group_by_modality and not s1.use_lora
    assert s1.accumulation_steps(8) == 16 and s1.accumulation_steps(1) == 128
    s2 = load_sft_config(CONFIGS / "sft_stage2_math.yaml")
    assert (s2.learning_rate, s2.num_train_epochs, s2.model, s2.group_by_modality) == (1e-6, 3, "runs/sft_stage1", True)
    # the dataclass defaults are the paper's too
    d = SFTRunConfig()
    assert (d.learning_rate, d.num_train_epochs, d.effective_batch_size, d.max_length, d.warmup_ratio) == (1e-5, 3.0, 128, 10240, 0.05)
    # overrides, explicit nulls, errors
    s = load_sft_config(CONFIGS / "sft_stage1.yaml", parse_set(["learning_rate=2e-5", "max_length=null", "report_to=[wandb]"]))
    assert (s.learning_rate, s.max_length, s.report_to) == (2e-5, None, ["wandb"])
    with pytest.raises(ThymeError, match="lerning_rate"):
        load_sft_config(None, {"lerning_rate": 1})
    with pytest.raises(ThymeError, match="not a multiple"):
        SFTRunConfig(effective_batch_size=128, per_device_train_batch_size=3).accumulation_steps(1)
    with pytest.raises(ThymeError, match="key=value"):
        parse_set(["nokey"])


def test_scale_out_configs_point_at_deepspeed_files():
    for z in (2, 3):
        acc = yaml.safe_load((CONFIGS / f"accelerate_zero{z}.yaml").read_text())
        assert acc["distributed_type"] == "DEEPSPEED"
        ds = json.loads((REPO / acc["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == z and ds["bf16"]["enabled"] == "auto"
        assert ds["gradient_accumulation_steps"] == "auto"  # the trainer fills it from our config


def test_modality_sampler_keeps_batches_homogeneous_and_covers_every_sample():
    has_image = [True] * 7 + [False] * 4
    s = ModalityGroupedSampler(has_image, batch_size=3, seed=1)
    order = list(iter(s))
    assert len(order) == len(s) == 9 + 6
    assert set(order) == set(range(11))
    for i in range(0, len(order), 3):
        assert len({has_image[j] for j in order[i: i + 3]}) == 1
    s.set_epoch(0)
    assert list(iter(s)) == order  # deterministic per epoch
    s.set_epoch(1)
    assert list(iter(s)) != order


# --------------------------------------------------------------------------- training on the tiny checkpoint


@needs_corpus
def test_training_overfits_keeps_the_vision_tower_and_masked_tokens_out_of_the_gradient(tiny_checkpoint, tmp_path):
    import torch

    from thyme.backends.hf import HFBackend, vision_tower
    from thyme.train.sft import build_trainer

    files = [corpus_jsonl(tmp_path / "train.jsonl", ["thyme-case-1", "thyme-case-7"])]
    cfg = tiny_cfg(tiny_checkpoint, files, tmp_path / "run", max_steps=10)
    trainer, stats = build_trainer(cfg, show_progress=False)
    assert (stats.kept, stats.with_image, stats.text_only) == (2, 1, 1)
    model = trainer.model
    visual = {n: p.detach().clone() for n, p in vision_tower(model).named_parameters()}
    lm = {n: p.detach().clone() for n, p in model.named_parameters() if "language_model" in n}
    assert visual and all(not p.requires_grad for p in vision_tower(model).parameters())

    # masked tokens get no gradient; the trainer's loss is the mean over trained tokens only
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    labels = batch["labels"]
    assert batch["pixel_values"] is not None and batch["mm_token_type_ids"].sum() > 0
    assert (labels[batch["mm_token_type_ids"] == 1] == -100).all() and (labels[batch["attention_mask"] == 0] == -100).all()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    logits = out.logits
    logits.retain_grad()
    shift = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shift.reshape(-1), ignore_index=-100)
    loss.backward()
    grad = logits.grad[:, :-1].abs().sum(-1)
    masked = shift == -100
    assert grad[masked].max().item() == 0.0
    assert (grad[~masked] > 0).all()
    model.zero_grad()
    trainer_loss = trainer.compute_loss(model, dict(batch))
    assert abs(trainer_loss.item() - loss.item()) < 1e-3

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    for n, p in vision_tower(model).named_parameters():
        assert torch.equal(p.detach(), visual[n]), f"frozen parameter {n} moved"
    assert any(not torch.equal(p.detach(), lm[n]) for n, p in model.named_parameters() if n in lm)

    trainer.save_model(cfg.output_dir)
    backend = HFBackend(cfg.output_dir)  # what `thyme run --model` loads: weights, processor, chat template
    assert backend.describe()["max_pixels"] == 12544 and Path(cfg.output_dir, "chat_template.jinja").is_file()


@needs_corpus
def test_lora_run_saves_a_merged_model_that_loads(tiny_checkpoint, tmp_path):
    from thyme.backends.hf import HFBackend
    from thyme.train.sft import train_sft

    files = [corpus_jsonl(tmp_path / "train.jsonl", ["thyme-case-7"])]
    out = train_sft(tiny_cfg(tiny_checkpoint, files, tmp_path / "lora", max_steps=1, use_lora=True, effective_batch_size=1), show_progress=False)
    assert out["merged_dir"] and Path(out["output_dir"], "adapter_config.json").is_file()
    HFBackend(out["merged_dir"])


# --------------------------------------------------------------------------- end to end


@needs_corpus
def test_convert_verify_stage1_stage2_and_run_end_to_end(tiny_checkpoint, tmp_path):
    from thyme.data.convert import ConvertConfig, convert
    from thyme.data.verify import verify
    from thyme.sandbox import Sandbox
    from thyme.train.sft import train_sft

    from ..data.test_convert import released_sft_rows, write_parquet

    # released SFT rows (embedded images, the authors' paths) -> local records -> execution filter
    src = write_parquet(released_sft_rows(), tmp_path / "src.parquet")
    records = tmp_path / "data" / "sft.jsonl"
    assert convert(str(src), records, ConvertConfig(split="2round")).written == 2
    kept = tmp_path / "data" / "sft.kept.jsonl"
    with Sandbox() as sandbox:
        v = verify(records, sandbox=sandbox, kept_path=kept, rejected_path=tmp_path / "data" / "sft.rejected.jsonl")
    assert (v.kept, v.rejected) == (2, 0), v.reasons

    # stage 1 from the tiny base model
    s1 = train_sft(tiny_cfg(tiny_checkpoint, [kept], tmp_path / "stage1", max_steps=2), show_progress=False)
    assert s1["global_step"] == 2 and s1["records"] == 2

    # stage 2 (math annealing) from stage 1, through the command line and the shipped config
    p = run_module(
        "thyme.cli", "train", "sft", "--config", str(CONFIGS / "sft_stage2_math.yaml"),
        "--model", str(tmp_path / "stage1"), "--train-file", str(kept), "--output-dir", str(tmp_path / "stage2"),
        "--max-steps", "2", "--json",
        *[f"--set={kv}" for kv in ("max_pixels=12544", "effective_batch_size=2", "gradient_checkpointing=false",
                                   "dataloader_num_workers=0", "report_to=[none]", "save_strategy=no")],
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s2 = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s2["global_step"], s2["with_image"], s2["text_only"], s2["gradient_accumulation_steps"]) == (2, 1, 1, 2)
    cfg2 = yaml.safe_load((tmp_path / "stage2" / "thyme_sft_config.yaml").read_text())
    assert cfg2["learning_rate"] == 1e-6 and cfg2["group_by_modality"] is True

    # the result answers through `thyme run`
    image = CORPUS / "thyme/images/case6-1.jpg"
    p = run_module("thyme.cli", "run", "--model", str(tmp_path / "stage2"), "--image", str(image), "--question", "What is written?",
                   "--max-new-tokens", "8", "--max-rounds", "1", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().startswith("answer:")
