"""The training loader: an infinite, deterministic, exactly resumable stream of batches.

    loader = build_train_loader(cfg.data, stage, stage_index=0, rank=r, world_size=W, seed=s,
                                micro_batch=b, tokenizer=tok, state=saved_or_None)
    batch = next(iter(loader))        # {"image": uint8 (B, 3, S, S), "text": long (B, L)}
    loader.state_dict()               # small JSON-able dict; this rank's readers
    loader.counters()                 # {"samples_ok": ..., "bad_image": ..., ...} (all workers)

Readers: rank r, DataLoader worker w -> reader id r * workers + w, of R = world_size * workers
(workers=0 counts as 1 in-process reader). See reader.py for what one reader reads.

Resume guarantees (documented in docs/data.md too):
- Same number of readers (R unchanged): restoring `state` continues every reader at the exact
  next sample, and the DataLoader's worker rotation is restored, so the sequence of batches
  on every rank is identical to an uninterrupted run (given the same shard bytes).
- Different R (world size or workers changed): pass the merged state of *all* old ranks
  (`merge_loader_states`). The unread rest of the draw sequence is re-split: partly read
  shards continue at their saved sample, untouched draws are dealt to the new readers. No
  shard or sample is skipped; the only repeats are the already-emitted part of each old
  reader's in-progress shuffle block (at most `shuffle_buffer` samples per old reader).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipa_ds.config import ConfigError
from clipa_ds.data import storage
from clipa_ds.data.reader import COUNTERS, Reader, ReaderContext, initial_state
from clipa_ds.data.shards import RetryPolicy, ShardPlan, load_index, parse_sources
from clipa_ds.data.workers import worker_options

log = logging.getLogger(__name__)
STATE_VERSION = 1


class _ReaderDataset(IterableDataset):
    """Each DataLoader worker plays one logical reader of this rank."""

    def __init__(self, ctx: ReaderContext, reader_ids: list[int], states: dict[int, dict[str, Any]], rotation: int):
        super().__init__()
        self.ctx = ctx
        self.reader_ids = reader_ids
        self.states = states
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        logical = (physical + self.rotation) % len(self.reader_ids)
        reader_id = self.reader_ids[logical]
        yield from Reader(self.ctx, reader_id, self.states[reader_id]).batches()


class TrainLoader:
    """Iterates forever; remembers, per reader, the state after the last batch it handed out."""

    def __init__(
        self, ctx: ReaderContext, *, rank: int, reader_ids: list[int], states: dict[int, dict[str, Any]],
        rotation: int, workers: int,
    ) -> None:
        self.ctx = ctx
        self.rank = rank
        self.reader_ids = reader_ids
        self._states = dict(states)
        self._next_worker = rotation
        self._counters: dict[int, dict[str, int]] = {
            r: {k: int(s.get("counters", {}).get(k, 0)) for k in COUNTERS} for r, s in states.items()
        }
        dataset = _ReaderDataset(ctx, reader_ids, states, rotation)
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, persistent_workers=False,
            prefetch_factor=2 if workers else None, **worker_options(workers),
        )
        self._iter: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = iter(self._loader)
        batch = next(self._iter)
        reader_id = batch.pop("_reader")
        self._states[reader_id] = batch.pop("_state")
        self._counters[reader_id] = batch.pop("_counters")
        self._next_worker = (self.reader_ids.index(reader_id) + 1) % len(self.reader_ids)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """This rank's loader state (small, JSON-able). Merge all ranks' with merge_loader_states."""
        return {
            "version": STATE_VERSION,
            "seed": self.ctx.seed,
            "stage_index": self.ctx.stage_index,
            "num_readers": self.ctx.num_readers,
            "readers": {str(r): self._states[r] for r in self.reader_ids},
            "next_worker": {str(self.rank): self._next_worker},
        }

    def counters(self) -> dict[str, int]:
        """Data-quality counters summed over this rank's readers (monotonic across restores)."""
        return {k: sum(c.get(k, 0) for c in self._counters.values()) for k in COUNTERS}

    def close(self) -> None:
        self._iter = None  # DataLoader workers exit when the iterator is collected


def merge_loader_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-rank `state_dict()`s (e.g. from all_gather_object) into one global state."""
    if not states:
        raise ValueError("merge_loader_states needs at least one state")
    merged = {k: states[0][k] for k in ("version", "seed", "stage_index", "num_readers")}
    merged["readers"] = {}
    merged["next_worker"] = {}
    identity = ("seed", "stage_index", "num_readers")
    for s in states:
        if any(s[k] != merged[k] for k in identity):
            raise ValueError("loader states come from different runs, stages or layouts")
        merged["readers"].update(s["readers"])
        merged["next_worker"].update(s["next_worker"])
    return merged


def gather_loader_state(loader: TrainLoader) -> dict[str, Any]:
    """All ranks' states merged (a collective when torch.distributed is initialised)."""
    local = loader.state_dict()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        return merge_loader_states(gathered)
    return merge_loader_states([local])


