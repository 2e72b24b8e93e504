"""Cost of gradient caching: time per sample with and without it, same global batch, side by side.

    PYTHONPATH=. python benchmarks/gradcache_overhead.py [--variant tiny --global-batch 64 --micro-batch 16]

Modes, each one real `clipa_ds.step.train_step` on a DeepSpeed engine (ZeRO-1, AdamW):
- per_micro_batch: DeepSpeed's accumulation (micro_batch x world negatives per loss);
- gradient_cache: the same micro-batches, the loss over the whole global batch;
- full_batch: no accumulation (micro = global): the same loss as gradient_cache, if memory allows.
Steps of the modes are interleaved round by round so that machine load hits all of them alike.
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _batches(count: int, batch: int, image: int, context: int, vocab: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (batch, 3, image, image), generator=g, dtype=torch.uint8).to(device),
            "text": torch.randint(1, vocab, (batch, context), generator=g).to(device),
        }
        for _ in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--mask-ratio", type=float, default=0.0, help="random patch masking ratio")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from clipa_ds.config import EngineConfig, LossConfig, OptimConfig
    from clipa_ds.engine import batch_plan, build_engine, init_distributed
    from clipa_ds.models.clip import build_clip
    from clipa_ds.models.variants import get_variant
    from clipa_ds.step import train_step
    from clipa_ds.task import CLIPTask

    env = init_distributed()
    engine_cfg = EngineConfig(zero_stage=args.zero_stage, bf16=args.bf16)
    optim = OptimConfig(lr=1e-4, grad_clip=1.0)
    vocab = get_variant(args.variant).vocab_size

    def make(micro: int) -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = build_clip(args.variant, args.context_length)
        model.visual.set_token_masking("random" if args.mask_ratio > 0 else "none", args.mask_ratio)
        plan = batch_plan(args.global_batch, micro, env.world_size)
        return build_engine(CLIPTask(model), engine_cfg, plan, optim, env.device), plan

    accumulated, plan = make(args.micro_batch)
    full, full_plan = make(args.global_batch // env.world_size)
    micro_data = _batches(plan.grad_accum, plan.micro_batch, args.image_size, args.context_length, vocab, env.device)
    full_data = _batches(1, full_plan.micro_batch, args.image_size, args.context_length, vocab, env.device)
    modes = {
        "per_micro_batch": (accumulated, plan, micro_data, LossConfig(accumulation="per_micro_batch")),
        "gradient_cache": (accumulated, plan, micro_data, LossConfig(accumulation="gradient_cache")),
        "full_batch": (full, full_plan, full_data, LossConfig()),
    }

    def run(mode: str) -> float:
        engine, step_plan, data, loss_cfg = modes[mode]
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = train_step(engine, iter(data), step_plan, env.device, loss=loss_cfg)
        float(stats.loss_sum)  # host sync: the step is really done
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for mode in modes:
            run(mode)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            times[mode].append(run(mode))

    # Median and minimum: on a shared machine the minimum is the least disturbed estimate.
    per_sample = {mode: statistics.median(t) / args.global_batch for mode, t in times.items()}
    per_sample_min = {mode: min(t) / args.global_batch for mode, t in times.items()}
    result = {
        "benchmark": "gradcache_overhead",
        "device": env.device.type if env.device.type != "cuda" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "variant": args.variant,
        "image_size": args.image_size,
        "context_length": args.context_length,
        "mask_ratio": args.mask_ratio,
        "bf16": args.bf16,
        "zero_stage": args.zero_stage,
        "world_size": env.world_size,
        "global_batch": args.global_batch,
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "rounds": args.rounds,
        "s_per_sample_median": per_sample,
        "s_per_sample_min": per_sample_min,
        "step_s_all": times,
        "gradient_cache_over_per_micro_batch": per_sample["gradient_cache"] / per_sample["per_micro_batch"],
        "gradient_cache_over_per_micro_batch_min": per_sample_min["gradient_cache"] / per_sample_min["per_micro_batch"],
        # Ratio within each round (adjacent steps see similar machine load), then the median.
        "gradient_cache_over_per_micro_batch_paired": statistics.median(
            c / p for c, p in zip(times["gradient_cache"], times["per_micro_batch"])
        ),
        "gradient_cache_over_full_batch": per_sample["gradient_cache"] / per_sample["full_batch"],
        "negatives_per_loss": {
            "per_micro_batch": plan.micro_batch * env.world_size,
            "gradient_cache": args.global_batch,
            "full_batch": args.global_batch,
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
