"""DeepSpeed set-up: distributed init, the batch arithmetic (in one place), config composition.

The DeepSpeed JSON in ds_configs/ holds engine knobs only (ZeRO stage, buckets). Batch sizes,
clipping and precision come from the run config and are added here.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipa_ds.config import ConfigError, EngineConfig, OptimConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int  # per rank
    grad_accum: int
    world_size: int


def batch_plan(global_batch: int, micro_batch: int, world_size: int) -> BatchPlan:
    """Derive per-rank micro-batch and accumulation steps; micro_batch=0 means no accumulation."""
    if global_batch % world_size:
        raise ConfigError(
            f"global_batch={global_batch} does not divide by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    if micro_batch == 0:
        micro_batch = global_batch // world_size
    if global_batch % (world_size * micro_batch):
        raise ConfigError(
            f"global_batch={global_batch} is not divisible by world_size x micro_batch = "
            f"{world_size} x {micro_batch}; pick a micro_batch that divides {global_batch // world_size}"
        )
    return BatchPlan(global_batch, micro_batch, global_batch // (world_size * micro_batch), world_size)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: CPU when no GPU is present."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def init_distributed() -> DistEnv:
    """Join the process group set up by torchrun / the deepspeed launcher, or make a world of one."""
    accelerator = select_accelerator()
    if "RANK" not in os.environ:  # plain `python -m clipa_ds.train`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    backend = "nccl" if accelerator == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, world, local_rank, device)


# ----------------------------------------------------------------------------- DeepSpeed config


def read_ds_config(name: str) -> dict[str, Any]:
    """A ds_configs/ JSON file: shipped in the wheel as clipa_ds.ds_configs, top-level in a checkout."""
    try:
        resource: Any = resources.files("clipa_ds.ds_configs").joinpath(name)
    except ModuleNotFoundError:
        resource = Path(__file__).resolve().parent.parent / "ds_configs" / name
    if not resource.is_file():
        raise ConfigError(f"DeepSpeed config {name} is not shipped with clipa-ds; check engine.zero_stage")
    return json.loads(resource.read_text())


def build_ds_config(engine: EngineConfig, plan: BatchPlan, optim: OptimConfig) -> dict[str, Any]:
    config = read_ds_config(f"zero{engine.zero_stage}.json") if engine.zero_stage > 0 else {}
    config.setdefault("zero_optimization", {})["stage"] = engine.zero_stage
    if engine.ds_config_overrides:
        config = _deep_merge(config, json.loads(Path(engine.ds_config_overrides).read_text()))
    config.update(
        train_batch_size=plan.global_batch,
        train_micro_batch_size_per_gpu=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        gradient_clipping=optim.grad_clip,
        steps_per_print=10**9,  # clipa-ds logs itself
        wall_clock_breakdown=False,
    )
    if engine.bf16:
        config.setdefault("bf16", {})["enabled"] = True
        # Without this, DeepSpeed accumulates gradients in bf16 across micro-batches.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW where only weight matrices decay (not biases, norms, position tables, temperature)."""
    from clipa_ds.models.clip import param_groups

    groups = param_groups(model, optim.weight_decay)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **fused)


def build_engine(task: nn.Module, engine_cfg: EngineConfig, plan: BatchPlan, optim: OptimConfig, device: torch.device) -> Any:
    import deepspeed

    optimizer = build_optimizer(task, optim, device)
    engine, _, _, _ = deepspeed.initialize(
        model=task, optimizer=optimizer, config=build_ds_config(engine_cfg, plan, optim)
    )
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
