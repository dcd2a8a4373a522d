"""Tiny random checkpoints of the real Qwen VL architectures, and processor loading without torchvision."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyme.backends.processors import load_processor, pixel_budget, torchvision_available, without_video
from thyme.errors import ModelLoadError
from thyme.testing.tiny_checkpoint import (
    ARCHS,
    CHAT_TEMPLATES,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN3_VL_TEMPLATE_SHA256,
    QWEN_SPECIAL_TOKENS,
    write_tiny_checkpoint,
)

SYSTEM_USER_IMAGE = [
    {"role": "system", "content": [{"type": "text", "text": "You reason with code."}]},
    {"role": "user", "content": [{"type": "image", "image": "/nowhere/x.jpg"}, {"type": "text", "text": "What is written on the sign?"}]},
]
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou reason with code.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is written on the sign?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> tuple[Path, float]:
    """A Qwen2.5-VL tiny checkpoint and the seconds its writing took."""
    t0 = time.perf_counter()
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", arch="qwen2_5_vl", seed=0)
    return path, time.perf_counter() - t0


@pytest.fixture(scope="session")
def loaded(ckpt):
    from transformers import AutoModelForImageTextToText

    path, _ = ckpt
    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    model.eval()
    return processor, model


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def test_writes_the_hub_layout_fast(ckpt):
    path, seconds = ckpt
    assert seconds < 10, f"writing took {seconds:.1f} s"
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.json",
    } <= names
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (14, 2, 2)
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)
    assert pre["processor_class"] == "Qwen2_5_VLProcessor"
    assert json.loads((path / "chat_template.json").read_text())["chat_template"] == QWEN2_VL_CHAT_TEMPLATE
    assert (path / "model.safetensors").stat().st_size < 5_000_000


def test_loads_with_the_auto_classes(loaded):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    processor, model = loaded
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"  # saves under the real name
    assert pixel_budget(processor) == (3136, 12845056)
    cfg = model.config
    assert cfg.text_config.hidden_size == 64 and cfg.text_config.num_hidden_layers == 2
    assert cfg.text_config.num_attention_heads == 4 and cfg.text_config.num_key_value_heads == 2
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == 64 // 4 // 2
    assert cfg.vision_config.depth == 2 and cfg.vision_config.hidden_size == 64


@pytest.mark.skipif(torchvision_available(), reason="checks the failure mode without torchvision")
def test_plain_autoprocessor_needs_torchvision(ckpt):
    """Why load_processor exists: AutoProcessor builds a torchvision video processor."""
    from transformers import AutoProcessor

    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(ckpt[0])


def test_special_token_ids(loaded):
    processor, model = loaded
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "special tokens must follow the vocabulary in Qwen's order"
    assert 1500 < ids[0] <= 2000  # the trained BPE vocabulary comes first
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size == len(tok)
    gen = model.generation_config
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id
    assert gen.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    for t in ("<tool_call>", "</tool_call>", "<|object_ref_start|>", "<|vision_pad|>", "<|box_start|>"):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t


def test_chat_template_renders_the_qwen_format(loaded):
    processor, _ = loaded
    assert processor.chat_template == QWEN2_VL_CHAT_TEMPLATE
    assert processor.apply_chat_template(SYSTEM_USER_IMAGE, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    # Without a system message the template adds Qwen's default one.
    no_sys = processor.apply_chat_template(SYSTEM_USER_IMAGE[1:], add_generation_prompt=True, tokenize=False)
    assert no_sys.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_thyme_text_tokenises_sensibly(loaded):
    tok = loaded[0].tokenizer
    text = (
        '<think>The sign is small, so I will crop it.\n<code>\n```python\nimport cv2\nimg = cv2.imread("/tmp/a.jpg")\n'
        "print(img.shape)\n```\n</code>\n<sandbox_output>(480, 640, 3)\n</sandbox_output></think>\n<answer>B</answer>"
    )
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # byte-level: lossless
    assert len(ids) < len(text) / 2.5, f"{len(ids)} tokens for {len(text)} characters"
    pieces = tok.convert_ids_to_tokens(ids)
    assert "```" in pieces or "```Ċ" in pieces
    assert any("python" in p for p in pieces)
    special = tok("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False).input_ids
    assert len(special) == 3


def test_generates_from_an_image(loaded):
    import torch

    processor, model = loaded
    prompt = processor.apply_chat_template(SYSTEM_USER_IMAGE, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[_image(200, 120)], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    grid = inputs["image_grid_thw"][0].tolist()
    assert n_image_tokens == grid[0] * grid[1] * grid[2] // 4
    pad_ids = [model.config.image_token_id, model.config.video_token_id]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, suppress_tokens=pad_ids)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_same_seed_same_checkpoint(tmp_path, ckpt):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (ckpt[0] / name).read_bytes(), name
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (ckpt[0] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "qwen2_5_vl"])
def test_other_archs(tmp_path, arch):
    import torch
    from transformers import AutoModelForImageTextToText

    path = write_tiny_checkpoint(tmp_path / arch, arch=arch)
    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.model_type == arch
    assert processor.chat_template == CHAT_TEMPLATES[arch]
    assert processor.apply_chat_template(SYSTEM_USER_IMAGE, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    patch = 16 if arch == "qwen3_vl" else 14
    assert processor.image_processor.patch_size == patch
    inputs = processor(
        text=[processor.apply_chat_template(SYSTEM_USER_IMAGE, add_generation_prompt=True, tokenize=False)],
        images=[_image(160, 96)],
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[1] == 3 * 2 * patch * patch
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id, model.config.video_token_id]
        )
    assert out.shape[1] > inputs["input_ids"].shape[1]
    if arch == "qwen3_vl":
        tok = processor.tokenizer
        assert tok.convert_ids_to_tokens(tok("<think>", add_special_tokens=False).input_ids) == ["<think>"]
        # Qwen3-VL adds no default system message.
        assert processor.apply_chat_template(SYSTEM_USER_IMAGE[1:], add_generation_prompt=True, tokenize=False).startswith(
            "<|im_start|>user\n"
        )


def test_qwen3_template_is_the_shipped_bytes():
    data = QWEN3_VL_CHAT_TEMPLATE.encode("utf-8")
    assert len(data) == 5292
    assert hashlib.sha256(data).hexdigest() == QWEN3_VL_TEMPLATE_SHA256


def test_unknown_arch():
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        write_tiny_checkpoint("/tmp/never-written", arch="llava")


def test_cli_entry(tmp_path, capsys):
    from thyme.cli import main

    assert main(["dev", "tiny-checkpoint", str(tmp_path / "c"), "--arch", "qwen2_vl"]) == 0
    assert "qwen2_vl" in capsys.readouterr().out
    assert (tmp_path / "c" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- processor loading


def test_pixel_budget(ckpt):
    processor = load_processor(ckpt[0], min_pixels=28 * 28, max_pixels=56 * 56)
    assert pixel_budget(processor) == (784, 3136)
    out = processor.image_processor(images=[_image(500, 300)], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert h * w * 14 * 14 <= 56 * 56
    default = load_processor(ckpt[0]).image_processor(images=[_image(500, 300)], return_tensors="pt")
    assert default["pixel_values"].shape[0] > out["pixel_values"].shape[0]
    with pytest.raises(ModelLoadError, match="min_pixels"):
        load_processor(ckpt[0], min_pixels=5000, max_pixels=1000)
    with pytest.raises(ModelLoadError, match="positive"):
        load_processor(ckpt[0], max_pixels=-3)


def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as e:
        load_processor(missing)
    assert str(missing) in str(e.value) and "hint" in str(e.value)


def test_incomplete_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as e:
        load_processor(tmp_path / "empty")
    assert "empty" in str(e.value) and "config.json" in str(e.value)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import thyme.backends.processors as procs

    monkeypatch.setattr(procs, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_processor("thyme-tests/surely-not-a-cached-model")
    assert time.perf_counter() - t0 < 20  # straight to the local cache, no network retries
    msg = str(e.value)
    assert "thyme-tests/surely-not-a-cached-model" in msg and "local path" in msg


def test_without_video_keeps_the_class_identity():
    from transformers import Qwen2_5_VLProcessor

    sub = without_video(Qwen2_5_VLProcessor)
    assert sub is without_video(Qwen2_5_VLProcessor)
    assert issubclass(sub, Qwen2_5_VLProcessor) and sub.__name__ == "Qwen2_5_VLProcessor"
    assert "video_processor" not in sub.get_attributes()
    assert "video_processor" in Qwen2_5_VLProcessor.get_attributes()  # the library class is untouched


@pytest.mark.parametrize("arch", ARCHS)
def test_head_dim_32_for_vllm(tmp_path, arch):
    """``head_dim=32`` (vLLM's CPU attention refuses 16): same hidden size, 2 heads over 1 KV
    head, an M-RoPE section that covers the half head; it loads and generates in transformers."""
    import torch
    from transformers import AutoModelForImageTextToText

    path = write_tiny_checkpoint(tmp_path / arch, arch=arch, head_dim=32)
    model = AutoModelForImageTextToText.from_pretrained(path)
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (2, 1)
    assert text.hidden_size // text.num_attention_heads == 32 and getattr(text, "head_dim", 32) == 32
    assert sum(text.rope_parameters["mrope_section"]) == 16
    processor = load_processor(path)
    inputs = processor(
        text=[processor.apply_chat_template(SYSTEM_USER_IMAGE, add_generation_prompt=True, tokenize=False)],
        images=[_image(160, 96)],
        return_tensors="pt",
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id])
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_unsupported_head_dim_is_refused(tmp_path):
    with pytest.raises(ValueError, match="head_dim 24"):
        write_tiny_checkpoint(tmp_path / "c", head_dim=24)
