"""Typed run configuration: one dataclass per component.

A recipe is plain data (a dict). `load_config` applies `a.b=c` overrides to that dict, then
builds these dataclasses strictly (clipa_ds.typed_config). Each dataclass validates its own
values in `__post_init__`, so a bad run stops before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from clipa_ds.typed_config import ConfigError, apply_override, check, check_choice, from_dict, get_dotted, parse_override

__all__ = ["Config", "ConfigError", "load_config"]

_check = check
_check_choice = check_choice


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    log_every_steps: int = 10
    tensorboard: bool = True
    # A step slower than this dumps every thread's stack to stderr (repeating), so a hung
    # collective or data worker names itself in the job log; 0 = off. Diagnostic only: it never kills.
    stall_dump_s: float = 900.0

    def __post_init__(self) -> None:
        _check(bool(self.dir), "run.dir is empty; set run.dir=PATH")
        _check(self.log_every_steps >= 1, f"run.log_every_steps={self.log_every_steps} must be >= 1")
        _check(self.stall_dump_s >= 0, f"run.stall_dump_s={self.stall_dump_s} must be >= 0 (0 = off)")


@dataclass(kw_only=True)
class ModelConfig:
    variant: str = "tiny"
    grad_checkpointing_vision: bool = False
    grad_checkpointing_text: bool = False
    compile: bool = False  # torch.compile each transformer block (clipa_ds.compile)

    def __post_init__(self) -> None:
        from clipa_ds.models.variants import VARIANTS

        _check_choice("model.variant", self.variant, VARIANTS)


@dataclass(kw_only=True)
class S3Config:
    # Credentials are deliberately NOT config keys: they come from AWS_ACCESS_KEY_ID /
    # AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), a profile, or botocore's default chain, so
    # they never reach config dumps, fingerprints, checkpoints or logs.
    endpoint_url: str = ""  # "" -> $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS itself
    region: str = ""  # "" -> $AWS_REGION / $AWS_DEFAULT_REGION
    profile: str = ""  # "" -> $AWS_PROFILE / default chain
    addressing_style: str = "auto"  # auto | path | virtual
    anonymous: bool = False  # unsigned requests (public buckets)

    def __post_init__(self) -> None:
        _check_choice("data.s3.addressing_style", self.addressing_style, ("auto", "path", "virtual"))
        _check(
            self.endpoint_url == "" or self.endpoint_url.startswith(("http://", "https://")),
            f"data.s3.endpoint_url={self.endpoint_url!r} must start with http:// or https://",
        )


@dataclass(kw_only=True)
class DataConfig:
    # Shard URLs (local, s3://, gs://, http(s)://) with brace patterns; "::" separates parts.
    train_urls: str = ""
    # One weight per "::"-separated source to mix them by weight; empty: all parts form one source.
    source_weights: list[float] = field(default_factory=list)
    workers: int = 2
    shuffle_buffer: int = 1000  # samples per shuffle block (also the resume re-read cost)
    max_image_pixels: int = 50_000_000  # decompression-bomb cap; larger images are skipped+counted
    min_crop_scale: float = 0.9  # random-resized-crop area range [min_crop_scale, 1]
    fast_decode: bool = True  # DCT-scaled JPEG decode (PIL draft) before the resize
    resample: bool = False  # draw shards with replacement (deterministic) instead of epochs
    index: str = ""  # sizes.json with samples per shard ("" = none); build: clipa-ds index URLS
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5  # tries per shard read before the shard is skipped and counted
    retry_backoff_s: float = 0.5  # first backoff; doubles per attempt, with jitter
    retry_backoff_max_s: float = 30.0
    max_failed_shard_frac: float = 0.05  # stop when more shards than this share fail
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        _check(self.workers >= 0, f"data.workers={self.workers} must be >= 0")
        _check(self.shuffle_buffer >= 1, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1")
        _check(self.max_image_pixels > 0, f"data.max_image_pixels={self.max_image_pixels} must be > 0")
        _check(0.0 < self.min_crop_scale <= 1.0, f"data.min_crop_scale={self.min_crop_scale} must be in (0, 1]")
        _check(
            all(w > 0 for w in self.source_weights),
            f"data.source_weights={self.source_weights} must all be > 0",
        )
        sources = len([p for p in self.train_urls.split("::") if p.strip()])
        _check(
            not self.source_weights or len(self.source_weights) == sources,
            f"data.source_weights has {len(self.source_weights)} weights for {sources} '::'-separated "
            "sources in data.train_urls; give one weight per source, or none",
        )
        _check(self.connect_timeout_s > 0, f"data.connect_timeout_s={self.connect_timeout_s} must be > 0")
        _check(self.read_timeout_s > 0, f"data.read_timeout_s={self.read_timeout_s} must be > 0")
        _check(self.max_attempts >= 1, f"data.max_attempts={self.max_attempts} must be >= 1")
        _check(
            0 <= self.retry_backoff_s <= self.retry_backoff_max_s,
            f"data.retry_backoff_s={self.retry_backoff_s} must be in [0, data.retry_backoff_max_s]",
        )
        _check(
            0.0 <= self.max_failed_shard_frac <= 1.0,
            f"data.max_failed_shard_frac={self.max_failed_shard_frac} must be in [0, 1]",
        )


@dataclass(kw_only=True)
class EngineConfig:
    zero_stage: int = 1
    bf16: bool = True
    # Peak dense FLOP/s of one accelerator, for MFU (H100 SXM bf16: 989 TFLOP/s).
    peak_tflops: float = 989.0
    # Extra DeepSpeed JSON merged over ds_configs/zero{stage}.json (file path or "").
    ds_config_overrides: str = ""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"engine.zero_stage={self.zero_stage}; choose 0, 1, 2 or 3")
        _check(self.peak_tflops > 0, f"engine.peak_tflops={self.peak_tflops} must be > 0")


LOSS_KINDS = ("clip", "siglip")
ACCUMULATION_MODES = ("gradient_cache", "per_micro_batch")


@dataclass(kw_only=True)
class LossConfig:
    kind: str = "clip"  # clip (softmax InfoNCE) | siglip (pairwise sigmoid, learnable bias)
    # How micro-batches of one optimizer step share negatives (only matters when grad_accum > 1):
    # gradient_cache: the loss sees the whole global batch (the recipe's batch = negatives),
    #   at about one extra forward pass; per_micro_batch: DeepSpeed's plain accumulation, each
    #   micro-batch x world_size is its own contrastive batch (fewer negatives, a different loss).
    accumulation: str = "gradient_cache"
    # Global batches with a non-finite loss on any rank are skipped on all ranks; this many in a
    # row stop the run (after the last good checkpoint).
    max_nonfinite_steps_in_a_row: int = 5
    # SigLIP initial temperature exp(t') and bias (the paper: t' = log 10, b = -10).
    siglip_temperature_init: float = 10.0
    siglip_bias_init: float = -10.0

    def __post_init__(self) -> None:
        _check_choice("loss.kind", self.kind, LOSS_KINDS)
        _check_choice("loss.accumulation", self.accumulation, ACCUMULATION_MODES)
        _check(
            self.max_nonfinite_steps_in_a_row >= 1,
            f"loss.max_nonfinite_steps_in_a_row={self.max_nonfinite_steps_in_a_row} must be >= 1",
        )
        _check(
            0.0 < self.siglip_temperature_init <= 100.0,
            f"loss.siglip_temperature_init={self.siglip_temperature_init} must be in (0, 100] "
            "(the model clamps the temperature at 100)",
        )


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation inside the training loop (every N samples and at the end of each stage)."""

    # Labelled shards (a "cls" per sample) or an ImageFolder root; "synthetic" generates the tiny
    # recipe's held-out shapes; "" turns zero-shot evaluation off.
    zeroshot_data: str = ""
    classnames: str = ""  # file with one class name per line; "" = ImageNet-1k (or synthetic)
    templates: str = ""  # file with one prompt template per line ("{}" = class name)
    retrieval_data: str = ""  # captioned shards for image-text retrieval; "" = off
    every_samples: int = 0  # 0: only at the end of each stage
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(self.every_samples >= 0, f"eval.every_samples={self.every_samples} must be >= 0")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")


