"""``thyme data``: ``convert``, ``verify``, ``show-masks``, ``review``, ``annotate`` (wired into :mod:`thyme.cli` by ``add_parser``/``run``).

Errors in the user's input raise :class:`thyme.errors.ThymeError` (the cli prints them, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from .entry import add_sandbox_flags, sandbox_config


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme data {convert,verify,show-masks,review,annotate,synthesize}`` on an argparse subparsers object."""
    from ..config import add_fields
    from ..data.convert import ConvertConfig
    from ..data.masks import MaskConfig
    from ..data.verify import VerifyConfig

    p = subparsers.add_parser(
        "data", help="SFT and RL data: convert released datasets, execution filtering, loss masks, Label Studio review and annotation"
    )
    sub = p.add_subparsers(dest="data_command", required=True)

    q = sub.add_parser("convert", help="released Thyme datasets (hub id or parquet / JSONL files) to local JSONL + images")
    q.add_argument("source", help="hub id (Kwai-Keye/Thyme-SFT, Kwai-Keye/Thyme-RL) or a parquet / JSON / JSONL file or folder")
    q.add_argument("--out", required=True, help="records JSONL to write (appended; a rerun resumes)")
    add_fields(q, ConvertConfig)
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")

    q = sub.add_parser("verify", help="re-execute every record's code; keep records whose outputs match (execution filtering)")
    q.add_argument("records", help="JSONL of Thyme SFT records")
    q.add_argument("--kept", default=None, help="kept records (default: <stem>.kept.jsonl beside the input)")
    q.add_argument("--rejected", default=None, help="rejected records with the reason (default: <stem>.rejected.jsonl)")
    q.add_argument("--images-root", default=None, help="folder relative image paths start from (default: the records file's folder)")
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")
    add_fields(q, VerifyConfig)
    add_sandbox_flags(q)

    q = sub.add_parser("show-masks", help="print the text a record trains on (the loss-mask spans)")
    q.add_argument("records", help="JSONL of Thyme SFT records")
    q.add_argument("--model", required=True, help="checkpoint (folder or hub id) whose processor and chat template render the record")
    q.add_argument("--index", type=int, required=True, help="which record (counting from 0)")
    q.add_argument("--json", action="store_true", help="print a JSON list of the trained spans' texts")
    q.add_argument("--images-root", default=None, help="folder relative image paths start from (default: the records file's folder)")
    q.add_argument(
        "--allow-absolute-paths",
        action="store_true",
        help="accept image paths that leave the images root (absolute, .., symlinks pointing out); only for records you trust",
    )
    q.add_argument(
        "--config", default=None, help="SFT config YAML whose mask settings to use (last_round_only, max_pixels, min_pixels, system_prompt)"
    )
    add_fields(q, MaskConfig, ("max_pixels", "min_pixels"))
    q.add_argument("--all-rounds", action="store_true", help="train every round (turn last_round_only off)")
    _add_review_parser(sub)
    _add_annotate_parser(sub)
    _add_synthesize_parser(sub)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``thyme data ...`` command; returns the exit status."""
    cmd = args.data_command
    if cmd == "convert":
        return _convert(args)
    if cmd == "verify":
        return _verify(args)
    if cmd == "show-masks":
        return _show_masks(args)
    if cmd == "review":
        return _review(args)
    if cmd == "annotate":
        return _annotate(args)
    if cmd == "synthesize":
        return _synthesize(args)
    raise ThymeError(f"unknown data command {cmd!r}")


def _convert(args: argparse.Namespace) -> int:
    from ..config import build
    from ..data.convert import ConvertConfig, convert, format_summary
    from .replay import CountingProgress

    cfg = build(ConvertConfig, None, args)
    bar = CountingProgress(None, desc="convert", unit="row", interval_s=cfg.progress_interval_s)

    def progress(n: int, total: int | None, failed: int, resumed: int) -> None:
        bar.update(n, resumed=resumed, failed=failed, total=total)

    try:
        summary = convert(args.source, args.out, cfg, progress=progress)
    except BaseException:
        bar.close(summary=False)
        raise
    bar.close()
    print(json.dumps(summary.to_dict(), ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..agent.parallel import resolve_workers
    from ..agent.replay import require_json_objects
    from ..config import build
    from ..data.verify import VerifyConfig, format_summary, verify
    from ..jsonl import count_lines
    from ..sandbox import Sandbox
    from .replay import CountingProgress

    records = Path(args.records)
    if not records.is_file():
        raise ThymeError(f"records file not found: {records}", "pass a JSONL file of Thyme SFT records")
    require_json_objects(records, what="SFT records")  # an image or a CSV: one clear error
    stem = records.with_suffix("")
    kept = args.kept or f"{stem}.kept.jsonl"
    rejected = args.rejected or f"{stem}.rejected.jsonl"
    cfg = build(VerifyConfig, None, args)
    sb_cfg = sandbox_config(args, {})
    total = count_lines(records)  # bounded memory; a non-UTF-8 line counts too
    if total == 0:
        print(f"warning: {records} holds no records; nothing to verify", file=sys.stderr)
    bar = CountingProgress(total, desc="verify", unit="record", interval_s=cfg.progress_interval_s)
    seen = [0]
    rejected_n = [0]

    def on_result(obj: Any, rejection: dict[str, Any] | None) -> None:
        seen[0] += 1
        rejected_n[0] += rejection is not None

    def progress(n: int) -> None:  # n counts the records an earlier run verified; a rejection is a failure
        bar.update(n, resumed=n - seen[0], failed=rejected_n[0])

    kw = dict(kept_path=kept, rejected_path=rejected, images_root=args.images_root, config=cfg, progress=progress, on_result=on_result)
    try:
        if resolve_workers(cfg.workers) == 1 and cfg.ray is None:
            with Sandbox(sb_cfg) as sandbox:
                summary = verify(records, sandbox=sandbox, **kw)
        else:  # each worker starts its own sandbox from this config
            summary = verify(records, sandbox_config=sb_cfg, **kw)
    except BaseException:
        bar.close(summary=False)
        raise
    bar.close()
    print(json.dumps(summary.to_dict(), ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def _show_masks(args: argparse.Namespace) -> int:
    from ..backends.processors import load_processor
    from ..data.masks import MaskConfig, encode_record, prepare_processor, show_masks
    from ..data.records import read_record

    mask = MaskConfig()
    if args.config:
        from ..train.sft_config import load_sft_config

        sft = load_sft_config(args.config)
        mask = MaskConfig(
            last_round_only=sft.last_round_only, min_pixels=sft.min_pixels, max_pixels=sft.max_pixels, system_prompt=sft.system_prompt
        )
    if args.max_pixels is not None:
        mask.max_pixels = args.max_pixels
    if args.min_pixels is not None:
        mask.min_pixels = args.min_pixels
    if args.all_rounds:
        mask.last_round_only = False
    rec = read_record(args.records, args.index, images_root=args.images_root, allow_absolute=args.allow_absolute_paths)
    processor = prepare_processor(load_processor(args.model), mask)
    sample = encode_record(rec, processor, mask)
    print(show_masks(sample, as_json=args.json))
    return 0


# --------------------------------------------------------------------------- review (Label Studio)


def _add_push_flags(q: Any, default_title: str) -> None:
    """``--push URL --token-env VAR --project-title T`` of a Label Studio task export."""
    q.add_argument("--push", default=None, metavar="URL", help="also create a project on this Label Studio server and import the tasks")
    q.add_argument("--token-env", default="LABEL_STUDIO_API_KEY", help="environment variable holding the API token for --push")
    q.add_argument("--project-title", default=None, help=f"title of the project --push creates (default: {default_title})")


def _add_export_source(q: Any) -> None:
    """``EXPORT`` or ``--from-server URL --project ID --token-env VAR`` of a Label Studio import."""
    q.add_argument("export", nargs="?", default=None, help="Label Studio export (Export > JSON) of the project (or --from-server)")
    q.add_argument("--from-server", default=None, metavar="URL", help="fetch the export of --project from this Label Studio server instead")
    q.add_argument("--project", type=int, default=None, help="with --from-server: the project id (export --push prints it)")
    q.add_argument("--token-env", default="LABEL_STUDIO_API_KEY", help="environment variable holding the API token for --from-server")


def _add_review_parser(sub: Any) -> None:
    """``thyme data review {export,import}``: manual review of records in Label Studio."""
    from ..config import add_fields
    from ..data.review import ReviewConfig

    r = sub.add_parser("review", help="manual review in Label Studio: export records as tasks, import the reviewers' decisions")
    rsub = r.add_subparsers(dest="review_command", required=True)
    q = rsub.add_parser("export", help="write Label Studio tasks (tasks.json) and a labeling config (labeling_config.xml) for records")
    q.add_argument("records", help="JSONL of Thyme records (e.g. the kept records of thyme data synthesize / verify)")
    q.add_argument("--out", required=True, help="folder for tasks.json and labeling_config.xml")
    q.add_argument("--images-root", default=None, help="folder relative image paths start from (default: the records file's folder)")
    add_fields(q, ReviewConfig, ("image_mode", "local_files_root", "max_image_mb", "allow_absolute_paths"))
    _add_push_flags(q, "thyme review <records stem>")
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")

    q = rsub.add_parser("import", help="apply a Label Studio JSON export: accepted records out, rejected ones with the reviewers' reasons")
    _add_export_source(q)
    q.add_argument("--records", required=True, help="the records file the tasks were exported from")
    q.add_argument("--out", default=None, help="accepted records (default: <records stem>.accepted.jsonl beside the records)")
    q.add_argument("--rejected", default=None, help="rejected records with their reason (default: <out stem>.rejected.jsonl)")
    add_fields(q, ReviewConfig, ("min_annotators", "max_export_mb"))
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")


def _label_studio(url: str, token_env: str, flag: str) -> Any:
    """The Label Studio client for ``url`` with the token from ``$token_env``; a clear error
    naming ``flag`` when the variable is empty."""
    import os

    from ..data.labelstudio import LabelStudio

    token = os.environ.get(token_env) or ""
    if not token:
        raise ThymeError(f"{flag} needs a Label Studio API token in ${token_env}", "copy it from the server's Account & Settings page")
    return LabelStudio(url, token)


def _export_tasks(args: argparse.Namespace, title: str, label_config: str, image_mode: str, export: Any, fmt: Any) -> int:
    """Run ``export(on_task)`` (a review or annotate export); with ``--push``, create the
    project first and import its tasks in batches as they are written (then a local-files
    storage when images are served that way); print the summary."""
    client, pid, pushed, batch = None, None, [0], []
    if args.push:
        client = _label_studio(args.push, args.token_env, "--push")
        pid = client.create_project((args.project_title or title)[:50], label_config)["id"]

    def flush() -> None:
        if batch:
            pushed[0] += client.import_tasks(pid, batch)
            batch.clear()

    def on_task(task: dict[str, Any]) -> None:
        batch.append(task)
        if len(batch) >= client.limits.import_batch:
            flush()

    summary = export(on_task if client else None)
    out: dict[str, Any] = summary.to_dict()
    if client is not None:
        flush()
        out["project_id"], out["pushed"] = pid, pushed[0]
        if image_mode == "local-files" and summary.images_folder:  # Label Studio serves files of a project's storages only
            out["storage_id"] = client.add_local_storage(pid, summary.images_folder)["id"]
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(fmt(summary))
        if client is not None:
            print(f"pushed {pushed[0]} task(s) to project {pid} at {args.push.rstrip('/')}/projects/{pid}")
    return 0


def _import_source(args: argparse.Namespace, out_path: str | Path) -> Any:
    """The export to import: the file given, or (``--from-server URL --project ID``) the
    project's export fetched from the server and kept beside the output as ``<out>.export.json``."""
    if (args.export is None) == (args.from_server is None):
        raise ThymeError("give either an export file or --from-server URL --project ID", "Label Studio: Export > JSON gives the file")
    if not args.from_server:
        return args.export
    if args.project is None:
        raise ThymeError("--from-server needs --project ID", "the id is in the project's URL (/projects/ID)")
    export = _label_studio(args.from_server, args.token_env, "--from-server").export_project(args.project)
    kept = Path(f"{Path(out_path).with_suffix('')}.export.json")
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(export)
    return export


