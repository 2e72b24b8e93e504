"""Learning rate as a pure function of samples seen within a stage: linear warm-up, cosine decay."""

from __future__ import annotations

import math

from clipa_ds.config import OptimConfig


def lr_at(samples: int, optim: OptimConfig, stage_samples: int) -> float:
    """LR after `samples` samples of a stage of `stage_samples` samples."""
    if optim.warmup_samples > 0 and samples < optim.warmup_samples:
        return optim.lr * (samples + 1) / optim.warmup_samples
    decay_span = max(1, stage_samples - optim.warmup_samples)
    progress = min(1.0, (samples - optim.warmup_samples) / decay_span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))
