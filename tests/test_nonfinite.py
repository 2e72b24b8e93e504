"""Non-finite losses: a NaN on one rank makes every rank skip that step together; the clamp holds.

One 2-rank job (gloo, CPU DeepSpeed) runs each scenario for three steps: a normal step, a step
whose loss is NaN on rank 1 only, and a normal step (DeepSpeed's accumulation bookkeeping must
still line up after the skip).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from clipa_ds.numerics import NonFiniteTracker, local_nonfinite
from tests.conftest import run_ranks
from tests.test_gradcache import GLOBAL, WORLD, build_engine, build_model, fp32_params, global_batch, init_worker

# (name, accumulation, micro-batch, ZeRO stage, bf16, the micro-batch of the bad step that is NaN)
SCENARIOS = [
    ("cache-z2-bf16", "gradient_cache", 2, 2, True, 0),
    ("plain-accum1-z1", "per_micro_batch", 8, 1, False, 0),
    # NaN in the 2nd of 4 micro-batches: the 1st was already back-propagated into ZeRO's buffers.
    ("plain-accum4-z3", "per_micro_batch", 2, 3, False, 1),
    ("plain-accum4-z1-bf16", "per_micro_batch", 2, 1, True, 1),
]
STEPS, BAD_STEP, BAD_RANK = 3, 1, 1


def _local_batches(rank: int, micro: int) -> list[dict[str, torch.Tensor]]:
    batch = global_batch()
    local = slice(rank * GLOBAL // WORLD, (rank + 1) * GLOBAL // WORLD)
    return [{k: v[local][i : i + micro] for k, v in batch.items()} for i in range(0, GLOBAL // WORLD, micro)]


def _inject_nan(task: Any, rank: int, nan_call: int) -> list[int]:
    """On BAD_RANK, make the `nan_call`-th loss computation of step BAD_STEP return NaN."""
    calls = [0, -1]  # [loss computations so far in this step, current step]
    original = task.compute_loss

    def compute_loss(emb: Any) -> torch.Tensor:
        loss = original(emb)
        is_bad = rank == BAD_RANK and calls[1] == BAD_STEP and calls[0] == nan_call
        calls[0] += 1
        return loss * float("nan") if is_bad else loss

    task.compute_loss = compute_loss  # the instance attribute wins over the method, in every path
    return calls


def _worker(rank: int, port: int, queue: Any) -> None:
    init_worker(rank, port)
    import torch.distributed as dist

    from clipa_ds.config import LossConfig
    from clipa_ds.engine import batch_plan
    from clipa_ds.step import train_step
    from clipa_ds.task import CLIPTask

    for name, accumulation, micro, stage, bf16, nan_call in SCENARIOS:
        loss_cfg = LossConfig(accumulation=accumulation)
        plan = batch_plan(GLOBAL, micro, WORLD)
        task = CLIPTask(build_model("clip", "random"), loss_cfg)
        engine = build_engine(task, stage, bf16, micro=micro, accum=plan.grad_accum)
        calls = _inject_nan(task, rank, nan_call)
        tracker = NonFiniteTracker(max_in_a_row=2)
        changed, skipped, checksums, finite = [], [], [], []
        for step in range(STEPS):
            calls[:] = [0, step]
            before = fp32_params(engine)
            stats = train_step(engine, iter(_local_batches(rank, micro)), plan, torch.device("cpu"), loss=loss_cfg)
            after = fp32_params(engine)
            tracker.update(stats.skipped)
            changed.append(any(not torch.equal(before[k], after[k]) for k in before))
            skipped.append(stats.skipped)
            checksums.append(sum(float(v.double().sum()) for v in after.values()))
            finite.append(bool(torch.isfinite(stats.loss_sum)))  # a skipped step adds 0, not NaN
        counters = (engine.global_steps, engine.skipped_steps, engine.micro_steps, plan.grad_accum)
        queue.put((name, rank, changed, skipped, checksums, (tracker.total, tracker.in_a_row), counters, finite))
    queue.put(("clamp", rank, *_clamp_scenario(rank)))
    dist.barrier()
    dist.destroy_process_group()


def _clamp_scenario(rank: int) -> tuple[list[float], list[float]]:
    """Steps push the temperature parameter past log(100); forward still clamps (bf16, ZeRO-2)."""
    from clipa_ds.engine import batch_plan
    from clipa_ds.models.clip import CLIP, LOGIT_SCALE_MAX
    from clipa_ds.step import train_step
    from clipa_ds.task import CLIPTask
    from tests.test_gradcache import CONTEXT, micro_spec

    torch.manual_seed(0)
    task = CLIPTask(CLIP(micro_spec(), CONTEXT, logit_scale_init=LOGIT_SCALE_MAX - 0.05))
    # A loss that only wants a higher temperature (features enter with weight 0, so every parameter
    # is in the graph as ZeRO expects).
    task.compute_loss = lambda emb: -emb.logit_scale + 0.0 * (emb.image.sum() + emb.text.sum())
    plan = batch_plan(GLOBAL, 2, WORLD)
    engine = build_engine(task, 2, True)
    masters, temperatures = [], []
    for _ in range(3):
        train_step(engine, iter(_local_batches(rank, 2)), plan, torch.device("cpu"))
        masters.append(float(fp32_params(engine)["logit_scale"]))
        with torch.no_grad():
            temperatures.append(float(task.embed(_local_batches(rank, 2)[0]).logit_scale))
    return masters, temperatures


@pytest.fixture(scope="module")
def job() -> dict[str, dict[int, Any]]:
    """Run every scenario once in one 2-rank job: {scenario: {rank: results}}."""
    by_name: dict[str, dict[int, Any]] = {}
    for name, rank, *rest in run_ranks(_worker, WORLD, messages=WORLD * (len(SCENARIOS) + 1)):
        by_name.setdefault(name, {})[rank] = rest
    return by_name


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_all_ranks(job: dict[str, dict[int, Any]]) -> None:
    by_name = job
    for name, _, _, _, _, _ in SCENARIOS:
        ranks = by_name[name]
        for rank, (changed, skipped, checksums, tracked, counters, finite) in ranks.items():
            assert skipped == [False, True, False], (name, rank)
            assert all(finite) and all(math.isfinite(c) for c in checksums), (name, rank)
            # Weights unchanged by the NaN step on every rank, and the step after it trains again.
            assert changed == [True, False, True], (name, rank)
            assert tracked == (1, 0), (name, rank)
            global_steps, skipped_steps, micro_steps, grad_accum = counters
            # Booked like a DeepSpeed overflow skip: counters stay on the accumulation boundary.
            assert (global_steps, skipped_steps, micro_steps) == (STEPS, 1, STEPS * grad_accum), (name, rank)
        assert ranks[0][2] == ranks[1][2], name  # both ranks hold the same weights after every step


@pytest.mark.slow
def test_temperature_clamp_holds_after_steps_push_past_it_under_deepspeed(job: dict[str, dict[int, Any]]) -> None:
    """Clamping in forward is what holds: the fp32 master copy goes past log(100) and stays there."""
    from clipa_ds.models.clip import LOGIT_SCALE_MAX

    # The bf16 module computes exp(clamp(t')) in bf16: 99.0, the clamp's value in that dtype.
    clamped = float(torch.tensor([50.0], dtype=torch.bfloat16).clamp(max=LOGIT_SCALE_MAX).exp())
    for rank, (masters, temperatures) in job["clamp"].items():
        assert all(m > LOGIT_SCALE_MAX for m in masters), (rank, masters)
        assert temperatures == [clamped] * 3 and clamped <= 100.0, (rank, temperatures)


def test_tracker_stops_after_n_in_a_row_and_resets_on_a_good_step() -> None:
    tracker = NonFiniteTracker(max_in_a_row=3)
    for skipped in (True, True, False, True, True):
        tracker.update(skipped)
        assert not tracker.exhausted
    tracker.update(True)
    assert tracker.exhausted and tracker.total == 5 and tracker.in_a_row == 3
    message = tracker.message(step=42)
    assert "3 global batches in a row" in message and "max_nonfinite_steps_in_a_row=3" in message
    restored = NonFiniteTracker(max_in_a_row=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.exhausted and restored.total == 5


def test_local_nonfinite_flags_nan_and_inf() -> None:
    ok = torch.ones(3)
    assert float(local_nonfinite(ok, torch.tensor(2.0))) == 0.0
    assert float(local_nonfinite(ok, torch.tensor([1.0, math.inf]))) == 1.0
    assert float(local_nonfinite(torch.tensor(math.nan), None)) == 1.0
