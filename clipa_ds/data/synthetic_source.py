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
IMAGE_SIZE = 64


def materialize_train_urls(train_urls: str, run_dir: str, rank: int) -> str:
    """Return `train_urls`, or for "synthetic" the URL pattern of shards generated under run_dir."""
    if train_urls != SYNTHETIC:
        return train_urls
    from clipa_ds.config import ConfigError
    from clipa_ds.data.synthetic import write_synthetic_shards

    if "://" in run_dir:
        raise ConfigError("data.train_urls=synthetic needs a local run.dir; give real shard URLs for object storage")
    data_dir = Path(run_dir) / "synthetic_data"
    num_shards = SAMPLES // SAMPLES_PER_SHARD
    if rank == 0 and not (data_dir / "sizes.json").is_file():
        write_synthetic_shards(
            data_dir, num_samples=SAMPLES, samples_per_shard=SAMPLES_PER_SHARD, image_size=IMAGE_SIZE, seed=0
        )
    if dist.is_initialized():
        dist.barrier()
    return f"{data_dir}/train-{{000000..{num_shards - 1:06d}}}.tar"