def resplit(state: dict[str, Any], num_readers: int) -> dict[int, dict[str, Any]]:
    """Deal the unread rest of an old layout's draw sequence to `num_readers` new readers.

    Old reader positions are (queue, next_draw, stride=R_old); together their arithmetic
    tails cover every draw >= G = max(next_draw). Draws below G still owed by a reader are
    made explicit queue items, dealt round-robin (sorted by draw) with the partly read
    shards; new reader i then continues with G + i, G + i + num_readers, ...
    """
    old = state["readers"]
    if len(old) != state["num_readers"]:
        raise ValueError(
            f"loader state holds {len(old)} of {state['num_readers']} readers; to change the number "
            "of readers, save the merged state of all ranks (gather_loader_state)"
        )
    blocks = [s["block"] for s in old.values()]
    frontier = max(b["next_draw"] for b in blocks)
    pending: list[list[int]] = []
    for b in blocks:
        pending.extend(list(q) for q in b["queue"])
        pending.extend([d, 0, 0] for d in range(b["next_draw"], frontier, b["stride"]))
    pending.sort()
    counters = {k: sum(int(s.get("counters", {}).get(k, 0)) for s in old.values()) for k in COUNTERS}
    new: dict[int, dict[str, Any]] = {}
    for i in range(num_readers):
        block = {"queue": pending[i::num_readers], "next_draw": frontier + i, "stride": num_readers}
        # Old counters go to reader 0 so that the totals stay monotonic.
        new[i] = {"block": block, "skip": 0, "counters": counters if i == 0 else {}}
    return new


def _preflight(sources: list, settings: storage.StorageSettings) -> None:
    """Fail before training on an empty pattern, a missing local shard, or an unreachable store."""
    for source in sources:
        if not source.urls:
            raise ConfigError(f"data.train_urls: {source.spec!r} expands to no shard URLs")
        local = [u for u in source.urls if not storage.is_remote(u)]
        missing = [u for u in local if not _nonempty_local(u)]
        if missing:
            raise ConfigError(
                f"data.train_urls: {len(missing)} of {len(source.urls)} shards are missing or empty, "
                f"first: {missing[0]!r}"
            )
        remote = [u for u in source.urls if storage.is_remote(u)]
        for url in remote[:1] + remote[-1:] if len(remote) > 1 else remote:
            try:
                storage.size_of(url, settings)
            except Exception as err:  # noqa: BLE001 (any failure here is a config problem)
                raise ConfigError(
                    f"data.train_urls: cannot read shard {url!r}: {type(err).__name__}: {err}. "
                    f"Check the URL, the bucket and the credentials ({settings.describe()})"
                ) from None


def _nonempty_local(url: str) -> bool:
    import os

    path = storage.strip_protocol(url)
    return os.path.isfile(path) and os.path.getsize(path) > 0


def build_train_loader(
    data_cfg: Any,
    stage: Any,
    *,
    stage_index: int,
    rank: int,
    world_size: int,
    seed: int,
    micro_batch: int,
    tokenizer: Any,
    state: dict[str, Any] | None = None,
    with_keys: bool = False,
) -> TrainLoader:
    """Build this rank's loader for `stage`; `state` from state_dict()/merge_loader_states."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    sources = parse_sources(data_cfg.train_urls, data_cfg.source_weights)
    settings = storage.StorageSettings.from_config(data_cfg)
    if any(storage.is_remote(u) for s in sources for u in s.urls[:1]):
        log.info("data: %s", settings.describe())
    _preflight(sources, settings)
    workers = data_cfg.workers
    per_rank = max(1, workers)
    num_readers = world_size * per_rank
    ctx = ReaderContext(
        plan=ShardPlan(sources, seed=seed, stage_index=stage_index, resample=data_cfg.resample),
        settings=settings,
        policy=RetryPolicy(data_cfg.max_attempts, data_cfg.retry_backoff_s, data_cfg.retry_backoff_max_s),
        index=load_index(data_cfg.index, settings),
        seed=seed,
        stage_index=stage_index,
        image_size=stage.image.size,
        context_length=stage.text.context_length,
        text_strategy=stage.text.strategy,
        micro_batch=micro_batch,
        tokenizer=tokenizer,
        block_size=data_cfg.shuffle_buffer,
        max_pixels=data_cfg.max_image_pixels,
        min_crop_scale=data_cfg.min_crop_scale,
        fast_decode=data_cfg.fast_decode,
        max_failed_shard_frac=data_cfg.max_failed_shard_frac,
        num_readers=num_readers,
        with_keys=with_keys,
    )
    reader_ids = [rank * per_rank + w for w in range(per_rank)]
    states, rotation = _restore(state, ctx, reader_ids, rank)
    return TrainLoader(ctx, rank=rank, reader_ids=reader_ids, states=states, rotation=rotation, workers=workers)


def _restore(
    state: dict[str, Any] | None, ctx: ReaderContext, reader_ids: list[int], rank: int
) -> tuple[dict[int, dict[str, Any]], int]:
    if state is None:
        return {r: initial_state(r, ctx.num_readers) for r in reader_ids}, 0
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
    if (state["seed"], state["stage_index"]) != (ctx.seed, ctx.stage_index):
        raise ValueError(
            f"loader state is for seed {state['seed']} stage {state['stage_index']}, "
            f"not seed {ctx.seed} stage {ctx.stage_index}"
        )
    if state["num_readers"] == ctx.num_readers and all(str(r) in state["readers"] for r in reader_ids):
        states = {r: state["readers"][str(r)] for r in reader_ids}
        return states, int(state["next_worker"].get(str(rank), 0))
    dealt = resplit(state, ctx.num_readers)
    return {r: dealt[r] for r in reader_ids}, 0
