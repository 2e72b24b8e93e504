"""Training-step throughput and MFU of clipa-ds (and open_clip side by side), printed as JSON.

Runs the real step: CLIPTask (on-device uint8 normalisation, CLIPA model, clip loss) in the
DeepSpeed engine from `clipa_ds.engine.build_engine` (AdamW groups, ZeRO stage, bf16 with fp32
gradient accumulation, clipping), driven by `clipa_ds.step.train_step` as the training loop
drives it. Batches are synthetic and already on the device (uint8 images, random token ids),
so the loader is not measured. World size 1.

    PYTHONPATH=. python benchmarks/throughput.py --recipe tiny --stage pretrain --micro-batch 32
    PYTHONPATH=. python benchmarks/throughput.py --recipe clipa-v2-h14-84 --stage pretrain \
        --micro-batch 512 --system both --compile model.grad_checkpointing_vision=false

`--system open_clip` runs open_clip's CLIPA model (the registered ViT-*-CLIPA config of the same
variant, built at the stage's image size / text length / patch dropout = mask ratio; a config
of the same CLIPA form for variants open_clip lacks, e.g. tiny) with open_clip's standard recipe:
fp32 weights under bf16 autocast, torch AdamW, open_clip.loss.ClipLoss, clip_grad_norm_ and the
logit-scale clamp. Nothing is downloaded: no weights, no tokenizer (token ids are fed directly).
`--system both` builds both and alternates timed windows (`--rounds`), so load on a shared
machine hits both alike; it reports the ratio clipa-ds / open_clip in samples/s.

Timing: after `--warmup` steps, each window of `--steps` steps is timed by the host clock with
a device synchronise only at the window's ends; per-step times come from CUDA events on GPU
(no sync inside the window) and from the host clock on CPU. MFU = samples/s x analytic training
FLOPs per sample (clipa_ds.flops; image tokens after masking, patch embedding on all patches) /
peak FLOP/s: engine.peak_tflops on GPU, on CPU a measured dense matmul (reported as such).
`--check-syncs` runs one more step per system under a host-sync detector and reports every
synchronising op with the code that issued it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SYSTEMS = ("clipa-ds", "open_clip")
# open_clip's registered CLIPA configs for our variants (same widths/depths/heads).
OPEN_CLIP_CONFIGS = {"L-14": "ViT-L-14-CLIPA", "H-14": "ViT-H-14-CLIPA", "G-14": "ViT-bigG-14-CLIPA"}

# ----------------------------------------------------------------------------- host syncs

# aten ops that make the host wait for the device (a scalar read, or an output whose shape
# depends on the data).
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
    "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
})


def _call_site() -> str:
    """The innermost caller outside torch and this file, as 'package/file.py:line'."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/" in path or path.endswith("benchmarks/throughput.py"):
            continue
        for marker in ("/site-packages/", "/clipa_ds/"):
            if marker in path:
                path = ("clipa_ds/" if marker == "/clipa_ds/" else "") + path.split(marker, 1)[1]
                break
        return f"{path}:{frame.lineno}"
    return "<torch>"


