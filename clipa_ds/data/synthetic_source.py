"""`data.train_urls=synthetic`: generate the tiny recipe's shards once, inside the run directory.

This makes `torchrun -m clipa_ds.train tiny run.dir=D` work with no dataset at hand. Rank 0 writes
the shards (deterministically, so a restart finds identical bytes); the others wait.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

SYNTHETIC = "synthetic"
SAMPLES = 16_384
SAMPLES_PER_SHARD = 1_024
EVAL_SAMPLES = 1_024
IMAGE_SIZE = 64
PROMPTS = ("a photo of a {}.", "a {}.", "a picture of a {}.")


def _data_dir(run_dir: str, key: str) -> Path:
    from clipa_ds.config import ConfigError

    if "://" in run_dir:
        raise ConfigError(f"{key}=synthetic needs a local run.dir; give real shard URLs for object storage")
    return Path(run_dir) / "synthetic_data"


def _once_on_rank0(rank: int, done: Path, write: object) -> None:
    if rank == 0 and not done.is_file():
        write()  # type: ignore[operator]
    if dist.is_initialized():
        dist.barrier()


def materialize_train_urls(train_urls: str, run_dir: str, rank: int) -> str:
    """Return `train_urls`, or for "synthetic" the URL pattern of shards generated under run_dir."""
    if train_urls != SYNTHETIC:
        return train_urls
    from clipa_ds.data.synthetic import write_synthetic_shards

    data_dir = _data_dir(run_dir, "data.train_urls")
    _once_on_rank0(rank, data_dir / "sizes.json", lambda: write_synthetic_shards(
        data_dir, num_samples=SAMPLES, samples_per_shard=SAMPLES_PER_SHARD, image_size=IMAGE_SIZE, seed=0
    ))
    return f"{data_dir}/train-{{000000..{SAMPLES // SAMPLES_PER_SHARD - 1:06d}}}.tar"


def materialize_eval_urls(run_dir: str, rank: int) -> str:
    """Held-out labelled synthetic shards (another seed) under run_dir; returns the shard path."""
    from clipa_ds.data.synthetic import write_synthetic_eval

    data_dir = _data_dir(run_dir, "eval.zeroshot_data")
    shard = data_dir / "eval-000000.tar"
    _once_on_rank0(rank, shard, lambda: write_synthetic_eval(data_dir, num_samples=EVAL_SAMPLES, image_size=IMAGE_SIZE, seed=1))
    return str(shard)
