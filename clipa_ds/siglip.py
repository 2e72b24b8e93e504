"""SigLIP pairwise sigmoid loss with a ring exchange of text chunks across ranks.

Loss of the global batch of N pairs (Zhai et al. 2023):
    L = -1/N * sum_{i,j} log sigmoid(z_ij * (t * x_i . y_j + b)),  z_ij = +1 if i == j else -1.
Rank r holds B local pairs and computes L_r = -1/B * sum_{i local} sum_{j global} (...), so the mean of
L_r over ranks (what DeepSpeed's gradient averaging takes) is L.

No rank ever holds the (N, N) logits, nor even its (B, N) rows: the text features travel around a
ring (rank r sends to r+1, receives from r-1; P2P send/recv) and each step scores one (B, B) block.
Every block is checkpointed, so autograd keeps only its inputs (the feature chunks) and recomputes
the block's logits in backward; the backward of a ring hop sends the chunk's gradient back the
other way, so each rank receives the gradient of every loss term with respect to its own texts.
Logits and sigmoid run in fp32 whatever the towers' dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from clipa_ds.config import LossConfig


def siglip_model_kwargs(loss: LossConfig) -> dict[str, Any]:
    """Extra `build_clip` keyword arguments for `loss.kind` (SigLIP: its own temperature + bias)."""
    if loss.kind != "siglip":
        return {}
    return {"logit_scale_init": math.log(loss.siglip_temperature_init), "logit_bias_init": loss.siglip_bias_init}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _exchange(tensor: Tensor, send_to: int, recv_from: int) -> Tensor:
    """Send `tensor` to rank `send_to` and return the same-shaped tensor received from `recv_from`."""
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, send_to), dist.P2POp(dist.irecv, received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingHop(torch.autograd.Function):
    """Forward: pass a chunk to the next rank. Backward: pass its gradient to the previous rank."""

    @staticmethod
    def forward(ctx: Any, chunk: Tensor) -> Tensor:
        rank, world = _world()
        return _exchange(chunk, (rank + 1) % world, (rank - 1) % world)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        rank, world = _world()
        return _exchange(grad, (rank - 1) % world, (rank + 1) % world)


def _block_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, positives: bool) -> Tensor:
    """-sum log sigmoid(z * logits) of one (B, Bc) block; `positives`: the block holds the matching pairs."""
    logits = scale * image @ text.T + bias  # (B, Bc) fp32
    labels = -torch.ones_like(logits)
    if positives:
        labels += 2.0 * torch.eye(logits.shape[0], logits.shape[1], device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """This rank's SigLIP loss: its B images against the texts of every rank. Inputs (B, E), normalised."""
    _, world = _world()
    image = image_features.float()
    text = text_features.float()
    scale = logit_scale.float()
    bias = logit_bias.float()
    batch = image.shape[0]
    total = image.new_zeros(())
    chunk = text  # (B, E): at hop k it holds the texts of rank (r - k) mod W
    for hop in range(world):
        if hop > 0:
            chunk = _RingHop.apply(chunk)
        total = total + checkpoint(_block_loss, image, chunk, scale, bias, hop == 0, use_reentrant=False)
    return total / batch
