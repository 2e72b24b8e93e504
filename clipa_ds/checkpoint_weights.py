"""Consolidated weights: safe loading, safetensors files, init_from, loading into a model of another shape.

Nothing here unpickles arbitrary objects. Consolidated weights are safetensors. DeepSpeed's own
files are torch pickles that DeepSpeed reads with `weights_only=False`; `weights_only_torch_load`
forces `weights_only=True` for every `torch.load` inside it, with an allow-list of the four
DeepSpeed classes its checkpoints contain (loss scaler, ZeRO stage enum, fragment address).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from clipa_ds.config import ConfigError
from clipa_ds.checkpoint_store import atomic_write_bytes

StateDict = dict[str, torch.Tensor]
META_KEY = "clipa_ds"  # safetensors metadata key holding our JSON (variant, context_length, ...)


def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Inside: every torch.load uses weights_only=True (+ the DeepSpeed allow-list).

    DeepSpeed hard-codes weights_only=False in its loaders; patching the one function for the
    duration of a load is the narrowest way to keep its code paths and still refuse arbitrary
    pickles. Not thread-safe by design: loads happen on the main thread.
    """
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original  # type: ignore[assignment]


# ----------------------------------------------------------------------------- safetensors


def save_weights(path: Path, weights: StateDict, meta: dict[str, Any]) -> None:
    """fp32 contiguous tensors + our JSON metadata, written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in weights.items()}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))


def load_weights(path: Path) -> tuple[StateDict, dict[str, Any]]:
    """(tensors, metadata) from a safetensors file; metadata is {} for foreign files."""
    from safetensors import safe_open

    tensors: StateDict = {}
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    meta = json.loads(raw[META_KEY]) if META_KEY in raw else {}
    return tensors, meta


# ----------------------------------------------------------------------------- DeepSpeed checkpoints


def consolidate_deepspeed(checkpoints_dir: Path, tag: str, zero_stage: int) -> StateDict:
    """Full fp32 weights of the model from a DeepSpeed checkpoint of any ZeRO stage (one process)."""
    partitioned = any((checkpoints_dir / tag).glob("*optim_states.pt"))
    with weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):
        if zero_stage == 0 and not partitioned:  # plain fp32 training: the module holds the weights
            files = sorted((checkpoints_dir / tag).glob("mp_rank_*_model_states.pt"))
            if not files:
                raise FileNotFoundError(f"no mp_rank_*_model_states.pt in {checkpoints_dir / tag}")
            module = torch.load(files[0], map_location="cpu")["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            module = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)
    # DeepSpeed wraps CLIPTask, whose `model` attribute is the CLIP.
    return {k.removeprefix("model."): v.detach().float().contiguous() for k, v in module.items()}


# ----------------------------------------------------------------------------- into a model


def describe_mismatch(model: nn.Module, weights: StateDict, *, resizable: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between a model's parameters and `weights` (empty = compatible)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for name in sorted(set(expected) - set(weights)):
        problems.append(f"missing {name} {list(expected[name])}")
    for name in sorted(set(weights) - set(expected)):
        problems.append(f"unexpected {name} {list(weights[name].shape)}")
    for name in sorted(set(expected) & set(weights)):
        got = tuple(weights[name].shape)
        if got != expected[name] and name not in resizable:
            problems.append(f"shape of {name}: checkpoint {list(got)}, model {list(expected[name])}")
    return problems


TEXT_POSITIONS = "text.positional_embedding"


def load_into(model: nn.Module, weights: StateDict, source: str) -> None:
    """Load `weights` into a clipa-ds CLIP; text positions are interpolated when lengths differ.

    Raises ConfigError naming every mismatched tensor (another architecture or variant).
    """
    problems = describe_mismatch(model, weights, resizable=(TEXT_POSITIONS,))
    if TEXT_POSITIONS in weights and weights[TEXT_POSITIONS].shape[1:] != model.state_dict()[TEXT_POSITIONS].shape[1:]:
        problems.append(
            f"shape of {TEXT_POSITIONS}: checkpoint {list(weights[TEXT_POSITIONS].shape)}, "
            f"model {list(model.state_dict()[TEXT_POSITIONS].shape)}"
        )
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ConfigError(
            f"the weights in {source} do not fit this model ({len(problems)} mismatched tensors):\n  {shown}\n"
            "Use weights of the same model.variant (and loss.kind), or drop checkpoint.init_from"
        )
    target_length = model.text.context_length
    source_length = weights[TEXT_POSITIONS].shape[0]
    if source_length != target_length:
        # Load at the source length, then interpolate the learned table (CLIPA's 8 -> 32 hand-off).
        model.text.resize_positions(source_length)
        model.load_state_dict(weights, strict=True)
        model.text.resize_positions(target_length)
    else:
        model.load_state_dict(weights, strict=True)


def weights_digest(weights: StateDict) -> str:
    """Short content hash of a state dict (names, shapes, fp32 bytes): proves which weights a stage got."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{name}:{list(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def log(message: str) -> None:
    print(f"clipa-ds: {message}", file=sys.stderr, flush=True)
