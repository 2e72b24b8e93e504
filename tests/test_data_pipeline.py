"""Train loader on local shards: rank/worker split, exact resume, re-split, mixing, resampling."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from clipa_ds.config import ConfigError, DataConfig, ImageStageConfig, StageConfig, TextStageConfig
from clipa_ds.data.pipeline import build_train_loader, merge_loader_states
from clipa_ds.data.shards import ShardPlan, Source, expand_urls, parse_sources
from clipa_ds.data.synthetic import write_synthetic_shards
from clipa_ds.data.tokenizer import CaptionTokenizer

SHARDS = 8
PER_SHARD = 24
STAGE = StageConfig(
    name="pretrain", samples=10_000, global_batch=16,
    image=ImageStageConfig(size=32), text=TextStageConfig(context_length=8),
)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_samples=SHARDS * PER_SHARD, samples_per_shard=PER_SHARD, image_size=40, seed=3)
    return out


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer()


def urls(shard_dir: Path) -> str:
    return f"{shard_dir}/train-{{000000..{SHARDS - 1:06d}}}.tar"


def loader(cfg: DataConfig, tok: Any, *, rank: int = 0, world: int = 1, state: Any = None, seed: int = 0):
    return build_train_loader(
        cfg, STAGE, stage_index=0, rank=rank, world_size=world, seed=seed, micro_batch=8,
        tokenizer=tok, state=state, with_keys=True,
    )


def take(it: Any, batches: int) -> list[dict[str, Any]]:
    return list(itertools.islice(it, batches))


def keys_of(batches: list[dict[str, Any]]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batches_have_the_agreed_shapes(shard_dir: Path, tokenizer: CaptionTokenizer) -> None:
    cfg = DataConfig(train_urls=urls(shard_dir), workers=0, shuffle_buffer=16)
    (batch,) = take(loader(cfg, tokenizer), 1)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 32, 32)
    assert batch["text"].dtype == torch.long and batch["text"].shape == (8, 8)
    assert (batch["text"][:, 0] == tokenizer.cls_id).all()
    assert batch["image"].float().std() > 5  # real pictures, not blanks


def test_two_ranks_two_workers_read_each_sample_once_per_epoch(shard_dir: Path, tokenizer: CaptionTokenizer) -> None:
    cfg = DataConfig(train_urls=urls(shard_dir), workers=2, shuffle_buffer=16)
    per_rank = SHARDS * PER_SHARD // 2 // 8  # batches per rank in one epoch
    seen = []
    for rank in (0, 1):
        batches = take(loader(cfg, tokenizer, rank=rank, world=2), per_rank)
        assert all(d < SHARDS for b in batches for d in b["draw"])  # still epoch 0
        seen += keys_of(batches)
    assert len(seen) == len(set(seen)) == SHARDS * PER_SHARD


@pytest.mark.parametrize("workers", [0, 2])
def test_restore_continues_with_exactly_the_next_samples(
    shard_dir: Path, tokenizer: CaptionTokenizer, workers: int
) -> None:
    cfg = DataConfig(train_urls=urls(shard_dir), workers=workers, shuffle_buffer=20)
    first = loader(cfg, tokenizer)
    reference = take(first, 7)
    state = first.state_dict()
    reference += take(first, 30)  # crosses shards, blocks and the epoch boundary
    resumed = take(loader(cfg, tokenizer, state=state), 30)
    assert keys_of(resumed) == keys_of(reference[7:])
    for a, b in zip(resumed, reference[7:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_state_is_small_and_json_able(shard_dir: Path, tokenizer: CaptionTokenizer) -> None:
    import json

    cfg = DataConfig(train_urls=urls(shard_dir), workers=0, shuffle_buffer=16)
    it = loader(cfg, tokenizer)
    take(it, 5)
    text = json.dumps(it.state_dict())
    assert len(text) < 2000
    assert json.loads(text) == it.state_dict()


def test_restore_with_fewer_ranks_skips_nothing(shard_dir: Path, tokenizer: CaptionTokenizer) -> None:
    buffer = 16
    cfg = DataConfig(train_urls=urls(shard_dir), workers=0, shuffle_buffer=buffer)
    old = [loader(cfg, tokenizer, rank=r, world=2) for r in (0, 1)]
    before = [b for it in old for b in take(it, 5)]
    state = merge_loader_states([it.state_dict() for it in old])
    new = loader(cfg, tokenizer, rank=0, world=1, state=state)
    after = take(new, 40)
    epoch0 = lambda batches: [k for b in batches for k, d in zip(b["key"], b["draw"]) if d < SHARDS]  # noqa: E731
    got = Counter(epoch0(before) + epoch0(after))
    assert len(got) == SHARDS * PER_SHARD  # nothing skipped
    repeats = sum(n - 1 for n in got.values())
    assert repeats <= 2 * buffer  # at most one shuffle block per old reader


def test_partial_state_cannot_resplit(shard_dir: Path, tokenizer: CaptionTokenizer) -> None:
    cfg = DataConfig(train_urls=urls(shard_dir), workers=0, shuffle_buffer=16)
    it = loader(cfg, tokenizer, rank=0, world=2)
    take(it, 2)
    with pytest.raises(ValueError, match="all ranks"):
        loader(cfg, tokenizer, rank=0, world=1, state=it.state_dict())


def test_seed_and_stage_change_the_order(shard_dir: Path, tokenizer: CaptionTokenizer) -> None:
    cfg = DataConfig(train_urls=urls(shard_dir), workers=0, shuffle_buffer=16)
    a = keys_of(take(loader(cfg, tokenizer, seed=0), 3))
    assert a == keys_of(take(loader(cfg, tokenizer, seed=0), 3))
    assert a != keys_of(take(loader(cfg, tokenizer, seed=1), 3))


def test_epochs_without_replacement_cover_every_shard_once() -> None:
    source = Source("s", tuple(f"s/{i}.tar" for i in range(10)), 1.0)
    plan = ShardPlan([source], seed=0, stage_index=0, resample=False)
    for epoch in range(3):
        drawn = [plan.url(d) for d in range(epoch * 10, epoch * 10 + 10)]
        assert sorted(drawn) == sorted(source.urls)
    assert [plan.url(d) for d in range(10)] != [plan.url(d) for d in range(10, 20)]


def test_resampling_is_deterministic_and_with_replacement() -> None:
    source = Source("s", tuple(f"s/{i}.tar" for i in range(10)), 1.0)
    draws = lambda seed: [ShardPlan([source], seed=seed, stage_index=1, resample=True).url(d) for d in range(60)]  # noqa: E731
    a = draws(0)
    assert a == draws(0) and a != draws(1)
    assert max(Counter(a[:10]).values()) > 1 or len(set(a[:10])) < 10  # replacement
    assert set(a) == set(source.urls)


@pytest.mark.parametrize("resample", [False, True])
def test_sources_mix_by_weight(resample: bool) -> None:
    big = Source("a", tuple(f"a/{i}.tar" for i in range(7)), 3.0)
    small = Source("b", tuple(f"b/{i}.tar" for i in range(5)), 1.0)
    plan = ShardPlan([big, small], seed=0, stage_index=0, resample=resample)
    drawn = [plan.url(d) for d in range(4096)]
    share = sum(u.startswith("a/") for u in drawn) / len(drawn)
    assert abs(share - 0.75) < (0.001 if not resample else 0.03)
    if not resample:  # each source still cycles through its shards epoch by epoch
        first = [u for u in drawn if u.startswith("b/")][:5]
        assert sorted(first) == sorted(small.urls)


def test_brace_expansion_and_sources() -> None:
    assert expand_urls("s3://b/{00..02}.tar::/x/y.tar") == ["s3://b/00.tar", "s3://b/01.tar", "s3://b/02.tar", "/x/y.tar"]
    assert len(parse_sources("a/{0..3}.tar::b/{0..1}.tar", [])) == 1
    two = parse_sources("a/{0..3}.tar::b/{0..1}.tar", [2.0, 1.0])
    assert [len(s.urls) for s in two] == [4, 2]
    with pytest.raises(ConfigError, match="one weight per source"):
        parse_sources("a/{0..3}.tar", [1.0, 2.0])


def test_missing_or_empty_shards_fail_before_training(tmp_path: Path, tokenizer: CaptionTokenizer) -> None:
    with pytest.raises(ConfigError, match="data.train_urls is empty"):
        loader(DataConfig(train_urls=""), tokenizer)
    missing = f"{tmp_path}/nothing-{{0..3}}.tar"
    with pytest.raises(ConfigError, match="nothing-0.tar"):
        loader(DataConfig(train_urls=missing), tokenizer)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.tar"):
        loader(DataConfig(train_urls=str(tmp_path / "empty.tar")), tokenizer)


def test_http_shards_give_the_same_stream_as_local(shard_dir: Path, tokenizer: CaptionTokenizer) -> None:
    from tests.s3_server import RangeHTTPServer

    server = RangeHTTPServer(shard_dir)
    try:
        remote = DataConfig(train_urls=f"{server.endpoint}/train-{{000000..{SHARDS - 1:06d}}}.tar", workers=0,
                            shuffle_buffer=16, read_timeout_s=5.0)
        local = DataConfig(train_urls=urls(shard_dir), workers=0, shuffle_buffer=16)
        assert keys_of(take(loader(remote, tokenizer), 30)) == keys_of(take(loader(local, tokenizer), 30))
        with pytest.raises(ConfigError, match="missing-0.tar"):
            loader(DataConfig(train_urls=f"{server.endpoint}/missing-{{0..1}}.tar"), tokenizer)
    finally:
        server.close()