def _review(args: argparse.Namespace) -> int:
    from ..config import build
    from ..data import review

    cfg = build(review.ReviewConfig, None, args)
    if args.review_command == "export":
        return _export_tasks(
            args,
            f"thyme review {Path(args.records).stem}",
            review.LABEL_CONFIG,
            cfg.image_mode,
            lambda on_task: review.export_review(args.records, args.out, cfg, images_root=args.images_root, on_task=on_task),
            review.format_export_summary,
        )
    if args.review_command == "import":
        out_path = args.out or f"{Path(args.records).with_suffix('')}.accepted.jsonl"
        export = _import_source(args, out_path)
        s = review.apply_review(export, args.records, out_path, args.rejected, cfg)
        print(json.dumps(s.to_dict(), ensure_ascii=False) if args.json else review.format_import_summary(s))
        return 0
    raise ThymeError(f"unknown data review command {args.review_command!r}")


# --------------------------------------------------------------------------- annotate (Label Studio, RL data)


def _add_annotate_parser(sub: Any) -> None:
    """``thyme data annotate {export,import}``: RL questions with boxes annotated in Label Studio."""
    from ..config import add_fields
    from ..data.annotate import AnnotateConfig

    a = sub.add_parser(
        "annotate", help="RL data: export high-resolution images as Label Studio tasks, import checked annotations as RL records"
    )
    asub = a.add_subparsers(dest="annotate_command", required=True)
    q = asub.add_parser(
        "export", help="write Label Studio tasks (tasks.json), a labeling config and skipped.jsonl for a folder or list of images"
    )
    q.add_argument("images", help="a folder of images (walked recursively), one image, or a text file listing image paths (one a line)")
    q.add_argument("--out", required=True, help="folder for tasks.json, labeling_config.xml and skipped.jsonl")
    add_fields(q, AnnotateConfig, ("min_long_side", "image_mode", "local_files_root", "max_image_mb", "allow_absolute_paths"))
    _add_push_flags(q, "thyme annotate <folder name>")
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")

    q = asub.add_parser("import", help="check a Label Studio JSON export and write RL records (with bbox, category, annotators)")
    _add_export_source(q)
    q.add_argument("--out", required=True, help="RL records to write (JSONL)")
    q.add_argument("--rejected", default=None, help="rejected annotations with their reason (default: <out stem>.rejected.jsonl)")
    q.add_argument(
        "--images-root", default=None, help="the folder given to export (task image paths are relative to it; default: the current folder)"
    )
    add_fields(q, AnnotateConfig, ("max_area", "min_iou", "min_annotators", "allow_absolute_paths", "max_export_mb"))
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")


