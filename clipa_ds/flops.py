"""Analytic FLOPs per sample for CLIPA models, and MFU.

Convention (as in the PaLM / Chinchilla MFU accounting): count only matmuls and attention, one
multiply-add = 2 FLOPs; LayerNorm, GELU, softmax, embedding look-ups and the loss are ignored.
Training = 3 x forward (backward computes gradients w.r.t. activations and weights, 2 x forward).
Activation recomputation (gradient checkpointing) is NOT counted: MFU measures useful work.

Per transformer layer of width d, MLP width m, over n tokens (multiply-adds):
    qkv projection      3 * n * d^2
    attention out proj      n * d^2
    scores  Q K^T           n^2 * d
    weighted values A V     n^2 * d
    MLP                 2 * n * d * m
Image tower extras: patch embedding n * (3 * p * p) * d; projection d * E after pooling (once).
Text tower extras: projection d * E on the pooled last token (once).

Check (tests/test_flops.py): H-14 at 36 image tokens and 8 text tokens -> ~151 GFLOPs per
training sample (45.6 image + 4.8 text forward, x3).
"""

from __future__ import annotations

from dataclasses import dataclass

from clipa_ds.models.variants import ModelSpec, TowerSpec

FLOPS_PER_MAC = 2.0
TRAIN_MULTIPLIER = 3.0


@dataclass(frozen=True, kw_only=True)
class FlopsBreakdown:
    """Training FLOPs per sample (forward + backward)."""

    image: float
    text: float
    total: float


def tower_forward_flops(tower: TowerSpec, tokens: int) -> float:
    """Forward FLOPs of the transformer blocks of one tower, per sample, over `tokens` tokens."""
    n, d, m = float(tokens), float(tower.width), float(tower.mlp_dim)
    macs_per_layer = (
        3 * n * d * d  # qkv
        + n * d * d  # attention output projection
        + 2 * n * n * d  # Q K^T and A V
        + 2 * n * d * m  # MLP up + down
    )
    return FLOPS_PER_MAC * tower.depth * macs_per_layer


def image_forward_flops(spec: ModelSpec, image_tokens: int, *, patch_tokens: int | None = None) -> float:
    """Image tower forward FLOPs per sample.

    `image_tokens`: tokens the blocks see (after masking). `patch_tokens`: patches embedded,
    i.e. before masking (the tower embeds every patch, then drops); defaults to image_tokens.
    """
    d = spec.vision.width
    patches = image_tokens if patch_tokens is None else patch_tokens
    patch_embed = patches * 3 * spec.patch_size * spec.patch_size * d
    proj = d * spec.embed_dim
    return tower_forward_flops(spec.vision, image_tokens) + FLOPS_PER_MAC * (patch_embed + proj)


def text_forward_flops(spec: ModelSpec, text_tokens: int) -> float:
    """Text tower forward FLOPs per sample over `text_tokens` tokens."""
    proj = spec.text.width * spec.embed_dim
    return tower_forward_flops(spec.text, text_tokens) + FLOPS_PER_MAC * proj


def train_flops_per_sample(
    spec: ModelSpec, image_tokens: int, text_tokens: int, *, patch_tokens: int | None = None
) -> FlopsBreakdown:
    """Training FLOPs per sample = 3 x forward, per tower and in total."""
    image = TRAIN_MULTIPLIER * image_forward_flops(spec, image_tokens, patch_tokens=patch_tokens)
    text = TRAIN_MULTIPLIER * text_forward_flops(spec, text_tokens)
    return FlopsBreakdown(image=image, text=text, total=image + text)


def image_tokens_for(spec: ModelSpec, image_size: int, mask_ratio: float = 0.0) -> int:
    """Tokens the image tower's blocks see for a square image, after masking (training)."""
    from clipa_ds.reduce.image import num_kept

    grid = image_size // spec.patch_size
    return num_kept(grid * grid, mask_ratio)


def mfu(samples_per_s: float, flops_per_sample: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved useful FLOP/s over peak FLOP/s (of the same devices).

    For a multi-GPU run pass global samples/s and peak_flops_per_s = per-device peak x world size.
    """
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak_flops_per_s={peak_flops_per_s} must be > 0")
    return samples_per_s * flops_per_sample / peak_flops_per_s
