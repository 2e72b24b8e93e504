"""What a checkpoint adds to DeepSpeed's state (RNG states per rank), which config changes are
safe, and where a run resumes.

RNG states are stored as plain lists of ints (JSON-able, loadable with `weights_only=True`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clipa_ds.checkpoint_store import Manifest, RunLayout, find_resumable
from clipa_ds.config import Config, ConfigError

# ----------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU, and CUDA when present) generator states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def gather_rng(group: Any = None) -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective when distributed)."""
    local = capture_rng()
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, local, group=group)
    return states


# ----------------------------------------------------------------------------- config changes

# Keys that may differ between the saved run and the resumed one (fnmatch-style prefixes).
# Everything else must match for the stages already started, or the run would silently change.
SAFE_PREFIXES = (
    "recipe",
    "run.dir",
    "run.log_every_steps",
    "run.tensorboard",
    "run.stall_dump_s",
    "model.grad_checkpointing_vision",  # recomputation gives the same math
    "model.grad_checkpointing_text",
    "data.workers",  # the loader re-splits readers (see docs: at most one shuffle block repeats)
    "data.connect_timeout_s",
    "data.read_timeout_s",
    "data.max_attempts",
    "data.retry_backoff_s",
    "data.retry_backoff_max_s",
    "data.max_failed_shard_frac",
    "data.s3",
    "engine.peak_tflops",
    "engine.ds_config_overrides",
    "checkpoint",
    "eval",
    "loss.max_nonfinite_steps_in_a_row",
)
# Per-stage keys that may change in the stage being resumed (later stages may change freely).
SAFE_STAGE_KEYS = ("samples", "image.eval_size")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _is_safe(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in SAFE_PREFIXES)


def config_changes(saved: dict[str, Any], cfg: Config, *, finished: int, resumed: bool) -> tuple[list[str], list[str]]:
    """(unsafe, safe) differences between a checkpoint's config and `cfg`.

    Stages 0..finished-1 are done; with `resumed`, stage `finished` is in progress. Those are
    compared by position; later stages have not started and may change freely.
    """
    current = cfg.to_dict()
    saved_stages, new_stages = saved.get("stages", []), current["stages"]
    old = _flatten({k: v for k, v in saved.items() if k != "stages"})
    new = _flatten({k: v for k, v in current.items() if k != "stages"})
    compared = finished + 1 if resumed else finished
    for index in range(compared):
        old_stage = saved_stages[index] if index < len(saved_stages) else {}
        new_stage = new_stages[index] if index < len(new_stages) else {}
        for key, value in _flatten(old_stage).items():
            old[f"stages.{index}.{key}"] = value
        for key, value in _flatten(new_stage).items():
            new[f"stages.{index}.{key}"] = value
    unsafe, safe = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after:
            continue
        line = f"{key}: {before!r} -> {after!r}"
        parts = key.split(".")
        if _is_safe(key):
            safe.append(line)
        elif parts[0] == "stages" and int(parts[1]) < finished:
            unsafe.append(line + " (that stage is already finished)")
        elif parts[0] == "stages" and ".".join(parts[2:]) in SAFE_STAGE_KEYS:
            safe.append(line)
        else:
            unsafe.append(line)
    return unsafe, safe


def check_resume_config(saved: dict[str, Any], cfg: Config, *, finished: int, resumed: bool, where: str) -> list[str]:
    """Raise ConfigError on unsafe changes; return the safe ones (to log)."""
    unsafe, safe = config_changes(saved, cfg, finished=finished, resumed=resumed)
    if unsafe:
        listing = "\n  ".join(unsafe)
        raise ConfigError(
            f"run.dir holds {where}, made with a different configuration; these changes would "
            f"silently alter the run:\n  {listing}\nRestore these values to resume, or start a new "
            "run with another run.dir (checkpoint.init_from=OLD_RUN_DIR starts from its weights)"
        )
    return safe


# ----------------------------------------------------------------------------- where to resume


@dataclass
class ResumeDecision:
    finished: int  # stages 0..finished-1 are done
    manifest: Manifest | None  # checkpoint inside stage `finished` to continue from
    notes: list[str]  # for the log
    partitioned: bool  # its optimizer states are per-rank partitions (world size matters)


def decide_resume(layout: RunLayout, cfg: Config) -> ResumeDecision:
    """How far the run in `layout` got, and whether `cfg` may continue it (raises ConfigError)."""
    names = [s.name for s in cfg.stages]
    finished = 0
    while finished < len(names) and layout.final_marker(finished, names[finished]).is_file():
        finished += 1
    choice = find_resumable(layout)
    notes = list(choice.notes)
    manifest = choice.manifest
    if manifest is not None and manifest.stage_index != finished:
        manifest = None  # a checkpoint of a stage that has finished since
    saved: dict[str, Any] | None = manifest.config if manifest is not None else None
    where = f"checkpoint {manifest.tag}" if manifest is not None else ""
    if saved is None and finished:
        marker = layout.final_marker(finished - 1, names[finished - 1])
        saved, where = json.loads(marker.read_text())["config"], f"finished stage {names[finished - 1]!r}"
    if saved is not None:
        safe = check_resume_config(saved, cfg, finished=finished, resumed=manifest is not None, where=where)
        notes += [f"accepted config change {line}" for line in safe]
    if manifest is not None:
        notes.append(
            f"resuming stage {manifest.stage_name!r} from checkpoint {manifest.tag} "
            f"({manifest.samples_seen} samples in, saved at world size {manifest.world_size})"
        )
    elif finished == len(names):
        notes.append(f"all stages of {layout.root} are finished; nothing to train")
    elif finished:
        notes.append(f"stages {names[:finished]} are finished; stage {names[finished]!r} starts from their weights")
    # Optimizer states partitioned per rank (ZeRO, or DeepSpeed's bf16 optimizer) only load at
    # the world size they were saved with; a plain fp32 ZeRO-0 checkpoint loads anywhere.
    partitioned = manifest is not None and any(name.endswith("optim_states.pt") for name in manifest.files)
    return ResumeDecision(finished, manifest, notes, partitioned)