def _annotate(args: argparse.Namespace) -> int:
    from ..config import build
    from ..data import annotate

    cfg = build(annotate.AnnotateConfig, None, args)
    if args.annotate_command == "export":
        return _export_tasks(
            args,
            f"thyme annotate {Path(args.images).resolve().name}",
            annotate.LABEL_CONFIG,
            cfg.image_mode,
            lambda on_task: annotate.export_annotation(args.images, args.out, cfg, on_skip=annotate.print_skip, on_task=on_task),
            annotate.format_export_summary,
        )
    if args.annotate_command == "import":
        export = _import_source(args, args.out)
        s = annotate.import_annotations(export, args.out, args.rejected, cfg, images_root=args.images_root)
        print(json.dumps(s.to_dict(), ensure_ascii=False) if args.json else annotate.format_import_summary(s))
        return 0
    raise ThymeError(f"unknown data annotate command {args.annotate_command!r}")


# --------------------------------------------------------------------------- synthesize (issue 16)


def _add_synthesize_parser(sub: Any) -> None:
    """``thyme data synthesize SEEDS --scenario S --teacher-base-url URL --teacher-model NAME --out OUT.jsonl``."""
    from ..config import TEACHER_API_KEY_ENV, add_fields
    from ..data.synthesize import SCENARIOS, SynthConfig, TeacherConfig

    q = sub.add_parser(
        "synthesize",
        help="make Thyme SFT data from seed rows with a teacher model (six scenarios, filtered stage by stage)",
        description=f"Teacher keys come from the environment variable {TEACHER_API_KEY_ENV}.",
    )
    q.add_argument(
        "seeds",
        help="JSONL / parquet file, save_to_disk folder or hub id of seed rows: image, question, answer, "
        "bbox (x1, y1, x2, y2 pixels), optional options, scenario",
    )
    q.add_argument("--out", required=True, help="kept records (JSONL; rejected rows go to OUT.rejected.jsonl, images to OUT_images/)")
    q.add_argument("--images-root", default=None, help="folder seed image paths start from (default: the seeds file's folder)")
    q.add_argument("--json", action="store_true", help="print the summary (funnel included) as one JSON line")
    q.add_argument("--config", default=None, help="YAML with sections synthesize, teacher, code_teacher, verifier, sandbox (flags win)")
    add_fields(q, SynthConfig, exclude=("scenario",))
    q.add_argument(
        "--scenario", default=None, choices=list(SCENARIOS), help="the scenario of every row (default: each row's 'scenario' column)"
    )
    for prefix, what in (
        ("teacher-", "teacher"),
        ("code-teacher-", "code teacher for compute (default: the teacher)"),
        ("verifier-", "consistency verifier (default: the teacher)"),
    ):
        add_fields(q.add_argument_group(what), TeacherConfig, prefix=prefix, help_prefix=f"{what}: ")
    add_sandbox_flags(q)


