"""Typed run configuration: one dataclass per component, strict loading, dotted overrides.

A recipe is plain data (a dict). `load_config` applies `a.b=c` overrides to that dict, then
builds the dataclasses with `from_dict`, which rejects unknown keys and values of the wrong type
with a message that names the key and what is allowed. Each dataclass validates its own values
in `__post_init__`, so a bad run stops before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(key: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = tuple(allowed)
    _check(value in allowed, f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    log_every_steps: int = 10
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.dir), "run.dir is empty; set run.dir=PATH")
        _check(self.log_every_steps >= 1, f"run.log_every_steps={self.log_every_steps} must be >= 1")


@dataclass(kw_only=True)
class ModelConfig:
    variant: str = "tiny"
    grad_checkpointing_vision: bool = False
    grad_checkpointing_text: bool = False

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


@dataclass(kw_only=True)
class LossConfig:
    kind: str = "clip"

    def __post_init__(self) -> None:
        _check_choice("loss.kind", self.kind, ("clip",))


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
class Config:
    recipe: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: list[StageConfig] = field(default_factory=list)

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, keys: typing.Iterable[str] | None = None) -> str:
        """Stable hash of the config (or of selected dotted sections)."""
        data = self.to_dict()
        if keys is not None:
            data = {k: _get_dotted(data, k) for k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def _get_dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{key} must be a mapping of fields of {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        _check(isinstance(value, list), f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        _check(isinstance(value, bool), f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value.replace("_", "")) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be an integer") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    where = f"{prefix}." if prefix else ""
    if unknown:
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; allowed keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{where}{name}") for name, value in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key {where}{missing[0]}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}: {err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", parsed c). Values are parsed as YAML scalars/lists (1e-3, true, [1,2])."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example run.dir=/tmp/run)")
    key, raw = text.split("=", 1)
    key = key.strip()
    _check(bool(key), f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted; stage lists accept an index or a stage name) in the recipe dict."""
    parts = key.split(".")
    node: Any = data
    path = []
    for part in parts[:-1]:
        path.append(part)
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(path))
        else:
            _check(isinstance(node, dict), f"cannot set {key}: {'.'.join(path[:-1])} is not a section")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        index = _list_index(node, last, key)
        node[index] = value
    else:
        node[last] = value


def _list_index(items: list[Any], part: str, key: str) -> int:
    if part.isdigit():
        index = int(part)
        _check(index < len(items), f"{key}: index {index} is out of range (there are {len(items)})")
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    _check(part in names, f"{key}: no stage named {part!r}; stages are {names}")
    return names.index(part)


def _list_item(items: list[Any], part: str, key: str) -> Any:
    return items[_list_index(items, part, key)]


def load_config(recipe: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Recipe name or YAML path, plus `a.b=c` overrides -> validated Config."""
    from clipa_ds.recipes import load_recipe

    data = load_recipe(recipe)
    data.setdefault("recipe", recipe)
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
    return from_dict(Config, data)
