"""Bad input gets a clear error that names the input and says what to do."""

from __future__ import annotations

import struct
import zlib

import pytest

from thyme.errors import ImageError
from thyme.imageio import image_size, open_image

from ..agent.test_replay import run_cli


def _png_header_only(path, w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def test_missing_folder_garbage_and_bomb_images(tmp_path):
    with pytest.raises(ImageError, match="image not found: .*nope.jpg"):
        open_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        open_image(tmp_path)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageError, match="cannot read image .*junk.jpg"):
        image_size(junk)
    # 20000 x 20000 claimed by a 100-byte file: refused from the header, nothing decoded
    with pytest.raises(ImageError, match="too large: .*bomb.png.*decompression bomb"):
        open_image(_png_header_only(tmp_path / "bomb.png", 20000, 20000))
    with pytest.raises(ImageError, match="too large"):
        image_size(_png_header_only(tmp_path / "big.png", 13000, 12000))


def test_run_with_a_missing_image_fails_before_loading_the_model(tmp_path):
    p = run_cli("run", "--image", str(tmp_path / "none.png"), "--question", "q", "--model", "no/such-model")
    assert p.returncode == 2
    assert "image not found" in p.stderr and "none.png" in p.stderr
    assert "Traceback" not in p.stderr


def test_run_with_a_model_that_cannot_be_loaded(tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    p = run_cli("run", "--image", str(img), "--question", "q", "--model", str(tmp_path / "no-such-checkpoint"))
    assert p.returncode == 2, p.stderr
    assert "no-such-checkpoint" in p.stderr and "Traceback" not in p.stderr


def test_bad_config_key_is_named(tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agent:\n  max_roundz: 3\n")
    p = run_cli("run", "--image", str(img), "--question", "q", "--model", "m", "--config", str(cfg))
    assert p.returncode == 2 and "max_roundz" in p.stderr and "max_rounds" in p.stderr


def test_train_rl_checks_every_train_image_before_loading_the_model(tmp_path):
    """A missing train image used to mask its rollouts at every step (loss 0, TRL's "all reward
    functions returned None"): the run finished having trained on nothing."""
    import io
    import json

    from PIL import Image

    from thyme.train.rl.data import rl_record

    def write(name, image):
        f = tmp_path / name
        f.write_text(json.dumps(rl_record("What is shown?", image, "A", rid="r1")) + "\n")
        return f

    model = str(tmp_path / "never-loaded")
    p = run_cli("train", "rl", "--model", model, "--train-file", str(write("missing.jsonl", "imgs/gone.jpg")))
    assert p.returncode == 2, p.stderr
    assert "record r1" in p.stderr and str(tmp_path / "imgs" / "gone.jpg") in p.stderr and "train file's own folder" in p.stderr, p.stderr
    assert "never-loaded" not in p.stderr and "Traceback" not in p.stderr
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), "red").save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a valid header, half the pixels
    p = run_cli("train", "rl", "--model", model, "--train-file", str(write("cut.jsonl", str(tmp_path / "cut.jpg"))))
    assert p.returncode == 2 and "cut.jpg" in p.stderr and "truncated" in p.stderr and "never-loaded" not in p.stderr, p.stderr
    p = run_cli("train", "rl", "--model", model, "--train-file", str(tmp_path / "cut.jsonl"), "--set", "check_images=false",
                "--set", "sandbox.allow_weaker=true")  # RL requires every sandbox layer: a host without one would stop before the model
    assert "never-loaded" in p.stderr  # without the full decode it gets as far as the model
