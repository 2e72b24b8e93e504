"""Checkpoints of a run as the training loop uses them: auto-resume, save, stage hand-off.

One `RunCheckpoints` per run; every method is a collective (call it on every rank).

- `prepare()`: checks run.dir is writable, pulls from the object store when run.dir is empty,
  picks the newest complete checkpoint (falling back past corrupt or partial ones, and saying
  so), and refuses config changes that would silently alter the run (checkpoint_state).
- `start_stage(k)`: what stage k starts from: its own checkpoint (resume inside the stage; a
  different world size goes through DeepSpeed's universal format, checkpoint_universal), the
  previous stage's final weights (hand-off: fresh optimizer and LR schedule, text positions
  interpolated by `load_into`), `checkpoint.init_from` for the first stage, or a random init.
- `restore(engine, start)`: DeepSpeed state + this rank's RNG + the merged loader state.
- `save(...)`: DeepSpeed `save_checkpoint` on every rank, then the manifest and the `latest`
  pointer by rank 0 after a barrier (checkpoint_store), then keep-last pruning and the sync.
- `finish_stage(k, weights)`: consolidated fp32 weights of the stage (safetensors) + marker.

Guarantees (tests/test_resume.py, tests/test_checkpoint*.py):
- Same world size, ZeRO stage, data and config: a run killed at any point (SIGKILL, or during a
  checkpoint write) and restarted with the same command ends with bit-identical weights (CPU,
  ZeRO 1/2/3). The loss of steps redone after the checkpoint is identical too.
- Another world size: weights, fp32 master copy and AdamW moments carry over exactly (universal
  format); the per-rank RNG streams are derived anew; the data loader re-splits the unread rest
  of its shard sequence: no sample is skipped, at most one shuffle block (data.shuffle_buffer
  samples) per old reader is repeated, and the sample order differs from an uninterrupted run,
  so the loss continues the curve within batch noise, not bit-identically.
- Config changes: run.dir/logging/timeouts/workers/checkpoint/eval settings, a stage's length
  (not yet finished) and everything about stages not yet started may change; anything else
  that differs from the checkpoint (model, batch sizes, image/text settings, optimizer, loss,
  data sources, seed, ZeRO stage, precision) is refused, naming each changed key.
- SIGTERM / SIGUSR1: every rank saves at the next step boundary, then exits with 128+signal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from clipa_ds.checkpoint_sources import CONFIG_FILE, build_model_for, load_model_for_eval, read_init_weights
from clipa_ds.checkpoint_state import decide_resume, gather_rng, restore_rng, seed_everything
from clipa_ds.checkpoint_store import (
    Manifest,
    RunLayout,
    atomic_write_text,
    check_writable,
    checkpoint_tag,
    disk_problem,
    estimate_checkpoint_bytes,
    list_tags,
    prune,
    publish_latest,
    write_manifest,
)
from clipa_ds.checkpoint_trigger import CheckpointTrigger, Preempted, StopSignals, control_group
from clipa_ds.checkpoint_universal import convert_to_universal, universal_overrides, universal_tag
from clipa_ds.checkpoint_weights import StateDict, load_weights, log, save_weights, weights_only_torch_load
from clipa_ds.config import Config, ConfigError, EngineConfig

__all__ = [
    "CheckpointError",
    "Preempted",
    "RunCheckpoints",
    "StageStart",
    "build_model_for",
    "load_model_for_eval",
]

# Test-only fault injection: SIGKILL every rank right after its N-th save wrote its files, before
# the manifest and the `latest` pointer (a crash in the middle of a checkpoint).
KILL_DURING_SAVE_ENV = "CLIPA_DS_TEST_KILL_DURING_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (disk space, I/O); the message says what to do."""


@dataclass
class StageStart:
    weights: StateDict | None  # initial weights of a fresh stage (None: random init or resume)
    source: str  # where they come from, for the log
    resume: Manifest | None  # checkpoint inside this stage to continue from
    load_tag: str  # the tag to load (the universal conversion's for a new world size)
    engine: EngineConfig  # with `load_universal` switched on when needed


@dataclass
class Restored:
    samples_seen: int
    loader_state: dict[str, Any] | None
    nonfinite: dict[str, int] | None


