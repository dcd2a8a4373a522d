"""Data for Thyme SFT: a light index of the records, the collator, the modality batch sampler.

The dataset handed to TRL is an index (``file``, ``offset``, ``has_image``, ``length`` per
record): records stay in their JSONL files and are read, rendered and labelled
(:func:`thyme.data.masks.encode_record`) by :class:`ThymeSFTCollator` in the data-loader
workers, so 500k multi-image records never sit in memory. TRL runs with
``dataset_kwargs={"skip_prepare_dataset": True}`` and ``remove_unused_columns=False``.

The index is built once (a pass that renders every record's text and reads image headers to
count its tokens exactly, without decoding pixels) and cached in the output folder; records
longer than ``max_length`` or malformed are dropped there and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..data.masks import IGNORE_INDEX, EncodedSample, MaskConfig, encode_record
from ..data.records import parse_sft_record
from ..errors import ThymeError
from ..jsonl import JsonInputError, json_limits, parse_line


@dataclass
class IndexStats:
    """What the index pass found: records read, kept, dropped as too long, malformed (first reasons)."""

    records: int = 0
    kept: int = 0
    too_long: int = 0
    malformed: int = 0
    with_image: int = 0
    text_only: int = 0
    max_tokens: int = 0
    examples: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    dropped_ids: list[str] = field(default_factory=list)

    def drop(self, reason: str, rid: str) -> None:
        """Count one dropped record under ``reason``; the first 10 ids are kept."""
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.dropped_ids) < 10:
            self.dropped_ids.append(rid)


def _drop_reason(e: BaseException) -> str:
    from ..errors import ImageError, RecordError
    from ..records import PathRefused

    if isinstance(e, (json.JSONDecodeError, JsonInputError)):
        return "invalid JSON"
    if isinstance(e, ImageError):
        return "image missing or unreadable"
    if isinstance(e, PathRefused):
        return "image path outside the images root (allow_absolute_paths opts in)"
    if isinstance(e, RecordError):
        return "malformed record"
    return f"cannot be encoded ({type(e).__name__})"


def _line_id(line: bytes, where: str) -> str:
    try:
        rid = json.loads(line).get("id")
    except Exception:
        rid = None
    return str(rid) if rid is not None else where


def _iter_offsets(path: str) -> Iterator[tuple[int, int, bytes | None]]:
    """``(line number, byte offset, line)`` of every non-empty line (``None``: a line longer
    than the JSON line limit, skipped unread: :func:`thyme.jsonl.iter_lines_bounded`)."""
    limit = json_limits().max_line_bytes
    with open(path, "rb") as f:
        n = 0
        while True:
            off = f.tell()
            line = f.readline(limit + 1)
            if not line:
                return
            n += 1
            if len(line) > limit and not (len(line) == limit + 1 and line.endswith(b"\n")):
                while not line.endswith(b"\n") and line:
                    line = f.readline(1 << 20)
                yield n, off, None
            elif line.strip():
                yield n, off, line


def _cache_key(files: list[str], model: str, mask: MaskConfig, max_length: int | None, images_root: str | None, allow_absolute_paths: bool = False) -> str:
    st = []
    for p in files:
        s = os.stat(p)
        st.append([os.path.abspath(p), s.st_size, s.st_mtime_ns])
    blob = json.dumps([st, os.path.abspath(model) if os.path.exists(model) else model, asdict(mask), max_length, images_root] + ([True] if allow_absolute_paths else []), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def build_index(
    files: list[str],
    processor: Any,
    mask: MaskConfig,
    *,
    model: str,
    images_root: str | None = None,
    max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    allow_absolute_paths: bool = False,
) -> tuple[dict[str, list], IndexStats]:
    """Index the records of ``files`` for training.

    Image paths follow :mod:`thyme.records`' rule (inside ``images_root`` or each file's folder;
    ``allow_absolute_paths`` is the user's opt-in to others): a record naming a path outside is
    dropped as malformed, with its reason, like any bad record.

    Returns:
        ``(columns, stats)``: columns ``file`` (index into ``files``), ``offset`` (byte offset of
        the line), ``has_image``, ``length`` (tokens), ``id``; one entry per kept record.

    Raises:
        ThymeError: a file is missing, or no record is left.
    """
    for p in files:
        if not Path(p).is_file():
            raise ThymeError(f"training file not found: {p}", "train_files are JSONL files of Thyme SFT records (thyme data convert / verify)")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f".thyme_sft_index-{_cache_key(files, model, mask, max_length, images_root, allow_absolute_paths)}.json"
        if cache.is_file():
            data = json.loads(cache.read_text())
            return data["columns"], IndexStats(**data["stats"])
    from tqdm import tqdm

    cols: dict[str, list] = {"file": [], "offset": [], "has_image": [], "length": [], "id": []}
    stats = IndexStats()
    bar = tqdm(desc="indexing records", unit="record", disable=not show_progress or None)
    for fi, path in enumerate(files):
        root = images_root if images_root is not None else str(Path(path).resolve().parent)
        for n, off, line in _iter_offsets(path):
            stats.records += 1
            bar.update(1)
            try:
                rec = parse_sft_record(parse_line(line, what=f"record on line {n} of {path}"), line=n, images_root=root, allow_absolute=allow_absolute_paths)
                sample = encode_record(rec, processor, mask, pixels=False)
            except Exception as e:  # one bad record is dropped, the rest trains
                stats.malformed += 1
                stats.drop(_drop_reason(e), _line_id(line, f"{path}:{n}"))
                if len(stats.examples) < 10:
                    stats.examples.append(f"{path}:{n}: {type(e).__name__}: {e}")
                continue
            if max_length is not None and len(sample) > max_length:
                stats.too_long += 1
                stats.drop(f"longer than max_length ({max_length} tokens)", str(rec.id))
                continue
            stats.kept += 1
            stats.max_tokens = max(stats.max_tokens, len(sample))
            has_image = bool(rec.inputs or rec.outputs)
            stats.with_image += int(has_image)
            stats.text_only += int(not has_image)
            for k, v in (("file", fi), ("offset", off), ("has_image", has_image), ("length", len(sample)), ("id", rec.id)):
                cols[k].append(v)
    bar.close()
    if not stats.kept:
        raise ThymeError(
            f"no trainable record in {files} ({stats.records} read, {stats.too_long} longer than max_length, {stats.malformed} malformed)",
            "; ".join(stats.examples[:3]) or "raise max_length or check the files",
        )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({"columns": cols, "stats": asdict(stats)}))
        os.replace(tmp, cache)
    return cols, stats


class ThymeSFTCollator:
    """Reads, renders, labels and pads a batch of indexed records.

    Args:
        processor: the model's processor, pixel budget applied (:func:`thyme.data.masks.prepare_processor`).
        mask: masking settings.
        files: the indexed files (``file`` column indexes them).
        images_root: folder relative image paths start from (default: each file's folder).
        allow_absolute_paths: the user's opt-in to image paths outside it (:mod:`thyme.records`).
        max_length: refuse (ValueError) a sample longer than this (the index already dropped them).

    Returns (``__call__``): ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids``
    ``(B, L)`` int64 (right-padded: pad id / 0 / -100 / 0), and when the batch has images
    ``pixel_values`` ``(patches, patch_dim)`` float32 and ``image_grid_thw`` ``(images, 3)`` int64,
    the images of all samples in order.
    """

    def __init__(self, processor: Any, mask: MaskConfig, files: list[str], *, images_root: str | None = None, max_length: int | None = None, allow_absolute_paths: bool = False):
        self.processor = processor
        self.allow_absolute_paths = allow_absolute_paths
        self.mask = mask
        self.files = list(files)
        self.images_root = images_root
        self.max_length = max_length
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = int(pad)

    def read(self, example: dict[str, Any]) -> EncodedSample:
        path = self.files[int(example["file"])]
        with open(path, "rb") as f:
            f.seek(int(example["offset"]))
            line = f.readline(json_limits().max_line_bytes + 1)  # bounded (parse_line refuses a longer one)
        root = self.images_root if self.images_root is not None else str(Path(path).resolve().parent)
        rec = parse_sft_record(parse_line(line, what=f"record at byte {example['offset']} of {path}"), images_root=root, allow_absolute=self.allow_absolute_paths)
        sample = encode_record(rec, self.processor, self.mask)
        if self.max_length is not None and len(sample) > self.max_length:
            raise ValueError(f"record {rec.id} has {len(sample)} tokens, above max_length {self.max_length}")
        return sample

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate([self.read(ex) for ex in examples], self.pad_token_id)


def collate(samples: list[EncodedSample], pad_token_id: int) -> dict[str, Any]:
    """Right-pad encoded samples into a batch (see :class:`ThymeSFTCollator`)."""
    import torch

    L = max(len(s) for s in samples)
    B = len(samples)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s)
        ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        att[i, :n] = 1
        lab[i, :n] = torch.tensor(s.labels, dtype=torch.long)
        mm[i, :n] = torch.tensor(s.mm_token_type_ids, dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": att, "labels": lab, "mm_token_type_ids": mm}
    pv = [s.pixel_values for s in samples if s.pixel_values is not None]
    if pv:
        batch["pixel_values"] = torch.cat(pv, dim=0)
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in samples if s.image_grid_thw is not None], dim=0)
    return batch


class ModalityGroupedSampler:
    """Orders samples so that every block of ``batch_size`` consecutive indices is all image
    samples or all text-only samples (stage 2: "image and text-only samples fed separately").

    Each epoch: shuffle each modality, pad it to a multiple of ``batch_size`` with random
    repeats of its own samples, cut into blocks, shuffle the blocks. With ``accelerate``, each
    process receives whole blocks, so per-device batches stay homogeneous. Deterministic for a
    given ``seed`` and epoch (:meth:`set_epoch`, called by the trainer; otherwise the epoch
    counts the iterations).
    """

    def __init__(self, has_image: list[bool], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.has_image = [bool(x) for x in has_image]
        self.batch_size = batch_size
        self.seed = seed
        self._epoch: int | None = None
        self._iters = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def _groups(self) -> list[list[int]]:
        return [g for g in ([i for i, x in enumerate(self.has_image) if x], [i for i, x in enumerate(self.has_image) if not x]) if g]

    def __len__(self) -> int:
        b = self.batch_size
        return sum(-(-len(g) // b) * b for g in self._groups())

    def blocks(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (lists of indices), in order."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        blocks = []
        for g in self._groups():
            g = list(g)
            rng.shuffle(g)
            while len(g) % self.batch_size:
                g.append(rng.choice(g))
            blocks.extend(g[i: i + self.batch_size] for i in range(0, len(g), self.batch_size))
        rng.shuffle(blocks)
        return blocks

    def __iter__(self) -> Iterator[int]:
        epoch = self._epoch if self._epoch is not None else self._iters
        self._iters += 1
        for block in self.blocks(epoch):
            yield from block
