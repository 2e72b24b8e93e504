"""Non-finite losses: one decision for all ranks, a clean skip in DeepSpeed, a stop after N in a row.

Skipping cleanly needs the decision *before* the first backward of the global batch: DeepSpeed has
no public way to drop gradients already accumulated in its (ZeRO-partitioned) buffers. Gradient
caching has the full-batch loss before any backward, and so does plain training without
accumulation: there the whole global batch is simply not back-propagated and `engine.step()` is
not called, on every rank, so DeepSpeed's micro-step/boundary counters stay aligned (they only move
in `step()`). `mark_skipped_step` then books the batch the way DeepSpeed books its own overflow
skips (global_steps, global_samples, skipped_steps, micro_steps), so engine counters keep matching
the loop's step count across checkpoints.

Plain per-micro-batch accumulation learns of a bad micro-batch after earlier ones were already
back-propagated. There the boundary micro-batch is back-propagated with a NaN factor, so every
rank's reduced gradients are non-finite, and DeepSpeed's own overflow check (bf16 with
`check_grad_overflow`, the default; ZeRO-3; fp16) discards the step and zeroes the buffers on all
ranks together; `deepspeed_skipped` verifies that it did.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """Too many global batches in a row had a non-finite loss."""


def local_nonfinite(*tensors: Tensor | None) -> Tensor:
    """0-dim float flag on the device: 1.0 if any element of `tensors` is NaN or inf (no host sync)."""
    flags = [(~torch.isfinite(t.detach())).any() for t in tensors if t is not None]
    if not flags:
        raise ValueError("local_nonfinite needs at least one tensor")
    return torch.stack(flags).any().float()


def any_rank(flag: Tensor) -> bool:
    """True if `flag` (0-dim, 0/1) is set on any rank. A collective: every rank must call it."""
    flag = flag.detach().clone().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def mark_skipped_step(engine: Any, grad_accum: int) -> None:
    """Book a global batch that was neither back-propagated nor stepped, as DeepSpeed books an overflow."""
    engine.skipped_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.micro_steps += grad_accum


def deepspeed_skipped(engine: Any, skipped_before: int) -> None:
    """Raise if DeepSpeed applied an update that `poison` should have made it skip."""
    if engine.skipped_steps == skipped_before:
        raise NonFiniteLossError(
            "a non-finite loss reached a gradient-accumulation step but DeepSpeed applied the update "
            "(its overflow check is off in this precision/ZeRO set-up); the weights may now be "
            "non-finite. Use loss.accumulation=gradient_cache (skips before any backward) or bf16."
        )


def poison(loss: Tensor) -> Tensor:
    """`loss` times NaN: its backward makes every gradient non-finite, which DeepSpeed then skips."""
    return loss * float("nan")


class NonFiniteTracker:
    """Counts skipped global batches (total, and in a row) and says when to stop the run."""

    def __init__(self, max_in_a_row: int) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0

    def update(self, skipped: bool) -> None:
        if skipped:
            self.total += 1
            self.in_a_row += 1
        else:
            self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def message(self, step: int) -> str:
        return (
            f"stopping: the loss was non-finite on at least one rank for {self.in_a_row} global batches "
            f"in a row (up to step {step}; loss.max_nonfinite_steps_in_a_row={self.max_in_a_row}, "
            f"{self.total} skipped in this stage). The weights were not updated by those batches; resume "
            "from the last good checkpoint with a lower learning rate, or check the data around that step."
        )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = int(state["total"])
        self.in_a_row = int(state["in_a_row"])
