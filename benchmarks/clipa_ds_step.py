"""clipa-ds's training step for throughput.py: the workload of a recipe stage, synthetic
on-device batches, and the step exactly as the training loop runs it (per-step LR, train_step on
the DeepSpeed engine of clipa_ds.engine.build_engine), with optional per-phase timing.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from phases import EngineClock, PhaseClock

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

    def __init__(
        self, cfg: Any, stage: Any, w: Workload, device: torch.device,
        *, compile_blocks: bool, grad_accum: int = 1, breakdown: bool = False,
    ) -> None:
        from clipa_ds.engine import batch_plan, build_engine
        from clipa_ds.models.clip import build_clip
        from clipa_ds.siglip import siglip_model_kwargs
        from clipa_ds.task import CLIPTask

        model = build_clip(
            w.variant, w.context_length,
            grad_checkpointing_vision=cfg.model.grad_checkpointing_vision,
            grad_checkpointing_text=cfg.model.grad_checkpointing_text,
            **siglip_model_kwargs(cfg.loss),
        )
        model.visual.set_token_masking(w.mask, w.mask_ratio)
        if compile_blocks:  # compile, then checkpoint (inside the towers), then ZeRO wrap
            from clipa_ds.compile import compile_blocks as compile_fn

            compile_fn(model)
        self.compiled = compile_blocks
        self.plan = batch_plan(w.micro_batch * grad_accum, w.micro_batch, 1)
        self.samples_per_step, self.micro_steps = self.plan.global_batch, self.plan.grad_accum
        self.engine = build_engine(CLIPTask(model, cfg.loss), cfg.engine, self.plan, stage.optim, device)
        # --breakdown: train_step drives an EngineClock in place of the engine (timed calls).
        self.clock = PhaseClock(device) if breakdown else None
        self.stage, self.device, self.loss_cfg = stage, device, cfg.loss
        self.batches = itertools.cycle(synthetic_batches(w, model.spec.vocab_size, device))
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0

    def step(self) -> None:
        from clipa_ds.engine import set_lr
        from clipa_ds.schedule import lr_at
        from clipa_ds.step import train_step

        set_lr(self.engine, lr_at(self.steps * self.plan.global_batch, self.stage.optim, self.stage.samples))
        engine = EngineClock(self.engine, self.clock) if self.clock is not None else self.engine
        self.loss_sum += train_step(engine, self.batches, self.plan, self.device, loss=self.loss_cfg).loss_sum
        self.steps += 1

    def take_phase_times(self) -> dict[str, float]:
        """Seconds per phase since the last call (after a device synchronise); {} if not timed."""
        return self.clock.take() if self.clock is not None else {}
