"""CLIPTask: the single nn.Module DeepSpeed wraps (model + loss, batch in, loss out).

Three uses of one forward, so every pass goes through the DeepSpeed engine (its hooks gather
ZeRO-3 parameters and handle loss scaling):
- `task(batch)` -> this rank's loss (plain training, one micro-batch = one contrastive batch);
- `task(batch, embed_only=True)` -> Embeddings (gradient caching, pass 1, under no_grad);
- `task(batch, embedding_grads=g)` -> the surrogate sum(emb * g) whose gradient with respect to the
  parameters is the cached full-batch gradient (gradient caching, pass 2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from clipa_ds.config import LossConfig
from clipa_ds.loss import contrastive_loss

# OpenAI CLIP normalisation, as CLIPA and open_clip use.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, 3, H, W) on the device -> normalised float (B, 3, H, W) in `dtype`.

    Images cross the host-device link as uint8 (4x less than fp32) and are normalised here.
    The constants enter as Python scalars, per channel: a `torch.tensor(..., device=gpu)` table
    would be a host-to-device copy (a host sync) on every micro-batch.
    """
    x = images.float()  # (B, 3, H, W) fp32, a new tensor: safe to modify in place
    for c, (mean, std) in enumerate(zip(IMAGE_MEAN, IMAGE_STD)):
        x[:, c].sub_(mean * 255.0).div_(std * 255.0)
    return x.to(dtype)


class Embeddings(NamedTuple):
    """What the loss consumes: features (B, E) and the scalars the loss also differentiates."""

    image: Tensor  # (B, E) L2-normalised, tower dtype
    text: Tensor  # (B, E)
    logit_scale: Tensor  # () exp'd and clamped
    logit_bias: Tensor | None  # () SigLIP only


class CLIPTask(nn.Module):
    """Forward a batch {"image": uint8 (B,3,S,S), "text": long (B,L)} to the contrastive loss."""

    def __init__(self, model: nn.Module, loss: LossConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_kind = (loss or LossConfig()).kind
        if self.loss_kind == "siglip" and getattr(model, "logit_bias", None) is None:
            raise ValueError(
                "loss.kind='siglip' needs a model with a logit bias: build it with "
                "build_clip(..., **clipa_ds.siglip.siglip_model_kwargs(cfg.loss))"
            )
        # Detached copy of the clamped temperature for logging; read only at log intervals.
        self.last_logit_scale: Tensor | None = None

    def embed(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Embeddings:
        dtype = next(self.model.parameters()).dtype
        images = normalize_images(batch["image"], dtype)
        image, text, logit_scale = self.model(images, batch["text"], generator=generator)
        bias = self.model.logit_bias() if self.loss_kind == "siglip" else None
        self.last_logit_scale = logit_scale.detach()
        return Embeddings(image, text, logit_scale, bias)

    def compute_loss(self, emb: Embeddings) -> Tensor:
        """This rank's loss; the mean over ranks is the loss of the global batch."""
        return contrastive_loss(self.loss_kind, emb.image, emb.text, emb.logit_scale, emb.logit_bias)

    def forward(
        self,
        batch: dict[str, Tensor],
        generator: torch.Generator | None = None,
        *,
        embed_only: bool = False,
        embedding_grads: Embeddings | None = None,
    ) -> Tensor | Embeddings:
        emb = self.embed(batch, generator)
        if embed_only:
            return emb
        if embedding_grads is not None:
            return surrogate(emb, embedding_grads)
        return self.compute_loss(emb)


def surrogate(emb: Embeddings, grads: Embeddings) -> Tensor:
    """sum(emb * grad) over features and scalars: d/dtheta of it = sum(dL/demb * demb/dtheta).

    Every term is kept even when its gradient is zero, so each parameter gets a gradient in every
    backward (ZeRO's reduction hooks expect that).
    """
    total = (emb.image.float() * grads.image).sum() + (emb.text.float() * grads.text).sum()
    total = total + (emb.logit_scale.float() * grads.logit_scale).sum()
    if emb.logit_bias is not None and grads.logit_bias is not None:
        total = total + (emb.logit_bias.float() * grads.logit_bias).sum()
    return total