@dataclass(kw_only=True)
class ImageStageConfig:
    size: int = 224
    mask: str = "none"  # image token reduction inside the tower (training only)
    mask_ratio: float = 0.0
    eval_size: int = 0  # 0: same as size

    def __post_init__(self) -> None:
        from clipa_ds.reduce.image import IMAGE_MASKS

        _check(self.size > 0, f"image.size={self.size} must be > 0")
        _check_choice("image.mask", self.mask, IMAGE_MASKS)
        _check(0.0 <= self.mask_ratio < 1.0, f"image.mask_ratio={self.mask_ratio} must be in [0, 1)")
        _check(self.eval_size >= 0, f"image.eval_size={self.eval_size} must be >= 0")


@dataclass(kw_only=True)
class TextStageConfig:
    context_length: int = 32
    strategy: str = "truncate"

    def __post_init__(self) -> None:
        from clipa_ds.reduce.text import TEXT_STRATEGIES

        _check(self.context_length >= 2, f"text.context_length={self.context_length} must be >= 2")
        _check_choice("text.strategy", self.strategy, TEXT_STRATEGIES)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_samples: int = 0
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-6
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be in [0, lr]")
        _check(self.warmup_samples >= 0, f"optim.warmup_samples={self.warmup_samples} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")


@dataclass(kw_only=True)
class StageConfig:
    name: str
    samples: int
    global_batch: int
    # Per-GPU micro-batch; 0 derives it as global_batch / world_size (no accumulation).
    micro_batch: int = 0
    image: ImageStageConfig = field(default_factory=ImageStageConfig)
    text: TextStageConfig = field(default_factory=TextStageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        _check(bool(self.name), "every stage needs a name")
        _check(self.samples > 0, f"{where}: samples={self.samples} must be > 0")
        _check(self.global_batch > 0, f"{where}: global_batch={self.global_batch} must be > 0")
        _check(self.micro_batch >= 0, f"{where}: micro_batch={self.micro_batch} must be >= 0")
        _check(
            self.optim.warmup_samples <= self.samples,
            f"{where}: optim.warmup_samples={self.optim.warmup_samples} is longer than the stage "
            f"({self.samples} samples); shorten the warm-up or lengthen the stage",
        )

    @property
    def steps(self) -> int:
        """Optimizer steps in this stage (the last partial batch is dropped)."""
        return self.samples // self.global_batch


@dataclass(kw_only=True)
class CheckpointConfig:
    """When to checkpoint, how many to keep, where a run starts from (see clipa_ds/checkpoint.py)."""

    every_samples: int = 0  # global samples between checkpoints inside a stage; 0 = off
    every_minutes: float = 0.0  # wall-clock minutes between checkpoints (rank 0's clock); 0 = off
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted; 0 = keep all
    # The first stage starts from these weights instead of a random init: a .safetensors file,
    # a clipa-ds run directory (its last finished stage, else its latest checkpoint), or an
    # open_clip export directory of clipa-ds. Text positions are interpolated when lengths differ.
    init_from: str = ""
    # fsspec URL (s3://bucket/run) that every finished checkpoint and stage is copied to; a new
    # machine with an empty run.dir resumes from there. Set automatically when run.dir is remote.
    sync_to: str = ""
    # Local staging directory when run.dir is an object-store URL ("" = a directory under $TMPDIR).
    local_dir: str = ""

    def __post_init__(self) -> None:
        _check(self.every_samples >= 0, f"checkpoint.every_samples={self.every_samples} must be >= 0 (0 = off)")
        _check(self.every_minutes >= 0, f"checkpoint.every_minutes={self.every_minutes} must be >= 0 (0 = off)")
        _check(self.keep_last >= 0, f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 = keep all)")


@dataclass(kw_only=True)
class Config:
    recipe: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: list[StageConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(len(self.stages) > 0, "the config has no stages; a recipe must list at least one")
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), f"stage names must be unique, got {names}")
        from clipa_ds.models.variants import get_variant

        patch = get_variant(self.model.variant).patch_size
        for stage in self.stages:
            for key, size in (("image.size", stage.image.size), ("image.eval_size", stage.image.eval_size)):
                _check(
                    size % patch == 0,
                    f"stage {stage.name!r}: {key}={size} is not a multiple of the patch size {patch} "
                    f"of model {self.model.variant!r}; use e.g. {max(patch, size // patch * patch)}",
                )
            from clipa_ds.reduce.image import validate_image_mask

            grid = stage.image.size // patch
            try:
                validate_image_mask(stage.image.mask, stage.image.mask_ratio, grid, grid)
            except ConfigError as err:
                raise ConfigError(f"stage {stage.name!r}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, keys: typing.Iterable[str] | None = None) -> str:
        """Stable hash of the config (or of selected dotted sections)."""
        data = self.to_dict()
        if keys is not None:
            data = {k: get_dotted(data, k) for k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_config(recipe: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Recipe name or YAML path, plus `a.b=c` overrides -> validated Config."""
    from clipa_ds.recipes import load_recipe

    data = load_recipe(recipe)
    data.setdefault("recipe", recipe)
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
    return from_dict(Config, data)
