"""Image token reduction: forward+backward time per sample of the image tower, masked vs not.

Builds `VisionTower(get_variant(variant))` and times one training step's forward + backward
(no optimizer) for no masking and for random / grid / block masking at each ratio. The
configurations are measured round-robin (one warm-up round, then `--reps` rounds), so a change
in machine load hits all of them alike; each reports the median over rounds.

Clock: on CPU with one thread (the default) the time is the process CPU time, which other
programs on a shared machine barely disturb (wall time there swung 2x between rounds); the wall
time is reported beside it. With several threads, or on CUDA (synchronised), it is wall time.

    PYTHONPATH=. python benchmarks/token_reduction.py              # B-16, 224 px, CPU
    PYTHONPATH=. python benchmarks/token_reduction.py --quick      # tiny tower, seconds

Prints one JSON line per configuration, then a final JSON object:
{"speedup": {"random": {"0.5": x, "0.75": y}, "grid": {...}, "block": {...}}, ...}
with speedup = time per sample without masking / time per sample with masking.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

STRATEGIES = ("random", "grid", "block")


def _step(tower: torch.nn.Module, images: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
    """(wall, cpu) seconds for one forward + backward."""
    tower.zero_grad(set_to_none=True)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = tower(images, generator)  # (B, E)
    out.float().square().mean().backward()
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for all configs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny tower at 64 px, batch 4, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.variant, args.image_size, args.batch, args.reps = "tiny", 64, 4, 2

    from clipa_ds.models.variants import get_variant
    from clipa_ds.models.vision import VisionTower
    from clipa_ds.reduce.image import num_kept, validate_image_mask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    spec = get_variant(args.variant)
    grid = args.image_size // spec.patch_size
    ratios = [float(r) for r in args.ratios.split(",")]
    configs = [("none", 0.0)] + [(s, r) for s in STRATEGIES for r in ratios]
    for strategy, ratio in configs:
        validate_image_mask(strategy, ratio, grid, grid)

    tower = VisionTower(spec).to(device).train()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    walls: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    for round_ in range(args.reps + 1):
        for strategy, ratio in configs:
            tower.set_token_masking(strategy, ratio)
            wall, cpu = _step(tower, images, generator)
            if round_ > 0:  # round 0 warms up allocators and kernels
                times[(strategy, ratio)].append(cpu if clock == "cpu" else wall)
                walls[(strategy, ratio)].append(wall)

    per_sample = {c: statistics.median(t) / args.batch for c, t in times.items()}
    wall_per_sample = {c: statistics.median(t) / args.batch for c, t in walls.items()}
    base, base_wall = per_sample[("none", 0.0)], wall_per_sample[("none", 0.0)]
    for (strategy, ratio), t in per_sample.items():
        wall = wall_per_sample[(strategy, ratio)]
        row = {"strategy": strategy, "ratio": ratio, "tokens": num_kept(grid * grid, ratio),
               "ms_per_sample": round(t * 1e3, 3), "speedup": round(base / t, 3), "clock": clock,
               "wall_ms_per_sample": round(wall * 1e3, 3), "speedup_wall": round(base_wall / wall, 3),
               "rounds_ms": [round(s * 1e3 / args.batch, 3) for s in times[(strategy, ratio)]]}  # fmt: skip
        print(json.dumps(row))
    final = {
        "speedup": {s: {str(r): round(base / per_sample[(s, r)], 3) for r in ratios} for s in STRATEGIES},
        "ms_per_sample": {"none": round(base * 1e3, 3)}
        | {s: {str(r): round(per_sample[(s, r)] * 1e3, 3) for r in ratios} for s in STRATEGIES},
        "speedup_wall": {
            s: {str(r): round(base_wall / wall_per_sample[(s, r)], 3) for r in ratios} for s in STRATEGIES
        },
        "clock": clock, "variant": args.variant, "image_size": args.image_size, "tokens": grid * grid,
        "batch": args.batch, "reps": args.reps, "threads": args.threads, "device": str(device),
    }  # fmt: skip
    print(json.dumps(final))
    return final


if __name__ == "__main__":
    main()
