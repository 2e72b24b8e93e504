"""Zero-shot classification: class embeddings from prompts, top-k accuracy, distributed.

Call `run_zeroshot` on every rank (it runs collectives). It
1. encodes the prompts once across the ranks: rank r encodes a contiguous block of classes, the
   (C, E) class matrix is all-gathered (no rank encodes every class);
2. evaluates this rank's slice of the data (see datasets.py: no padding, no duplicates);
3. sums the counts over ranks and returns percentages.

Evaluation always sees full tokens: prompts go through `tokenizer.encode_batch` (plain
truncation, never the training text reduction) and the model is put in eval mode, which turns
the image tower's patch masking off; each module's train/eval flag is restored afterwards.
Every rank runs the same number of forwards (dummy ones when out of data) so ZeRO-3's
collective parameter gathering inside forward cannot hang.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from clipa_ds.data.storage import StorageSettings
from clipa_ds.evaluate import metrics
from clipa_ds.evaluate.datasets import EvalDataError, eval_loader
from clipa_ds.evaluate.labels import LabelSet, imagenet_label_set
from clipa_ds.task import normalize_images

TOPK = (1, 5)


class PromptTokenizer(Protocol):
    def encode_batch(self, captions: list[str], context_length: int) -> Tensor: ...


class EncoderModel(Protocol):
    def encode_image(self, images: Tensor) -> Tensor: ...
    def encode_text(self, tokens: Tensor) -> Tensor: ...


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() + no_grad for the block; restores every module's own training flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def model_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the weights (bf16 under DeepSpeed bf16): images are normalised into it."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def model_context_length(model: nn.Module) -> int:
    text = getattr(model, "text", None)
    length = getattr(text, "context_length", None)
    if not isinstance(length, int):
        raise ValueError("cannot read the text context length from the model; pass context_length=")
    return length


def class_slice(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block [lo, hi) of classes that `rank` encodes; blocks cover 0..C exactly once."""
    return num_classes * rank // world_size, num_classes * (rank + 1) // world_size


def build_classifier(
    model: nn.Module,
    tokenizer: PromptTokenizer,
    label_set: LabelSet,
    *,
    context_length: int,
    device: torch.device | str,
    batch_size: int = 256,
) -> Tensor:
    """(C, E) float32 class embeddings on `device`, identical on every rank.

    Must run inside `eval_mode(model)` and on all ranks. Each rank encodes classes
    `class_slice(C, rank, W)` (its prompts in batches of `batch_size`), then the blocks are gathered.
    """
    rank, world = metrics.world()
    lo, hi = class_slice(label_set.num_classes, rank, world)
    prompts = [p for c in range(lo, hi) for p in label_set.prompts(c)]  # ((hi-lo) * T)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    dummy = label_set.prompts(0)[:1]
    features: list[Tensor] = []
    embed_dim = 0
    for batch in metrics.lockstep(batches, device):
        tokens = tokenizer.encode_batch(batch if batch is not None else dummy, context_length).to(device)  # (B, L)
        out = model.encode_text(tokens).float()  # (B, E)
        embed_dim = out.shape[1]
        if batch is not None:
            features.append(out)
    if features:
        local = torch.cat(features).view(hi - lo, len(label_set.templates), -1)  # (c, T, E)
        local = metrics.class_embeddings(local)  # (c, E)
    else:
        local = torch.zeros(0, embed_dim, device=device)
    return metrics.gather_rows(local, device).to(device)  # (C, E)


