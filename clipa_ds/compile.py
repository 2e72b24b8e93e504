"""torch.compile of the transformer blocks, in the order compile -> checkpoint -> ZeRO wrap.

Why per block and not the whole model: the blocks are where the time goes, every block of a tower
has the same code and shapes, and PyTorch inlines nn.Modules (parameters become graph inputs),
so one compiled graph serves all blocks of a tower: compile time is that of one or two blocks,
not of 32 + 24. Inductor fuses LayerNorm, GELU, bias adds and the residual adds around the
matmuls and the fused attention; the rest of the model (patch embedding, masking gather,
pooling, loss) stays eager, so data-dependent code never reaches the compiler.

Order, and why it holds:
- compile: `nn.Module.compile()` works in place, so parameter names (state_dict keys,
  checkpoints, AdamW groups) do not gain an `_orig_mod.` prefix.
- checkpoint: the towers call `checkpoint(block, x)`; the recomputation in backward calls the
  same compiled block, so activation checkpointing and compilation compose.
- ZeRO wrap: `deepspeed.initialize` comes last and sees ordinary parameters (ZeRO-1/2 do not
  hook module forwards; ZeRO-3 would, and is not what the recipes use for speed).

Shapes are static per stage (fixed batch, fixed kept-token count, fixed text length), so the
blocks compile with `dynamic=False` (the best kernels); a new stage or evaluation adds a few
graphs, so the recompile limit is raised to stay clear of a silent fall-back to eager.
"""

from __future__ import annotations

import torch
from torch import nn

# Graphs per block code object: (image, text) x (train, eval) x stages, with margin.
RECOMPILE_LIMIT = 64


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a clipa-ds CLIP (image tower, then text tower)."""
    return [*model.visual.blocks, *model.text.blocks]


def compile_blocks(model: nn.Module, *, mode: str | None = None, fullgraph: bool = True) -> int:
    """Compile every transformer block of `model` in place; returns how many were compiled.

    Call after the model is built and its weights are loaded (and after `resize_positions`),
    before `deepspeed.initialize`. `mode` is torch.compile's: None (default), "max-autotune-no-
    cudagraphs", ... ("reduce-overhead" uses CUDA graphs, which DeepSpeed's gradient hooks and
    buffers do not tolerate: measure before using it). `fullgraph=True` makes a graph break an
    error rather than a silent slowdown.
    """
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):  # torch >= 2.6
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    else:
        config.cache_size_limit = max(config.cache_size_limit, RECOMPILE_LIMIT)
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(mode=mode, dynamic=False, fullgraph=fullgraph)
    return len(blocks)


def is_compiled(block: nn.Module) -> bool:
    """True when `block` runs through torch.compile (set by `compile_blocks`)."""
    return getattr(block, "_compiled_call_impl", None) is not None
