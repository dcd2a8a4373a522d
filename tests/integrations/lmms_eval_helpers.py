"""What the lmms-eval tests share: the strict switch, the local task's rows and files, the thyme config."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from ..conftest import CORPUS

#: ``THYME_REQUIRE_LMMS_EVAL=1`` (``make test-lmms-eval`` / CI): a missing lmms-eval FAILS these
#: tests instead of skipping them (the main suite has no lmms-eval: its own environment).
REQUIRE_LMMS_EVAL = os.environ.get("THYME_REQUIRE_LMMS_EVAL", "").lower() in ("1", "true", "yes")
TASK_DIR = Path(__file__).resolve().parent / "lmms_eval_task"
TASK = "thyme_vstar_local"
#: the rows the corpus has images for (V* Bench; image paths relative to the corpus folder)
CORPUS_ROWS = CORPUS / "benchmarks" / "samples" / "vstar.jsonl"


def require_lmms_eval() -> None:
    """Skip (or, with THYME_REQUIRE_LMMS_EVAL=1, fail) when lmms-eval cannot be imported."""
    why = None
    if importlib.util.find_spec("lmms_eval") is None:
        why = "lmms-eval is not installed here (its own environment: make venv-lmms-eval; make test-lmms-eval)"
    else:
        try:
            import lmms_eval.api.model  # noqa: F401
        except Exception as e:  # noqa: BLE001 - e.g. a torchvision that does not import
            why = f"lmms-eval does not import here ({type(e).__name__}: {e})"
    if why is None:
        return
    if REQUIRE_LMMS_EVAL:
        pytest.fail(f"THYME_REQUIRE_LMMS_EVAL=1 but {why}")
    pytest.skip(why)


def _generated_image(path: Path, seed: int) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (320 + 16 * seed, 240), (250, 250, 245))
    d = ImageDraw.Draw(im)
    d.ellipse((40, 40, 120, 120), fill=(220, 30, 30))
    d.ellipse((200, 120 + 8 * seed, 280, 200), fill=(30, 30, 220) if seed % 2 else (240, 240, 240))
    im.save(path, format="PNG")


def write_benchmark(root: Path) -> Path:
    """A V* data file in the corpus's normalised form under ``root`` (images relative to it):
    the corpus sample rows when the corpus is there (their images copied), then two generated
    rows (always: the test runs without the corpus too). Returns the data file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    if CORPUS_ROWS.is_file():
        for line in CORPUS_ROWS.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            src = CORPUS / row["image"]
            shutil.copyfile(src, root / "images" / src.name)
            row["image"] = f"images/{src.name}"
            rows.append(row)
    for i, (q, opts, ans, cat) in enumerate(
        [
            ("What is the colour of the ball on the left?", "(A) red\n(B) blue\n(C) green\n(D) white", "A", "direct_attributes"),
            ("Is the red ball above or below the other ball?", "(A) below\n(B) above", "B", "relative_position"),
        ]
    ):
        name = f"generated-{i}.png"
        _generated_image(root / "images" / name, i)
        rows.append({"question_id": f"gen-{i}", "image": f"images/{name}", "question": q, "options": opts, "category": cat, "answer": ans})
    data = root / "vstar.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def write_task(data: Path, folder: Path) -> Path:
    """The local task (``lmms_eval_task/``) copied to ``folder`` with its rows: ``thyme eval``'s
    rows of ``data`` (read by thyme's own loader) as docs with absolute image paths. Returns ``folder``."""
    from thyme.evaluate.benchmarks import get_benchmark, load_rows

    rows = load_rows(get_benchmark("vstar"), data, images_root=data.parent)
    shutil.copytree(TASK_DIR, folder, ignore=shutil.ignore_patterns("__pycache__"))
    docs = [
        {
            "question_id": str(r.question_id),
            "question": r.question,
            "options": [[k, v] for k, v in r.options.items()],
            "answer": r.answer,
            "category": r.category,
            "image": str(Path(r.image).resolve()),
            "hint": r.hint or "",
        }
        for r in rows
    ]
    rows_file = folder / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    yaml_file = folder / f"{TASK}.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("test: rows.jsonl", f"test: {rows_file}"))
    return folder


def write_config(path: Path) -> Path:
    """The thyme config both sides run with: greedy, short rounds (a tiny checkpoint), one
    trajectory at a time, a small pixel budget, and one shown image path (the plugin and
    thyme serve write the doc's image to their own files: the model must see the same prompt)."""
    path.write_text(
        "eval: {concurrency: 1}\n"
        "agent: {max_new_tokens: 12, max_rounds: 2, max_total_tokens: 24, temperature: 0.0, shown_path: /mnt/data/input.png}\n"
        "model: {max_pixels: 12544, min_pixels: 3136}\n"
    )
    return path


def lmms_env(tmp: Path) -> dict[str, str]:
    """The environment of an lmms-eval run: offline, its caches under ``tmp``."""
    return {
        **os.environ,
        "HF_HOME": str(tmp / "hf"),
        "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "THYME_SERVE_API_KEY": "",
    }


def read_samples(out: Path) -> dict[str, str]:
    """``{doc_id: the response lmms-eval scored}`` from a ``--log_samples`` output folder
    (lmms-eval 0.7.3 writes ``<model>/<date>_samples_<task>.jsonl`` with ``doc_id`` and
    ``filtered_resps``)."""
    files = sorted(out.rglob(f"*samples_{TASK}*.jsonl"))
    assert files, f"no samples file under {out}: {sorted(str(p) for p in out.rglob('*'))}"
    got = {}
    for line in files[-1].read_text().splitlines():
        if line.strip():
            s = json.loads(line)
            resp = s["filtered_resps"]
            got[str(s["doc_id"])] = resp[0] if isinstance(resp, list) else resp
    return got
