"""CLIPTask: the single nn.Module DeepSpeed wraps (model + loss, batch in, loss out)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clipa_ds.loss import clip_loss

# OpenAI CLIP normalisation, as CLIPA and open_clip use.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, 3, H, W) on the device -> normalised float (B, 3, H, W) in `dtype`.

    Images cross the host-device link as uint8 (4x less than fp32) and are normalised here.
    """
    mean = torch.tensor(IMAGE_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGE_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    return ((images.float() - mean) / std).to(dtype)


class CLIPTask(nn.Module):
    """Forward a batch {"image": uint8 (B,3,S,S), "text": long (B,L)} to the contrastive loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # Detached copy of the clamped temperature for logging; read only at log intervals.
        self.last_logit_scale: Tensor | None = None

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        images = normalize_images(batch["image"], dtype)
        image_features, text_features, logit_scale = self.model(images, batch["text"], generator=generator)
        self.last_logit_scale = logit_scale.detach()
        return clip_loss(image_features, text_features, logit_scale)
