"""Image-text retrieval (COCO / Flickr30k protocol): Recall@1/5/10 in both directions.

- image -> text: an image is a hit at k if ANY of its captions is among the k best captions;
- text -> image: a caption is a hit at k if ITS image is among the k best images.

Call `run_retrieval` on every rank. Each rank encodes its slice of the images and their captions;
all embeddings are gathered with their global sample keys and sorted by key, so every rank holds
the full set in single-process order (no sample dropped or counted twice, whatever the world
size). The queries are then split across ranks, each ranked against all candidates, and the hit
counts are summed: the result equals a brute-force single-process computation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from clipa_ds.data.storage import StorageSettings
from clipa_ds.evaluate import metrics
from clipa_ds.evaluate.datasets import EvalDataError, eval_loader
from clipa_ds.evaluate.zeroshot import PromptTokenizer, eval_mode, model_context_length, model_dtype
from clipa_ds.task import normalize_images

RECALL_K = (1, 5, 10)
KEY_SHIFT = 32  # sample key (unit, position) -> unit << 32 | position, a sortable int64


def encode_local(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    tokenizer: PromptTokenizer,
    *,
    context_length: int,
    image_size: int,
    device: torch.device | str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's (image keys (n,), image feats (n, E), caption image keys (m,), caption feats (m, E)).

    Captions keep their order within a sample. Must run inside `eval_mode(model)` on all ranks.
    """
    dtype = model_dtype(model)
    image_keys, image_feats, text_keys, text_feats = [], [], [], []
    for batch in metrics.lockstep(batches, device):
        if batch is None:  # out of data: dummy forwards of both towers keep ZeRO-3 in step
            model.encode_image(torch.zeros(1, 3, image_size, image_size, dtype=dtype, device=device))
            model.encode_text(tokenizer.encode_batch(["a"], context_length).to(device))
            continue
        keys = (batch["key"][:, 0] << KEY_SHIFT) | batch["key"][:, 1]  # (B,)
        images = normalize_images(batch["image"].to(device, non_blocking=True), dtype)  # (B, 3, S, S)
        image_feats.append(model.encode_image(images).float().cpu())  # (B, E)
        image_keys.append(keys)
        captions = [c for sample in batch["captions"] for c in sample]  # (m,)
        owners = torch.repeat_interleave(keys, torch.tensor([len(s) for s in batch["captions"]]))  # (m,)
        tokens = tokenizer.encode_batch(captions, context_length).to(device)  # (m, L)
        text_feats.append(model.encode_text(tokens).float().cpu())  # (m, E)
        text_keys.append(owners)
    if not image_feats:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, torch.zeros(0, 0), empty, torch.zeros(0, 0)
    return torch.cat(image_keys), torch.cat(image_feats), torch.cat(text_keys), torch.cat(text_feats)


def _pad_dim(feats: Tensor, dim: int) -> Tensor:
    """A rank without samples has (0, 0) features; give it the common width for the gather."""
    return feats if feats.shape[1] == dim else feats.new_zeros(feats.shape[0], dim)


def gather_sorted(
    image_keys: Tensor, image_feats: Tensor, text_keys: Tensor, text_feats: Tensor, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor]:
    """All ranks' embeddings in global key order: (images (N, E), captions (M, E), caption image row (M,))."""
    cdev = metrics.collective_device(device)
    dim = int(metrics.all_reduce(torch.tensor([image_feats.shape[1]], device=cdev), "max"))
    all_image_keys = metrics.gather_rows(image_keys, device).cpu()  # (N,)
    all_images = metrics.gather_rows(_pad_dim(image_feats, dim), device).cpu()  # (N, E)
    # A caption's position within its sample is kept by a stable sort on the owner key.
    local_order = torch.arange(text_keys.shape[0], dtype=torch.long)
    all_text_keys = metrics.gather_rows(text_keys, device).cpu()  # (M,)
    all_text_order = metrics.gather_rows(local_order, device).cpu()  # (M,)
    all_texts = metrics.gather_rows(_pad_dim(text_feats, dim), device).cpu()  # (M, E)

    image_order = torch.sort(all_image_keys, stable=True).indices
    sorted_image_keys = all_image_keys[image_order]
    if sorted_image_keys.numel() > 1 and bool((sorted_image_keys[1:] == sorted_image_keys[:-1]).any()):
        raise RuntimeError("internal error: a sample was evaluated by two ranks")
    # Captions of one sample live on one rank, so (owner key, local order) is a total order.
    text_order = torch.sort(all_text_order, stable=True).indices
    text_order = text_order[torch.sort(all_text_keys[text_order], stable=True).indices]
    text_image = torch.searchsorted(sorted_image_keys, all_text_keys[text_order])  # (M,)
    return all_images[image_order], all_texts[text_order], text_image


def recall_counts(
    images: Tensor, texts: Tensor, text_image: Tensor, *, device: torch.device | str, ks: tuple[int, ...] = RECALL_K
) -> dict[str, int]:
    """Hit counts {"i2t@k", "t2i@k"} summed over ranks; rank r ranks queries r, r+W, ... ."""
    rank, world = metrics.world()
    images, texts, text_image = images.to(device), texts.to(device), text_image.to(device)
    image_rows = torch.arange(rank, images.shape[0], world, device=device)
    text_rows = torch.arange(rank, texts.shape[0], world, device=device)
    i2t = metrics.image_to_text_ranks(images[image_rows], image_rows, texts, text_image)
    t2i = metrics.text_to_image_ranks(texts[text_rows], text_image[text_rows], images)
    hits_i2t, hits_t2i = metrics.hits_at_k(i2t, ks), metrics.hits_at_k(t2i, ks)
    counts = torch.tensor([hits_i2t[k] for k in ks] + [hits_t2i[k] for k in ks], dtype=torch.long)
    counts = metrics.all_reduce(counts.to(metrics.collective_device(device)), "sum").cpu()
    out = {f"i2t@{k}": int(counts[i]) for i, k in enumerate(ks)}
    out.update({f"t2i@{k}": int(counts[len(ks) + i]) for i, k in enumerate(ks)})
    return out


def run_retrieval(
    model: nn.Module,
    data: str,
    *,
    tokenizer: PromptTokenizer,
    image_size: int,
    device: torch.device | str,
    batch_size: int = 64,
    context_length: int | None = None,
    workers: int = 0,
    storage_settings: StorageSettings | None = None,
) -> dict[str, Any]:
    """Retrieval Recall@1/5/10 (percent) on captioned .tar shards; call on every rank.

    Returns {"task", "images", "captions", "image_to_text_R@k", "text_to_image_R@k"}.
    """
    context_length = context_length if context_length is not None else model_context_length(model)
    rank, world = metrics.world()
    loader, _ = eval_loader(
        data, "captions", image_size, batch_size, rank=rank, world_size=world, workers=workers,
        settings=storage_settings,
    )
    with eval_mode(model):
        local = encode_local(
            model, loader, tokenizer, context_length=context_length, image_size=image_size, device=device
        )
    images, texts, text_image = gather_sorted(*local, device=device)
    if images.shape[0] == 0:
        raise EvalDataError(f"eval set {data!r} is empty (0 samples on all ranks); check the path or shard pattern")
    counts = recall_counts(images, texts, text_image, device=device)
    summary: dict[str, Any] = {"task": "retrieval", "images": images.shape[0], "captions": texts.shape[0]}
    summary.update(
        metrics.recall_summary(counts, {"i2t": images.shape[0], "t2i": texts.shape[0]}, RECALL_K)
    )
    return summary