class HostSyncCounter(TorchDispatchMode):
    """Counts host-device synchronisations by call site, on any device.

    Sees every aten op (forward and backward): scalar reads (.item(), bool(t), float(t)),
    data-dependent shapes (nonzero, masked_select, unique) and device-to-host copies. tolist()
    and numpy() read memory without an aten op, so they are wrapped too. A CPU run therefore
    finds the same syncs a GPU run would make.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in SYNC_OPS:
            self.sites[f"{name.removeprefix('aten::')} @ {_call_site()}"] += 1
        elif name in ("aten::_to_copy", "aten::copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            source = args[1] if name == "aten::copy_" else args[0]
            if isinstance(source, torch.Tensor) and source.device.type != "cpu":
                self.sites[f"device_to_host @ {_call_site()}"] += 1
        return out

    def __enter__(self) -> "HostSyncCounter":
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(tensor: torch.Tensor, *a: Any, _m: str = method, _f: Any = original, **k: Any) -> Any:
                self.sites[f"{_m} @ {_call_site()}"] += 1
                return _f(tensor, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


# ----------------------------------------------------------------------------- workload


@dataclasses.dataclass(frozen=True)
class Workload:
    variant: str
    image_size: int
    mask: str
    mask_ratio: float
    context_length: int
    micro_batch: int
    patch_tokens: int  # patches embedded per image
    image_tokens: int  # tokens the image blocks see, after masking
    flops_per_sample: float  # training FLOPs (3 x forward), clipa_ds.flops


def make_workload(cfg: Any, stage: Any, micro_batch: int) -> Workload:
    from clipa_ds.flops import image_tokens_for, train_flops_per_sample
    from clipa_ds.models.variants import get_variant

    spec = get_variant(cfg.model.variant)
    grid = stage.image.size // spec.patch_size
    kept = image_tokens_for(spec, stage.image.size, stage.image.mask_ratio)
    flops = train_flops_per_sample(spec, kept, stage.text.context_length, patch_tokens=grid * grid).total
    return Workload(
        variant=cfg.model.variant, image_size=stage.image.size, mask=stage.image.mask,
        mask_ratio=stage.image.mask_ratio, context_length=stage.text.context_length,
        micro_batch=micro_batch, patch_tokens=grid * grid, image_tokens=kept, flops_per_sample=flops,
    )


def synthetic_batches(w: Workload, vocab_size: int, device: torch.device, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """`count` distinct on-device batches, as the loader delivers them (uint8 images, long ids)."""
    gen = torch.Generator().manual_seed(0)
    size = (w.micro_batch, 3, w.image_size, w.image_size)
    return [
        {
            "image": torch.randint(0, 256, size, generator=gen, dtype=torch.uint8).to(device),  # (B, 3, S, S)
            "text": torch.randint(1, vocab_size, (w.micro_batch, w.context_length), generator=gen).to(device),  # (B, L)
        }
        for _ in range(count)
    ]


# ----------------------------------------------------------------------------- systems


class ClipaDsRunner:
    """One optimizer step = clipa_ds.step.train_step on the DeepSpeed engine (as train.py does)."""

    name = "clipa-ds"

    def __init__(self, cfg: Any, stage: Any, w: Workload, device: torch.device, *, compile_blocks: bool) -> None:
        from clipa_ds.engine import batch_plan, build_engine
        from clipa_ds.models.clip import build_clip
        from clipa_ds.task import CLIPTask

        model = build_clip(
            w.variant, w.context_length,
            grad_checkpointing_vision=cfg.model.grad_checkpointing_vision,
            grad_checkpointing_text=cfg.model.grad_checkpointing_text,
        )
        model.visual.set_token_masking(w.mask, w.mask_ratio)
        if compile_blocks:  # compile, then checkpoint (inside the towers), then ZeRO wrap
            from clipa_ds.compile import compile_blocks as compile_fn

            compile_fn(model)
        self.plan = batch_plan(w.micro_batch, w.micro_batch, 1)
        self.engine = build_engine(CLIPTask(model), cfg.engine, self.plan, stage.optim, device)
        self.stage, self.device = stage, device
        self.batches = itertools.cycle(synthetic_batches(w, model.spec.vocab_size, device))
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0

    def step(self) -> None:
        from clipa_ds.engine import set_lr
        from clipa_ds.schedule import lr_at
        from clipa_ds.step import train_step

        set_lr(self.engine, lr_at(self.steps * self.plan.global_batch, self.stage.optim, self.stage.samples))
        self.loss_sum += train_step(self.engine, self.batches, self.plan, self.device).loss_sum
        self.steps += 1


def open_clip_config(w: Workload) -> tuple[str, dict[str, Any]]:
    """(source, model config) of open_clip's CLIPA model for the workload's variant and stage."""
    import open_clip

    from clipa_ds.models.variants import get_variant

    spec = get_variant(w.variant)
    name = OPEN_CLIP_CONFIGS.get(w.variant)
    if name is not None:
        cfg = open_clip.get_model_config(name)
    else:  # same form as open_clip's ViT-*-CLIPA json files
        name = "custom CLIPA-form config"
        cfg = {
            "embed_dim": spec.embed_dim,
            "vision_cfg": {
                "layers": spec.vision.depth, "width": spec.vision.width,
                "head_width": spec.vision.width // spec.vision.heads,
                "mlp_ratio": spec.vision.mlp_dim / spec.vision.width, "patch_size": spec.patch_size,
                "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True,
            },
            "text_cfg": {
                "vocab_size": spec.vocab_size, "width": spec.text.width, "heads": spec.text.heads,
                "layers": spec.text.depth, "mlp_ratio": spec.text.mlp_dim / spec.text.width,
                "pool_type": "last", "no_causal_mask": True,
            },
        }
    cfg["vision_cfg"].update(image_size=w.image_size, patch_dropout=w.mask_ratio)
    cfg["text_cfg"].update(context_length=w.context_length)
    cfg["text_cfg"].pop("hf_tokenizer_name", None)  # ids are fed directly: no tokenizer
    cfg["text_cfg"].pop("tokenizer_kwargs", None)
    return name, cfg


class OpenClipRunner:
    """open_clip's training step (open_clip_train.train.train_one_epoch, accum_freq=1)."""

    name = "open_clip"

    def __init__(self, cfg: Any, stage: Any, w: Workload, device: torch.device, *, bf16: bool) -> None:
        import open_clip
        from open_clip.loss import ClipLoss

        from clipa_ds.task import normalize_images

        self.config_source, model_cfg = open_clip_config(w)
        self.model = open_clip.model.CLIP(**model_cfg).to(device).train()
        if cfg.model.grad_checkpointing_vision or cfg.model.grad_checkpointing_text:
            self.model.set_grad_checkpointing(True)
        # open_clip main.py: no weight decay on gains, biases and logit_scale.
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        optim = stage.optim
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": optim.weight_decay},
            ],
            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        )
        self.loss = ClipLoss(cache_labels=True)
        self.grad_clip = optim.grad_clip
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.normalize = normalize_images
        self.batches = itertools.cycle(synthetic_batches(w, model_cfg["text_cfg"]["vocab_size"], device))
        self.loss_sum = torch.zeros((), device=device)

    def step(self) -> None:
        import math

        batch = next(self.batches)
        images = self.normalize(batch["image"])  # (B, 3, S, S) fp32, as open_clip's loader gives
        with self.autocast:
            image_features, text_features, logit_scale = self.model(images, batch["text"])
            loss = self.loss(image_features, text_features, logit_scale)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, norm_type=2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        self.loss_sum += loss.detach()


