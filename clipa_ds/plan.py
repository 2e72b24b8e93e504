"""`clipa-ds plan RECIPE [key=value ...]`: what a run costs before it starts.

Per stage and in total: image/text tokens after reduction, forward and training GFLOPs per
sample split by tower (clipa_ds.flops: 2 x multiply-adds of matmuls and attention, training =
3 x forward), exaFLOPs, GPU-hours and cost at a GPU type / MFU / price, the parameter count, and
the per-GPU memory for the run's ZeRO stage and micro-batch (clipa_ds.memory), with a warning and
a micro-batch that fits when it does not.

GPU-hours = total training FLOPs / (peak dense bf16 FLOP/s x MFU) / 3600. The batch arithmetic is
clipa_ds.engine.batch_plan, the same function training uses, so a bad global batch / world size /
micro-batch fails here with the message training would give.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from clipa_ds.config import Config, ConfigError, StageConfig, load_config


@dataclass(frozen=True, kw_only=True)
class GpuType:
    memory_gib: float  # usable, as nvidia-smi reports it
    peak_tflops: float  # dense bf16 tensor-core peak
    price_per_hour: float  # illustrative default; pass --price-per-gpu-hour for yours


GPUS: dict[str, GpuType] = {
    # CLIPA-v2's README prices an 8x A100-80GB hour at $12,247 / 7,776 h = $1.575 per GPU.
    "a100": GpuType(memory_gib=80.0, peak_tflops=312.0, price_per_hour=1.575),
    "a100-40gb": GpuType(memory_gib=40.0, peak_tflops=312.0, price_per_hour=1.2),
    "h100": GpuType(memory_gib=79.6, peak_tflops=989.0, price_per_hour=3.0),
    "h200": GpuType(memory_gib=139.8, peak_tflops=989.0, price_per_hour=3.5),
    "b200": GpuType(memory_gib=178.0, peak_tflops=2250.0, price_per_hour=5.0),
    "l40s": GpuType(memory_gib=44.4, peak_tflops=362.0, price_per_hour=1.0),
}
DEFAULT_GPU = "h100"
DEFAULT_WORLD_SIZE = 8
DEFAULT_MFU = 0.4


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def stage_plan(cfg: Config, stage: StageConfig, *, world_size: int, gpu: GpuType, mfu: float, price: float) -> dict[str, Any]:
    """Everything `plan` reports for one stage, JSON-ready."""
    from clipa_ds.engine import batch_plan, build_ds_config
    from clipa_ds.flops import image_forward_flops, text_forward_flops
    from clipa_ds.memory import ZeroSetup, estimate_memory
    from clipa_ds.models.variants import analytic_param_count, get_variant
    from clipa_ds.reduce.image import num_kept, validate_image_mask

    spec = get_variant(cfg.model.variant)
    where = f"stage {stage.name!r}"
    grid = stage.image.size // spec.patch_size
    try:
        validate_image_mask(stage.image.mask, stage.image.mask_ratio, grid, grid)
        plan = batch_plan(stage.global_batch, stage.micro_batch, world_size)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None

    patch_tokens = grid * grid
    image_tokens = num_kept(patch_tokens, stage.image.mask_ratio)
    text_tokens = stage.text.context_length
    fwd_image = image_forward_flops(spec, image_tokens, patch_tokens=patch_tokens)
    fwd_text = text_forward_flops(spec, text_tokens)
    train_flops = 3.0 * (fwd_image + fwd_text)
    total_flops = train_flops * stage.samples
    gpu_hours = total_flops / (gpu.peak_tflops * 1e12 * mfu) / 3600.0

    params = analytic_param_count(spec, text_tokens)
    try:
        ds_config = build_ds_config(cfg.engine, plan, stage.optim)
    except OSError as err:
        raise ConfigError(f"engine.ds_config_overrides: cannot read it ({err})") from None
    zero = ZeroSetup.from_ds_config(ds_config, world_size)
    negatives = plan.micro_batch * world_size  # the loss sees one micro-batch from every rank

    def memory_for(micro_batch: int) -> Any:
        return estimate_memory(
            spec, params=params, zero=zero, micro_batch=micro_batch, image_tokens=image_tokens,
            patch_tokens=patch_tokens, text_tokens=text_tokens, negatives=micro_batch * world_size,
            checkpoint_vision=cfg.model.grad_checkpointing_vision, checkpoint_text=cfg.model.grad_checkpointing_text,
        )

    memory = memory_for(plan.micro_batch)
    fits = memory.total / 2**30 <= gpu.memory_gib
    suggestion = None if fits else _largest_fitting_micro_batch(plan.global_batch // world_size, gpu, memory_for)
    return {
        "name": stage.name,
        "samples": stage.samples,
        "steps": stage.steps,
        "global_batch": plan.global_batch,
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "negatives_per_loss": negatives,
        "image_size": stage.image.size,
        "patch_tokens": patch_tokens,
        "image_tokens": image_tokens,
        "image_mask": stage.image.mask,
        "image_mask_ratio": stage.image.mask_ratio,
        "text_tokens": text_tokens,
        "text_strategy": stage.text.strategy,
        "lr": stage.optim.lr,
        "warmup_samples": stage.optim.warmup_samples,
        "forward_gflops_per_sample": {
            "image": fwd_image / 1e9, "text": fwd_text / 1e9, "total": (fwd_image + fwd_text) / 1e9,
        },
        "train_gflops_per_sample": train_flops / 1e9,
        "train_gflops_per_sample_image": 3.0 * fwd_image / 1e9,
        "train_gflops_per_sample_text": 3.0 * fwd_text / 1e9,
        "exaflops": total_flops / 1e18,
        "gpu_hours": gpu_hours,
        "wall_hours": gpu_hours / world_size,
        "cost": gpu_hours * price,
        "params": params,
        "memory_gib": memory.gib(),
        "fits": fits,
        "suggested_micro_batch": suggestion,
    }


def _largest_fitting_micro_batch(per_rank: int, gpu: GpuType, memory_for: Any) -> int | None:
    """Largest divisor of the per-rank batch whose estimate fits (then accumulation = rest)."""
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        if memory_for(micro).total / 2**30 <= gpu.memory_gib:
            return micro
    return None


def build_plan(
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    world_size: int = DEFAULT_WORLD_SIZE,
    gpu: str = DEFAULT_GPU,
    mfu: float = DEFAULT_MFU,
    price_per_gpu_hour: float | None = None,
) -> dict[str, Any]:
    """The whole report as a dict (the --json output). Raises ConfigError on bad input."""
    _check(world_size >= 1, f"--world-size={world_size} must be >= 1")
    _check(gpu in GPUS, f"--gpu={gpu!r} is not known; choose one of: {', '.join(GPUS)}")
    _check(0.0 < mfu <= 1.0, f"--mfu={mfu} must be in (0, 1], e.g. 0.4")
    gpu_type = GPUS[gpu]
    price = gpu_type.price_per_hour if price_per_gpu_hour is None else price_per_gpu_hour
    _check(price >= 0.0, f"--price-per-gpu-hour={price} must be >= 0")

    cfg = load_config(recipe, overrides)
    stages = [stage_plan(cfg, s, world_size=world_size, gpu=gpu_type, mfu=mfu, price=price) for s in cfg.stages]
    from clipa_ds.models.variants import get_variant, text_param_count, vision_param_count

    spec = get_variant(cfg.model.variant)
    final_context = cfg.stages[-1].text.context_length
    warnings = [
        f"stage {s['name']!r}: ~{s['memory_gib']['total']:.1f} GiB per GPU exceeds the {gpu_type.memory_gib:g} GiB "
        f"of one {gpu}; " + (
            f"set stages.{s['name']}.micro_batch={s['suggested_micro_batch']} (gradient accumulation; "
            f"fewer negatives per loss)" if s["suggested_micro_batch"] else "no micro-batch fits"
        ) + ", raise --world-size, or use a higher engine.zero_stage"
        for s in stages if not s["fits"]
    ]
    total_hours = sum(s["gpu_hours"] for s in stages)
    return {
        "recipe": cfg.recipe,
        "model": cfg.model.variant,
        "params": stages[-1]["params"],
        "params_vision": vision_param_count(spec),
        "params_text": text_param_count(spec, final_context),
        "zero_stage": cfg.engine.zero_stage,
        "bf16": cfg.engine.bf16,
        "world_size": world_size,
        "gpu": gpu,
        "gpu_memory_gib": gpu_type.memory_gib,
        "gpu_peak_tflops": gpu_type.peak_tflops,
        "mfu": mfu,
        "price_per_gpu_hour": price,
        "stages": stages,
        "total": {
            "samples": sum(s["samples"] for s in stages),
            "exaflops": sum(s["exaflops"] for s in stages),
            "gpu_hours": total_hours,
            "wall_hours": total_hours / world_size,
            "cost": sum(s["cost"] for s in stages),
        },
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- text output


def _count(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.4g}{suffix}"
    return f"{n:g}"


def format_plan(report: dict[str, Any]) -> str:
    lines = [
        f"recipe {report['recipe']}: model {report['model']}, {_count(report['params'])} parameters "
        f"(vision {_count(report['params_vision'])}, text {_count(report['params_text'])}), "
        f"ZeRO-{report['zero_stage']}, {'bf16' if report['bf16'] else 'fp32'}",
        f"{report['world_size']} x {report['gpu']} ({report['gpu_memory_gib']:g} GiB, "
        f"{report['gpu_peak_tflops']:g} TFLOP/s bf16), MFU {report['mfu']:g}, "
        f"${report['price_per_gpu_hour']:g} per GPU-hour",
        "",
    ]
    header = ("stage", "samples", "batch", "micro x acc", "img px", "img tok", "txt tok",
              "fwd GF i/t", "train GF", "EFLOP", "GPU-h", "cost $", "GiB/GPU")
    rows = [header]
    for s in report["stages"]:
        mask = f" ({s['image_mask']} {s['image_mask_ratio']:.0%})" if s["image_mask"] != "none" else ""
        fwd = s["forward_gflops_per_sample"]
        rows.append((
            s["name"], _count(s["samples"]), str(s["global_batch"]), f"{s['micro_batch']} x {s['grad_accum']}",
            str(s["image_size"]), f"{s['image_tokens']}/{s['patch_tokens']}{mask}",
            f"{s['text_tokens']} {s['text_strategy']}", f"{fwd['image']:.1f}/{fwd['text']:.1f}",
            f"{s['train_gflops_per_sample']:.1f}", f"{s['exaflops']:.0f}", f"{s['gpu_hours']:,.0f}",
            f"{s['cost']:,.0f}", f"{s['memory_gib']['total']:.1f}" + ("" if s["fits"] else " !"),
        ))
    t = report["total"]
    rows.append(("total", _count(t["samples"]), "", "", "", "", "", "", "", f"{t['exaflops']:.0f}",
                 f"{t['gpu_hours']:,.0f}", f"{t['cost']:,.0f}", ""))
    lines += _table(rows)
    lines += ["", f"wall-clock: {t['wall_hours']:,.1f} h on {report['world_size']} GPUs", ""]
    mem_rows = [("memory GiB/GPU", "weights", "grads", "optim", "buffers", "activ.", "overhead", "total")]
    for s in report["stages"]:
        m = s["memory_gib"]
        mem_rows.append((s["name"], *(f"{m[k]:.2f}" for k in
                         ("weights", "gradients", "optimizer", "buffers", "activations", "overhead", "total"))))
    lines += _table(mem_rows)
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipa-ds plan", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe name or YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `clipa-ds train`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--world-size", type=int, default=DEFAULT_WORLD_SIZE, help="number of GPUs (default 8)")
    p.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU type: {', '.join(GPUS)} (default {DEFAULT_GPU})")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilisation (default {DEFAULT_MFU})")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="USD per GPU-hour (default per GPU type)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = build_plan(
            args.recipe, args.overrides, world_size=args.world_size, gpu=args.gpu, mfu=args.mfu,
            price_per_gpu_hour=args.price_per_gpu_hour,
        )
    except ConfigError as err:
        print(f"clipa-ds plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
