"""Training-step throughput and MFU of clipa-ds (and open_clip side by side), printed as JSON.

Runs the real step: CLIPTask (on-device uint8 normalisation, CLIPA model, the config's loss) in
the DeepSpeed engine of `clipa_ds.engine.build_engine` (AdamW groups, ZeRO stage, bf16 with fp32
gradient accumulation, clipping), driven by `clipa_ds.step.train_step` as the training loop
drives it, with the LR set per step. Batches are synthetic and already on the device (uint8
images, random token ids): the loader is not measured. World size 1.

    PYTHONPATH=. python benchmarks/throughput.py --recipe tiny --stage pretrain --micro-batch 32
    PYTHONPATH=. python benchmarks/throughput.py --recipe clipa-v2-h14-84 --stage pretrain \
        --micro-batch 512 --system both --compile model.grad_checkpointing_vision=false

`--system` takes labels, measured in one process with alternating timed windows (`--rounds`),
so load on a shared machine hits all of them alike: `clipa-ds`, `clipa-ds+compile` (blocks
compiled, for an A/B of compilation), `open_clip` (see open_clip_step.py: open_clip's CLIPA
model and standard recipe, nothing downloaded), `both` = clipa-ds,open_clip. Every pair gets a
samples/s ratio; `ratio_clipa_ds_to_open_clip` is the headline one.

Timing and MFU (device syncs only at window ends; CUDA events per step on GPU; CPU-time MFU
against a measured matmul peak on CPU) are described in benchmarks/RESULTS.md.
`--check-syncs` runs one more step per system under host_syncs.HostSyncCounter and reports every
host-device synchronisation with the code that issued it, and the aten ops dispatched (an eager
kernel-launch count). `--breakdown` times forward / backward / optimizer step (phases.py).
The systems live in clipa_ds_step.py and open_clip_step.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # clipa_ds, and the sibling benchmark modules
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from clipa_ds_step import ClipaDsRunner, Workload, make_workload, synthetic_batches  # noqa: E402
from host_syncs import HostSyncCounter  # noqa: E402

SYSTEMS = ("clipa-ds", "open_clip")
# Labels --system accepts: a system, or clipa-ds with its blocks compiled (for A/B in one run).
LABELS = ("clipa-ds", "clipa-ds+compile", "open_clip")

# ----------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(runner: Any, steps: int, device: torch.device) -> tuple[float, list[float], float]:
    """(wall seconds for `steps` steps, per-step seconds, process CPU seconds), synchronising
    only at the window's ends. On a shared CPU machine the process CPU time is the steadier clock
    (other programs delay this one's wall time, not its CPU time)."""
    synchronize(device)
    cpu_start = time.process_time()
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        start = time.perf_counter()
        events[0].record()
        for i in range(steps):
            runner.step()
            events[i + 1].record()
        synchronize(device)
        wall = time.perf_counter() - start
        per_step = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
        return wall, per_step, time.process_time() - cpu_start
    marks = [time.perf_counter()]
    for _ in range(steps):
        runner.step()
        marks.append(time.perf_counter())
    return marks[-1] - marks[0], [b - a for a, b in zip(marks, marks[1:])], time.process_time() - cpu_start


def measured_matmul_tflops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> tuple[float, float]:
    """Best dense (n x n) @ (n x n) rate on this CPU in TFLOP/s: (per wall second, per second of
    process CPU time). The CPU 'peak' for MFU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best_wall = best_cpu = float("inf")
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        a @ b
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return 2 * n**3 / best_wall / 1e12, 2 * n**3 / max(best_cpu, 1e-9) / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def build_runner(name: str, cfg: Any, stage: Any, w: Workload, device: torch.device, args: argparse.Namespace) -> Any:
    if name.startswith("clipa-ds"):
        # model.compile is the config flag train.py honours (getattr: absent in older configs).
        compiled = args.compile or name == "clipa-ds+compile" or bool(getattr(cfg.model, "compile", False))
        return ClipaDsRunner(
            cfg, stage, w, device, compile_blocks=compiled, grad_accum=args.grad_accum, breakdown=args.breakdown
        )
    from open_clip_step import OpenClipRunner, open_clip_config

    from clipa_ds.config import ConfigError

    if cfg.loss.kind != "clip":
        raise ConfigError(f"loss.kind={cfg.loss.kind!r}: the open_clip side by side runs the clip loss only")
    source, model_cfg = open_clip_config(w.variant, w.image_size, w.context_length, w.mask_ratio)
    runner = OpenClipRunner(
        model_cfg, stage.optim, synthetic_batches(w, model_cfg["text_cfg"]["vocab_size"], device),
        device, bf16=cfg.engine.bf16,
        grad_checkpointing=cfg.model.grad_checkpointing_vision or cfg.model.grad_checkpointing_text,
        breakdown=args.breakdown,
    )
    runner.config_source = source
    return runner


@dataclasses.dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    step_s: list[float] = dataclasses.field(default_factory=list)
    resident_bytes: int = 0  # CUDA: weights, grads, optimizer state after warm-up
    peak_bytes: int = 0  # CUDA: resident + the largest transient of a timed window
    phase_s: dict[str, float] = dataclasses.field(default_factory=dict)  # --breakdown


def measure(runners: dict[str, Any], args: argparse.Namespace, device: torch.device, timings: dict[str, Timing]) -> None:
    """Alternate timed windows over the systems, so machine load hits all of them alike."""
    cuda = device.type == "cuda"
    for runner in runners.values():  # drop the warm-up's phase marks
        getattr(runner, "take_phase_times", dict)()
    for _ in range(args.rounds):
        for name, runner in runners.items():
            timing = timings[name]
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            wall, per_step, cpu = time_window(runner, args.steps, device)
            timing.wall_s += wall
            timing.cpu_s += cpu
            timing.step_s += per_step
            for phase, seconds in getattr(runner, "take_phase_times", dict)().items():
                timing.phase_s[phase] = timing.phase_s.get(phase, 0.0) + seconds
            if cuda:  # the other system's resident state is in `base`: count only this one's
                peak = torch.cuda.max_memory_allocated(device) - base + timing.resident_bytes
                timing.peak_bytes = max(timing.peak_bytes, peak)


def count_host_syncs(runner: Any, device: torch.device) -> dict[str, Any]:
    """Host syncs of one optimizer step: by call site, the device syncs, and who issued them."""
    counter = HostSyncCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":  # CUDA's own detector as a second opinion
            torch.cuda.set_sync_debug_mode("warn")
        try:
            # Compiled regions cannot run under a dispatch mode: run them eagerly (same Python
            # code; a sync inside a compiled block would be a graph break, which fullgraph forbids).
            with torch.compiler.set_stance("force_eager"), counter:
                runner.step()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    out: dict[str, Any] = {
        "device_syncs": sum(counter.device_syncs().values()),
        "by_owner": counter.by_owner(),
        "sites": dict(counter.sites),
        "aten_compute_ops": counter.compute_ops,
    }
    if device.type == "cuda":
        out["cuda_sync_debug_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from clipa_ds.config import ConfigError, load_config
    from clipa_ds.engine import init_distributed

    dist_env = init_distributed()  # world of one; picks DeepSpeed's CPU accelerator without a GPU
    device = dist_env.device
    import deepspeed  # after init_distributed chose the accelerator

    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, args.overrides)
    stages = {s.name: s for s in cfg.stages}
    stage_name = args.stage or cfg.stages[0].name
    if stage_name not in stages:
        raise ConfigError(f"--stage={stage_name!r} is not a stage of {args.recipe}; stages are {list(stages)}")
    stage = stages[stage_name]
    if args.bf16 is not None:
        cfg.engine = dataclasses.replace(cfg.engine, bf16=args.bf16)
    bf16 = cfg.engine.bf16
    w = make_workload(cfg, stage, args.micro_batch)
    cpu_clock = device.type == "cpu" and not args.peak_tflops  # MFU per CPU-second, see doc
    if args.peak_tflops:
        peak_tflops = peak_wall = args.peak_tflops
        peak_source = "--peak-tflops"
    elif device.type == "cuda":
        peak_tflops = peak_wall = cfg.engine.peak_tflops
        peak_source = "engine.peak_tflops"
    else:  # the faster of fp32 and (when the run is bf16) bf16: CPUs without bf16 units emulate it
        rates = [measured_matmul_tflops(dtype) for dtype in ((torch.float32, torch.bfloat16) if bf16 else (torch.float32,))]
        peak_wall, peak_tflops = max(r[0] for r in rates), max(r[1] for r in rates)
        peak_source = f"best {'fp32/bf16' if bf16 else 'fp32'} 1024^3 matmul per CPU-second, this CPU"

    runners: dict[str, Any] = {}
    timings: dict[str, Timing] = {}
    for name in args.labels:
        torch.manual_seed(cfg.run.seed)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        runners[name] = build_runner(name, cfg, stage, w, device, args)
        for _ in range(args.warmup):  # compilation, allocator and optimizer state happen here
            runners[name].step()
        synchronize(device)
        after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        timings[name] = Timing(resident_bytes=after - before)
    measure(runners, args, device, timings)
    syncs = {name: count_host_syncs(r, device) for name, r in runners.items()} if args.check_syncs else {}

    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    results: dict[str, dict[str, Any]] = {}
    for name, runner in runners.items():
        t = timings[name]
        timed_samples = args.rounds * args.steps * runner.samples_per_step
        samples_per_s = timed_samples / t.wall_s
        record: dict[str, Any] = {
            "system": "clipa-ds" if name.startswith("clipa-ds") else name,
            "label": name,
            "recipe": args.recipe,
            "stage": stage.name,
            "device": device.type,
            "device_name": device_name(device),
            "micro_batch": w.micro_batch,
            "grad_accum": runner.micro_steps,
            "samples_per_s": samples_per_s,
            "samples_per_cpu_s": timed_samples / t.cpu_s,
            "step_time_s": {
                "median": statistics.median(t.step_s),
                "p90": percentile(t.step_s, 0.9),
                "mean": t.wall_s / (args.rounds * args.steps),
            },
            "mfu": (timed_samples / t.cpu_s if cpu_clock else samples_per_s) * w.flops_per_sample / (peak_tflops * 1e12),
            "mfu_wall": samples_per_s * w.flops_per_sample / (peak_wall * 1e12),
            "tflops_per_s": samples_per_s * w.flops_per_sample / 1e12,
            "flops_per_sample": w.flops_per_sample,
            "peak_tflops": peak_tflops,
            "peak_tflops_source": peak_source,
            "peak_memory_bytes": t.peak_bytes if device.type == "cuda" else rss_peak,
            "peak_memory_kind": (
                "torch.cuda.max_memory_allocated, this system only" if device.type == "cuda"
                else "process peak RSS (getrusage), all systems of this process"
            ),
            # Mean loss of every step run (finite: the step computed something real).
            "mean_loss": runner.loss_sum.item() / ((args.warmup + args.rounds * args.steps) * runner.micro_steps),
            "workload": dataclasses.asdict(w),
            "settings": {
                "bf16": bf16,
                "zero_stage": cfg.engine.zero_stage if name.startswith("clipa-ds") else None,
                "compile_blocks": bool(getattr(runner, "compiled", False)),
                "loss": cfg.loss.kind,
                "grad_checkpointing_vision": cfg.model.grad_checkpointing_vision,
                "grad_checkpointing_text": cfg.model.grad_checkpointing_text,
                "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                "threads": torch.get_num_threads(), "overrides": list(args.overrides),
            },
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/throughput.py " + shlex.join(args.argv),
        }
        if name == "open_clip":
            import open_clip

            record.update(open_clip=open_clip.__version__, open_clip_config=runner.config_source)
        if name in syncs:
            record["host_syncs_per_step"] = syncs[name]
        if t.phase_s:  # engine calls per optimizer step; "other" = the rest of the step
            phases = {k: v / (args.rounds * args.steps) for k, v in t.phase_s.items()}
            phases["other"] = record["step_time_s"]["mean"] - sum(phases.values())
            record["phase_time_s_per_step"] = phases
        results[name] = record
    ratios = pair_ratios(results)
    for record in results.values():
        record.update(ratios)
    return results


def pair_ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """samples/s ratios of every pair (a listed before b) measured in this run: {"a/b": x}."""
    if len(results) < 2:
        return {}
    labels = list(results)
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    out: dict[str, Any] = {
        "ratios_samples_per_s": {f"{a}/{b}": results[a]["samples_per_s"] / results[b]["samples_per_s"] for a, b in pairs},
        "ratios_samples_per_cpu_s": {
            f"{a}/{b}": results[a]["samples_per_cpu_s"] / results[b]["samples_per_cpu_s"] for a, b in pairs
        },
    }
    if "clipa-ds" in results and "open_clip" in results:
        out["ratio_clipa_ds_to_open_clip"] = out["ratios_samples_per_s"]["clipa-ds/open_clip"]
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="recipe name or YAML path (clipa_ds.recipes)")
    parser.add_argument("--stage", default="", help="stage name (default: the first stage)")
    parser.add_argument("--micro-batch", type=int, required=True, help="per-device micro-batch (global batch = micro-batch x --grad-accum)")
    parser.add_argument(
        "--system", default="clipa-ds",
        help=f"one of {', '.join(LABELS)}, 'both' (= clipa-ds,open_clip), or a comma-separated list",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per system (compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
    parser.add_argument("--rounds", type=int, default=1, help="timed windows per system, alternated")
    parser.add_argument("--grad-accum", type=int, default=1, help="clipa-ds micro-batches per optimizer step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    bf16 = parser.add_mutually_exclusive_group()
    bf16.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="force bf16 on")
    bf16.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (default: engine.bf16)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default: see doc)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--check-syncs", action="store_true", help="count host syncs in one more step")
    parser.add_argument("--breakdown", action="store_true", help="time forward / backward / optimizer step")
    parser.add_argument("--out", default="", help="write the JSON here (several systems: NAME.<label>.json each)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = parser.parse_args(argv)
    args.argv = argv
    if min(args.micro_batch, args.steps, args.rounds, args.grad_accum) < 1 or args.warmup < 0:
        parser.error("--micro-batch, --steps, --rounds and --grad-accum must be >= 1, --warmup >= 0")
    args.labels = ["clipa-ds", "open_clip"] if args.system == "both" else args.system.split(",")
    unknown = [label for label in args.labels if label not in LABELS]
    if unknown or len(set(args.labels)) != len(args.labels):
        parser.error(f"--system={args.system!r}: use distinct labels from {', '.join(LABELS)}, or 'both'")
    if args.grad_accum != 1 and "open_clip" in args.labels:
        # open_clip's --accum-freq re-runs the forward over cached features: another algorithm.
        parser.error("--grad-accum applies to --system clipa-ds only (open_clip steps per micro-batch)")
    return args


def write_out(path: str, results: dict[str, dict[str, Any]]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if len(results) == 1:
        target.write_text(json.dumps(next(iter(results.values())), indent=2) + "\n")
        return
    for label, record in results.items():
        target.with_suffix(f".{label}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from clipa_ds.config import ConfigError

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        results = run(args)
    except ConfigError as err:
        print(f"throughput: configuration error: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_out(args.out, results)
    if len(results) > 1:
        for record in results.values():
            print(json.dumps(record))
    summary = dict(next(iter(results.values()))) if len(results) == 1 else {"systems": results, **pair_ratios(results)}
    print(json.dumps(summary))  # last line: one JSON object
    return 0


if __name__ == "__main__":
    sys.exit(main())
