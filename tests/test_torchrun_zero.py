"""`torchrun --nproc_per_node 2 -m clipa_ds.train tiny` trains under ZeRO 1, 2 and 3 (CPU, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

REQUIRED_KEYS = {"stage", "step", "samples_seen", "loss", "lr", "logit_scale", "samples_per_s", "mfu", "data_wait_frac"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from clipa_ds.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    paths = write_synthetic_shards(out, num_samples=2048, samples_per_shard=256, image_size=48, seed=0)
    return f"{out}/train-{{000000..{len(paths) - 1:06d}}}.tar"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_train_and_log(zero_stage: int, shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "clipa_ds.train", "tiny", f"run.dir={run_dir}", f"data.train_urls={shards}", "data.workers=1",
        f"engine.zero_stage={zero_stage}", "run.log_every_steps=4", "run.tensorboard=false",
        "stages.pretrain.samples=1536", "stages.pretrain.global_batch=64", "stages.pretrain.optim.lr=5e-4",
        "stages.pretrain.optim.warmup_samples=128",
        "stages.finetune.samples=128", "stages.finetune.global_batch=64", "stages.finetune.optim.warmup_samples=64",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]  # events: stage_start, eval, ...
    pretrain = [r for r in steps if r["stage"] == "pretrain"]
    assert len(pretrain) == 6 and all(REQUIRED_KEYS <= r.keys() for r in steps)
    assert [r["samples_seen"] for r in pretrain] == [256 * i for i in range(1, 7)]
    assert any(r["stage"] == "finetune" for r in steps)
    first, last = pretrain[0]["loss"], pretrain[-1]["loss"]
    assert last < first - 0.1, f"loss did not fall under ZeRO-{zero_stage}: {first:.3f} -> {last:.3f}"
    assert all(r["logit_scale"] <= 100.0 for r in steps)
