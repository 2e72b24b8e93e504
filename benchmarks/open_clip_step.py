"""open_clip's CLIPA model and standard training step, for the side-by-side in throughput.py.

The model is open_clip's registered ViT-*-CLIPA config of the same variant (same widths, depths,
heads; GAP + final LayerNorm, bias-free projection, bidirectional text with last-token pooling)
built at the stage's image size, text length and patch dropout (= the stage's random masking
ratio). Variants open_clip does not register (tiny, B-16, L-16) get a config of the same CLIPA
form. Differences that stay: open_clip's vision tower has a class token (one more token) and
learned position embeddings; clipa-ds has neither. FLOPs are counted the same for both.

The step is open_clip_train's train_one_epoch with accum_freq=1: fp32 weights under bf16
autocast, torch AdamW (no weight decay on gains, biases, logit_scale), ClipLoss,
clip_grad_norm_, then the in-place logit_scale clamp. Nothing is downloaded: the model is built
from the config dict (no pretrained weights), and token ids are fed directly (no tokenizer).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from phases import PhaseClock

# open_clip's registered CLIPA configs for clipa-ds variants (same tower shapes).
OPEN_CLIP_CONFIGS = {"L-14": "ViT-L-14-CLIPA", "H-14": "ViT-H-14-CLIPA", "G-14": "ViT-bigG-14-CLIPA"}


def open_clip_config(variant: str, image_size: int, context_length: int, mask_ratio: float) -> tuple[str, dict[str, Any]]:
    """(where the config came from, open_clip model config) for a clipa-ds variant and stage."""
    import open_clip

    from clipa_ds.models.variants import get_variant

    spec = get_variant(variant)
    name = OPEN_CLIP_CONFIGS.get(variant)
    if name is not None:
        cfg = open_clip.get_model_config(name)
    else:  # the form of open_clip's ViT-*-CLIPA json files
        name = "CLIPA-form config built from clipa-ds's variant (open_clip registers none)"
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
    cfg["vision_cfg"].update(image_size=image_size, patch_dropout=mask_ratio)
    cfg["text_cfg"].update(context_length=context_length)
    cfg["text_cfg"].pop("hf_tokenizer_name", None)  # ids are fed directly: no tokenizer
    cfg["text_cfg"].pop("tokenizer_kwargs", None)
    return name, cfg


class OpenClipRunner:
    """One open_clip optimizer step per `step()` on cycling on-device batches."""

    name = "open_clip"

    def __init__(
        self,
        model_cfg: dict[str, Any],
        optim: Any,
        batches: list[dict[str, torch.Tensor]],
        device: torch.device,
        *,
        bf16: bool,
        grad_checkpointing: bool,
        breakdown: bool = False,
    ) -> None:
        import open_clip
        from open_clip.loss import ClipLoss

        self.model = open_clip.model.CLIP(**model_cfg).to(device).train()
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # open_clip_train/main.py: gains, biases and logit_scale are not decayed.
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        no_decay = [p for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
        no_decay_ids = {id(p) for p in no_decay}
        self.optimizer = torch.optim.AdamW(
            [
                {"params": no_decay, "weight_decay": 0.0},
                {"params": [p for _, p in named if id(p) not in no_decay_ids], "weight_decay": optim.weight_decay},
            ],
            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        )
        self.loss = ClipLoss(cache_labels=True)
        self.grad_clip = optim.grad_clip
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        from clipa_ds.task import IMAGE_MEAN, IMAGE_STD

        # Made once (open_clip's loader normalises on the host; here both systems normalise the
        # same uint8 batch on the device, so neither pays a host-side transform).
        self.mean = (torch.tensor(IMAGE_MEAN) * 255.0).view(1, 3, 1, 1).to(device)
        self.std = (torch.tensor(IMAGE_STD) * 255.0).view(1, 3, 1, 1).to(device)
        self.batches = itertools.cycle(batches)
        self.loss_sum = torch.zeros((), device=device)
        self.samples_per_step = batches[0]["image"].shape[0]
        self.micro_steps = 1
        self.clock = PhaseClock(device) if breakdown else None

    def step(self) -> None:
        run = self.clock.run if self.clock is not None else lambda _phase, fn, *a: fn(*a)
        loss = run("forward", self._forward, next(self.batches))
        run("backward", loss.backward)
        run("step", self._update)
        self.loss_sum += loss.detach()

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = (batch["image"].float() - self.mean) / self.std  # (B, 3, S, S) fp32, as open_clip's loader gives
        with self.autocast:
            image_features, text_features, logit_scale = self.model(images, batch["text"])
            return self.loss(image_features, text_features, logit_scale)

    def _update(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, norm_type=2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def take_phase_times(self) -> dict[str, float]:
        """Seconds per phase since the last call (after a device synchronise); {} if not timed."""
        return self.clock.take() if self.clock is not None else {}
