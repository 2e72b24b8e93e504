"""Where consolidated weights come from: a run directory, a safetensors file, an eval bundle, an
open_clip export. Used by `checkpoint.init_from`, `clipa-ds export` and `clipa-ds eval`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from clipa_ds.checkpoint_store import RunLayout, find_resumable
from clipa_ds.checkpoint_weights import TEXT_POSITIONS, StateDict, consolidate_deepspeed, load_into, load_weights, log
from clipa_ds.config import ConfigError

CONFIG_FILE = "config.json"  # resolved config of a run, in the run directory


@dataclass
class WeightsInfo:
    """What we know about a set of weights, enough to rebuild the model and evaluate it."""

    variant: str
    context_length: int
    image_size: int  # evaluation resolution
    source: str  # human-readable origin
    extra: dict[str, Any] = field(default_factory=dict)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / "stages").is_dir())


def _stage_sizes(config: dict[str, Any], index: int) -> tuple[int, int]:
    stage = config["stages"][index]
    return stage["text"]["context_length"], stage["image"]["eval_size"] or stage["image"]["size"]


def read_run_weights(run_dir: Path, stage: str | None = None) -> tuple[StateDict, WeightsInfo]:
    """The newest weights of a run (or of one named stage): a stage's final weights, or the
    latest complete checkpoint consolidated to fp32 when the stage is still running."""
    layout = RunLayout(run_dir)
    choice = find_resumable(layout)
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        config = json.loads(config_path.read_text())
    elif choice.manifest is not None:
        config = choice.manifest.config
    else:
        raise ConfigError(f"{run_dir} holds no {CONFIG_FILE} and no complete checkpoint: not a clipa-ds run")
    names = [s["name"] for s in config["stages"]]
    if stage is not None and stage not in names:
        raise ConfigError(f"--stage {stage!r}: the run {run_dir} has stages {names}")
    finished = [i for i, n in enumerate(names) if layout.final_marker(i, n).is_file()]
    wanted = names.index(stage) if stage is not None else None
    in_progress = choice.manifest
    if wanted is not None and wanted in finished:
        index, from_checkpoint = wanted, False
    elif in_progress is not None and (wanted is None or in_progress.stage_index == wanted) and (
        not finished or in_progress.stage_index > finished[-1]
    ):
        index, from_checkpoint = in_progress.stage_index, True
    elif wanted is None and finished:
        index, from_checkpoint = finished[-1], False
    else:
        what = f"stage {stage!r}" if stage else "any stage"
        raise ConfigError(f"{run_dir}: {what} has neither finished nor a complete checkpoint yet")
    context_length, image_size = _stage_sizes(config, index)
    if from_checkpoint:
        assert in_progress is not None
        for note in choice.notes:
            log(note)
        weights = consolidate_deepspeed(layout.checkpoints, in_progress.tag, in_progress.zero_stage)
        source = f"{run_dir} checkpoint {in_progress.tag} (stage {names[index]!r}, in progress)"
    else:
        weights, _ = load_weights(layout.final_weights(index, names[index]))
        source = f"{run_dir} stage {names[index]!r} (final)"
    info = WeightsInfo(config["model"]["variant"], context_length, image_size, source, {"stage": names[index]})
    return weights, info


def read_weights(path: str, stage: str | None = None) -> tuple[StateDict, WeightsInfo]:
    """Weights + info from any source clipa-ds writes."""
    from clipa_ds.checkpoint_open_clip import is_open_clip_export, read_open_clip_export

    location = Path(path)
    if is_run_dir(location):
        return read_run_weights(location, stage)
    if stage is not None:
        raise ConfigError(f"--stage applies to run directories; {path} is not one")
    if location.is_dir() and is_open_clip_export(location):
        return read_open_clip_export(location)
    if location.is_dir() and (location / "model_config.json").is_file():
        config = json.loads((location / "model_config.json").read_text())
        weights, _ = load_weights(location / "model.safetensors")
        info = WeightsInfo(config["variant"], int(config["context_length"]), int(config["image_size"]), str(location))
        return weights, info
    if location.is_file() and location.suffix == ".safetensors":
        weights, meta = load_weights(location)
        if "variant" not in meta:
            raise ConfigError(
                f"{path} has no clipa-ds metadata (variant); write it with `clipa-ds export`, or use it "
                "as checkpoint.init_from, where the run's model.variant applies"
            )
        length = weights[TEXT_POSITIONS].shape[0]
        return weights, WeightsInfo(meta["variant"], int(meta.get("context_length", length)), int(meta["image_size"]), path)
    raise ConfigError(
        f"{path!r} is not a clipa-ds run directory, a .safetensors file, an eval bundle or an open_clip export"
    )


def read_init_weights(path: str) -> StateDict:
    """Weights for `checkpoint.init_from` (the run's own model.variant applies to bare files)."""
    location = Path(path)
    if location.is_file() and location.suffix == ".safetensors":
        return load_weights(location)[0]
    if not location.exists():
        raise ConfigError(f"checkpoint.init_from={path!r} does not exist")
    if location.is_file():
        raise ConfigError(
            f"checkpoint.init_from={path!r}: only .safetensors files are accepted (never pickles); "
            "convert with `clipa-ds export` or safetensors"
        )
    return read_weights(path)[0]


def build_model_for(weights: StateDict, info: WeightsInfo) -> nn.Module:
    """A clipa-ds CLIP of `info.variant` holding `weights`, in eval mode on CPU."""
    from clipa_ds.models.clip import build_clip

    kwargs: dict[str, Any] = {"logit_bias_init": 0.0} if "logit_bias.bias" in weights else {}
    model = build_clip(info.variant, int(weights[TEXT_POSITIONS].shape[0]), **kwargs)
    load_into(model, weights, info.source)
    return model.eval()


def load_model_for_eval(path: str) -> tuple[nn.Module, int, int]:
    """(model, context_length, image_size) from a run dir, .safetensors, eval bundle or open_clip export."""
    weights, info = read_weights(path)
    return build_model_for(weights, info), info.context_length, info.image_size
