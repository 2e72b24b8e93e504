"""Training entry point: `python -m clipa_ds.train RECIPE [key=value ...]`.

Works as one process, under `torchrun` and under `deepspeed --module`. The loop only sequences
the components: start stage (checkpoint) -> step -> log -> save; each component owns its branches.
Re-running the same command with the same run.dir resumes where the run stopped.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from clipa_ds.checkpoint import CheckpointError, Preempted, RunCheckpoints, StageStart
from clipa_ds.checkpoint_state import seed_everything
from clipa_ds.checkpoint_weights import StateDict, load_into, weights_digest
from clipa_ds.config import Config, ConfigError, StageConfig, load_config
from clipa_ds.data.synthetic_source import materialize_train_urls
from clipa_ds.engine import BatchPlan, DistEnv, batch_plan, build_engine, init_distributed, set_lr
from clipa_ds.evaluate.in_loop import InLoopEvaluator
from clipa_ds.metrics import MetricsLogger
from clipa_ds.numerics import NonFiniteLossError, NonFiniteTracker
from clipa_ds.schedule import lr_at
from clipa_ds.step import StepStats, train_step


@dataclass
class StageResult:
    name: str
    samples: int
    wall_s: float
    final_loss: float
    weights: StateDict = field(repr=False, default_factory=dict)


def stage_tokens(cfg: Config, stage: StageConfig) -> tuple[int, int]:
    """(image tokens, text tokens) a training sample costs in this stage, after reduction."""
    from clipa_ds.models.variants import get_variant
    from clipa_ds.reduce.image import num_kept

    patch = get_variant(cfg.model.variant).patch_size
    grid = stage.image.size // patch
    return num_kept(grid * grid, stage.image.mask_ratio), stage.text.context_length


def build_stage_model(cfg: Config, stage: StageConfig, start: StageStart) -> torch.nn.Module:
    """The model for `stage`, holding the start weights (text positions interpolated to the stage)."""
    from clipa_ds.models.clip import build_clip
    from clipa_ds.siglip import siglip_model_kwargs

    model = build_clip(
        cfg.model.variant,
        stage.text.context_length,
        grad_checkpointing_vision=cfg.model.grad_checkpointing_vision,
        grad_checkpointing_text=cfg.model.grad_checkpointing_text,
        **siglip_model_kwargs(cfg.loss),
    )
    if start.weights is not None:
        # The sin-cos image table is recomputed per resolution by the tower; nothing to carry.
        load_into(model, start.weights, start.source)
    model.visual.set_token_masking(stage.image.mask, stage.image.mask_ratio)
    if cfg.model.compile:  # compile, then checkpoint (inside the towers), then ZeRO wrap (build_engine)
        from clipa_ds.compile import compile_blocks

        compile_blocks(model)
    return model


def full_fp32_state_dict(engine: Any) -> StateDict:
    """Consolidated fp32 weights from any ZeRO stage (a collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: StateDict = {}
    for name, param in engine.module.model.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (param.detach() if full is None else full).float().cpu().clone()
    return out


class LogWindow:
    """Sums step losses on the device; one host sync per log interval."""

    def __init__(self, cfg: Config, stage: StageConfig, plan: BatchPlan, dist_env: DistEnv, logger: MetricsLogger) -> None:
        from clipa_ds.flops import train_flops_per_sample
        from clipa_ds.models.variants import get_variant

        self.cfg, self.stage, self.plan, self.env, self.logger = cfg, stage, plan, dist_env, logger
        spec = get_variant(cfg.model.variant)
        self.image_tokens, self.text_tokens = stage_tokens(cfg, stage)
        # Patches are embedded before masking drops any; the blocks see only the kept tokens.
        patch_tokens = (stage.image.size // spec.patch_size) ** 2
        self.flops = train_flops_per_sample(spec, self.image_tokens, self.text_tokens, patch_tokens=patch_tokens).total
        self.peak = cfg.engine.peak_tflops * 1e12 * dist_env.world_size
        self.loss_sum = torch.zeros((), device=dist_env.device)
        self.last_loss = float("nan")
        self._reset()

    def _reset(self) -> None:
        self.loss_sum.zero_()
        self.start, self.wait, self.steps, self.skipped = time.perf_counter(), 0.0, 0, 0

    def add(self, stats: StepStats) -> None:
        self.loss_sum += stats.loss_sum
        self.wait += stats.data_wait_s
        self.steps += 1
        self.skipped += int(stats.skipped)

    def flush(self, step: int, engine: Any, loader: Any) -> None:
        torch.distributed.all_reduce(self.loss_sum)
        good = max(1, self.steps - self.skipped)
        self.last_loss = self.loss_sum.item() / (self.env.world_size * self.plan.grad_accum * good)
        elapsed = time.perf_counter() - self.start
        samples_per_s = self.steps * self.plan.global_batch / elapsed
        self.logger.log({
            "stage": self.stage.name,
            "step": step,
            "samples_seen": step * self.plan.global_batch,
            "loss": self.last_loss,
            "lr": engine.optimizer.param_groups[0]["lr"],
            "logit_scale": float(engine.module.last_logit_scale),
            "samples_per_s": samples_per_s,
            "mfu": samples_per_s * self.flops / self.peak,
            "data_wait_frac": self.wait / elapsed,
            "skipped_steps": self.skipped,
            "image_tokens": self.image_tokens,
            "text_tokens": self.text_tokens,
            **{f"data/{k}": v for k, v in loader.counters().items()},
        })
        eta = (self.stage.steps - step) * self.plan.global_batch / samples_per_s
        self.logger.progress(self.stage.name, step, self.stage.steps, self.last_loss, samples_per_s, eta)
        self._reset()


def guarded(batches: Any) -> Any:
    """Fetch batches without touching the global torch RNG: a DataLoader draws its base seed from
    the global RNG (which drives patch masking) when its iterator starts; a resumed run would
    start it after restoring the RNG and be one draw off. (Loader workers outlive a pre-emption
    SIGTERM on their own: see clipa_ds.data.workers.)"""
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        yield batch


def evaluate(engine: Any, evaluator: Any, stage: StageConfig, device: torch.device, logger: MetricsLogger, samples_seen: int) -> None:
    """In-loop evaluation (a collective). RNG-neutral: it must not shift the training RNG stream,
    or a run resumed from a checkpoint taken after an evaluation would diverge."""
    model = engine.module.model
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            results = evaluator.run(model, stage.image.eval_size or stage.image.size, device)
        finally:
            model.train()
    logger.log({"event": "eval", "stage": stage.name, "samples_seen": samples_seen, **results})


def arm_stall_dump(seconds: float) -> None:
    """(Re)start the countdown after which every thread's stack goes to stderr, every `seconds`
    until the next call: a rank stuck in a collective, a data worker or storage then shows where."""
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, repeat=True, exit=False)


class StageRunner:
    """One stage: built from its start point (fresh, hand-off or checkpoint), then the step loop."""

    def __init__(
        self, cfg: Config, stage_index: int, dist_env: DistEnv, logger: MetricsLogger, ckpt: RunCheckpoints, evaluator: Any
    ) -> None:
        from clipa_ds.data.pipeline import build_train_loader
        from clipa_ds.data.tokenizer import CaptionTokenizer
        from clipa_ds.task import CLIPTask

        self.cfg, self.index, self.env, self.logger, self.ckpt, self.evaluator = cfg, stage_index, dist_env, logger, ckpt, evaluator
        self.stage = stage = cfg.stages[stage_index]
        self.plan = batch_plan(stage.global_batch, stage.micro_batch, dist_env.world_size)
        start = ckpt.start_stage(stage_index)
        # Seeded before the model is built: a fresh stage's init is the same on every restart.
        seed_everything(cfg.run.seed + 1000 * stage_index + dist_env.rank)
        model = build_stage_model(cfg, stage, start)
        self.num_params = sum(p.numel() for p in model.parameters())
        self._log_start(model, start)
        self.engine = build_engine(CLIPTask(model, cfg.loss), start.engine, self.plan, stage.optim, dist_env.device)
        restored = ckpt.restore(self.engine, start) if start.resume is not None else None
        self.loader = build_train_loader(
            cfg.data, stage, stage_index=stage_index, rank=dist_env.rank, world_size=dist_env.world_size,
            seed=cfg.run.seed, micro_batch=self.plan.micro_batch, tokenizer=CaptionTokenizer(),
            state=restored.loader_state if restored else None,
        )
        self.batches = guarded(iter(self.loader))
        self.tracker = NonFiniteTracker(cfg.loss.max_nonfinite_steps_in_a_row)
        if restored and restored.nonfinite:
            self.tracker.load_state_dict(restored.nonfinite)
        self.first_step = restored.samples_seen // self.plan.global_batch if restored else 0
        self.trigger = ckpt.trigger(self.first_step * self.plan.global_batch)
        self.window = LogWindow(cfg, stage, self.plan, dist_env, logger)

    def _log_start(self, model: torch.nn.Module, start: StageStart) -> None:
        # The digest proves which weights a handed-over stage started from (tests compare it).
        digest = weights_digest(model.state_dict()) if start.weights is not None and self.env.rank == 0 else ""
        self.logger.log({
            "event": "stage_start", "stage": self.stage.name, "init": start.source, "init_digest": digest,
            "text_context_length": self.stage.text.context_length, "world_size": self.env.world_size,
        })

    def run(self) -> StageResult:
        start, stop_signal = time.perf_counter(), 0
        try:
            for step in range(self.first_step, self.stage.steps):
                arm_stall_dump(self.cfg.run.stall_dump_s)
                lr = self.train_one(step)
                stop_signal = self.after_step(step + 1, lr)
        finally:
            faulthandler.cancel_dump_traceback_later()
        wall_s = time.perf_counter() - start
        weights = full_fp32_state_dict(self.engine)
        samples = self.stage.steps * self.plan.global_batch
        info = {"samples": samples, "final_loss": self.window.last_loss, "wall_s": wall_s}
        self.ckpt.finish_stage(self.index, weights, info)
        self.loader.close()
        if stop_signal:
            raise Preempted(stop_signal)
        return StageResult(self.stage.name, samples, wall_s, self.window.last_loss, weights)

    def train_one(self, step: int) -> float:
        lr = lr_at(step * self.plan.global_batch, self.stage.optim, self.stage.samples)
        set_lr(self.engine, lr)
        stats = train_step(self.engine, self.batches, self.plan, self.env.device, loss=self.cfg.loss)
        self.tracker.update(stats.skipped)
        if self.tracker.exhausted:
            raise NonFiniteLossError(self.tracker.message(step + 1))
        self.window.add(stats)
        return lr

    def after_step(self, done: int, lr: float) -> int:
        """Log, evaluate, checkpoint after `done` steps; returns a stop signal to honour at the stage end."""
        samples, final = done * self.plan.global_batch, done == self.stage.steps
        if done % self.cfg.run.log_every_steps == 0 or final:
            self.window.flush(done, self.engine, self.loader)
        if self.evaluator.enabled and (final or self.evaluator.due(samples - self.plan.global_batch, samples)):
            evaluate(self.engine, self.evaluator, self.stage, self.env.device, self.logger, samples)
        decision = self.trigger.poll(samples, final_step=final)
        if decision.save:
            nonfinite = self.tracker.state_dict()
            self.ckpt.save(self.engine, self.loader, self.index, samples, lr=lr, nonfinite=nonfinite, num_params=self.num_params)
            self.trigger.saved(samples)
        if decision.stop_signal and not final:
            raise Preempted(decision.stop_signal)
        return decision.stop_signal


def run(cfg: Config) -> list[StageResult]:
    """Train every stage of `cfg` in order, resuming from run.dir and handing weights between stages."""
    dist_env = init_distributed()
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, train_urls=materialize_train_urls(cfg.data.train_urls, cfg.run.dir, dist_env.local_rank))
    )
    for stage in cfg.stages:  # fail on batch arithmetic before any work
        batch_plan(stage.global_batch, stage.micro_batch, dist_env.world_size)
    ckpt = RunCheckpoints(cfg, dist_env.rank, dist_env.world_size, dist_env.local_rank)
    results: list[StageResult] = []
    try:
        ckpt.prepare()
        logger = MetricsLogger(ckpt.layout.root, dist_env.rank, cfg.run.tensorboard)
        evaluator = InLoopEvaluator(cfg.eval, cfg.data, str(ckpt.layout.root), dist_env.local_rank)
        try:
            for stage_index in range(len(cfg.stages)):
                if ckpt.stage_done(stage_index):
                    info = ckpt.final_info(stage_index)
                    results.append(StageResult(info["stage"], info["samples"], info["wall_s"], info["final_loss"]))
                    continue
                results.append(StageRunner(cfg, stage_index, dist_env, logger, ckpt, evaluator).run())
        finally:
            logger.close()
        if results and not results[-1].weights:  # the run was already finished
            results[-1].weights = ckpt.final_weights(len(cfg.stages) - 1)
    finally:
        ckpt.close()
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
    except (CheckpointError, NonFiniteLossError) as err:
        print(f"clipa-ds: error: {err}", file=sys.stderr)
        return 1
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"clipa-ds: {stop}; run the same command again to resume", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
