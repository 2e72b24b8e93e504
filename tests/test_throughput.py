"""The throughput harness on CPU, the host-sync detector, and compiled transformer blocks.

- benchmarks/throughput.py runs the real training step (tiny recipe) alone and beside open_clip,
  and its JSON carries the fields RESULTS.md and the issue need;
- benchmarks/host_syncs.HostSyncCounter finds every kind of host sync, and finds none in the
  clipa-ds forward + backward (task, model, masking, loss): on a GPU each one would stall the
  launch queue once per micro-batch;
- clipa_ds.compile.compile_blocks gives the eager loss and gradients, with checkpointing on,
  and one compiled graph serves every block of a tower.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from host_syncs import HostSyncCounter  # noqa: E402

from clipa_ds.config import LossConfig  # noqa: E402
from clipa_ds.models.clip import build_clip  # noqa: E402
from clipa_ds.siglip import siglip_model_kwargs  # noqa: E402
from clipa_ds.task import CLIPTask  # noqa: E402

REQUIRED = ("system", "recipe", "stage", "device", "micro_batch", "samples_per_s", "mfu")


def _batch(size: int = 48, batch: int = 4, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen),
        "text": torch.randint(1, 32000, (batch, length), generator=gen),
    }


def _run_benchmark(args: list[str], tmp_path: Path) -> tuple[dict, list[dict]]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--recipe", "tiny", "--threads", "1", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), [json.loads(line) for line in lines[:-1]]


def _check_record(record: dict, system: str, stage: str, micro_batch: int) -> None:
    assert all(key in record for key in REQUIRED), sorted(record)
    assert (record["system"], record["recipe"], record["stage"]) == (system, "tiny", stage)
    assert (record["device"], record["micro_batch"]) == ("cpu", micro_batch)
    assert record["samples_per_s"] > 0 and record["samples_per_cpu_s"] > 0
    assert 0 < record["mfu"] < 1 and record["mfu_wall"] > 0
    # On CPU, MFU = samples per CPU-second x analytic FLOPs / measured matmul FLOPs per CPU-second.
    achieved = record["samples_per_cpu_s"] * record["flops_per_sample"]
    assert record["mfu"] == pytest.approx(achieved / (record["peak_tflops"] * 1e12))
    assert record["peak_memory_bytes"] > 0
    steps = record["step_time_s"]
    assert 0 < steps["median"] <= steps["p90"]
    assert math.isfinite(record["mean_loss"]) and record["mean_loss"] > 0
    assert record["torch"] == torch.__version__ and record["deepspeed"]


# ----------------------------------------------------------------------------- host syncs


def test_host_sync_counter_finds_each_kind_of_sync() -> None:
    x = torch.randn(4)
    with HostSyncCounter() as clean:
        y = (x * 2).sum()  # device work only
        z = torch.tensor([1.0, 2.0]).to(x.device, non_blocking=True)  # built on the host: no wait
    assert clean.total == 0 and clean.compute_ops >= 2
    with HostSyncCounter() as syncs:
        y.item()
        bool(y > 0)
        float(y)
        x.nonzero()
        x.tolist()
        torch.tensor([1.0], device=x.device)  # a blocking copy when the device is a GPU
    kinds = {site.split(" @ ")[0] for site in syncs.sites}
    assert kinds == {"_local_scalar_dense", "nonzero", "tolist", "host_data_to_device"}
    assert syncs.total == 6
    assert all("tests/test_throughput.py" in site for site in syncs.sites)  # the culprit's line
    assert syncs.by_owner() == {"tests": 6}
    assert torch.tensor is not None and z.tolist() == [1.0, 2.0]  # patches are undone on exit


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
@pytest.mark.parametrize(("mask", "ratio"), [("none", 0.0), ("random", 0.3), ("grid", 0.75), ("block", 0.5)])
def test_clip_task_forward_backward_has_no_host_syncs(loss_kind: str, mask: str, ratio: float) -> None:
    # The per-micro-batch work of train_step: uint8 normalisation, both towers, token masking,
    # the loss and its backward. Any sync here would stall the GPU once per micro-batch.
    loss = LossConfig(kind=loss_kind)
    model = build_clip("tiny", 16, **siglip_model_kwargs(loss))
    model.visual.set_token_masking(mask, ratio)
    task = CLIPTask(model, loss)
    with HostSyncCounter() as syncs:
        task(_batch(), torch.Generator().manual_seed(1)).backward()
    assert dict(syncs.sites) == {}
    assert syncs.compute_ops > 100


# ----------------------------------------------------------------------------- the harness


@pytest.mark.slow
def test_benchmark_clipa_ds_beside_open_clip_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "results" / "tiny.json"
    summary, records = _run_benchmark(
        ["--stage", "finetune", "--micro-batch", "8", "--warmup", "1", "--steps", "2",
         "--system", "both", "--check-syncs", "--out", str(out)],
        tmp_path,
    )
    systems = summary["systems"]
    assert list(systems) == ["clipa-ds", "open_clip"] and [r["system"] for r in records] == list(systems)
    for name, record in systems.items():
        _check_record(record, name, "finetune", 8)
        # 48 px at patch 8 = 36 patches, 30% random masking keeps 25; the text has 16 tokens.
        assert (record["workload"]["patch_tokens"], record["workload"]["image_tokens"]) == (36, 25)
        written = json.loads(out.with_suffix(f".{name}.json").read_text())
        assert {k: written[k] for k in REQUIRED} == {k: record[k] for k in REQUIRED}
    ratio = systems["clipa-ds"]["samples_per_s"] / systems["open_clip"]["samples_per_s"]
    assert summary["ratio_clipa_ds_to_open_clip"] == pytest.approx(ratio)
    assert systems["open_clip"]["open_clip_config"].startswith("CLIPA-form")

    # Host syncs of one optimizer step: none from clipa-ds's micro-batch path; at most the one
    # all-rank finite-loss agreement per optimizer step (clipa_ds/numerics.py). DeepSpeed's own
    # (its non-finite gradient check, the clip coefficient) are reported, not asserted.
    syncs = systems["clipa-ds"]["host_syncs_per_step"]
    ours = {site: n for site, n in syncs["sites"].items() if " @ clipa_ds/" in site or "<- clipa_ds/" in site}
    assert all("clipa_ds/numerics.py" in site for site in ours), ours
    assert sum(ours.values()) <= 1
    assert set(syncs["by_owner"]) <= {"clipa_ds", "deepspeed"}


@pytest.mark.slow
def test_benchmark_compiled_blocks_in_the_deepspeed_step(tmp_path: Path) -> None:
    record, _ = _run_benchmark(
        # The shapes of test_compiled_checkpointed_blocks_match_eager: inductor's cache serves both.
        ["--stage", "finetune", "--micro-batch", "4", "--warmup", "1", "--steps", "1", "--system", "clipa-ds+compile"],
        tmp_path,
    )
    _check_record(record, "clipa-ds", "finetune", 4)  # one system: the last line is its record
    assert record["label"] == "clipa-ds+compile" and record["settings"]["compile_blocks"] is True


# ----------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_checkpointed_blocks_match_eager() -> None:
    from clipa_ds.compile import compile_blocks, is_compiled, transformer_blocks

    torch.manual_seed(0)
    eager = build_clip("tiny", 16)
    eager.visual.set_token_masking("random", 0.3)
    compiled = copy.deepcopy(eager)
    compiled.visual.set_grad_checkpointing(True)  # compile, then checkpoint: recompute is compiled
    compiled.text.set_grad_checkpointing(True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_blocks(compiled) == 6 and all(is_compiled(b) for b in transformer_blocks(compiled))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes

    batch = _batch()
    losses = []
    for model in (eager, compiled):
        loss = CLIPTask(model)(batch, torch.Generator().manual_seed(5))
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)
    # Blocks share their graphs: one per tower shape (image 25 tokens, text 16), not one per block.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
