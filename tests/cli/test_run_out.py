"""``thyme run --out`` over an existing trajectory (issue 18, defect 8): refused unless
``--overwrite``, which replaces the JSON and removes the old images (no orphans, no ``-1``
copies); a run that fails before writing leaves no folder it created."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from thyme.cli import main as thyme_main

from ..evaluate.test_runner import Scripted


@pytest.fixture
def scripted(monkeypatch):
    """``--base-url`` builds a scripted backend that answers at once (no server)."""
    import thyme.backends.openai as openai_mod

    monkeypatch.setattr(openai_mod, "OpenAIBackend", lambda base_url, model, **kw: Scripted(lambda r: "<answer>red</answer>"))


def _image(tmp_path, name, colour):
    p = tmp_path / name
    Image.new("RGB", (24, 16), colour).save(p)
    return str(p)


def _argv(image, out, *extra):
    return [
        "run",
        "--image",
        image,
        "--question",
        "colour?",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
        "--out",
        str(out),
        *extra,
    ]


def test_run_out_refuses_to_replace_and_overwrite_leaves_no_orphans(scripted, tmp_path, capsys):
    out = tmp_path / "runs" / "t.json"
    assert thyme_main(_argv(_image(tmp_path, "first.png", "red"), out)) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "t_images").iterdir()) == ["first.png"]
    before = out.read_text()
    capsys.readouterr()
    assert thyme_main(_argv(_image(tmp_path, "second.png", "blue"), out)) == 2
    err = capsys.readouterr().err
    assert "would replace" in err and str(out) in err and "--overwrite" in err
    assert out.read_text() == before
    assert thyme_main(_argv(_image(tmp_path, "second.png", "blue"), out, "--overwrite")) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "t_images").iterdir()) == ["second.png"]  # the old image is gone
    assert json.loads(out.read_text())["images"] == ["t_images/second.png"]
    # the same image again: no second copy beside the first
    assert thyme_main(_argv(_image(tmp_path, "second.png", "blue"), out, "--overwrite")) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "t_images").iterdir()) == ["second.png"]


def test_run_samples_out_is_checked_too(scripted, tmp_path, capsys):
    out = tmp_path / "s.json"
    img = _image(tmp_path, "a.png", "red")
    assert thyme_main(_argv(img, out, "--num-samples", "2", "--temperature", "0.5")) == 0
    assert (tmp_path / "s-0.json").is_file() and (tmp_path / "s-1.json").is_file()
    assert thyme_main(_argv(img, out, "--num-samples", "2", "--temperature", "0.5")) == 2
    assert "s-0.json" in capsys.readouterr().err
    assert thyme_main(_argv(img, out, "--num-samples", "2", "--temperature", "0.5", "--overwrite")) == 0


def test_a_failed_run_leaves_no_out_folder_it_created(tmp_path, monkeypatch, capsys):
    import thyme.backends.openai as openai_mod
    from thyme.errors import ThymeError

    def broken(base_url, model, **kw):
        raise ThymeError("no such server")

    monkeypatch.setattr(openai_mod, "OpenAIBackend", broken)
    out = tmp_path / "new" / "deeper" / "t.json"
    assert thyme_main(_argv(_image(tmp_path, "a.png", "red"), out)) == 2
    assert "no such server" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # a folder that was there before is kept, even empty
    (tmp_path / "mine").mkdir()
    assert thyme_main(_argv(_image(tmp_path, "a.png", "red"), tmp_path / "mine" / "t.json")) == 2
    assert (tmp_path / "mine").is_dir()
