"""Contrastive losses: CLIP InfoNCE (local rows against globally gathered features) and SigLIP.

CLIP: each rank scores only its own rows against the features of every rank, gathered *with*
gradient (`torch.distributed.nn.all_gather` back-propagates through the gather). Rank r's loss is
the mean over its B local rows; DeepSpeed averages gradients over ranks, so the update equals the
gradient of the global loss over all W*B pairs. Logits and softmax run in fp32 even if the towers
are bf16. SigLIP lives in clipa_ds.siglip (ring exchange; same per-rank convention).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from clipa_ds.siglip import siglip_loss


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: Tensor) -> Tensor:
    """(B, E) local features -> (W*B, E) features of all ranks, rank-major, with gradient."""
    rank, world = _world()
    if world == 1:
        return features
    import torch.distributed.nn  # registers autograd-aware collectives

    return torch.cat(torch.distributed.nn.all_gather(features), dim=0)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of the local rows against all gathered columns. Inputs (B, E), normalised."""
    rank, _ = _world()
    image_features = image_features.float()
    text_features = text_features.float()
    scale = logit_scale.float()
    all_image = gather_with_grad(image_features)  # (W*B, E)
    all_text = gather_with_grad(text_features)  # (W*B, E)
    batch = image_features.shape[0]
    labels = torch.arange(batch, device=image_features.device) + rank * batch  # (B,)
    logits_per_image = scale * image_features @ all_text.T  # (B, W*B)
    logits_per_text = scale * text_features @ all_image.T  # (B, W*B)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def contrastive_loss(
    kind: str, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor | None = None
) -> Tensor:
    """This rank's loss of `kind` ("clip" | "siglip"); the mean over ranks is the global-batch loss."""
    if kind == "clip":
        return clip_loss(image_features, text_features, logit_scale)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("loss.kind='siglip' needs the model's logit_bias (build_clip(logit_bias_init=...))")
        return siglip_loss(image_features, text_features, logit_scale, logit_bias)
    raise ValueError(f"loss.kind={kind!r} is not valid; choose one of: clip, siglip")
