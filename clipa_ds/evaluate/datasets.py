"""Evaluation data readers: labelled / captioned webdataset shards and ImageFolder directories.

Sources (local paths, s3://, gs://, http(s)://), opened through the training pipeline's storage
layer (timeouts always set, S3 settings from `data.s3` / the environment) and read with its
retrying stream and strict tar reader: a damaged or unreachable shard fails the evaluation
instead of silently shrinking the eval set.
- shards: a URL containing ".tar"; brace patterns ("val-{000..009}.tar") and several patterns
  joined by "::" (webdataset convention). Samples are tar members grouped by key (the member
  name up to the first dot of its basename).
  * zero-shot: an image (jpg/jpeg/png/webp) and a class index in "cls" (or "cls.txt");
  * retrieval: an image and its captions, from "json" (a list of strings, or an object with
    "captions": [...] or "caption": "...") or else "txt" (one caption per non-empty line).
- ImageFolder: ROOT/CLASS_DIR/IMAGE; classes are the sorted directory names, label = position.

Each sample gets a global key (unit, position): unit = shard index (or file index for a folder),
position = index inside the shard. Ranks split the work without padding: when there are at
least as many units as ranks, rank r reads units u with u % W == r; otherwise every rank reads
every shard and keeps the samples with (u + position) % W == r. DataLoader workers then split a
rank's units by index. Every sample lands on exactly one rank and one worker.

Eval transform: resize the shorter side to S (bicubic), center crop S x S, uint8 (3, S, S);
normalisation happens on the device (`clipa_ds.task.normalize_images`), as in training.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipa_ds.data import storage
from clipa_ds.data.shards import RetryingStream, RetryPolicy, expand_urls
from clipa_ds.data.tario import iter_samples
from clipa_ds.data.workers import worker_options

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "cls.txt")
TASKS = ("labels", "captions")


class EvalDataError(ValueError):
    """Evaluation data that cannot be used as given; the message says what is wrong and the fix."""


def is_shard_source(source: str) -> bool:
    return ".tar" in source


def default_storage() -> storage.StorageSettings:
    """Storage settings from the environment (what `data.s3` defaults to)."""
    from clipa_ds.config import DataConfig

    return storage.StorageSettings.from_config(DataConfig())


def _listing(root: str, settings: storage.StorageSettings) -> tuple[Any, str, str]:
    """(filesystem, path to list, prefix that turns a listed path back into a URL)."""
    fs = storage.filesystem(root, settings)
    if storage.is_remote(root):
        return fs, root.rstrip("/"), f"{storage.protocol_of(root)}://"
    return fs, storage.strip_protocol(root).rstrip("/") or "/", ""


def image_folder_classes(root: str, settings: storage.StorageSettings | None = None) -> list[str]:
    """Sorted class-directory names of an ImageFolder root (local path or object-store URL)."""
    fs, path, _ = _listing(root, settings or default_storage())
    if not fs.isdir(path):
        raise EvalDataError(
            f"eval data {root!r} is neither .tar shards nor a directory; pass shard URL(s) such as "
            "'val-{000..009}.tar' or an ImageFolder root (ROOT/CLASS/IMAGE)"
        )
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))


def _folder_files(root: str, settings: storage.StorageSettings) -> tuple[list[str], list[int], list[str]]:
    """(file URLs, labels, class names) of an ImageFolder, sorted by class then file name."""
    fs, path, prefix = _listing(root, settings)
    classes = image_folder_classes(root, settings)
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for entry in sorted(fs.ls(f"{path}/{name}", detail=False)):
            if entry.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                files.append(entry if entry.startswith(prefix) else prefix + entry)
                labels.append(label)
    return files, labels, classes


def eval_transform(image: Image.Image, size: int) -> Tensor:
    """PIL image -> uint8 (3, size, size): shorter side resized to `size`, then center crop."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, S, S)


def decode_image(data: bytes, size: int) -> Tensor:
    with Image.open(io.BytesIO(data)) as image:
        # JPEG DCT-domain downscale: decodes at >= size per side, never below.
        image.draft("RGB", (size, size))
        return eval_transform(image, size)


def _stream(url: str, settings: storage.StorageSettings) -> RetryingStream:
    return RetryingStream(url, 0, lambda u, offset: storage.open_at(u, offset, settings), RetryPolicy())


def read_file(url: str, settings: storage.StorageSettings) -> bytes:
    stream = _stream(url, settings)
    try:
        return stream.read()
    finally:
        stream.close()


