"""Gradient caching: the contrastive loss over the whole global batch, in micro-batch memory.

DeepSpeed's gradient accumulation computes the loss per micro-batch, so a step sees only
micro_batch x world_size negatives. Here the recipe's global batch is the number of negatives,
whatever the GPU count (GradCache, Gao et al. 2021; OpenCLIP's --accum-freq):

1. each rank runs the towers under no_grad on its micro-batches and keeps the embeddings;
2. the loss of the full global batch (features gathered / ringed across ranks) is differentiated
   with respect to the local embeddings and the temperature/bias only (no tower graph): cheap;
3. each micro-batch is re-run with a graph and back-propagates sum(emb * cached grad) through
   `engine.backward(..., scale_wrt_gas=False)`: DeepSpeed would otherwise divide by
   gradient_accumulation_steps, but the cached gradients are already those of the full-batch loss,
   so the micro-batch gradients must add up, not average. DeepSpeed then averages over ranks,
   which is exactly the gradient of the global loss (see clipa_ds.loss).

The re-run must reproduce pass 1 exactly: each micro-batch gets a seed, and both passes draw its
token mask from a torch.Generator seeded with it; the towers have no dropout. The temperature and
SigLIP bias are parameters used by the loss: their cached gradients enter the surrogate too
(split evenly over the micro-batches), through the clamp in the model's forward.
Cost: one extra forward of the towers per step (benchmarks/gradcache_overhead.py). Memory: the
step's micro-batches stay on the device as uint8, plus the (B_local, E) embeddings and, for CLIP,
this rank's (B_local, N) logits in pass 2 (SigLIP scores (B, B) blocks); activations are those of
one micro-batch, as with plain accumulation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from clipa_ds.numerics import any_rank, local_nonfinite, mark_skipped_step
from clipa_ds.task import Embeddings

Batch = dict[str, Tensor]


def micro_batch_seeds(count: int) -> list[int]:
    """One mask seed per micro-batch, from the global torch CPU RNG (seeded per rank by the loop,
    restored on resume). Reading this CPU tensor is not a device sync."""
    return torch.randint(0, 2**62, (count,)).tolist()


def seeded_generator(seed: int) -> torch.Generator:
    """CPU generator: keep_indices draws on the generator's device, so masks match on any device."""
    return torch.Generator().manual_seed(seed)


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().requires_grad_(True)


def embed_all(engine: Any, micro_batches: list[Batch], seeds: list[int]) -> Embeddings:
    """Pass 1: embeddings of all local micro-batches, no graph -> fp32 leaves (B_local, E)."""
    with torch.no_grad():
        parts = [engine(b, seeded_generator(s), embed_only=True) for b, s in zip(micro_batches, seeds)]
    return Embeddings(
        image=_leaf(torch.cat([p.image for p in parts])),  # (B_local, E)
        text=_leaf(torch.cat([p.text for p in parts])),  # (B_local, E)
        logit_scale=_leaf(parts[0].logit_scale),  # same parameters for every micro-batch
        logit_bias=_leaf(parts[0].logit_bias),
    )


def embedding_grads(task: Any, emb: Embeddings) -> tuple[Tensor, Embeddings]:
    """Pass 2: this rank's loss over the global batch and d(sum over ranks of it)/d(local embeddings)."""
    with torch.enable_grad():
        loss = task.compute_loss(emb)
        leaves = [t for t in emb if t is not None]
        grads = iter(torch.autograd.grad(loss, leaves))
    return loss.detach(), Embeddings(*(None if t is None else next(grads) for t in emb))


def gradient_cache_step(engine: Any, micro_batches: list[Batch]) -> tuple[Tensor, bool]:
    """One optimizer step over `micro_batches` with the global-batch loss -> (this rank's loss, skipped).

    A non-finite loss or embedding gradient on any rank skips the step on all ranks before any
    backward (no engine.backward/step, so DeepSpeed's accumulation counters stay aligned).
    """
    count = len(micro_batches)
    if count != engine.gradient_accumulation_steps():
        raise ValueError(
            f"gradient caching got {count} micro-batches but DeepSpeed accumulates "
            f"{engine.gradient_accumulation_steps()}; they must match (see engine.batch_plan)"
        )
    seeds = micro_batch_seeds(count)
    emb = embed_all(engine, micro_batches, seeds)
    loss, grads = embedding_grads(engine.module, emb)
    if any_rank(local_nonfinite(loss, *(g for g in grads if g is not None))):
        mark_skipped_step(engine, count)
        return loss, True

    sizes = [b["text"].shape[0] for b in micro_batches]
    image_grads = grads.image.split(sizes)  # count x (b_i, E)
    text_grads = grads.text.split(sizes)
    for i, (batch, seed) in enumerate(zip(micro_batches, seeds)):
        cached = Embeddings(
            image_grads[i],
            text_grads[i],
            grads.logit_scale / count,
            None if grads.logit_bias is None else grads.logit_bias / count,
        )
        surrogate = engine(batch, seeded_generator(seed), embedding_grads=cached)
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    return loss, False