def local_run_dir(cfg: Config) -> Path:
    """Where this process reads and writes; a staging directory when run.dir is an object store."""
    from clipa_ds.data.storage import is_remote

    if not is_remote(cfg.run.dir):
        return Path(cfg.run.dir)
    if cfg.checkpoint.local_dir:
        return Path(cfg.checkpoint.local_dir)
    digest = hashlib.sha256(cfg.run.dir.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "clipa-ds" / digest


class RunCheckpoints:
    def __init__(self, cfg: Config, rank: int, world_size: int, local_rank: int) -> None:
        from clipa_ds.checkpoint_sync import RemoteMirror
        from clipa_ds.data.storage import StorageSettings, is_remote

        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.layout = RunLayout(local_run_dir(cfg))
        url = cfg.checkpoint.sync_to or (cfg.run.dir if is_remote(cfg.run.dir) else "")
        self.mirror = RemoteMirror(url, StorageSettings.from_config(cfg.data)) if url else None
        self.group = control_group()
        self.signals = StopSignals().install()
        self.finished = 0  # stages 0..finished-1 are done
        self.resume: Manifest | None = None
        self._handoff: tuple[int, StateDict] | None = None
        self._saves = 0
        self._last_size = 0
        # Is run.dir one filesystem for all ranks? If not (node-local disks, e.g. staging for an
        # object store), each node's local rank 0 keeps its own copy tidy and complete.
        self.shared = True
        self._partitioned = False  # the resumed checkpoint has per-rank optimizer partitions

    @property
    def writer(self) -> bool:
        """The process that maintains this filesystem's copy of the run directory."""
        return self.rank == 0 if self.shared else self.local_rank == 0

    # ------------------------------------------------------------------ collectives

    @property
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self.group)

    def _from_rank0(self, value: Any) -> Any:
        if not self._distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _raise_if_any(self, problem: str | None, error: type[Exception]) -> None:
        """Every rank raises when any rank has a problem (no rank is left waiting in a collective)."""
        problems = [problem]
        if self._distributed:
            problems = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self.group)
        for rank, text in enumerate(problems):
            if text:
                raise error(text if self.world_size == 1 else f"rank {rank}: {text}")

    # ------------------------------------------------------------------ start of the run

    def prepare(self) -> None:
        problem = None
        try:
            check_writable(self.layout.root)
        except ConfigError as err:
            problem = str(err)
        self._raise_if_any(problem, ConfigError)
        self.shared = self._detect_shared()
        pulled, problem = None, None
        empty = not list_tags(self.layout) and not (self.layout.root / "stages").is_dir()
        if self.mirror is not None and self.writer and (empty or not self.shared):
            # Node-local copies always sync from the store, so every node resumes the same tag.
            try:
                pulled = self.mirror.pull(self.layout)
            except (OSError, ValueError) as err:
                problem = f"cannot read the checkpoints in {self.mirror.url}: {err}"
        self._raise_if_any(problem, CheckpointError)
        decision: Any = None
        if self.rank == 0:
            try:
                decision = decide_resume(self.layout, self.cfg)
                if pulled is not None and self.mirror is not None:
                    decision.notes.insert(0, f"pulled checkpoint {pulled} from {self.mirror.url}")
            except ConfigError as err:
                decision = str(err)
        decision = self._from_rank0(decision)
        if isinstance(decision, str):
            raise ConfigError(decision)
        self.finished, self.resume, self._partitioned = decision.finished, decision.manifest, decision.partitioned
        notes = decision.notes
        if not self.shared and self.mirror is None:
            if self.resume is not None or self.finished:
                raise ConfigError(
                    f"run.dir={self.cfg.run.dir!r} is not shared between the nodes, so the other nodes cannot "
                    "see rank 0's checkpoint; use a shared filesystem, or an object store (run.dir=s3://... "
                    "or checkpoint.sync_to=s3://...), or a new run.dir to start over"
                )
            if self.rank == 0:
                log(f"warning: run.dir={self.cfg.run.dir!r} is node-local and checkpoint.sync_to is not set: "
                    "this run cannot be resumed after a restart")
        if self.rank == 0:
            for note in notes:
                log(note)
            atomic_write_text(self.layout.root / CONFIG_FILE, json.dumps(self.cfg.to_dict(), indent=1) + "\n")
            self._sync(lambda m: m.upload_file(self.layout, CONFIG_FILE))

    def _detect_shared(self) -> bool:
        """All ranks see the file rank 0 just wrote: one shared filesystem."""
        if not self._distributed:
            return True
        token = self._from_rank0(secrets.token_hex(8) if self.rank == 0 else None)
        probe = self.layout.root / ".shared-probe"
        if self.rank == 0:
            atomic_write_text(probe, token)
        self.barrier()
        seen = probe.is_file() and probe.read_text() == token
        views: list[Any] = [None] * self.world_size
        dist.all_gather_object(views, seen, group=self.group)
        return all(views)

    # ------------------------------------------------------------------ stages

    def stage_done(self, stage_index: int) -> bool:
        return stage_index < self.finished

    def start_stage(self, stage_index: int) -> StageStart:
        engine = self.cfg.engine
        resume = self.resume if self.resume is not None and self.resume.stage_index == stage_index else None
        if resume is not None:
            if resume.world_size == self.world_size or not self._partitioned:
                return StageStart(None, f"checkpoint {resume.tag}", resume, resume.tag, engine)
            return self._universal_start(resume)
        if stage_index > 0:
            previous = self.cfg.stages[stage_index - 1]
            return StageStart(self.final_weights(stage_index - 1), f"stage {previous.name!r} final weights", None, "", engine)
        if self.cfg.checkpoint.init_from:
            return StageStart(self._init_weights(), f"init_from {self.cfg.checkpoint.init_from}", None, "", engine)
        return StageStart(None, "random init", None, "", engine)

    def _universal_start(self, resume: Manifest) -> StageStart:
        """A different world size: convert once per filesystem, then every rank loads the universal form."""
        if self.rank == 0:
            log(f"world size {resume.world_size} -> {self.world_size}: converting {resume.tag} to DeepSpeed's universal format")
        tag = universal_tag(resume.tag)
        path = self.layout.checkpoints / tag / "ds_overrides.json"
        problem = None
        if self.writer:  # deterministic, so node-local copies convert independently
            try:
                convert_to_universal(self.layout, resume.tag)
                universal_overrides(self.cfg.engine.ds_config_overrides, path)
            except Exception as err:  # noqa: BLE001 (reported on every rank below)
                problem = f"converting checkpoint {resume.tag} to the universal format failed: {type(err).__name__}: {err}"
        self._raise_if_any(problem, CheckpointError)
        engine = dataclasses.replace(self.cfg.engine, ds_config_overrides=str(path))
        return StageStart(None, f"checkpoint {resume.tag} (universal, new world size)", resume, tag, engine)

    def _init_weights(self) -> StateDict:
        """checkpoint.init_from, copied once into the run dir (so a restart reads the same weights)."""
        source = self.cfg.checkpoint.init_from
        copy = self.layout.root / "init_from.safetensors"
        problem = None
        if self.writer:
            try:
                current = load_weights(copy)[1].get("source") if copy.is_file() else None
                if current != source:
                    save_weights(copy, read_init_weights(source), {"source": source})
            except (ConfigError, OSError) as err:
                problem = str(err)
        self._raise_if_any(problem, ConfigError)
        return load_weights(copy)[0]

    def final_weights(self, stage_index: int) -> StateDict:
        if self._handoff is not None and self._handoff[0] == stage_index:
            return self._handoff[1]
        stage = self.cfg.stages[stage_index]
        return load_weights(self.layout.final_weights(stage_index, stage.name))[0]

    def final_info(self, stage_index: int) -> dict[str, Any]:
        stage = self.cfg.stages[stage_index]
        return json.loads(self.layout.final_marker(stage_index, stage.name).read_text())

    def trigger(self, start_samples: int) -> CheckpointTrigger:
        return CheckpointTrigger(self.cfg.checkpoint, self.signals, self.group, start_samples)

    # ------------------------------------------------------------------ restore / save

    def restore(self, engine: Any, start: StageStart) -> Restored:
        assert start.resume is not None
        with weights_only_torch_load():
            path, client = engine.load_checkpoint(
                str(self.layout.checkpoints), tag=start.load_tag, load_module_strict=True,
                load_optimizer_states=True, load_lr_scheduler_states=False,
            )
        if path is None or not client or "clipa_ds" not in client:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {start.load_tag} from {self.layout.checkpoints}")
        state = client["clipa_ds"]
        if state["world_size"] == self.world_size:
            restore_rng(state["rng"][self.rank])
        else:
            # Per-rank streams cannot be carried over to another number of ranks: derive new ones.
            seed_everything(self.cfg.run.seed + 1000 * state["stage_index"] + self.rank + 7919 * state["samples_seen"])
        return Restored(int(state["samples_seen"]), state["loader"], state.get("nonfinite"))

    def save(
        self, engine: Any, loader: Any, stage_index: int, samples_seen: int,
        *, lr: float, nonfinite: dict[str, int], num_params: int,
    ) -> str:
        from clipa_ds.data.pipeline import gather_loader_state

        stage = self.cfg.stages[stage_index]
        tag = checkpoint_tag(stage_index, samples_seen)
        loader_state = gather_loader_state(loader)  # collective
        rng = gather_rng(self.group)  # collective
        need = self._last_size or estimate_checkpoint_bytes(num_params, 2 if self.cfg.engine.bf16 else 4)
        self._raise_if_any(disk_problem(self.layout.checkpoints, need), CheckpointError)
        if self.writer:
            shutil.rmtree(self.layout.tag_dir(tag), ignore_errors=True)  # left by a crashed attempt
        self.barrier()
        client = {
            "clipa_ds": {
                "stage_index": stage_index, "stage_name": stage.name, "samples_seen": samples_seen,
                "lr": lr, "loader": loader_state, "rng": rng, "world_size": self.world_size,
                "fingerprint": self.cfg.fingerprint(), "nonfinite": nonfinite,
            }
        }
        engine.save_checkpoint(str(self.layout.checkpoints), tag=tag, client_state=client, save_latest=False)
        self._saves += 1
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(self._saves):
            os.kill(os.getpid(), signal.SIGKILL)
        self.barrier()  # every rank's files are written
        if self.mirror is not None and self.writer:
            self._sync(lambda m: m.upload_tag_files(self.layout, tag))
        self.barrier()
        size = 0
        if self.rank == 0:
            manifest = Manifest(
                tag=tag, stage_index=stage_index, stage_name=stage.name, samples_seen=samples_seen,
                world_size=self.world_size, zero_stage=self.cfg.engine.zero_stage, config=self.cfg.to_dict(),
            )
            write_manifest(self.layout, manifest)
            publish_latest(self.layout, tag)
            self._sync(lambda m: m.publish_tag(manifest))
            if self.cfg.checkpoint.keep_last:
                self._sync(lambda m: m.prune(set(list_tags(self.layout))))
            size = sum(manifest.files.values())
        self._last_size = int(self._from_rank0(size))  # also orders the pruning after publication
        if self.writer:
            # On node-local disks the other nodes hold no manifest: they keep only the newest tag.
            prune(self.layout, self.cfg.checkpoint.keep_last, tag)
        return tag

    def finish_stage(self, stage_index: int, weights: StateDict, info: dict[str, Any]) -> None:
        """Rank 0 writes the stage's consolidated weights, then its marker; all ranks keep `weights`."""
        stage = self.cfg.stages[stage_index]
        if self.rank == 0:
            eval_size = stage.image.eval_size or stage.image.size
            meta = {
                "variant": self.cfg.model.variant, "stage_index": stage_index, "stage": stage.name,
                "context_length": stage.text.context_length, "image_size": eval_size,
                "loss_kind": self.cfg.loss.kind,
            }
            save_weights(self.layout.final_weights(stage_index, stage.name), weights, meta)
            marker = {**meta, **info, "config": self.cfg.to_dict()}
            atomic_write_text(self.layout.final_marker(stage_index, stage.name), json.dumps(marker, indent=1) + "\n")
            self._sync(lambda m: m.upload_stage(self.layout, stage_index, stage.name))
            self._sync(lambda m: m.upload_file(self.layout, "metrics.jsonl"))
        self.barrier()
        self._handoff = (stage_index, weights)
        self.finished = stage_index + 1

    def _sync(self, action: Any) -> None:
        """Run a mirror action; a failed upload is reported, never fatal (the local copy is complete)."""
        if self.mirror is None:
            return
        try:
            action(self.mirror)
        except OSError as err:
            log(f"warning: sync to {self.mirror.url} failed ({err}); the local copy in {self.layout.root} is complete")

    def close(self) -> None:
        self.signals.restore()
