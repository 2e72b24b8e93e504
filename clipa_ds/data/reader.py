"""One reader's resumable sample stream: shard cursor -> tar samples -> block shuffle -> batches.

A reader (one per rank x DataLoader worker) owns a disjoint part of the draw sequence:

    position = {"queue": [[draw, sample index, byte offset], ...], "next_draw": d, "stride": R}

It first finishes the explicit `queue` items (a shard being read, or shards handed over by a
world-size change), then reads draws next_draw, next_draw + R, ... Readers start with
queue = [], next_draw = reader id, stride = R (number of readers), so together they read every
draw exactly once.

Shuffling uses fixed blocks of `shuffle_buffer` raw samples: read a block, permute it with an
RNG seeded by the block's start position, emit it. The saved state is the block's start
position plus how many of its entries were already emitted, so a restore re-reads that one
block (without decoding the emitted part) and continues with exactly the next sample.
Per-sample randomness (crop, text masking) is seeded by the sample's (draw, index), so it does
not depend on which reader or worker reads it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from clipa_ds.data import storage
from clipa_ds.data.decode import BadSample, decode_caption, decode_image, image_bytes
from clipa_ds.data.shards import RetryingStream, RetryPolicy, ShardFailed, ShardPlan, expected_samples
from clipa_ds.data.tario import RawSample, TarCorrupt, TarError, iter_samples

# Counters: read side (shards, raw samples) and decode side (per-sample problems).
READ_COUNTERS = (
    "shards_opened", "shards_done", "shards_failed", "shards_corrupt", "shards_truncated",
    "shards_short", "shards_empty", "samples_read", "samples_missing", "retries",
)
DECODE_COUNTERS = (
    "samples_ok", "bad_image", "oversized_image", "missing_image", "missing_caption", "bad_text",
)
COUNTERS = READ_COUNTERS + DECODE_COUNTERS
MAX_BAD_STREAK = 20_000


class DataError(RuntimeError):
    """The data stream cannot continue (for example too many failing shards)."""


@dataclass
class ReaderContext:
    """Everything a reader needs; picklable (it is sent to DataLoader workers)."""

    plan: ShardPlan
    settings: storage.StorageSettings
    policy: RetryPolicy
    index: dict[str, int]
    seed: int
    stage_index: int
    image_size: int
    context_length: int
    text_strategy: str
    micro_batch: int
    tokenizer: Any
    block_size: int
    max_pixels: int
    min_crop_scale: float
    fast_decode: bool
    max_failed_shard_frac: float
    num_readers: int
    with_keys: bool = False


def sample_seed(seed: int, stage_index: int, draw: int, index: int) -> int:
    """Distinct integer seed per sample (an int seeds random.Random ~5x faster than a str)."""
    return (((seed & 0xFFFFFFFF) << 96) | ((stage_index & 0xFFFF) << 80) | ((draw & 0xFFFFFFFFFF) << 40)
            | (index & 0xFFFFFFFFFF))


def initial_position(reader_id: int, num_readers: int) -> dict[str, Any]:
    return {"queue": [], "next_draw": reader_id, "stride": num_readers}


def initial_state(reader_id: int, num_readers: int) -> dict[str, Any]:
    return {"block": initial_position(reader_id, num_readers), "skip": 0, "counters": {}}


@dataclass
class _Cursor:
    queue: list[list[int]]
    next_draw: int
    stride: int
    current: list[int] | None = None  # [draw, next sample index, next byte offset]

    def position(self) -> dict[str, Any]:
        queue = ([list(self.current)] if self.current else []) + [list(q) for q in self.queue]
        return {"queue": queue, "next_draw": self.next_draw, "stride": self.stride}

    def take(self) -> list[int]:
        if self.queue:
            return self.queue.pop(0)
        draw = self.next_draw
        self.next_draw += self.stride
        return [draw, 0, 0]


@dataclass
class Reader:
    ctx: ReaderContext
    reader_id: int
    state: dict[str, Any]
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counters = {k: 0 for k in COUNTERS}
        self.counters.update(self.state.get("counters", {}))
        self._attempted = 0  # shard opens by this reader (for the failure threshold)

    # ------------------------------------------------------------------ raw samples

    def _raw(self, cursor: _Cursor) -> Iterator[tuple[int, int, RawSample]]:
        """(draw, index in shard, raw sample) forever, advancing `cursor`."""
        while True:
            draw, index, offset = cursor.take()
            cursor.current = [draw, index, offset]
            yield from self._read_shard(cursor, draw, index, offset)
            cursor.current = None

    def _read_shard(self, cursor: _Cursor, draw: int, index: int, offset: int) -> Iterator[tuple[int, int, RawSample]]:
        url = self.ctx.plan.url(draw)
        self.counters["shards_opened"] += 1
        self._attempted += 1
        stream = RetryingStream(url, offset, self._open, self.ctx.policy, self._count_retry)
        start = index
        try:
            for sample in iter_samples(stream, offset):  # type: ignore[arg-type]
                self.counters["samples_read"] += 1
                cursor.current = [draw, index + 1, sample.end]
                yield draw, index, sample
                index += 1
        except TarError as err:
            self.counters["shards_corrupt" if isinstance(err, TarCorrupt) else "shards_truncated"] += 1
        except ShardFailed as err:
            self.counters["shards_failed"] += 1
            self._check_failures(err)
        else:
            self.counters["shards_done"] += 1
        finally:
            stream.close()
        expected = expected_samples(self.ctx.index, url)
        if expected is not None and index < expected:
            self.counters["shards_short"] += 1
            self.counters["samples_missing"] += expected - index
        if index == start and start == 0:
            self.counters["shards_empty"] += 1

    def _open(self, url: str, offset: int):  # noqa: ANN202
        return storage.open_at(url, offset, self.ctx.settings)

    def _count_retry(self) -> None:
        self.counters["retries"] += 1

    def _check_failures(self, err: ShardFailed) -> None:
        # Judge against this reader's share of an epoch, so that one early failure among
        # thousands of shards does not look like 100%.
        share = max(1, self.ctx.plan.num_shards // self.ctx.num_readers)
        failed = self.counters["shards_failed"]
        if failed > self.ctx.max_failed_shard_frac * max(self._attempted, share):
            raise DataError(
                f"{failed} of {self._attempted} shards failed on reader {self.reader_id}, more than "
                f"data.max_failed_shard_frac={self.ctx.max_failed_shard_frac}; last: {err}"
            )

    # ------------------------------------------------------------------ shuffled samples

    def _blocks(self) -> Iterator[tuple[int, int, RawSample]]:
        """Block-shuffled raw samples; keeps self.state resumable after every yield."""
        block_pos = self.state["block"]
        skip = self.state["skip"]
        read_counters = {k: self.counters[k] for k in READ_COUNTERS}
        cursor = _Cursor([list(q) for q in block_pos["queue"]], block_pos["next_draw"], block_pos["stride"])
        raw = self._raw(cursor)
        size = self.ctx.block_size
        while True:
            start = cursor.position()
            first = start["queue"][0][:2] if start["queue"] else [start["next_draw"], 0]
            block = [next(raw) for _ in range(size)]
            order = list(range(size))
            random.Random(f"block/{self.ctx.seed}/{self.ctx.stage_index}/{first[0]}/{first[1]}").shuffle(order)
            for j in range(skip, size):
                # State *after* this entry: a restore re-reads the block and skips j + 1.
                self.state = {"block": start, "skip": j + 1, "read_counters": read_counters}
                yield block[order[j]]
            skip = 0
            read_counters = {k: self.counters[k] for k in READ_COUNTERS}

    # ------------------------------------------------------------------ batches

    def batches(self) -> Iterator[dict[str, Any]]:
        ctx = self.ctx
        images: list[np.ndarray] = []
        texts: list[list[int]] = []
        keys: list[tuple[str, int]] = []
        bad_streak = 0  # consecutive unusable samples: a dataset with none usable must not spin forever
        for draw, index, sample in self._blocks():
            rng = random.Random(sample_seed(ctx.seed, ctx.stage_index, draw, index))
            try:
                caption = decode_caption(sample.files)
                image = decode_image(
                    image_bytes(sample.files), ctx.image_size, rng,
                    max_pixels=ctx.max_pixels, min_scale=ctx.min_crop_scale, fast=ctx.fast_decode,
                )
            except BadSample as bad:
                self.counters[bad.reason] += 1
                bad_streak += 1
                if bad_streak >= MAX_BAD_STREAK:
                    raise DataError(
                        f"{bad_streak} consecutive samples were unusable on reader {self.reader_id} "
                        f"(last: {bad}, shard {ctx.plan.url(draw)}); counters: {self.counters}"
                    ) from None
                continue
            bad_streak = 0
            self.counters["samples_ok"] += 1
            images.append(image)
            texts.append(ctx.tokenizer.encode(caption, ctx.context_length, ctx.text_strategy, rng))
            keys.append((sample.key, draw))
            if len(images) == ctx.micro_batch:
                yield self._collate(images, texts, keys)
                images, texts, keys = [], [], []

    def _collate(self, images: list[np.ndarray], texts: list[list[int]], keys: list[tuple[str, int]]) -> dict[str, Any]:
        # (B, S, S, 3) -> (B, 3, S, S); numpy's copy avoids torch's thread pool in workers.
        image = torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
        text = torch.tensor(texts, dtype=torch.long)  # (B, L)
        counters = dict(self.counters)
        saved = dict(self.state.pop("read_counters"))
        saved.update({k: counters[k] for k in DECODE_COUNTERS})
        state = {"block": self.state["block"], "skip": self.state["skip"], "counters": saved}
        batch: dict[str, Any] = {"image": image, "text": text, "_reader": self.reader_id, "_state": state,
                                 "_counters": counters}
        if self.ctx.with_keys:  # tests: which sample, from which draw of the shard sequence
            batch["key"] = [k for k, _ in keys]
            batch["draw"] = [d for _, d in keys]
        return batch