def iter_tar(url: str, settings: storage.StorageSettings) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {extension: bytes}) samples from one tar shard, in member order.

    The strict tar reader raises on a damaged shard instead of silently ending early.
    """
    stream = _stream(url, settings)
    try:
        for sample in iter_samples(stream):
            yield sample.key, sample.files
    finally:
        stream.close()


def _image_bytes(fields: dict[str, bytes], where: str) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in fields:
            return fields[ext]
    raise EvalDataError(f"{where} has no image ({'/'.join(IMAGE_EXTS)}); found: {', '.join(sorted(fields))}")


def parse_label(fields: dict[str, bytes], where: str) -> int:
    for ext in LABEL_EXTS:
        if ext in fields:
            text = fields[ext].decode("utf-8").strip()
            try:
                return int(text)
            except ValueError:
                raise EvalDataError(
                    f"{where}: class label {text!r} in '.{ext}' is not an integer class index"
                ) from None
    raise EvalDataError(
        f"{where} has no class label: zero-shot shards need a '.cls' entry (the class index) per "
        f"sample; found only: {', '.join(sorted(fields))}. Use --task retrieval for captioned shards."
    )


def parse_captions(fields: dict[str, bytes], where: str) -> list[str]:
    captions: list[str] = []
    if "json" in fields:
        value: Any = json.loads(fields["json"].decode("utf-8"))
        if isinstance(value, dict):
            value = value.get("captions", value.get("caption", []))
        captions = [value] if isinstance(value, str) else [str(c) for c in value]
    elif "txt" in fields:
        captions = fields["txt"].decode("utf-8").splitlines()
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise EvalDataError(
            f"{where} has no captions: retrieval shards need a 'json' list of captions or a 'txt' "
            f"with one caption per line; found: {', '.join(sorted(fields))}"
        )
    return captions


@dataclass(frozen=True)
class EvalSample:
    key: tuple[int, int]  # (unit, position): a global, order-preserving sample id
    image: Tensor  # uint8 (3, S, S)
    target: int | list[str]  # class index, or captions


class EvalDataset(IterableDataset):
    """This rank's samples of an eval source, split further across DataLoader workers."""

    def __init__(
        self,
        source: str,
        task: str,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        settings: storage.StorageSettings | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task={task!r}; choose one of {TASKS}")
        if image_size <= 0:
            raise EvalDataError(f"image_size={image_size} must be > 0")
        self.source, self.task, self.image_size = source, task, image_size
        self.rank, self.world_size = rank, world_size
        self.settings = settings or default_storage()
        self.classes: list[str] | None = None
        self.folder_labels: list[int] = []
        if is_shard_source(source):
            self.units = expand_urls(source)
        else:
            if task != "labels":
                raise EvalDataError(f"retrieval needs captioned .tar shards; {source!r} is not a shard URL")
            self.units, self.folder_labels, self.classes = _folder_files(source, self.settings)
        # Whole units per rank when there are enough of them; else samples strided over ranks.
        self.split_units = len(self.units) >= world_size

    def _rank_units(self) -> list[int]:
        if self.split_units:
            return [u for u in range(len(self.units)) if u % self.world_size == self.rank]
        return list(range(len(self.units)))

    def _owns(self, unit: int, position: int) -> bool:
        return self.split_units or (unit + position) % self.world_size == self.rank

    def __iter__(self) -> Iterator[EvalSample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, unit in enumerate(self._rank_units()):
            if i % workers == worker:
                yield from self._unit_samples(unit)

    def _unit_samples(self, unit: int) -> Iterator[EvalSample]:
        url = self.units[unit]
        if self.classes is not None:  # ImageFolder: one image per unit
            if self._owns(unit, 0):
                image = decode_image(read_file(url, self.settings), self.image_size)
                yield EvalSample((unit, 0), image, self.folder_labels[unit])
            return
        for position, (key, fields) in enumerate(iter_tar(url, self.settings)):
            if not self._owns(unit, position):
                continue
            where = f"shard {url} sample {key!r}"
            # Parse the target first: a missing label should fail before any decode work.
            target = parse_label(fields, where) if self.task == "labels" else parse_captions(fields, where)
            yield EvalSample((unit, position), decode_image(_image_bytes(fields, where), self.image_size), target)


def collate(samples: list[EvalSample]) -> dict[str, Any]:
    """-> {"key": long (B, 2), "image": uint8 (B, 3, S, S), "label": long (B,) | "captions": list}."""
    batch: dict[str, Any] = {
        "key": torch.tensor([s.key for s in samples], dtype=torch.long),
        "image": torch.stack([s.image for s in samples]),
    }
    if isinstance(samples[0].target, int):
        batch["label"] = torch.tensor([s.target for s in samples], dtype=torch.long)
    else:
        batch["captions"] = [s.target for s in samples]
    return batch


def eval_loader(
    source: str,
    task: str,
    image_size: int,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    settings: storage.StorageSettings | None = None,
) -> tuple[DataLoader, EvalDataset]:
    """A DataLoader over this rank's slice (no shuffling, no padding, last batch kept)."""
    dataset = EvalDataset(source, task, image_size, rank, world_size, settings)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        **worker_options(workers),
    )
    return loader, dataset
