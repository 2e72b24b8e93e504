"""Gradient caching on 2 ranks x 4 micro-batches equals one step on the whole batch in one process.

Each scenario trains one DeepSpeed step (client SGD, lr=1, no clipping, so the update is minus
the gradient DeepSpeed applied) on a micro CLIP, and the parent process compares that update with
autograd's gradient of the loss of the whole 16-sample batch computed without any accumulation.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tests.conftest import run_ranks

WORLD, MICRO, ACCUM = 2, 2, 4
GLOBAL = WORLD * MICRO * ACCUM  # 16 samples, the number of negatives the recipe asks for
IMAGE, CONTEXT = 8, 6
MASK_SEED = 1000  # the loop seeds each rank's torch RNG; mask seeds are drawn from it


def micro_spec() -> Any:
    from clipa_ds.models.variants import ModelSpec, TowerSpec

    return ModelSpec(
        vision=TowerSpec(width=32, depth=2, heads=2, mlp_dim=64),
        text=TowerSpec(width=32, depth=1, heads=2, mlp_dim=64),
        patch_size=4,
        embed_dim=16,
        vocab_size=64,
    )


def build_model(kind: str, mask: str) -> torch.nn.Module:
    """The same initial weights in every process (seeded)."""
    from clipa_ds.config import LossConfig
    from clipa_ds.models.clip import CLIP
    from clipa_ds.siglip import siglip_model_kwargs

    torch.manual_seed(0)
    model = CLIP(micro_spec(), CONTEXT, **siglip_model_kwargs(LossConfig(kind=kind)))
    model.visual.set_token_masking(mask, 0.5)
    return model


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "image": torch.randint(0, 256, (GLOBAL, 3, IMAGE, IMAGE), generator=g, dtype=torch.uint8),
        "text": torch.randint(1, 64, (GLOBAL, CONTEXT), generator=g),
    }


def rows(rank: int, micro: int) -> slice:
    """Rows of the global batch in micro-batch `micro` of `rank` (rank-major, as the gathers order them)."""
    start = rank * MICRO * ACCUM + micro * MICRO
    return slice(start, start + MICRO)


def micro_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    batch = global_batch()
    return [{k: v[rows(rank, i)] for k, v in batch.items()} for i in range(ACCUM)]


def build_engine(task: torch.nn.Module, zero_stage: int, bf16: bool, micro: int = MICRO, accum: int = ACCUM) -> Any:
    import deepspeed

    from clipa_ds.config import EngineConfig, OptimConfig
    from clipa_ds.engine import batch_plan, build_ds_config

    plan = batch_plan(WORLD * micro * accum, micro, WORLD)
    config = build_ds_config(EngineConfig(zero_stage=zero_stage, bf16=bf16), plan, OptimConfig(grad_clip=0.0))
    config["zero_allow_untested_optimizer"] = True
    # Partition every parameter under ZeRO-3 (by default small ones stay whole on every rank).
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    optimizer = torch.optim.SGD(task.parameters(), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=config)
    return engine


def fp32_params(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 master weights by model parameter name (a collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {
        name.removeprefix("model."): safe_get_full_fp32_param(p).detach().float().clone()
        for name, p in engine.module.named_parameters()
    }


def init_worker(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    from clipa_ds.engine import init_distributed

    init_distributed()


# (name, loss kind, accumulation, token mask, ZeRO stage, bf16)
SCENARIOS = [
    ("cache-clip-z1", "clip", "gradient_cache", "random", 1, False),
    ("plain-clip-z1", "clip", "per_micro_batch", "none", 1, False),
    ("cache-clip-z3", "clip", "gradient_cache", "random", 3, False),
    ("cache-siglip-z2", "siglip", "gradient_cache", "random", 2, False),
    ("cache-clip-z2-bf16", "clip", "gradient_cache", "random", 2, True),
]


def _worker(rank: int, port: int, queue: Any) -> None:
    init_worker(rank, port)
    import torch.distributed as dist

    from clipa_ds.config import LossConfig
    from clipa_ds.engine import batch_plan
    from clipa_ds.step import train_step
    from clipa_ds.task import CLIPTask

    plan = batch_plan(GLOBAL, MICRO, WORLD)
    for name, kind, accumulation, mask, stage, bf16 in SCENARIOS:
        loss_cfg = LossConfig(kind=kind, accumulation=accumulation)
        engine = build_engine(CLIPTask(build_model(kind, mask), loss_cfg), stage, bf16)
        before = fp32_params(engine)
        torch.manual_seed(MASK_SEED + rank)
        stats = train_step(engine, iter(micro_batches(rank)), plan, torch.device("cpu"), loss=loss_cfg)
        after = fp32_params(engine)
        loss = stats.loss_sum / ACCUM
        dist.all_reduce(loss)
        if rank == 0:
            update = {k: (before[k] - after[k]).numpy() for k in before}  # = the applied gradient (SGD, lr 1)
            queue.put((name, float(loss) / WORLD, update, engine.global_steps, stats.skipped))
    dist.barrier()
    dist.destroy_process_group()


def reference(kind: str, mask: str, chunks: list[list[slice]]) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, no accumulation: mean over `chunks` of the loss of each chunk (a list of row slices).

    One chunk holding all 16 rows is the whole-batch step; 4 chunks of 4 rows is what per-micro-batch
    accumulation computes. Masks replay the per-micro-batch seeds each rank draws.
    """
    from clipa_ds.gradcache import micro_batch_seeds, seeded_generator
    from clipa_ds.loss import contrastive_loss
    from clipa_ds.task import normalize_images

    model = build_model(kind, mask)
    model.train()
    batch = global_batch()
    seeds = {}
    for rank in range(WORLD):
        torch.manual_seed(MASK_SEED + rank)
        for i, seed in enumerate(micro_batch_seeds(ACCUM)):
            seeds[rows(rank, i).start] = seed
    total = torch.zeros(())
    for chunk in chunks:
        feats = [
            model(normalize_images(batch["image"][r]), batch["text"][r], generator=seeded_generator(seeds[r.start]))
            for r in chunk
        ]
        image = torch.cat([f[0] for f in feats])  # (chunk rows, E)
        text = torch.cat([f[1] for f in feats])
        bias = model.logit_bias() if model.logit_bias is not None else None
        total = total + contrastive_loss(kind, image, text, feats[0][2], bias)
    loss = total / len(chunks)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _relative_error(update: dict[str, Any], grads: dict[str, torch.Tensor]) -> float:
    num = sum(float((torch.from_numpy(update[k]) - g).pow(2).sum()) for k, g in grads.items())
    den = sum(float(g.pow(2).sum()) for g in grads.values())
    return (num / den) ** 0.5


