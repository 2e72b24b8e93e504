"""Shard lists, the deterministic shard draw sequence, and retrying shard streams.

The whole stage reads one infinite, deterministic *draw sequence*: draw d (0, 1, 2, ...) names a
shard, computed from (seed, stage index, d) alone:

- without replacement (default): each source walks through its shards in a fresh permutation
  per epoch (seeded by seed, stage, source, epoch), so every shard of a source is drawn once
  per epoch;
- with replacement (`data.resample`): every draw picks a source by weight and a shard
  uniformly, from an RNG seeded by (seed, stage, d).

Several sources are mixed by weight in rounds of `MIX_ROUND` draws: each round holds a fixed
number of draws per source (largest-remainder rounding of the weights), in a seeded order.
Weights therefore apply to shards drawn, i.e. to samples when shards are of similar size.

Readers (rank x worker) take disjoint subsets of the draws (see reader.py), so no sample is
read twice within an epoch of a source and none is skipped.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, Callable, Sequence

from braceexpand import braceexpand

from clipa_ds.config import ConfigError
from clipa_ds.data import storage

MIX_ROUND = 1024


def expand_urls(spec: str) -> list[str]:
    """`a/{000..002}.tar::b/x.tar` -> the list of shard URLs (brace expansion, "::" joins)."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand(part))
    return urls


@dataclass(frozen=True)
class Source:
    spec: str
    urls: tuple[str, ...]
    weight: float


def parse_sources(train_urls: str, weights: Sequence[float]) -> list[Source]:
    """One source per "::"-part when weights are given, else one source with all parts."""
    if not train_urls.strip():
        raise ConfigError("data.train_urls is empty; set data.train_urls=PATH_OR_URL (brace patterns allowed)")
    if not weights:
        return [Source(train_urls, tuple(expand_urls(train_urls)), 1.0)]
    parts = [p.strip() for p in train_urls.split("::") if p.strip()]
    if len(parts) != len(weights):
        raise ConfigError(
            f"data.source_weights has {len(weights)} weights but data.train_urls has {len(parts)} "
            "'::'-separated sources; give one weight per source (or none)"
        )
    return [Source(p, tuple(expand_urls(p)), float(w)) for p, w in zip(parts, weights)]


def _allocate(weights: Sequence[float], total: int) -> list[int]:
    """Largest-remainder split of `total` draws by weight, at least 1 per source."""
    norm = sum(weights)
    exact = [w / norm * total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(counts) < total:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts


class ShardPlan:
    """draw index -> shard URL, deterministic in (seed, stage_index)."""

    def __init__(self, sources: Sequence[Source], *, seed: int, stage_index: int, resample: bool) -> None:
        self.sources = list(sources)
        self.seed = seed
        self.stage_index = stage_index
        self.resample = resample
        self.num_shards = sum(len(s.urls) for s in self.sources)
        self._weights = [s.weight for s in self.sources]
        self._per_round = _allocate(self._weights, MIX_ROUND) if len(self.sources) > 1 else [MIX_ROUND]
        self._round_cache: dict[int, list[int]] = {}

    def _tag(self, *parts: object) -> str:
        return "/".join(str(p) for p in (self.seed, self.stage_index, *parts))

    @lru_cache(maxsize=8)  # noqa: B019 (a plan lives as long as its loader)
    def _permutation(self, source: int, epoch: int) -> list[int]:
        order = list(range(len(self.sources[source].urls)))
        random.Random(self._tag("perm", source, epoch)).shuffle(order)
        return order

    def _round_order(self, r: int) -> list[int]:
        order = self._round_cache.get(r)
        if order is None:
            order = [s for s, n in enumerate(self._per_round) for _ in range(n)]
            random.Random(self._tag("mix", r)).shuffle(order)
            self._round_cache = {r: order}  # draws move forward: one round is enough
        return order

    def locate(self, draw: int) -> tuple[int, int]:
        """draw -> (source index, shard index within the source)."""
        if self.resample:
            rng = random.Random(self._tag("draw", draw))
            s = rng.choices(range(len(self.sources)), weights=self._weights)[0] if len(self.sources) > 1 else 0
            return s, rng.randrange(len(self.sources[s].urls))
        if len(self.sources) == 1:
            s, k = 0, draw
        else:
            r, j = divmod(draw, MIX_ROUND)
            order = self._round_order(r)
            s = order[j]
            k = r * self._per_round[s] + order[:j].count(s)  # this source's k-th draw
        epoch, i = divmod(k, len(self.sources[s].urls))
        return s, self._permutation(s, epoch)[i]

    def url(self, draw: int) -> str:
        s, i = self.locate(draw)
        return self.sources[s].urls[i]


# ----------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per read before the shard is given up
    backoff_s: float = 0.5  # first wait; doubles per attempt
    backoff_max_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with jitter (uniform in [50%, 100%] of the step)."""
        step = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return step * rng.uniform(0.5, 1.0)


class ShardFailed(Exception):
    """A shard that could not be read after all attempts (or a permanent error)."""

    def __init__(self, url: str, cause: BaseException, attempts: int) -> None:
        # Only the URL and the error type/message: never settings (which could hold secrets).
        super().__init__(f"{url}: {type(cause).__name__}: {cause} (after {attempts} attempt(s))")
        self.url = url
        self.cause = cause


PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class RetryingStream:
    """A forward-only binary stream over one shard that survives dropped connections.

    Any read error closes the handle and reopens at the current byte position (a ranged GET),
    after a backoff; `attempts` consecutive failures raise ShardFailed. Missing objects and
    permission errors fail at once.
    """

    def __init__(
        self,
        url: str,
        offset: int,
        opener: Callable[[str, int], BinaryIO],
        policy: RetryPolicy,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        self.pos = offset
        self._opener = opener
        self._policy = policy
        self._on_retry = on_retry
        self._handle: BinaryIO | None = None
        self._jitter = random.Random()  # timing only; never affects the data order

    def read(self, n: int = -1) -> bytes:
        failures = 0
        while True:
            try:
                if self._handle is None:
                    self._handle = self._opener(self.url, self.pos)
                data = self._handle.read(n)
                self.pos += len(data)
                return data
            except PERMANENT_ERRORS as err:
                self.close()
                raise ShardFailed(self.url, err, failures + 1) from None
            except Exception as err:  # noqa: BLE001 (network stacks raise many types)
                self.close()
                failures += 1
                if failures >= self._policy.attempts:
                    raise ShardFailed(self.url, err, failures) from None
                self._on_retry()
                time.sleep(self._policy.delay(failures, self._jitter))

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except Exception:  # noqa: BLE001 (a broken connection may fail to close)
                pass
            self._handle = None


# ----------------------------------------------------------------------------- index


def load_index(path: str, settings: storage.StorageSettings) -> dict[str, int]:
    """sizes.json ({shard name or URL: samples}) -> dict; empty path -> {}."""
    if not path:
        return {}
    try:
        with storage.open_at(path, 0, settings) as handle:
            data = json.loads(handle.read())
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.index={path!r} cannot be read: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ConfigError(f"data.index={path!r} must map shard names to sample counts")
    return data


def expected_samples(index: dict[str, int], url: str) -> int | None:
    """Look a shard up by full URL, then by file name (webdataset's sizes.json convention)."""
    if url in index:
        return index[url]
    return index.get(url.rsplit("/", 1)[-1])
