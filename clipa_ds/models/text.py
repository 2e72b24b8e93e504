"""CLIPA text tower: bidirectional transformer over BERT WordPiece ids, last-token pooling.

Differences from OpenAI CLIP (all per CLIPA): no causal mask, a 32,000-row embedding table for
the BERT-uncased vocabulary, pooling of the last position (open_clip pool_type='last'). The
learned position table is sized to the stage's context length and interpolated at the stage
hand-off (8 -> 32 tokens) with `resize_positions`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, get_act_layer
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from clipa_ds.models.variants import ModelSpec
from clipa_ds.models.vision import ACT_LAYER, force_fused_attention


class TextTower(nn.Module):
    def __init__(self, spec: ModelSpec, context_length: int, *, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if context_length < 1:
            raise ValueError(f"text context_length={context_length} must be >= 1")
        tower = spec.text
        norm_layer = partial(LayerNorm, eps=spec.vision_ln_eps)
        self.token_embedding = nn.Embedding(spec.vocab_size, tower.width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, tower.width))
        # Same block type as the image tower (qkv bias, GELU-tanh, LN eps 1e-6), so both towers
        # share kernels and compile the same way.
        self.blocks = nn.Sequential(*[
            Block(
                dim=tower.width,
                num_heads=tower.heads,
                mlp_ratio=tower.mlp_dim / tower.width,
                qkv_bias=True,
                act_layer=get_act_layer(ACT_LAYER),
                norm_layer=norm_layer,
            )
            for _ in range(tower.depth)
        ])
        force_fused_attention(self.blocks)
        self.ln_final = norm_layer(tower.width)
        self.proj = nn.Linear(tower.width, spec.embed_dim, bias=False)
        self.grad_checkpointing = grad_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.blocks:
            block.apply(init_weights_vit_timm)  # trunc_normal(0.02) weights, zero biases
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.no_grad()
    def resize_positions(self, new_length: int) -> None:
        """Linearly interpolate the learned position table to `new_length` rows (stage hand-off).

        align_corners=False treats each row as the centre of a cell, so growing 8 -> 32 keeps
        row 0 and row -1 exactly and fills in between. Replaces the Parameter: build the
        optimizer (DeepSpeed engine) after calling this.
        """
        if new_length < 1:
            raise ValueError(f"text context_length={new_length} must be >= 1")
        old = self.positional_embedding
        if new_length == old.shape[0]:
            return
        table = old.detach().float().t().unsqueeze(0)  # (1, D, L_old)
        table = F.interpolate(table, size=new_length, mode="linear", align_corners=False)  # (1, D, L_new)
        resized = table.squeeze(0).t().contiguous().to(old.dtype)  # (L_new, D)
        self.positional_embedding = nn.Parameter(resized, requires_grad=old.requires_grad)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) long, L <= context_length -> (B, E) (not normalised)."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"text has {length} tokens but the tower's context_length is {self.context_length}; "
                f"call resize_positions({length}) at the stage hand-off"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # (B, L, D)
        # No attention mask: CLIPA's text encoder is bidirectional.
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        x = self.ln_final(x[:, -1])  # (B, D) last-token pooling; LN of one row == row of LN
        return self.proj(x)  # (B, E)