@pytest.mark.slow
def test_gradient_cache_equals_whole_batch_step_and_plain_accumulation_does_not() -> None:
    """Gradient caching reproduces the whole-batch loss and gradient; DeepSpeed's accumulation cannot.

    Plain DeepSpeed accumulation runs the contrastive loss on each micro-batch separately: every
    loss sees only micro_batch x world_size = 4 candidates (3 negatives) instead of 16 (15), and the
    step's gradient is the mean of four small-batch losses, a different function whose gradient
    differs from the whole-batch one. The test shows it is exactly that mean of 4-sample losses.
    """
    results = {}
    for name, loss, update, global_steps, skipped in run_ranks(_worker, WORLD, messages=len(SCENARIOS)):
        results[name] = (loss, update)
        assert global_steps == 1 and not skipped, name

    whole = [[rows(r, i) for r in range(WORLD) for i in range(ACCUM)]]  # one chunk: all 16 rows
    per_micro = [[rows(r, i) for r in range(WORLD)] for i in range(ACCUM)]  # 4 chunks of 4 rows
    ref_loss, ref = reference("clip", "random", whole)
    for name in ("cache-clip-z1", "cache-clip-z3"):
        loss, update = results[name]
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        for key, grad in ref.items():
            torch.testing.assert_close(torch.from_numpy(update[key]), grad, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")

    ref_loss, ref = reference("siglip", "random", whole)
    loss, update = results["cache-siglip-z2"]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(update) == set(ref) and "logit_bias.bias" in ref
    for key, grad in ref.items():
        torch.testing.assert_close(torch.from_numpy(update[key]), grad, rtol=1e-4, atol=1e-6, msg=key)

    # bf16 towers: the same result up to bf16 rounding of activations (loss math stays fp32).
    ref_loss, ref = reference("clip", "random", whole)
    loss, update = results["cache-clip-z2-bf16"]
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert _relative_error(update, ref) < 0.05  # measured 0.016

    # Plain accumulation: not the whole-batch result, but exactly the mean of per-micro-batch losses.
    plain_loss, plain = results["plain-clip-z1"]
    whole_loss, whole_grads = reference("clip", "none", whole)
    micro_loss, micro_grads = reference("clip", "none", per_micro)
    assert abs(plain_loss - whole_loss) > 0.1
    assert _relative_error(plain, whole_grads) > 0.05
    assert plain_loss == pytest.approx(micro_loss, rel=1e-5)
    assert _relative_error(plain, micro_grads) < 1e-4


def test_surrogate_gradient_is_the_chain_rule() -> None:
    """d/dtheta sum(emb * g) == J^T g for features, temperature and bias (single process, no engine)."""
    from clipa_ds.task import Embeddings, surrogate

    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    t = torch.tensor(0.3, requires_grad=True)
    emb = Embeddings(x @ w, (x @ w).tanh(), t.exp(), t * 2.0)
    grads = Embeddings(torch.randn(5, 3), torch.randn(5, 3), torch.tensor(0.7), torch.tensor(-1.1))
    surrogate(emb, grads).backward()
    w2 = w.detach().clone().requires_grad_(True)
    t2 = t.detach().clone().requires_grad_(True)
    outs = (x @ w2, (x @ w2).tanh(), t2.exp(), t2 * 2.0)
    torch.autograd.backward(outs, list(grads))
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(t.grad, t2.grad)

