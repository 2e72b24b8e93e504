"""CLIPA-v1 recipes (Li, Wang, Xie, "An Inverse Scaling Law for CLIP Training", NeurIPS 2023,
arXiv 2305.07017): the three academic-budget models of the released weights table
(UCSC-VLAA/CLIPA, clipa_torch/README.md, LAION-400M, 8x A100):

| name                | pretrain                 | IN-1k zero-shot |
| CLIPA-B/16(I50,T16) | 112 px (7x7), 16 tokens  | 63.2            |
| CLIPA-L/16(I17,T16) |  64 px (4x4), 16 tokens  | 67.8            |
| CLIPA-L/16(I37,T8)  |  96 px (6x6),  8 tokens  | 69.3            |

"I" counts image tokens including the class token (49+1, 16+1, 36+1); the CLIPA tower pools by
GAP and has no class token, so the patch counts are 49, 16 and 36. "T" is the text length.

Schedule (paper, Sec. 3 "Training setup"): pre-train on LAION-400M for 6.4 epochs = 2,000
ImageNet-1k epochs (2,000 x 1,281,167 = 2,562,334,000 samples), then fine-tune for 0.36 epoch
(131,072,000 samples) at 224 px with text length 32 and no masking. Batch, lr and warm-up come
from the released GPU scripts clipa_torch/scripts/exp/gpu/vit_{b16,l16}/*_{pretrain,finetune}.sh
(8 GPUs, so global batch = 8 x --batch-size; lr = 8e-6 x batch/256 in pre-training, 8e-7 x
batch/256 in fine-tuning; warm-up ~51.2M and ~25.2-25.6M samples):

- B/16 I50T16: pretrain batch 65,536, lr 2.048e-3, 782 warm-up steps; truncated text (the
  script's ViT-B-16-CL16 model has no syntax mask). Fine-tune batch 8,192, lr 2.56e-5, 3,072
  warm-up steps.
- L/16 I17T16, I37T8: pretrain batch 32,768, lr 1.024e-3, 1,563 warm-up steps, syntax text
  masking (ViT-L-16-CL{16,8}-Syntax-GAP). Fine-tune batch 7,168, lr 2.24e-5, 3,571 warm-up steps.
AdamW b=(0.9, 0.95), wd 0.2, eps 1e-6 (OpenCLIP default for ViTs), cosine to 0.

Text length in fine-tuning: the paper says 32; the released B/16 and L/16-I17 fine-tune scripts
keep their 16-token model. We follow the paper (32; the learned text positions are interpolated
at the stage hand-off). Set `stages.finetune-224.text.context_length=16` for the script variant.
"""

from __future__ import annotations

from typing import Any

from clipa_ds.recipes.clipa_v2 import derive

PRETRAIN_SAMPLES = 2_000 * 1_281_167  # 2,562,334,000 = 6.4 LAION-400M epochs
FINETUNE_SAMPLES = 131_072_000  # 0.36 LAION-400M epoch


def _pretrain(*, size: int, context_length: int, strategy: str, batch: int, lr: float, warmup_steps: int) -> dict[str, Any]:
    return {
        "name": "pretrain",
        "samples": PRETRAIN_SAMPLES,
        "global_batch": batch,
        "micro_batch": 0,
        "image": {"size": size, "mask": "none", "mask_ratio": 0.0, "eval_size": 0},
        "text": {"context_length": context_length, "strategy": strategy},
        "optim": {
            "lr": lr,
            "min_lr": 0.0,
            "warmup_samples": warmup_steps * batch,
            "weight_decay": 0.2,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-6,
            "grad_clip": 1.0,
        },
    }


def _finetune(pretrain: dict[str, Any], *, batch: int, lr: float, warmup_steps: int) -> dict[str, Any]:
    return derive(
        pretrain,
        name="finetune-224",
        samples=FINETUNE_SAMPLES,
        global_batch=batch,
        image={"size": 224, "mask": "none", "mask_ratio": 0.0},
        text={"context_length": 32, "strategy": "truncate"},
        optim={"lr": lr, "warmup_samples": warmup_steps * batch},
    )


def _recipe(name: str, variant: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "run": {"dir": f"runs/{name}", "seed": 0, "log_every_steps": 50},
        # The released scripts train with --grad-checkpointing.
        "model": {"variant": variant, "grad_checkpointing_vision": True, "grad_checkpointing_text": True},
        "data": {"train_urls": "", "workers": 6, "shuffle_buffer": 10_000},
        "engine": {"zero_stage": 1, "bf16": True},
        "stages": stages,
    }


def b16_i50t16() -> dict[str, Any]:
    """B/16 at 112 px (49 tokens) with 16 text tokens: 63.2% zero-shot, ~2 days on 8x A100."""
    pretrain = _pretrain(size=112, context_length=16, strategy="truncate", batch=65_536, lr=2.048e-3, warmup_steps=782)
    return _recipe("clipa-v1-b16-i50t16", "B-16", [pretrain, _finetune(pretrain, batch=8_192, lr=2.56e-5, warmup_steps=3_072)])


def l16_i17t16() -> dict[str, Any]:
    """L/16 at 64 px (16 tokens) with 16 text tokens: 67.8% zero-shot, ~3 days on 8x A100."""
    pretrain = _pretrain(size=64, context_length=16, strategy="syntax", batch=32_768, lr=1.024e-3, warmup_steps=1_563)
    return _recipe("clipa-v1-l16-i17t16", "L-16", [pretrain, _finetune(pretrain, batch=7_168, lr=2.24e-5, warmup_steps=3_571)])


def l16_i37t8() -> dict[str, Any]:
    """L/16 at 96 px (36 tokens) with 8 text tokens: 69.3% zero-shot, ~4 days on 8x A100."""
    pretrain = _pretrain(size=96, context_length=8, strategy="syntax", batch=32_768, lr=1.024e-3, warmup_steps=1_563)
    return _recipe("clipa-v1-l16-i37t8", "L-16", [pretrain, _finetune(pretrain, batch=7_168, lr=2.24e-5, warmup_steps=3_571)])
