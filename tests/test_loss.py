"""The distributed CLIP loss equals the global loss of one process, in value and gradient."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from clipa_ds.loss import clip_loss
from tests.conftest import run_ranks

WORLD, LOCAL_B, IN_DIM, EMBED = 2, 5, 12, 8


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g)
    x_txt = torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g)
    w_img = torch.randn(IN_DIM, EMBED, generator=g)
    w_txt = torch.randn(IN_DIM, EMBED, generator=g)
    scale = torch.tensor(10.0)
    return x_img, x_txt, w_img, w_txt, scale


def _loss_and_grads(x_img, x_txt, w_img, w_txt, scale):
    w_img = w_img.clone().requires_grad_(True)
    w_txt = w_txt.clone().requires_grad_(True)
    img = torch.nn.functional.normalize(x_img @ w_img, dim=-1)
    txt = torch.nn.functional.normalize(x_txt @ w_txt, dim=-1)
    loss = clip_loss(img, txt, scale)
    loss.backward()
    return loss.detach(), w_img.grad, w_txt.grad


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x_img, x_txt, w_img, w_txt, scale = _problem()
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    loss, g_img, g_txt = _loss_and_grads(x_img[rows], x_txt[rows], w_img, w_txt, scale)
    # What DeepSpeed/DDP do with parameter gradients and what the loop does with the loss: average.
    for t in (loss, g_img, g_txt):
        dist.all_reduce(t)
        t /= WORLD
    if rank == 0:
        queue.put(tuple(t.numpy().copy() for t in (loss, g_img, g_txt)))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_match_global_loss_and_gradients() -> None:
    (arrays,) = run_ranks(_worker, WORLD, messages=1)
    loss, g_img, g_txt = (torch.from_numpy(a) for a in arrays)

    ref_loss, ref_img, ref_txt = _loss_and_grads(*_problem())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_img, ref_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_txt, ref_txt, rtol=1e-5, atol=1e-6)


def test_loss_is_minimal_for_matching_pairs() -> None:
    feats = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    matched = clip_loss(feats, feats, torch.tensor(50.0))
    shuffled = clip_loss(feats, feats.roll(1, dims=0), torch.tensor(50.0))
    assert matched < 0.1 < shuffled
