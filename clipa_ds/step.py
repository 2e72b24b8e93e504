"""One optimizer step over `grad_accum` micro-batches.

Two ways to accumulate (config `loss.accumulation`, used only when grad_accum > 1):
- gradient_cache: the loss of the whole global batch (clipa_ds.gradcache), about one extra forward;
- per_micro_batch: DeepSpeed's plain accumulation; each micro-batch x world_size is its own
  contrastive batch (fewer negatives: a different loss from the recipe's).
Each step makes one small all-rank agreement on whether the loss was finite (one host sync per
optimizer step); a non-finite step is skipped on every rank (clipa_ds.numerics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from clipa_ds.config import LossConfig
from clipa_ds.engine import BatchPlan
from clipa_ds.gradcache import gradient_cache_step
from clipa_ds.numerics import any_rank, deepspeed_skipped, local_nonfinite, mark_skipped_step, poison

Batch = dict[str, torch.Tensor]


@dataclass
class StepStats:
    # grad_accum x this rank's mean micro-batch loss (the sum of micro-batch losses in
    # per-micro-batch mode), on the device (no .item() here); zero when the step was skipped.
    loss_sum: torch.Tensor
    data_wait_s: float
    skipped: bool = False  # non-finite loss on some rank: no update on any rank


def _fetch(batches: Iterator[Batch], device: torch.device) -> tuple[Batch, float]:
    wait_start = time.perf_counter()
    batch = next(batches)
    wait = time.perf_counter() - wait_start
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}, wait


def _per_micro_batch(engine: Any, batches: Iterator[Batch], plan: BatchPlan, device: torch.device) -> StepStats:
    """DeepSpeed's accumulation; the finite-loss decision is taken at the boundary micro-batch."""
    loss_sum = torch.zeros((), device=device)
    bad = torch.zeros((), device=device)
    data_wait_s = 0.0
    for index in range(plan.grad_accum):
        batch, wait = _fetch(batches, device)
        data_wait_s += wait
        loss = engine(batch)
        bad = torch.maximum(bad, local_nonfinite(loss))
        if index == plan.grad_accum - 1 and any_rank(bad):
            if plan.grad_accum == 1:  # nothing back-propagated yet: skip cleanly
                mark_skipped_step(engine, 1)
            else:  # earlier micro-batches are in DeepSpeed's buffers: let its overflow check drop them
                skipped_before = engine.skipped_steps
                engine.backward(poison(loss))
                engine.step()
                deepspeed_skipped(engine, skipped_before)
            return StepStats(torch.zeros((), device=device), data_wait_s, skipped=True)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
    return StepStats(loss_sum, data_wait_s)


def _gradient_cache(engine: Any, batches: Iterator[Batch], plan: BatchPlan, device: torch.device) -> StepStats:
    micro_batches: list[Batch] = []
    data_wait_s = 0.0
    for _ in range(plan.grad_accum):
        batch, wait = _fetch(batches, device)
        micro_batches.append(batch)
        data_wait_s += wait
    loss, skipped = gradient_cache_step(engine, micro_batches)
    loss_sum = torch.zeros((), device=device) if skipped else loss * plan.grad_accum
    return StepStats(loss_sum, data_wait_s, skipped=skipped)


def train_step(
    engine: Any,
    batches: Iterator[Batch],
    plan: BatchPlan,
    device: torch.device,
    *,
    loss: LossConfig | None = None,
) -> StepStats:
    """Forward/backward the micro-batches of one global batch; DeepSpeed steps at the boundary."""
    accumulation = (loss or LossConfig()).accumulation
    if plan.grad_accum > 1 and accumulation == "gradient_cache":
        return _gradient_cache(engine, batches, plan, device)
    return _per_micro_batch(engine, batches, plan, device)
