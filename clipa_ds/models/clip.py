"""CLIP = CLIPA image tower + CLIPA text tower + learnable temperature; AdamW parameter groups."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipa_ds.models.text import TextTower
from clipa_ds.models.variants import ModelSpec, get_variant
from clipa_ds.models.vision import VisionTower

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class LogitBias(nn.Module):
    """SigLIP's learnable logit bias (only built for the sigmoid loss).

    A module, not a bare parameter, so that calling it runs ZeRO-3's pre-forward hook (which
    gathers the parameter) whatever the persistence threshold; it returns a fresh fp32 tensor,
    never a view of a parameter that ZeRO-3 may release after the call.
    """

    def __init__(self, init: float) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.full((1,), float(init)))

    def forward(self) -> torch.Tensor:
        return self.bias.to(torch.float32, copy=True).squeeze(0)  # ()


class CLIP(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        context_length: int,
        *,
        grad_checkpointing_vision: bool = False,
        grad_checkpointing_text: bool = False,
        logit_scale_init: float = LOGIT_SCALE_INIT,
        logit_bias_init: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.visual = VisionTower(spec, grad_checkpointing=grad_checkpointing_vision)
        self.text = TextTower(spec, context_length, grad_checkpointing=grad_checkpointing_text)
        # Shape (1,) rather than a 0-dim scalar: ZeRO-3 partitions/flattens parameters and
        # 1-element tensors are the safe common case.
        self.logit_scale = nn.Parameter(torch.full((1,), float(logit_scale_init)))
        # SigLIP only (see clipa_ds.siglip.siglip_model_kwargs); None keeps CLIP checkpoints as they were.
        self.logit_bias = LogitBias(logit_bias_init) if logit_bias_init is not None else None

    def encode_image(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return F.normalize(self.visual(images, generator=generator), dim=-1)  # (B, E)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)  # (B, E)

    def temperature(self) -> torch.Tensor:
        """exp(logit_scale) clamped to <= 100, as a 0-dim tensor.

        The clamp lives in forward because under ZeRO the optimizer updates an fp32 master copy:
        an in-place clamp of the (bf16) module parameter after step() would be overwritten.
        """
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp().squeeze(0)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image features (B, E), text features (B, E), both L2-normalised; logit scale ())."""
        return self.encode_image(images, generator), self.encode_text(tokens), self.temperature()


def build_clip(
    variant: str,
    context_length: int,
    *,
    grad_checkpointing_vision: bool = False,
    grad_checkpointing_text: bool = False,
    logit_scale_init: float = LOGIT_SCALE_INIT,
    logit_bias_init: float | None = None,
) -> CLIP:
    """Build a CLIPA model. Wrap in `with torch.device("meta"):` to size big variants for free.

    `logit_scale_init` is log(temperature); `logit_bias_init` adds SigLIP's learnable bias.
    """
    return CLIP(
        get_variant(variant),
        context_length,
        grad_checkpointing_vision=grad_checkpointing_vision,
        grad_checkpointing_text=grad_checkpointing_text,
        logit_scale_init=logit_scale_init,
        logit_bias_init=logit_bias_init,
    )


def _is_position_embedding(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("positional_embedding", "pos_embed")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Trainable parameters AdamW must not decay: everything except weight matrices.

    Biases, LayerNorm weights (ndim < 2), position embeddings and the temperature are excluded.
    Weight matrices include the patch-embedding conv kernel and the token-embedding table.
    """
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.ndim < 2 or _is_position_embedding(name))
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups: [weight matrices with `weight_decay`, everything else with 0]."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
