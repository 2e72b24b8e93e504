"""`data.train_urls=synthetic` / `eval.zeroshot_data=synthetic`: the tiny recipe's own data.

This makes `torchrun -m clipa_ds.train tiny run.dir=D` work with no dataset at hand. On every
node, local rank 0 writes the shards under the run directory (deterministic bytes, written to a
private temporary folder and renamed into place, so nodes sharing a file system cannot clash and
node-local run directories each get their copy); the other ranks wait at a barrier.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import torch.distributed as dist

SYNTHETIC = "synthetic"
SAMPLES = 16_384
SAMPLES_PER_SHARD = 1_024
EVAL_SAMPLES = 1_024
IMAGE_SIZE = 64
PROMPTS = ("a photo of a {}.", "a {}.", "a picture of a {}.")


def _materialize(run_dir: str, key: str, name: str, local_rank: int, write: Callable[[Path], object]) -> Path:
    """run_dir/name, written once per node by `write(folder)`; a collective when distributed."""
    from clipa_ds.config import ConfigError

    if "://" in run_dir:
        raise ConfigError(f"{key}=synthetic needs a local run.dir; give real shard URLs for object storage")
    target = Path(run_dir) / name
    if local_rank == 0 and not target.is_dir():
        scratch = target.with_name(f"{name}.tmp-{socket.gethostname()}-{os.getpid()}")
        write(scratch)
        try:
            os.rename(scratch, target)  # atomic; fails if another node's copy got there first
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return target


def materialize_train_urls(train_urls: str, run_dir: str, local_rank: int) -> str:
    """Return `train_urls`, or for "synthetic" the URL pattern of shards generated under run_dir."""
    if train_urls != SYNTHETIC:
        return train_urls
    from clipa_ds.data.synthetic import write_synthetic_shards

    folder = _materialize(run_dir, "data.train_urls", "synthetic_train", local_rank, lambda out: write_synthetic_shards(
        out, num_samples=SAMPLES, samples_per_shard=SAMPLES_PER_SHARD, image_size=IMAGE_SIZE, seed=0
    ))
    return f"{folder}/train-{{000000..{SAMPLES // SAMPLES_PER_SHARD - 1:06d}}}.tar"


def materialize_eval_urls(run_dir: str, local_rank: int) -> str:
    """Held-out labelled synthetic shards (another seed) under run_dir; returns the shard path."""
    from clipa_ds.data.synthetic import write_synthetic_eval

    folder = _materialize(run_dir, "eval.zeroshot_data", "synthetic_eval", local_rank, lambda out: write_synthetic_eval(
        out, num_samples=EVAL_SAMPLES, image_size=IMAGE_SIZE, seed=1
    ))
    return str(folder / "eval-000000.tar")
