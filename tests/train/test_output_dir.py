"""``thyme train sft|rl`` into an ``output_dir`` that holds an earlier run (issue 18, defect 2):
refused before anything loads unless ``--resume`` (continue) or ``--overwrite`` (start afresh:
the old run's checkpoints, model files and rollouts go, the folder's other files stay)."""

from __future__ import annotations

import json

import pytest

from thyme.cli import main as thyme_main


class Loaded(Exception):
    """Raised by the patched trainer builder: the command got past the output-dir check."""


def _finished_run(out, stage: str):
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("model.safetensors", "config.json", "training_args.bin", "chat_template.jinja", f"thyme_{stage}_config.yaml"):
        (out / name).write_text("old")
    if stage == "rl":
        (out / "rollouts.jsonl").write_text(json.dumps({"step": 0}) + "\n")
        (out / "rollout_images").mkdir()
        (out / "rollout_images" / "a.png").write_bytes(b"x")
    (out / "runs" / "Dec07_20-09-28_vm").mkdir(parents=True)
    (out / "runs" / "Dec07_20-09-28_vm" / "events.out.tfevents.1.vm.1.0").write_bytes(b"x")
    (out / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n---\n")
    (out / "notes.txt").write_text("mine")  # not thyme's: never removed
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n")


@pytest.fixture
def builds(monkeypatch):
    """Patch both stages' trainer builders: record that they were reached, and stop there."""
    import thyme.train.rl.run as rl_run
    import thyme.train.sft as sft

    calls = []

    def fake(cfg, **kw):
        calls.append(cfg.output_dir)
        raise Loaded

    monkeypatch.setattr(sft, "build_trainer", fake)
    monkeypatch.setattr(rl_run, "build_trainer", fake)
    return calls


def _argv(stage, out, tmp_path, *extra):
    f = tmp_path / "train.jsonl"
    f.write_text("{}\n")
    return ["train", stage, "--model", str(tmp_path / "base"), "--train-file", str(f), "--output-dir", str(out), *extra]


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_train_into_a_finished_run_is_refused_before_loading(stage, tmp_path, builds, capsys):
    out = tmp_path / "run"
    _finished_run(out, stage)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert thyme_main(_argv(stage, out, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier training run" in err and "checkpoint-2" in err and "--overwrite" in err and "--resume" in err
    assert "Traceback" not in err
    assert builds == []  # nothing loaded
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing touched


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_overwrite_removes_only_the_old_run_and_resume_keeps_it(stage, tmp_path, builds):
    out = tmp_path / "run"
    _finished_run(out, stage)
    with pytest.raises(Loaded):
        thyme_main(_argv(stage, out, tmp_path, "--resume"))
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()
    with pytest.raises(Loaded):
        thyme_main(_argv(stage, out, tmp_path, "--overwrite"))
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["data", "data/train.jsonl", "notes.txt", "runs"]
    assert builds == [str(out), str(out)]


def test_overwrite_with_resume_or_of_the_base_model_folder_is_refused(tmp_path, builds, capsys):
    out = tmp_path / "run"
    _finished_run(out, "sft")
    assert thyme_main(_argv("sft", out, tmp_path, "--overwrite", "--resume")) == 2
    assert "contradict" in capsys.readouterr().err
    argv = _argv("sft", out, tmp_path, "--overwrite")
    argv[argv.index("--model") + 1] = str(out)
    assert thyme_main(argv) == 2
    assert "would remove the model this run starts from" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and builds == []


def test_a_folder_without_a_run_trains(tmp_path, builds):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Loaded):
        thyme_main(_argv("sft", out, tmp_path))
