"""Per-GPU memory estimate for one training stage under DeepSpeed ZeRO with bf16.

A planning number, not a measurement: it says whether a (ZeRO stage, micro-batch) choice is in
the right range before a cluster is booked. Terms (bytes, N = data-parallel world size):

- weights:     bf16 parameters, 2 B/param (4 without bf16); ZeRO-3 partitions them (/N).
- gradients:   fp32 accumulation (`data_types.grad_accum_dtype: fp32`), 4 B/param;
               ZeRO-2 and ZeRO-3 partition them (/N).
- optimizer:   fp32 master copy + Adam m and v, 12 B/param; ZeRO-1..3 partition them (/N);
               0 on the GPU when `offload_optimizer.device` is cpu.
- buffers:     ZeRO communication buckets. DeepSpeed documents that overlap_comm uses 4.5x the
               reduce/allgather bucket sizes (2 B per element each); ZeRO-3 adds the prefetch
               bucket.
- activations: per transformer layer, per token, what the backward pass keeps, in bf16, with
               fused (flash) attention that stores no n x n score matrix (Korthikanti et al.
               2022, "Reducing Activation Recomputation", Sec. 4.1, without the 5 a n^2 term):
               attention 11 d + two LayerNorm inputs 4 d + MLP (3 d + 4 m) = 18 d + 4 m bytes
               (34 d at m = 4 d). With activation checkpointing only each layer's input (2 d)
               is kept, plus one layer's full set while it is recomputed. The patch embedding of
               all patches (before masking) and the contrastive logits (micro_batch x negatives,
               fp32, logits + softmax + gradient = 3 copies) are added.
- overhead:    CUDA context, NCCL and allocator fragmentation: a flat 2.5 GiB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from clipa_ds.models.variants import ModelSpec, TowerSpec

GIB = 2**30
OVERHEAD_BYTES = 2.5 * GIB
OVERLAP_COMM_FACTOR = 4.5  # DeepSpeed docs: overlap_comm uses 4.5x the bucket sizes


@dataclass(frozen=True, kw_only=True)
class ZeroSetup:
    """What the memory estimate needs from the DeepSpeed config."""

    stage: int
    world_size: int
    bf16: bool = True
    offload_optimizer: bool = False
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000

    @classmethod
    def from_ds_config(cls, ds_config: dict, world_size: int) -> ZeroSetup:
        zero = ds_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer") or {}
        return cls(
            stage=int(zero.get("stage", 0)),
            world_size=world_size,
            bf16=bool(ds_config.get("bf16", {}).get("enabled", False)),
            offload_optimizer=offload.get("device", "none") in ("cpu", "nvme"),
            overlap_comm=bool(zero.get("overlap_comm", False)),
            reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
            allgather_bucket_size=int(zero.get("allgather_bucket_size", 500_000_000)),
            prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        )


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per GPU, by kind."""

    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations + self.overhead

    def gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 2) for k, v in asdict(self).items()}
        out["total"] = round(self.total / GIB, 2)
        return out


def layer_activation_bytes(tower: TowerSpec, tokens: int, *, bytes_per_value: int = 2) -> float:
    """Activations one transformer layer keeps for backward, per sample (see module doc)."""
    per_token = (18 * tower.width + 4 * tower.mlp_dim) * bytes_per_value / 2
    return tokens * per_token


def tower_activation_bytes(tower: TowerSpec, tokens: int, *, checkpointing: bool, bytes_per_value: int = 2) -> float:
    """Activations of a whole tower per sample, with or without activation checkpointing."""
    full_layer = layer_activation_bytes(tower, tokens, bytes_per_value=bytes_per_value)
    if not checkpointing:
        return tower.depth * full_layer
    layer_inputs = tower.depth * tokens * tower.width * bytes_per_value
    return layer_inputs + full_layer  # one layer is live again while it is recomputed


def estimate_memory(
    spec: ModelSpec,
    *,
    params: int,
    zero: ZeroSetup,
    micro_batch: int,
    image_tokens: int,
    patch_tokens: int,
    text_tokens: int,
    negatives: int,
    checkpoint_vision: bool,
    checkpoint_text: bool,
) -> MemoryEstimate:
    """Per-GPU memory of one training step of a stage (see module doc for every term)."""
    n = zero.world_size
    value_bytes = 2 if zero.bf16 else 4
    weights = params * value_bytes / (n if zero.stage >= 3 else 1)
    gradients = params * 4 / (n if zero.stage >= 2 else 1)
    optimizer = 0.0 if zero.offload_optimizer else params * 12 / (n if zero.stage >= 1 else 1)

    buffers = 0.0
    if zero.stage >= 1 and zero.overlap_comm:
        buckets = zero.reduce_bucket_size + (zero.allgather_bucket_size if zero.stage < 3 else 0)
        buffers = OVERLAP_COMM_FACTOR * buckets * value_bytes
    if zero.stage >= 3:
        buffers += 2 * zero.prefetch_bucket_size * value_bytes

    per_sample = (
        tower_activation_bytes(spec.vision, image_tokens, checkpointing=checkpoint_vision, bytes_per_value=value_bytes)
        + tower_activation_bytes(spec.text, text_tokens, checkpointing=checkpoint_text, bytes_per_value=value_bytes)
        + patch_tokens * spec.vision.width * value_bytes  # patch embedding output, before masking
    )
    logits = 3 * micro_batch * negatives * 4  # fp32 logits, softmax, gradient (per direction reused)
    activations = micro_batch * per_sample + logits
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        buffers=buffers,
        activations=activations,
        overhead=OVERHEAD_BYTES,
    )
