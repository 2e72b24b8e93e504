"""One optimizer step over `grad_accum` micro-batches, with no host sync."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from clipa_ds.engine import BatchPlan


@dataclass
class StepStats:
    loss_sum: torch.Tensor  # sum of micro-batch losses on the device (no .item() here)
    data_wait_s: float


def train_step(engine: Any, batches: Iterator[dict[str, torch.Tensor]], plan: BatchPlan, device: torch.device) -> StepStats:
    """Forward/backward every micro-batch; DeepSpeed steps the optimizer at the boundary."""
    loss_sum = torch.zeros((), device=device)
    data_wait_s = 0.0
    for _ in range(plan.grad_accum):
        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait_s += time.perf_counter() - wait_start
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
    return StepStats(loss_sum, data_wait_s)