# ----------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(runner: Any, steps: int, device: torch.device) -> tuple[float, list[float]]:
    """(wall seconds for `steps` steps, per-step seconds), synchronising only at the ends."""
    synchronize(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        start = time.perf_counter()
        events[0].record()
        for i in range(steps):
            runner.step()
            events[i + 1].record()
        synchronize(device)
        wall = time.perf_counter() - start
        return wall, [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    marks = [time.perf_counter()]
    for _ in range(steps):
        runner.step()
        marks.append(time.perf_counter())
    return marks[-1] - marks[0], [b - a for a, b in zip(marks, marks[1:])]


def measured_matmul_tflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """Best dense (n x n) @ (n x n) rate on this CPU, in TFLOP/s: the CPU 'peak' for MFU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from clipa_ds.config import ConfigError, load_config
    from clipa_ds.engine import init_distributed

    dist_env = init_distributed()  # world of one; picks DeepSpeed's CPU accelerator without a GPU
    device = dist_env.device
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, args.overrides)
    stages = {s.name: s for s in cfg.stages}
    stage_name = args.stage or cfg.stages[0].name
    if stage_name not in stages:
        raise ConfigError(f"--stage={stage_name!r} is not a stage of {args.recipe}; stages are {list(stages)}")
    stage = stages[stage_name]
    bf16 = cfg.engine.bf16 if args.bf16 is None else args.bf16
    cfg.engine = dataclasses.replace(cfg.engine, bf16=bf16)
    w = make_workload(cfg, stage, args.micro_batch)
    if args.peak_tflops:
        peak_tflops, peak_source = args.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        peak_tflops, peak_source = cfg.engine.peak_tflops, "engine.peak_tflops"
    else:
        peak_tflops = measured_matmul_tflops(torch.bfloat16 if bf16 else torch.float32)
        peak_source = f"measured {'bf16' if bf16 else 'fp32'} 1024^3 matmul on this CPU"

    systems = SYSTEMS if args.system == "both" else (args.system,)
    runners: dict[str, Any] = {}
    resident: dict[str, int] = {}
    for name in systems:
        torch.manual_seed(cfg.run.seed)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        runner = (
            ClipaDsRunner(cfg, stage, w, device, compile_blocks=args.compile)
            if name == "clipa-ds" else OpenClipRunner(cfg, stage, w, device, bf16=bf16)
        )
        for _ in range(args.warmup):  # compilation, allocator and optimizer state happen here
            runner.step()
        synchronize(device)
        resident[name] = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else 0
        runners[name] = runner

    walls = {n: 0.0 for n in systems}
    times: dict[str, list[float]] = {n: [] for n in systems}
    peaks = {n: 0 for n in systems}
    for _ in range(args.rounds):  # alternate windows: machine load hits every system alike
        for name, runner in runners.items():
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            wall, per_step = time_window(runner, args.steps, device)
            walls[name] += wall
            times[name] += per_step
            if device.type == "cuda":  # this system's resident state + its transient peak
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - base + resident[name])

    syncs: dict[str, dict[str, int]] = {}
    if args.check_syncs:
        for name, runner in runners.items():
            syncs[name] = count_host_syncs(runner, device)

    import deepspeed

    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    results = {}
    for name, runner in runners.items():
        samples_per_s = args.rounds * args.steps * w.micro_batch / walls[name]
        loss = runner.loss_sum.item() / max(1, args.warmup + args.rounds * args.steps)
        record: dict[str, Any] = {
            "system": name,
            "recipe": args.recipe,
            "stage": stage.name,
            "device": device.type,
            "device_name": device_name(device),
            "micro_batch": w.micro_batch,
            "samples_per_s": samples_per_s,
            "step_time_s": {
                "median": statistics.median(times[name]),
                "p90": percentile(times[name], 0.9),
                "mean": walls[name] / (args.rounds * args.steps),
            },
            "mfu": samples_per_s * w.flops_per_sample / (peak_tflops * 1e12),
            "tflops_per_s": samples_per_s * w.flops_per_sample / 1e12,
            "flops_per_sample": w.flops_per_sample,
            "peak_tflops": peak_tflops,
            "peak_tflops_source": peak_source,
            "peak_memory_bytes": peaks[name] if device.type == "cuda" else rss_peak,
            "peak_memory_kind": (
                "torch.cuda.max_memory_allocated, this system only" if device.type == "cuda"
                else "process peak RSS (getrusage), all systems in this process"
            ),
            "mean_loss": loss,
            "workload": dataclasses.asdict(w),
            "settings": {
                "bf16": bf16,
                "zero_stage": cfg.engine.zero_stage if name == "clipa-ds" else None,
                "compile_blocks": args.compile if name == "clipa-ds" else False,
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

            record["open_clip"] = open_clip.__version__
            record["open_clip_config"] = runner.config_source
        if name in syncs:
            record["host_syncs_per_step"] = syncs[name]
        results[name] = record
    if len(results) == 2:
        ratio = results["clipa-ds"]["samples_per_s"] / results["open_clip"]["samples_per_s"]
        for record in results.values():
            record["ratio_clipa_ds_to_open_clip"] = ratio
    return results


def count_host_syncs(runner: Any, device: torch.device) -> dict[str, int]:
    """Host syncs of one optimizer step, by op and call site."""
    counter = HostSyncCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":  # CUDA's own detector as a second opinion
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                runner.step()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    out = dict(counter.sites)
    cuda_warnings = [w for w in caught if "synchronizing" in str(w.message)]
    if device.type == "cuda":
        out["cuda_sync_debug_warnings"] = len(cuda_warnings)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="recipe name or YAML path (clipa_ds.recipes)")
    parser.add_argument("--stage", default="", help="stage name (default: the first stage)")
    parser.add_argument("--micro-batch", type=int, required=True, help="per-device batch = global batch")
    parser.add_argument("--system", choices=(*SYSTEMS, "both"), default="clipa-ds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per system (compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
    parser.add_argument("--rounds", type=int, default=1, help="timed windows per system, alternated")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    bf16 = parser.add_mutually_exclusive_group()
    bf16.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="force bf16 on")
    bf16.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (default: engine.bf16)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default: see doc)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--check-syncs", action="store_true", help="count host syncs in one more step")
    parser.add_argument("--out", default="", help="write the JSON here (both: NAME.<system>.json)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.micro_batch < 1 or args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--micro-batch, --steps and --rounds must be >= 1, --warmup >= 0")
    return args


def write_out(path: str, results: dict[str, dict[str, Any]]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if len(results) == 1:
        target.write_text(json.dumps(next(iter(results.values())), indent=2) + "\n")
        return
    for name, record in results.items():
        target.with_suffix(f".{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    results = run(args)
    if args.out:
        write_out(args.out, results)
    for record in results.values():
        print(json.dumps(record))
    summary: dict[str, Any] = dict(next(iter(results.values()))) if len(results) == 1 else {
        "systems": results,
        "ratio_clipa_ds_to_open_clip": results["clipa-ds"]["ratio_clipa_ds_to_open_clip"],
    }
    print(json.dumps(summary))  # last line: one JSON object
    return 0


if __name__ == "__main__":
    sys.exit(main())