def count_correct(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    classifier: Tensor,
    *,
    image_size: int,
    device: torch.device | str,
    ks: tuple[int, ...] = TOPK,
) -> dict[str, int]:
    """Counts summed over ranks: {"total", "top{k}"..., "min_label", "max_label"}.

    Must run inside `eval_mode(model)` and on all ranks.
    """
    dtype = model_dtype(model)
    num_classes = classifier.shape[0]
    counts = torch.zeros(1 + len(ks), dtype=torch.long)
    low, high = num_classes, -1
    for batch in metrics.lockstep(batches, device):
        if batch is None:  # this rank is out of data: keep forwards in step with the others
            model.encode_image(torch.zeros(1, 3, image_size, image_size, dtype=dtype, device=device))
            continue
        images = normalize_images(batch["image"].to(device, non_blocking=True), dtype)  # (B, 3, S, S)
        labels = batch["label"].to(device)  # (B,)
        feats = model.encode_image(images).float()  # (B, E)
        ranks = metrics.zeroshot_ranks(feats, classifier, labels)  # (B,)
        hits = metrics.hits_at_k(ranks, ks)
        counts += torch.tensor([labels.numel(), *[hits[k] for k in ks]])
        low, high = min(low, int(labels.min())), max(high, int(labels.max()))
    cdev = metrics.collective_device(device)
    counts = metrics.all_reduce(counts.to(cdev), "sum").cpu()
    bounds = metrics.all_reduce(torch.tensor([-low, high], device=cdev), "max").cpu()
    out = {"total": int(counts[0]), "min_label": -int(bounds[0]), "max_label": int(bounds[1])}
    out.update({f"top{k}": int(counts[1 + i]) for i, k in enumerate(ks)})
    return out


def summarize(
    counts: dict[str, int], num_classes: int, ks: tuple[int, ...], source: str, label_source: str
) -> dict[str, Any]:
    """Percentages from summed counts; raises on an empty set or labels outside the label set."""
    if counts["total"] == 0:
        raise EvalDataError(f"eval set {source!r} is empty (0 samples on all ranks); check the path or shard pattern")
    if counts["min_label"] < 0 or counts["max_label"] >= num_classes:
        bad = counts["max_label"] if counts["max_label"] >= num_classes else counts["min_label"]
        raise EvalDataError(
            f"eval set {source!r} has class label {bad}, but the label set ({label_source}) has "
            f"{num_classes} classes (valid labels 0..{num_classes - 1}); pass the class-names file "
            "that matches the data (--classnames FILE, one line per class index)"
        )
    summary: dict[str, Any] = {"task": "zeroshot", "samples": counts["total"], "classes": num_classes}
    for k in ks:
        summary[f"top{k}"] = 100.0 * counts[f"top{k}"] / counts["total"]
    return summary


def run_zeroshot(
    model: nn.Module,
    data: str,
    *,
    tokenizer: PromptTokenizer,
    image_size: int,
    device: torch.device | str,
    batch_size: int = 64,
    label_set: LabelSet | None = None,
    context_length: int | None = None,
    workers: int = 0,
    storage_settings: StorageSettings | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 (percent) of `model` on `data`; call on every rank.

    data: .tar shard URL(s) with a "cls" label per sample, or an ImageFolder root.
    label_set: class names + templates (default: the shipped ImageNet-1k set).
    context_length: text length of the prompts (default: the model's text context length).
    workers: DataLoader decode processes for this rank; storage_settings: object-store settings
    (`StorageSettings.from_config(cfg.data)`; default: from the environment).
    Returns {"task", "samples", "classes", "top1", "top5"} (top-k only for k <= classes).
    """
    label_set = label_set if label_set is not None else imagenet_label_set()
    context_length = context_length if context_length is not None else model_context_length(model)
    ks = tuple(k for k in TOPK if k <= label_set.num_classes)
    rank, world = metrics.world()
    loader, dataset = eval_loader(
        data, "labels", image_size, batch_size, rank=rank, world_size=world, workers=workers,
        settings=storage_settings,
    )
    if dataset.classes is not None and len(dataset.classes) != label_set.num_classes:
        raise EvalDataError(
            f"ImageFolder {data!r} has {len(dataset.classes)} class directories but the label set "
            f"({label_set.source}) has {label_set.num_classes} class names; pass --classnames FILE "
            f"with {len(dataset.classes)} lines, in sorted directory order"
        )
    with eval_mode(model):
        classifier = build_classifier(
            model, tokenizer, label_set, context_length=context_length, device=device, batch_size=max(batch_size, 256)
        )
        counts = count_correct(model, loader, classifier, image_size=image_size, device=device, ks=ks)
    return summarize(counts, label_set.num_classes, ks, data, label_set.source)
