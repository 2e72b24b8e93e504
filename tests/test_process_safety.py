"""Loader workers never fork the (multi-threaded) training process; a stalled step names itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipa_ds.config import ConfigError, DataConfig, ImageStageConfig, RunConfig, StageConfig, TextStageConfig
from clipa_ds.data.pipeline import build_train_loader
from clipa_ds.data.synthetic import write_synthetic_shards
from clipa_ds.data.tokenizer import CaptionTokenizer
from clipa_ds.evaluate.datasets import eval_loader

# A training process in miniature: a train loader with 2 worker processes over `urls`.
LOADER_SNIPPET = (
    "from clipa_ds.config import DataConfig, ImageStageConfig, StageConfig, TextStageConfig\n"
    "from clipa_ds.data.pipeline import build_train_loader\n"
    "from clipa_ds.data.tokenizer import CaptionTokenizer\n"
    "stage = StageConfig(name='s', samples=1000, global_batch=4, image=ImageStageConfig(size=32),\n"
    "                    text=TextStageConfig(context_length=8))\n"
    "cfg = DataConfig(train_urls='{urls}', workers=2)\n"
    "loader = build_train_loader(cfg, stage, stage_index=0, rank=0, world_size=1, seed=0, micro_batch=4,\n"
    "                            tokenizer=CaptionTokenizer())\n"
)
STAGE = StageConfig(
    name="pretrain", samples=1_000, global_batch=8,
    image=ImageStageConfig(size=32), text=TextStageConfig(context_length=8),
)


def _parent_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid in /proc/{pid}/status")


def test_train_and_eval_workers_start_from_the_fork_server(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, num_samples=32, samples_per_shard=16, image_size=32, seed=0)
    cfg = DataConfig(train_urls=f"{tmp_path}/train-{{000000..000001}}.tar", workers=2, shuffle_buffer=4)
    # Not forked from this process: by the time loaders start, the training process runs gloo,
    # DeepSpeed and torch threads, and a fork can then hang in the child (see data/workers.py).
    train = build_train_loader(
        cfg, STAGE, stage_index=0, rank=0, world_size=1, seed=0, micro_batch=4, tokenizer=CaptionTokenizer(),
    )
    assert next(train)["image"].shape == (4, 3, 32, 32)
    assert os.getpid() not in {_parent_pid(w.pid) for w in train._iter._workers}  # type: ignore[union-attr]
    train.close()
    batches = iter(eval_loader(str(tmp_path / "train-000000.tar"), "captions", 32, 4, workers=1)[0])
    assert next(batches)["image"].shape == (4, 3, 32, 32)
    assert os.getpid() not in {_parent_pid(w.pid) for w in batches._workers}  # type: ignore[attr-defined]


def test_an_error_with_a_loader_open_still_exits(tmp_path: Path) -> None:
    # Workers block SIGTERM (pre-emption); multiprocessing's exit hook would terminate and then
    # wait for them forever. The error must end the process, not hang it.
    write_synthetic_shards(tmp_path, num_samples=32, samples_per_shard=16, image_size=32, seed=0)
    code = (
        LOADER_SNIPPET.format(urls=f"{tmp_path}/train-{{000000..000001}}.tar")
        + "next(loader)\n"
        "raise RuntimeError('failure mid-epoch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "failure mid-epoch" in proc.stderr


def test_workers_and_fork_server_end_when_the_training_process_is_killed(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, num_samples=32, samples_per_shard=16, image_size=32, seed=0)
    code = (
        "import multiprocessing.forkserver, sys, time\n"
        + LOADER_SNIPPET.format(urls=f"{tmp_path}/train-{{000000..000001}}.tar")
        + "next(loader)\n"
        "pids = [w.pid for w in loader._iter._workers] + [multiprocessing.forkserver._forkserver._forkserver_pid]\n"
        "print(*pids, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 3 and all(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        proc.kill()  # SIGKILL: no atexit, no cleanup of any kind in the training process
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _running(p)], "loader processes outlived the killed training process"


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class _EnvironmentValue(torch.utils.data.IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield os.environ.get("CLIPA_DS_TEST_VALUE", "unset")


def test_workers_see_the_environment_their_loader_was_built_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipa_ds.data.workers import worker_context, worker_options

    worker_context()  # the server is running before the variable exists, e.g. S3 keys set later
    monkeypatch.setenv("CLIPA_DS_TEST_VALUE", "set-after-the-server-started")
    loader = torch.utils.data.DataLoader(_EnvironmentValue(), batch_size=None, num_workers=1, **worker_options(1))
    assert list(loader) == ["set-after-the-server-started"]


def test_a_stalled_step_dumps_every_thread_stack() -> None:
    code = (
        "import time\n"
        "from clipa_ds.train import arm_stall_dump\n"
        "arm_stall_dump(0.5)\n"
        "def stuck_in_a_collective():\n"
        "    time.sleep(2.0)\n"
        "stuck_in_a_collective()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0  # diagnostic only: the process is not killed
    assert proc.stderr.count("Timeout (0:00:00.500000)!") >= 2  # repeats while stuck
    assert "stuck_in_a_collective" in proc.stderr


def test_stall_dump_rejects_a_negative_period() -> None:
    with pytest.raises(ConfigError, match="run.stall_dump_s"):
        RunConfig(stall_dump_s=-1)
