"""Evaluation math on embeddings (pure functions) and the few collectives evaluation needs.

Ranking rule, used by every metric here: a query's candidates are ordered by score, highest
first, exact ties broken toward the lower candidate index (a stable descending sort). A query is
a hit at k when its best-ranked positive candidate has rank < k. The rule is a deterministic
function of the score rows, so a distributed evaluation that ranks each query against all
candidates gives exactly the counts of a single-process run.

The collectives (bottom of the file) are no-ops without an initialised process group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

T = TypeVar("T")


class PeerRankError(RuntimeError):
    """Raised on the healthy ranks when another rank's evaluation failed (instead of a hang)."""

QUERY_CHUNK = 1024  # queries scored at once: bounds the (Q, M) score matrix


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def class_embeddings(prompt_features: Tensor) -> Tensor:
    """(C, T, E) per-prompt text features -> (C, E): normalised mean of normalised features."""
    per_prompt = F.normalize(prompt_features.float(), dim=-1)  # (C, T, E)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)  # (C, E)


def rank_of_first_positive(scores: Tensor, positive: Tensor) -> Tensor:
    """(Q, M) scores, (Q, M) bool positives -> (Q,) rank of each row's best-ranked positive.

    Rank = number of candidates ordered before it (higher score, or equal score and lower index).
    A row without any positive gets rank M (never a hit).
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    # argmax returns the first maximal index: the lowest-index positive holding the best score.
    first = (positive & (scores == best)).int().argmax(dim=1, keepdim=True)  # (Q, 1)
    index = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)  # (1, M)
    ahead = (scores > best) | ((scores == best) & (index < first))  # (Q, M)
    return ahead.sum(dim=1)  # (Q,)


def hits_at_k(ranks: Tensor, ks: Iterable[int]) -> dict[int, int]:
    """{k: number of queries with rank < k}."""
    return {k: int((ranks < k).sum()) for k in ks}


def zeroshot_ranks(image_features: Tensor, class_emb: Tensor, labels: Tensor) -> Tensor:
    """(N, E) images, (C, E) classes, (N,) labels -> (N,) rank of the true class."""
    ranks = []
    classes = torch.arange(class_emb.shape[0], device=labels.device)
    for start in range(0, image_features.shape[0], QUERY_CHUNK):
        feats = image_features[start : start + QUERY_CHUNK].float()
        scores = feats @ class_emb.float().T  # (Q, C)
        positive = labels[start : start + QUERY_CHUNK, None] == classes[None, :]  # (Q, C)
        ranks.append(rank_of_first_positive(scores, positive))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def image_to_text_ranks(
    image_features: Tensor, image_ids: Tensor, text_features: Tensor, text_image: Tensor
) -> Tensor:
    """Rank of each query image's best caption among all captions.

    image_features (Q, E) with their ids (Q,); text_features (M, E) with the id of the image each
    caption belongs to (M,). An image is a hit at k if any of its captions is in the top k.
    """
    ranks = []
    for start in range(0, image_features.shape[0], QUERY_CHUNK):
        scores = image_features[start : start + QUERY_CHUNK].float() @ text_features.float().T  # (Q, M)
        positive = image_ids[start : start + QUERY_CHUNK, None] == text_image[None, :]  # (Q, M)
        ranks.append(rank_of_first_positive(scores, positive))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def text_to_image_ranks(text_features: Tensor, text_image: Tensor, image_features: Tensor) -> Tensor:
    """Rank of each query caption's own image (row text_image[i] of image_features) among all images."""
    ranks = []
    images = torch.arange(image_features.shape[0], device=text_image.device)
    for start in range(0, text_features.shape[0], QUERY_CHUNK):
        scores = text_features[start : start + QUERY_CHUNK].float() @ image_features.float().T  # (Q, N)
        positive = text_image[start : start + QUERY_CHUNK, None] == images[None, :]  # (Q, N)
        ranks.append(rank_of_first_positive(scores, positive))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_summary(hits: dict[str, int], totals: dict[str, int], ks: Iterable[int]) -> dict[str, float]:
    """{"image_to_text_R@k": %, "text_to_image_R@k": %} from hit counts {"i2t@k": n} and totals."""
    out = {}
    for direction, name in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * hits[f"{direction}@{k}"] / totals[direction]
    return out


# ----------------------------------------------------------------------------------------------
# Collectives (gloo on CPU, NCCL on GPU); every function is a no-op in a single process.
# ----------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device(device: torch.device | str) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(device)
    return torch.device("cpu")


def all_reduce(values: Tensor, op: str = "sum") -> Tensor:
    """Reduce a tensor over ranks (sum or max); returns the reduced tensor."""
    if world()[1] == 1:
        return values
    dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


def gather_rows(rows: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """(n_r, ...) on each rank -> (sum n_r, ...) rank-major on every rank; n_r may differ.

    all_gather needs equal shapes, so rows are padded to the largest n_r and the padding is cut
    off before concatenating: nothing is dropped or counted twice.
    """
    if world()[1] == 1:
        return rows
    cdev = collective_device(device)
    rows = rows.to(cdev)
    count = torch.tensor([rows.shape[0]], device=cdev)
    counts = [torch.zeros_like(count) for _ in range(world()[1])]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)])


def lockstep(items: Iterable[T], device: torch.device | str = "cpu") -> Iterator[T | None]:
    """Yield this rank's items, then None until every rank is out of items.

    Every rank therefore runs the same number of iterations, so the caller can run a dummy
    forward on None: ZeRO-3 gathers parameters collectively inside forward, and a rank that
    stopped early would hang the others. An exception on any rank is raised on every rank
    (instead of a hang): the failing rank re-raises its own, the others a PeerRankError.
    """
    iterator = iter(items)
    rank, size = world()
    cdev = collective_device(device)
    while True:
        item: T | None = None
        error: BaseException | None = None
        has_item = 0
        try:
            item = next(iterator)
            has_item = 1
        except StopIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
        if size > 1:
            flags = all_reduce(torch.tensor([has_item, int(error is not None)], device=cdev), "max")
            any_item, any_error = int(flags[0]), int(flags[1])
        else:
            any_item, any_error = has_item, int(error is not None)
        if error is not None:
            raise error
        if any_error:
            raise PeerRankError(f"evaluation failed on another rank (this is rank {rank}); see that rank's error")
        if not any_item:
            return
        yield item if has_item else None
