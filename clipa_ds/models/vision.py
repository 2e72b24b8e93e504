"""CLIPA image tower on timm's VisionTransformer.

CLIPA design (DESIGN.md): fixed 2D sin-cos positions recomputed for whatever patch grid the
input has (so one set of weights serves 84 px pre-training and 224/336 px fine-tuning), no
ln_pre, global average pooling over patch tokens then LayerNorm, bias-free projection.

timm builds and initialises the modules (patch_embed, blocks, fc_norm); the forward is ours, so
that positions are added before token masking and masking can replay a caller's generator.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import LayerNorm, build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from clipa_ds.config import ConfigError
from clipa_ds.models.variants import ModelSpec
from clipa_ds.reduce.image import IMAGE_MASKS, keep_indices

ACT_LAYER = "gelu_tanh"


def force_fused_attention(blocks: nn.Sequential) -> None:
    """Route every block's attention through F.scaled_dot_product_attention (flash / mem-efficient).

    timm picks this by default unless TIMM_FUSED_ATTN=0; we make it explicit so a stray env var
    cannot silently fall back to the O(N^2)-memory path.
    """
    for block in blocks:
        block.attn.fused_attn = True


class VisionTower(nn.Module):
    def __init__(self, spec: ModelSpec, *, grad_checkpointing: bool = False) -> None:
        super().__init__()
        tower = spec.vision
        vit = VisionTransformer(
            img_size=224,  # only a default: dynamic_img_size accepts any multiple of the patch
            patch_size=spec.patch_size,
            embed_dim=tower.width,
            depth=tower.depth,
            num_heads=tower.heads,
            mlp_ratio=tower.mlp_dim / tower.width,
            qkv_bias=True,
            class_token=False,
            pos_embed="none",
            global_pool="avg",
            fc_norm=True,
            pre_norm=False,
            dynamic_img_size=True,
            num_classes=0,
            act_layer=ACT_LAYER,
            norm_layer=partial(LayerNorm, eps=spec.vision_ln_eps),
        )
        # Keep only the modules we use; the ViT wrapper (Identity head, pools) is dropped.
        self.patch_embed = vit.patch_embed
        self.blocks = vit.blocks
        self.fc_norm = vit.fc_norm
        force_fused_attention(self.blocks)
        self.proj = nn.Linear(tower.width, spec.embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=tower.width**-0.5)

        self.width = tower.width
        self.patch_size = spec.patch_size
        self.grad_checkpointing = grad_checkpointing
        self.mask_strategy = "none"
        self.mask_ratio = 0.0

    def set_token_masking(self, strategy: str, ratio: float) -> None:
        """Drop `ratio` of patch tokens with `strategy` (see reduce.image) in training mode only."""
        if strategy not in IMAGE_MASKS:
            raise ConfigError(f"image.mask={strategy!r} is not valid; choose one of: {', '.join(IMAGE_MASKS)}")
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"image.mask_ratio={ratio} must be in [0, 1)")
        self.mask_strategy = strategy
        self.mask_ratio = float(ratio)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def masking_active(self) -> bool:
        return self.training and self.mask_strategy != "none" and self.mask_ratio > 0.0

    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(grid_h * grid_w, D) sin-cos table in raster order.

        Recomputed per call rather than cached: it is N*D sin/cos (microseconds next to one
        block), never a parameter or a state_dict entry, never stale after a resolution change,
        and torch.compile folds it into the graph.
        """
        table = build_sincos2d_pos_embed([grid_h, grid_w], dim=self.width, device=device)  # (N, D) fp32
        return table.to(dtype)

    def forward_tokens(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Patch tokens after the last block: (B, K, D), K = kept tokens (N in eval mode)."""
        x = self.patch_embed(images)  # (B, gh, gw, D)
        batch, grid_h, grid_w, dim = x.shape
        x = x.reshape(batch, grid_h * grid_w, dim)  # (B, N, D)
        # Positions first, then drop: every kept token carries its own location.
        x = x + self.pos_embed(grid_h, grid_w, x.device, x.dtype)  # (B, N, D)
        if self.masking_active:
            idx = keep_indices(
                self.mask_strategy, self.mask_ratio, grid_h, grid_w, batch,
                device=x.device, generator=generator,
            )  # (B, K)
            x = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, dim))  # (B, K, D)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (B, 3, H, W) normalised float, H and W multiples of the patch -> (B, E)."""
        x = self.forward_tokens(images, generator)  # (B, K, D)
        x = self.fc_norm(x.mean(dim=1))  # (B, D)
        return self.proj(x)  # (B, E)
