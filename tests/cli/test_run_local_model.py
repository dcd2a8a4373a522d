"""`thyme run` end to end: hf backend on a tiny checkpoint, a real image, the real sandbox.

The prompt the model sees is byte for byte what Thyme was trained on, and an image the
sandbox produces enters the next round's forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from thyme import protocol
from thyme.agent import Agent, AgentConfig
from thyme.backends.base import GenerationRequest
from thyme.backends.hf import HFBackend, capture_vision_inputs
from thyme.sandbox import Sandbox

from ..conftest import CORPUS, corpus_records, needs_corpus
from ..agent.test_replay import run_cli

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
CROP = (
    "<think>The sign is small; zoom in.\n<code>\n```python\n"
    "from PIL import Image\n"
    "img = Image.open(image_path)\n"
    "crop = img.crop((1550, 2650, 1850, 2750)).resize((600, 200))\n"
    "path = '/mnt/data/temp_processed_images/sign.png'\n"
    "crop.save(path)\n"
    "print(path)\n"
    "```\n</code>"
)


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    return HFBackend(str(tiny_checkpoint), dtype="float32", seed=0)


@needs_corpus
def test_rendered_prompt_is_byte_identical_to_training(backend):
    """System + user turn + a recorded first round, rendered by the real chat template."""
    rec = next(r for r in corpus_records() if r["id"] == "thyme-readme-17127")
    image = str(CORPUS / "thyme" / rec["image"][0])
    question = protocol.strip_question_placeholder(rec["question"])
    msgs = protocol.build_messages(question, [image], image_sizes=[(2496, 1392)])
    template = (CORPUS / "thyme/user_prompt_template.txt").read_text()
    user = template.replace("{user_question}", question).replace("{user_image_path}", image).replace("{user_image_size}", "2496x1392")
    head = (
        "<|im_start|>system\n" + (CORPUS / "thyme/system_prompt.txt").read_text() + "<|im_end|>\n"
        "<|im_start|>user\n" + user.replace("<image>", VISION, 1) + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert backend.render_prompt(GenerationRequest(msgs)) == head

    # after the first code round: the recorded response up to its sandbox output, with the
    # output image as vision tokens, exactly as the SFT data was rendered
    first = protocol.split_recorded_response(rec["response"])[0]
    parts = [protocol.text_part(first)] + protocol.feedback_parts(type("R", (), {"ok": True, "images": ["/x.jpg"], "stdout": "", "state_lost": False})())
    recorded = rec["response"][: rec["response"].index("</sandbox_output>") + len("</sandbox_output>")]
    assert backend.render_prompt(GenerationRequest(msgs, protocol.merge_text_parts(parts))) == head + recorded.replace("<image>", VISION)


@needs_corpus
def test_sandbox_image_enters_the_next_round(backend, tmp_path):
    image = str(CORPUS / "thyme/images/case1-1.jpg")
    cfg = AgentConfig(prefill=CROP, max_new_tokens=8, max_rounds=1)
    with Sandbox() as sandbox, Agent(backend, sandbox, cfg, artifacts_dir=tmp_path / "art") as agent:
        with capture_vision_inputs(backend.model) as calls:
            traj = agent.run("What street is on the sign?", [image])
    assert traj.stop_reason != "error", traj.error
    forced = traj.turns[0]
    assert forced.execution["ok"], forced.execution
    assert forced.execution["stdout"].strip() == "/mnt/data/temp_processed_images/sign.png"
    (out,) = traj.output_images()
    with Image.open(out) as im:
        assert im.size == (600, 200)
    # one forward pass for round 1, holding the input image and then the sandbox image
    grids = calls[0]["grid_thw"].tolist()
    assert len(grids) == 2
    expected = backend.processor.image_processor(images=[Image.open(out).convert("RGB")], return_tensors="pt")
    n = expected["pixel_values"].shape[0]
    assert grids[1] == expected["image_grid_thw"][0].tolist()
    assert torch.allclose(calls[0]["pixel_values"][-n:], expected["pixel_values"].float(), atol=1e-5)


@needs_corpus
def test_thyme_run_cli_writes_the_trajectory_and_its_images(tiny_checkpoint, tmp_path):
    out = tmp_path / "run" / "traj.json"
    p = run_cli(
        "run", "--model", str(tiny_checkpoint), "--image", str(CORPUS / "thyme/images/case1-1.jpg"),
        "--question", "What street is on the sign?", "--prefill", CROP,
        "--max-new-tokens", "8", "--max-rounds", "2", "--dtype", "float32", "--seed", "0", "--out", str(out),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip().splitlines()[-1].startswith("answer:")
    assert "<sandbox_output>[image " in p.stdout  # the feedback was streamed with the reasoning
    d = json.loads(out.read_text())
    assert d["question"] == "What street is on the sign?"
    assert d["stop_reason"] in {"answer", "no_answer", "length", "max_rounds", "token_cap", "repetition"}
    assert len(d["turns"]) >= 2 and d["turns"][0]["code"].startswith("from PIL import Image")
    img = d["turns"][0]["execution"]["images"][0]
    assert not Path(img).is_absolute() and (out.parent / img).is_file()
    assert d["meta"]["model"]["backend"] == "hf"
