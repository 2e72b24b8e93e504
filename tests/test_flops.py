"""Analytic FLOPs: the CLIPA reference figure, and agreement with PyTorch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clipa_ds.flops import (
    image_forward_flops,
    image_tokens_for,
    mfu,
    text_forward_flops,
    tower_forward_flops,
    train_flops_per_sample,
)
from clipa_ds.models import build_clip, get_variant


def test_h14_reference_training_flops() -> None:
    # CLIPA pre-training of H/14: 84 px (6x6 = 36 patches) and 8 text tokens, ~151 GFLOPs.
    spec = get_variant("H-14")
    assert image_tokens_for(spec, 84) == 36
    flops = train_flops_per_sample(spec, 36, 8)
    assert flops.total == pytest.approx(151e9, rel=0.03)
    assert flops.total == pytest.approx(flops.image + flops.text)
    assert flops.image == pytest.approx(3 * image_forward_flops(spec, 36))
    assert flops.text == pytest.approx(3 * text_forward_flops(spec, 8))


def test_attention_term_is_quadratic() -> None:
    tower = get_variant("L-16").vision
    n = 50
    # Linear terms cancel in f(2n) - 2 f(n); what is left is the n^2 attention term:
    # 2 FLOPs x depth x 2 matmuls x ((2n)^2 - 2 n^2) x d.
    extra = tower_forward_flops(tower, 2 * n) - 2 * tower_forward_flops(tower, n)
    assert extra == pytest.approx(2 * tower.depth * 2 * (2 * n * n) * tower.width)


def test_masking_reduces_block_flops_not_patch_embedding() -> None:
    spec = get_variant("L-16")
    kept = image_tokens_for(spec, 224, 0.3)
    assert kept == 137  # floor(196 * 0.7)
    masked = image_forward_flops(spec, kept, patch_tokens=196)
    full = image_forward_flops(spec, 196)
    assert masked < full
    p, d = spec.patch_size, spec.vision.width
    assert masked - image_forward_flops(spec, kept) == pytest.approx(2 * (196 - kept) * 3 * p * p * d)


def test_matches_torch_flop_counter_on_tiny_model() -> None:
    torch.manual_seed(0)
    spec = get_variant("tiny")
    model = build_clip("tiny", 8).eval()
    images = torch.randn(2, 3, 48, 48)  # 6x6 = 36 patches
    tokens = torch.randint(0, spec.vocab_size, (2, 8))
    # The counter has no formula for the CPU SDPA kernel; the unfused path is the same math
    # as explicit matmuls (Q K^T, A V), which it does count.
    for block in list(model.visual.blocks) + list(model.text.blocks):
        block.attn.fused_attn = False
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images, tokens)
    analytic = image_forward_flops(spec, 36) + text_forward_flops(spec, 8)
    # The counter sees every matmul and conv; per sample it must equal the formula.
    assert counter.get_total_flops() / 2 == pytest.approx(analytic, rel=1e-9)


def test_mfu() -> None:
    flops = train_flops_per_sample(get_variant("H-14"), 36, 8).total
    # 2,000 samples/s on 8 H100s (989 TFLOP/s bf16 each).
    value = mfu(2000.0, flops, 8 * 989e12)
    assert value == pytest.approx(2000.0 * flops / (8 * 989e12))
    assert 0.0 < value < 1.0
    assert mfu(4000.0, flops, 8 * 989e12) == pytest.approx(2 * value)
    with pytest.raises(ValueError, match="peak_flops_per_s"):
        mfu(1.0, flops, 0.0)