def _synthesize(args: argparse.Namespace) -> int:
    from ..agent.parallel import resolve_workers
    from ..agent.scheduler import Progress
    from ..config import build, check_sections, load_yaml
    from ..data.synthesize import SynthConfig, TeacherClient, TeacherConfig, format_funnel, synthesize
    from ..sandbox import Sandbox

    yaml_cfg = load_yaml(args.config)
    check_sections(yaml_cfg, {"synthesize", "teacher", "code_teacher", "verifier", "sandbox"}, args.config or "")
    cfg = build(SynthConfig, yaml_cfg.get("synthesize"), args, section_name="synthesize")
    teacher_cfg = build(TeacherConfig, yaml_cfg.get("teacher"), args, prefix="teacher-", section_name="teacher")
    teacher = TeacherClient(teacher_cfg, what="teacher")

    def other(prefix: str, section: str, what: str) -> Any:
        """The code teacher / verifier: the teacher's settings, with those given for it on top."""
        given = build(TeacherConfig, yaml_cfg.get(section), args, prefix=prefix, section_name=section)
        if not given.base_url and not given.model:
            return None
        values = dict(teacher_cfg.__dict__)
        values.update({k: getattr(given, k) for k in given.__dict__ if getattr(given, k) != getattr(TeacherConfig(), k)})
        return TeacherClient(TeacherConfig(**values), what=what)

    code_teacher = other("code-teacher-", "code_teacher", "code-teacher")
    verifier = other("verifier-", "verifier", "verifier")
    sb_cfg = sandbox_config(args, yaml_cfg)

    def progress(total: int, initial: int) -> Any:
        return Progress(total, initial=initial, desc="synthesize", unit="row")

    kw = dict(config=cfg, images_root=args.images_root, code_teacher=code_teacher, verifier=verifier, progress=progress)
    if resolve_workers(cfg.workers) == 1 and cfg.ray is None:
        with Sandbox(sb_cfg) as sandbox:
            summary = synthesize(args.seeds, args.out, teacher=teacher, sandbox=sandbox, **kw)
    else:  # each worker starts its own sandbox from this config; the teacher calls stay here
        summary = synthesize(args.seeds, args.out, teacher=teacher, sandbox_config=sb_cfg, **kw)
    print(json.dumps(summary.to_dict(), ensure_ascii=False) if args.json else format_funnel(summary))
    return 0
