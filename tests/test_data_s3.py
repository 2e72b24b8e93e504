"""Reading shards from a real S3 server (SeaweedFS, SigV4) and surviving a misbehaving network."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from clipa_ds.config import ConfigError, DataConfig, ImageStageConfig, S3Config, StageConfig, TextStageConfig
from clipa_ds.data.pipeline import build_train_loader
from clipa_ds.data.reader import DataError
from clipa_ds.data.synthetic import write_synthetic_shards
from clipa_ds.data.tokenizer import CaptionTokenizer
from tests.s3_server import SECRET_KEY, FaultProxy, SeaweedS3

SHARDS = 8
PER_SHARD = 24
STAGE = StageConfig(name="s", samples=1000, global_batch=16, image=ImageStageConfig(size=32),
                    text=TextStageConfig(context_length=8))


@pytest.fixture(scope="module")
def bucket_urls(s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> str:
    local = write_synthetic_shards(tmp_path_factory.mktemp("s3src"), num_samples=SHARDS * PER_SHARD,
                                   samples_per_shard=PER_SHARD, image_size=40, seed=11)
    s3_server.upload(local, "clipa-data", "synthetic")
    return f"s3://clipa-data/synthetic/train-{{000000..{SHARDS - 1:06d}}}.tar"


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer()


def make_loader(cfg: DataConfig, tok: Any, *, rank: int = 0, world: int = 1, state: Any = None):
    return build_train_loader(cfg, STAGE, stage_index=0, rank=rank, world_size=world, seed=0, micro_batch=8,
                              tokenizer=tok, state=state, with_keys=True)


def keys(batches: list[dict[str, Any]]) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.mark.slow
def test_two_ranks_two_workers_from_s3_split_and_resume(
    s3_env: SeaweedS3, bucket_urls: str, tokenizer: CaptionTokenizer
) -> None:
    cfg = DataConfig(train_urls=bucket_urls, workers=2, shuffle_buffer=16)
    per_rank = SHARDS * PER_SHARD // 2 // 8
    seen, states, tails = [], [], []
    for rank in (0, 1):
        it = make_loader(cfg, tokenizer, rank=rank, world=2)
        batches = list(itertools.islice(it, per_rank))
        states.append(it.state_dict())
        seen += keys(batches)
        tails.append(list(itertools.islice(it, 5)))
        assert it.counters()["samples_ok"] >= per_rank * 8 and it.counters()["retries"] == 0
    assert len(seen) == len(set(seen)) == SHARDS * PER_SHARD  # one epoch: each sample exactly once
    for rank in (0, 1):  # restore: exactly the samples that came next
        resumed = list(itertools.islice(make_loader(cfg, tokenizer, rank=rank, world=2, state=states[rank]), 5))
        assert keys(resumed) == keys(tails[rank])
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, tails[rank]))


def test_bad_bucket_or_credentials_fail_at_start_without_secrets(
    s3_env: SeaweedS3, bucket_urls: str, tokenizer: CaptionTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="no-such-bucket/x-0.tar") as err:
        make_loader(DataConfig(train_urls="s3://no-such-bucket/x-{0..3}.tar"), tokenizer)
    with pytest.raises(ConfigError, match="clipa-data/synthetic/missing-0.tar"):
        make_loader(DataConfig(train_urls="s3://clipa-data/synthetic/missing-{0..3}.tar"), tokenizer)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET_KEY)
    with pytest.raises(ConfigError, match="PermissionError") as err:
        make_loader(DataConfig(train_urls=bucket_urls), tokenizer)
    assert SECRET_KEY not in str(err.value) and "credentials=keys from environment" in str(err.value)


@pytest.fixture
def proxy(s3_env: SeaweedS3) -> Any:
    fault = FaultProxy(int(s3_env.endpoint.rsplit(":", 1)[1]))
    yield fault
    fault.close()


def fault_cfg(urls: str, proxy: FaultProxy, **kw: Any) -> DataConfig:
    base = dict(train_urls=urls, workers=0, shuffle_buffer=16, connect_timeout_s=2.0, read_timeout_s=1.0,
                max_attempts=4, retry_backoff_s=0.05, retry_backoff_max_s=0.2,
                s3=S3Config(endpoint_url=proxy.endpoint))
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["stall", "stall:3000", "reset", "reset:3000", "503"])
def test_transient_faults_are_retried_and_the_stream_is_unchanged(
    bucket_urls: str, tokenizer: CaptionTokenizer, proxy: FaultProxy, fault: str
) -> None:
    reference = keys(list(itertools.islice(make_loader(fault_cfg(bucket_urls, proxy), tokenizer), 8)))
    it = make_loader(fault_cfg(bucket_urls, proxy), tokenizer)
    proxy.script([fault, fault])  # the next two data reads fail, then the network recovers
    start = time.monotonic()
    got = keys(list(itertools.islice(it, 8)))
    assert got == reference
    # aiohttp itself may retry an idempotent GET once on a reset before any response.
    assert it.counters()["retries"] >= 1 and it.counters()["shards_failed"] == 0
    assert proxy.faults == 2
    assert time.monotonic() - start < 30


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_dead_store_stops_with_a_clear_error_and_never_hangs(
    bucket_urls: str, tokenizer: CaptionTokenizer, proxy: FaultProxy
) -> None:
    cfg = fault_cfg(bucket_urls, proxy, workers=1, max_attempts=2, max_failed_shard_frac=0.2)
    it = make_loader(cfg, tokenizer)
    proxy.script([], default="stall")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"shards failed.*max_failed_shard_frac=0.2.*s3://clipa-data/synthetic"):
        list(itertools.islice(it, 50))
    assert time.monotonic() - start < 60


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_flaky_shard_is_skipped_and_counted(bucket_urls: str, tokenizer: CaptionTokenizer, proxy: FaultProxy) -> None:
    cfg = fault_cfg(bucket_urls, proxy, max_attempts=2, max_failed_shard_frac=0.5)
    it = make_loader(cfg, tokenizer)
    proxy.script(["503", "503"])  # both attempts of the first shard fail
    batches = list(itertools.islice(it, SHARDS * PER_SHARD // 8))
    assert it.counters()["shards_failed"] == 1
    epoch0 = [k for b in batches for k, d in zip(b["key"], b["draw"]) if d < SHARDS]
    assert len(set(epoch0)) == len(epoch0) == (SHARDS - 1) * PER_SHARD  # the other shards, each once


def test_index_reads_shards_from_s3(
    s3_env: SeaweedS3, bucket_urls: str, tokenizer: CaptionTokenizer
) -> None:
    import json

    from clipa_ds.data.index import main

    assert main([bucket_urls, "--out", "s3://clipa-data/synthetic/sizes.json"]) == 0
    sizes = json.loads(s3_env.filesystem().cat("clipa-data/synthetic/sizes.json"))
    assert sizes == {f"train-{i:06d}.tar": PER_SHARD for i in range(SHARDS)}
    cfg = DataConfig(train_urls=bucket_urls, workers=0, shuffle_buffer=8, index="s3://clipa-data/synthetic/sizes.json")
    it = make_loader(cfg, tokenizer)
    list(itertools.islice(it, SHARDS * PER_SHARD // 8 + 2))  # one epoch and a bit
    assert it.counters()["shards_done"] >= SHARDS and it.counters()["samples_missing"] == 0


@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_train_from_s3(s3_env: SeaweedS3, bucket_urls: str, tmp_path: Path) -> None:
    """The tiny recipe trains a few steps from the S3 server, 2 ranks x 2 loader workers."""
    import json
    import os
    import subprocess
    import sys

    from tests.s3_server import s3_environment

    run_dir = tmp_path / "run"
    port = FaultProxy.free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "-m", "clipa_ds.train", "tiny", f"run.dir={run_dir}", f"data.train_urls={bucket_urls}", "data.workers=2",
        "data.shuffle_buffer=32", "run.log_every_steps=2", "run.tensorboard=false",
        "stages.pretrain.samples=256", "stages.pretrain.global_batch=32", "stages.pretrain.optim.warmup_samples=32",
        "stages.finetune.samples=64", "stages.finetune.global_batch=32", "stages.finetune.optim.warmup_samples=32",
    ]
    env = {**os.environ, **s3_environment(s3_env.endpoint)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert s3_environment(s3_env.endpoint)["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pretrain = [r for r in records if r["stage"] == "pretrain" and "event" not in r]  # skip stage_start/eval
    assert pretrain[-1]["samples_seen"] == 256
    # Per-rank counters (rank 0 logs): it read its share and nothing failed.
    assert pretrain[-1]["data/samples_ok"] >= 128 and pretrain[-1]["data/shards_failed"] == 0


def test_webdataset_opens_s3_through_fsspec(s3_env: SeaweedS3, bucket_urls: str) -> None:
    import webdataset as wds

    from clipa_ds.data import storage
    from clipa_ds.data.shards import expand_urls

    storage.register_webdataset_opener(storage.StorageSettings.from_config(DataConfig()))
    first = expand_urls(bucket_urls)[0]
    samples = list(wds.WebDataset(first, shardshuffle=False))
    assert len(samples) == PER_SHARD and all("jpg" in s and "txt" in s for s in samples)
