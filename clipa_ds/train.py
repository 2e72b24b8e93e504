"""Training entry point: `python -m clipa_ds.train RECIPE [key=value ...]`.

Works as one process, under `torchrun` and under `deepspeed --module`. The loop only sequences
the components: build stage -> step -> log; each component owns its branches.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipa_ds.data.synthetic_source import materialize_train_urls
from clipa_ds.config import Config, ConfigError, StageConfig, load_config
from clipa_ds.engine import BatchPlan, DistEnv, batch_plan, build_engine, init_distributed, set_lr
from clipa_ds.flops import train_flops_per_sample
from clipa_ds.metrics import MetricsLogger
from clipa_ds.schedule import lr_at
from clipa_ds.step import train_step

StateDict = dict[str, torch.Tensor]


@dataclass
class StageResult:
    name: str
    samples: int
    wall_s: float
    final_loss: float
    weights: StateDict = field(repr=False, default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_tokens(cfg: Config, stage: StageConfig) -> tuple[int, int]:
    """(image tokens, text tokens) a training sample costs in this stage, after reduction."""
    from clipa_ds.models.variants import get_variant
    from clipa_ds.reduce.image import num_kept

    patch = get_variant(cfg.model.variant).patch_size
    grid = stage.image.size // patch
    return num_kept(grid * grid, stage.image.mask_ratio), stage.text.context_length


def build_stage_model(cfg: Config, stage: StageConfig, previous: StageConfig | None, weights: StateDict | None) -> torch.nn.Module:
    """Build the model for `stage`; hand over `weights` from the previous stage, reshaped."""
    from clipa_ds.models.clip import build_clip

    def build(context_length: int) -> torch.nn.Module:
        return build_clip(
            cfg.model.variant,
            context_length,
            grad_checkpointing_vision=cfg.model.grad_checkpointing_vision,
            grad_checkpointing_text=cfg.model.grad_checkpointing_text,
        )

    if weights is None:
        model = build(stage.text.context_length)
    else:
        assert previous is not None
        model = build(previous.text.context_length)
        model.load_state_dict(weights, strict=True)
        # Learned text positions are interpolated (e.g. 8 -> 32); the sin-cos image table is
        # recomputed for the new resolution by the tower itself.
        model.text.resize_positions(stage.text.context_length)
    model.visual.set_token_masking(stage.image.mask, stage.image.mask_ratio)
    return model


def full_fp32_state_dict(engine: Any) -> StateDict:
    """Consolidated fp32 weights from any ZeRO stage (a collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: StateDict = {}
    for name, param in engine.module.model.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (param.detach() if full is None else full).float().cpu().clone()
    return out


def train_stage(cfg: Config, stage_index: int, dist_env: DistEnv, logger: MetricsLogger, weights: StateDict | None) -> StageResult:
    from clipa_ds.data.pipeline import build_train_loader
    from clipa_ds.data.tokenizer import CaptionTokenizer
    from clipa_ds.models.variants import get_variant
    from clipa_ds.task import CLIPTask

    stage = cfg.stages[stage_index]
    previous = cfg.stages[stage_index - 1] if stage_index > 0 else None
    plan: BatchPlan = batch_plan(stage.global_batch, stage.micro_batch, dist_env.world_size)
    seed_everything(cfg.run.seed + 1000 * stage_index + dist_env.rank)

    model = build_stage_model(cfg, stage, previous, weights)
    engine = build_engine(CLIPTask(model), cfg.engine, plan, stage.optim, dist_env.device)
    loader = build_train_loader(
        cfg.data, stage, stage_index=stage_index, rank=dist_env.rank, world_size=dist_env.world_size,
        seed=cfg.run.seed, micro_batch=plan.micro_batch, tokenizer=CaptionTokenizer(),
    )
    image_tokens, text_tokens = stage_tokens(cfg, stage)
    flops = train_flops_per_sample(get_variant(cfg.model.variant), image_tokens, text_tokens).total
    peak = cfg.engine.peak_tflops * 1e12 * dist_env.world_size

    batches = iter(loader)
    loss_sum = torch.zeros((), device=dist_env.device)
    window_start, window_wait, window_samples = time.perf_counter(), 0.0, 0
    stage_start = time.perf_counter()
    last_loss = float("nan")
    for step in range(stage.steps):
        samples_seen = step * plan.global_batch
        set_lr(engine, lr_at(samples_seen, stage.optim, stage.samples))
        stats = train_step(engine, batches, plan, dist_env.device)
        loss_sum += stats.loss_sum
        window_wait += stats.data_wait_s
        window_samples += plan.global_batch
        if (step + 1) % cfg.run.log_every_steps == 0 or step + 1 == stage.steps:
            # The only host sync of the loop: once per log interval.
            torch.distributed.all_reduce(loss_sum)
            window_steps = window_samples // plan.global_batch
            last_loss = loss_sum.item() / (dist_env.world_size * plan.grad_accum * window_steps)
            elapsed = time.perf_counter() - window_start
            samples_per_s = window_samples / elapsed
            record = {
                "stage": stage.name,
                "step": step + 1,
                "samples_seen": (step + 1) * plan.global_batch,
                "loss": last_loss,
                "lr": engine.optimizer.param_groups[0]["lr"],
                "logit_scale": float(engine.module.last_logit_scale),
                "samples_per_s": samples_per_s,
                "mfu": samples_per_s * flops / peak,
                "data_wait_frac": window_wait / elapsed,
                "image_tokens": image_tokens,
                "text_tokens": text_tokens,
                **{f"data/{k}": v for k, v in loader.counters().items()},
            }
            logger.log(record)
            eta = (stage.steps - step - 1) * plan.global_batch / samples_per_s
            logger.progress(stage.name, step + 1, stage.steps, last_loss, samples_per_s, eta)
            loss_sum.zero_()
            window_start, window_wait, window_samples = time.perf_counter(), 0.0, 0
    wall_s = time.perf_counter() - stage_start
    weights = full_fp32_state_dict(engine)
    return StageResult(stage.name, stage.steps * plan.global_batch, wall_s, last_loss, weights)


def run(cfg: Config) -> list[StageResult]:
    """Train every stage of `cfg` in order, handing the weights from one stage to the next."""
    dist_env = init_distributed()
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, train_urls=materialize_train_urls(cfg.data.train_urls, cfg.run.dir, dist_env.rank))
    )
    for stage in cfg.stages:  # fail on batch arithmetic before any work
        batch_plan(stage.global_batch, stage.micro_batch, dist_env.world_size)
    run_dir = Path(cfg.run.dir)
    logger = MetricsLogger(run_dir, dist_env.rank, cfg.run.tensorboard)
    results: list[StageResult] = []
    weights: StateDict | None = None
    try:
        for stage_index in range(len(cfg.stages)):
            result = train_stage(cfg, stage_index, dist_env, logger, weights)
            weights = result.weights
            results.append(result)
    finally:
        logger.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the environment already carries it.
    args = [a for a in args if not a.startswith("--local_rank")]
    if not args or args[0].startswith("-"):
        print("usage: python -m clipa_ds.train RECIPE [key=value ...]", file=sys.stderr)
        return 2
    try:
        run(load_config(args[0], args[1:]))
    except ConfigError as err:
        print(f"clipa-ds: configuration error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
