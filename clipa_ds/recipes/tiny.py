"""`tiny`: a seconds-long two-stage CLIPA schedule on CPU; backs the demo and the tests.

Same shape as the real recipes: low-resolution, short-text pre-training, then a fine-tune at
higher resolution with longer text and random patch masking.
"""

from __future__ import annotations

from typing import Any


def recipe() -> dict[str, Any]:
    pretrain = {
        "name": "pretrain",
        "samples": 16_384,
        "global_batch": 128,
        "image": {"size": 32, "mask": "none", "mask_ratio": 0.0},
        "text": {"context_length": 8, "strategy": "syntax"},
        # Higher rates collapse this 2-layer text tower to a constant embedding within ~20 steps.
        "optim": {"lr": 5e-4, "warmup_samples": 1_024, "weight_decay": 0.1},
    }
    finetune = {
        "name": "finetune",
        "samples": 4_096,
        "global_batch": 128,
        "image": {"size": 48, "mask": "random", "mask_ratio": 0.3},
        "text": {"context_length": 16, "strategy": "truncate"},
        "optim": {"lr": 2e-4, "warmup_samples": 512, "weight_decay": 0.1},
    }
    return {
        "run": {"dir": "runs/tiny", "seed": 0, "log_every_steps": 10},
        "model": {"variant": "tiny"},
        "data": {"train_urls": "synthetic", "workers": 1, "shuffle_buffer": 500},
        "eval": {"zeroshot_data": "synthetic", "batch_size": 256},
        "engine": {"zero_stage": 1, "bf16": False, "peak_tflops": 1.0},
        # At least four checkpoints in every stage (21 and 5 here), so that killing a run after
        # its first checkpoint and resuming it is a meaningful test.
        "checkpoint": {"every_samples": 768, "keep_last": 2},
        "stages": [pretrain, finetune],
    }
