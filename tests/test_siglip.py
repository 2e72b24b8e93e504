"""Distributed SigLIP (ring exchange of text chunks) equals the single-process SigLIP loss."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipa_ds import siglip
from clipa_ds.config import ConfigError, LossConfig
from clipa_ds.siglip import siglip_loss, siglip_model_kwargs
from tests.conftest import run_ranks

# 3 ranks: with 2, "next" and "previous" on the ring are the same rank and a hop sent the wrong way
# would go unnoticed.
WORLD, LOCAL_B, IN_DIM, EMBED = 3, 4, 10, 6


def _problem() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g)
    x_txt = torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g)
    w_img = torch.randn(IN_DIM, EMBED, generator=g)
    w_txt = torch.randn(IN_DIM, EMBED, generator=g)
    t_prime = torch.tensor(math.log(10.0))
    bias = torch.tensor(-3.0)  # not -10: keeps positive and negative terms both visible in the value
    return x_img, x_txt, w_img, w_txt, t_prime, bias


def naive_siglip(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The paper's formula on the full (N, N) logits: -1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b))."""
    logits = scale * img @ txt.T + bias  # (N, N)
    labels = 2.0 * torch.eye(len(img)) - 1.0
    return -F.logsigmoid(labels * logits).sum() / len(img)


def _loss_and_grads(loss_fn, x_img, x_txt, w_img, w_txt, t_prime, bias):
    leaves = [t.clone().requires_grad_(True) for t in (w_img, w_txt, t_prime, bias)]
    img = F.normalize(x_img @ leaves[0], dim=-1)
    txt = F.normalize(x_txt @ leaves[1], dim=-1)
    loss = loss_fn(img, txt, leaves[2].exp(), leaves[3])
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _worker(rank: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    blocks: list[tuple[int, int]] = []
    block_loss = siglip._block_loss

    def recording_block(image, text, scale, bias, positives):
        blocks.append((image.shape[0], text.shape[0]))
        return block_loss(image, text, scale, bias, positives)

    siglip._block_loss = recording_block
    x_img, x_txt, w_img, w_txt, t_prime, bias = _problem()
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    out = _loss_and_grads(siglip_loss, x_img[rows], x_txt[rows], w_img, w_txt, t_prime, bias)
    for t in out:  # what DeepSpeed does with gradients and the loop with the loss: average
        dist.all_reduce(t)
        t /= WORLD
    if rank == 0:
        queue.put(([t.numpy().copy() for t in out], blocks))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ring_siglip_matches_single_process_value_and_gradients() -> None:
    ((arrays, blocks),) = run_ranks(_worker, WORLD, messages=1)
    ref = _loss_and_grads(naive_siglip, *_problem())
    for got, want, name in zip(arrays, ref, ("loss", "w_img", "w_txt", "t_prime", "bias")):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6, msg=name)
    # Forward: one (B, B) block per rank on the ring; backward recomputes each (checkpointed).
    # Never a (B, W*B) row block, let alone (N, N).
    assert blocks and all(shape == (LOCAL_B, LOCAL_B) for shape in blocks)
    assert len(blocks) == 2 * WORLD


def test_single_process_siglip_is_the_paper_formula() -> None:
    problem = _problem()
    got = _loss_and_grads(siglip_loss, *problem)
    want = _loss_and_grads(naive_siglip, *problem)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_siglip_logits_are_fp32_for_bf16_features() -> None:
    """bf16 tower outputs: the loss is computed (and returned) in fp32, equal to fp32 inputs' loss."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1).bfloat16()
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1).bfloat16()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss = siglip_loss(img, txt, scale, bias)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, naive_siglip(img.float(), txt.float(), scale, bias))


def test_siglip_model_has_paper_init_and_the_bias_is_a_model_parameter() -> None:
    from clipa_ds.models.clip import build_clip
    from clipa_ds.task import CLIPTask

    kwargs = siglip_model_kwargs(LossConfig(kind="siglip"))
    model = build_clip("tiny", 8, **kwargs)
    assert float(model.temperature().detach()) == pytest.approx(10.0)
    assert float(model.logit_bias().detach()) == -10.0
    assert "logit_bias.bias" in model.state_dict()  # travels with checkpoints, hand-off and export
    assert siglip_model_kwargs(LossConfig(kind="clip")) == {}
    with pytest.raises(ValueError, match="logit bias"):
        CLIPTask(build_clip("tiny", 8), LossConfig(kind="siglip"))
    with pytest.raises(ConfigError, match="loss.kind"):
        LossConfig(kind="sigmoid")
