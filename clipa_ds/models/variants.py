"""CLIPA model family: tower shapes per named variant, and an analytic parameter count.

Widths/depths/heads follow the CLIPA papers (DESIGN.md "Facts"). `tiny` exists for tests and the
CPU demo only. The parameter count is computed from the formulas below, not by building a model,
so the tests can check the built modules against an independent number.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipa_ds.config import ConfigError


@dataclass(frozen=True, kw_only=True)
class TowerSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int

    def __post_init__(self) -> None:
        if self.width % self.heads != 0:
            raise ConfigError(f"TowerSpec.width={self.width} must divide by heads={self.heads}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    vision: TowerSpec
    text: TowerSpec
    patch_size: int
    embed_dim: int
    # BERT-uncased WordPiece has 30,522 entries; CLIPA pads the table to 32,000 rows.
    vocab_size: int = 32000
    vision_ln_eps: float = 1e-6

    def __post_init__(self) -> None:
        # The 2D sin-cos table splits the width into 4 bands (sin/cos x h/w).
        if self.vision.width % 4 != 0:
            raise ConfigError(f"vision width={self.vision.width} must divide by 4 (2D sin-cos)")


VARIANTS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        vision=TowerSpec(width=128, depth=4, heads=4, mlp_dim=512),
        text=TowerSpec(width=128, depth=2, heads=4, mlp_dim=512),
        patch_size=8,
        embed_dim=128,
    ),
    "B-16": ModelSpec(
        vision=TowerSpec(width=768, depth=12, heads=12, mlp_dim=3072),
        text=TowerSpec(width=512, depth=12, heads=8, mlp_dim=2048),
        patch_size=16,
        embed_dim=512,
    ),
    "L-16": ModelSpec(
        vision=TowerSpec(width=1024, depth=24, heads=16, mlp_dim=4096),
        text=TowerSpec(width=768, depth=12, heads=12, mlp_dim=3072),
        patch_size=16,
        embed_dim=768,
    ),
    # CLIPA-v2 L/14: L/16 widths with 14-pixel patches.
    "L-14": ModelSpec(
        vision=TowerSpec(width=1024, depth=24, heads=16, mlp_dim=4096),
        text=TowerSpec(width=768, depth=12, heads=12, mlp_dim=3072),
        patch_size=14,
        embed_dim=768,
    ),
    "H-14": ModelSpec(
        vision=TowerSpec(width=1280, depth=32, heads=16, mlp_dim=5120),
        text=TowerSpec(width=1024, depth=24, heads=16, mlp_dim=4096),
        patch_size=14,
        embed_dim=1024,
    ),
    # bigG
    "G-14": ModelSpec(
        vision=TowerSpec(width=1664, depth=48, heads=16, mlp_dim=8192),
        text=TowerSpec(width=1280, depth=32, heads=20, mlp_dim=5120),
        patch_size=14,
        embed_dim=1280,
    ),
}


def get_variant(name: str) -> ModelSpec:
    if name not in VARIANTS:
        raise ConfigError(
            f"model.variant={name!r} is not valid; choose one of: {', '.join(VARIANTS)}"
        )
    return VARIANTS[name]


def block_param_count(tower: TowerSpec) -> int:
    """One pre-norm transformer block with biases everywhere (timm Block, qkv_bias=True)."""
    d, m = tower.width, tower.mlp_dim
    norms = 2 * (2 * d)  # norm1, norm2: weight + bias
    attn = (3 * d * d + 3 * d) + (d * d + d)  # qkv, out proj
    mlp = (d * m + m) + (m * d + d)  # fc1, fc2
    return norms + attn + mlp


def vision_param_count(spec: ModelSpec) -> int:
    d, p = spec.vision.width, spec.patch_size
    patch_embed = 3 * p * p * d + d  # conv weight + bias (no pre-norm, so the bias is kept)
    blocks = spec.vision.depth * block_param_count(spec.vision)
    fc_norm = 2 * d
    proj = d * spec.embed_dim  # bias-free
    return patch_embed + blocks + fc_norm + proj  # sin-cos positions are not parameters


def text_param_count(spec: ModelSpec, context_length: int) -> int:
    d = spec.text.width
    embeddings = spec.vocab_size * d + context_length * d
    blocks = spec.text.depth * block_param_count(spec.text)
    ln_final = 2 * d
    proj = d * spec.embed_dim
    return embeddings + blocks + ln_final + proj


def analytic_param_count(spec: ModelSpec, context_length: int) -> int:
    """Total trainable parameters of `build_clip`, including the scalar logit_scale."""
    return vision_param_count(spec) + text_param_count(spec, context_length) + 1
