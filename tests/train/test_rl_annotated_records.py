"""``thyme train rl`` on records of ``thyme data annotate import`` (issue 19): it trains on them
unchanged and each rollout's ``trajectory.meta`` in ``rollouts.jsonl`` carries the record's
target box, category, annotators and image size (tiny checkpoint, CPU, two steps)."""

from __future__ import annotations

import json

from PIL import Image

from ..data.test_annotate import H, W, _ann, _task
from .test_grpo import small


def test_two_rl_steps_on_annotated_records_carry_the_target_into_rollouts(tiny_checkpoint, tmp_path):
    from thyme.data.annotate import AnnotateConfig, import_annotations
    from thyme.train.rl.run import train_rl

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (W, H), (10, 120, 200)).save(photos / "big.png")
    export = tmp_path / "export.json"
    tasks = [
        _task(1, _ann(11, "a@x"), _ann(12, "b@x", answer="stop")),
        _task(2, _ann(21, "a@x", box=(900, 50, 960, 90), category="quantity")),
    ]
    export.write_text(json.dumps(tasks))
    s = import_annotations(export, tmp_path / "rl.jsonl", cfg=AnnotateConfig(), images_root=photos)
    assert s.kept == 2
    # the images lie below the records file's folder: no --allow-absolute-paths needed
    out = train_rl(small(tiny_checkpoint, [tmp_path / "rl.jsonl"], tmp_path / "rl", allow_absolute_paths=False))
    assert out["global_step"] == 2 and out["rollouts"] == 4
    lines = [json.loads(l) for l in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    by_group = {l["group"]: l["trajectory"]["meta"] for l in lines}
    assert by_group["task-1"] == {
        "annotators": ["a@x", "b@x"],
        "image_size": [W, H],
        "bbox": [100.0, 100.0, 140.0, 130.0],
        "category": "OCR",
    }
    assert by_group["task-2"]["bbox"] == [900.0, 50.0, 960.0, 90.0] and by_group["task-2"]["category"] == "quantity"
