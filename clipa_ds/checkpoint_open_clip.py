"""clipa-ds weights <-> an open_clip model directory (`open_clip.create_model_and_transforms("local-dir:DIR")`).

Text tower: open_clip's own TextTransformer configured as CLIPA (ViT-H-14-CLIPA's text_cfg:
pool_type last, no causal mask, BERT vocabulary; act GELU-tanh, LayerNorm eps 1e-6), so
    blocks.i.norm1 -> transformer.resblocks.i.ln_1     attn.qkv  -> attn.in_proj_weight/bias
    blocks.i.attn.proj -> attn.out_proj                norm2     -> ln_2
    mlp.fc1 -> mlp.c_fc, mlp.fc2 -> mlp.c_proj         proj.weight (E, W) -> text_projection (W, E)

Image tower: open_clip's built-in VisionTransformer always prepends a class token that takes part
in attention (even with pool_type avg), while CLIPA's image tower (DESIGN.md) has none; no choice
of its weights makes that token invisible to attention, so the built-in tower cannot reproduce
clipa-ds embeddings. open_clip also builds timm towers (`timm_model_name`), and timm builds a
model from a local directory's config.json (`local-dir:`): the export writes the exact timm
VisionTransformer that clipa-ds uses (no class token, average pool, fc_norm, no pre-norm,
GELU-tanh), with its position table (a parameter there) filled with clipa-ds's 2D sin-cos table
for the export's fixed image size. Result: identical embeddings up to float rounding.

The open_clip config names the timm directory by absolute path: after moving an export,
export again (or edit vision_cfg.timm_model_name in open_clip_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipa_ds.checkpoint_weights import StateDict
from clipa_ds.config import ConfigError

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
TIMM_DIR = "timm_vision"
_TEXT_BLOCK = {
    "norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def _rename_text_block(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def to_open_clip(weights: StateDict, variant: str, image_size: int) -> StateDict:
    """clipa-ds CLIP state dict -> open_clip CLIP (timm image tower) state dict."""
    from timm.layers import build_sincos2d_pos_embed

    from clipa_ds.models.variants import get_variant

    spec = get_variant(variant)
    out: StateDict = {}
    for name, tensor in weights.items():
        tensor = tensor.detach().float()
        if name.startswith("visual.proj."):
            out["visual.head.proj." + name.removeprefix("visual.proj.")] = tensor
        elif name.startswith("visual."):
            out["visual.trunk." + name.removeprefix("visual.")] = tensor
        elif name.startswith("text.blocks."):
            index, rest = name.removeprefix("text.blocks.").split(".", 1)
            out[f"transformer.resblocks.{index}.{_rename_text_block(rest, _TEXT_BLOCK)}"] = tensor
        elif name == "text.proj.weight":
            out["text_projection"] = tensor.t().contiguous()  # (W, E): open_clip computes x @ P
        elif name.startswith("text."):
            out[name.removeprefix("text.")] = tensor  # token_embedding, positional_embedding, ln_final
        elif name == "logit_scale":
            out["logit_scale"] = tensor.reshape(())
        elif name == "logit_bias.bias":
            out["logit_bias"] = tensor.reshape(())
        else:
            raise ConfigError(f"no open_clip name for clipa-ds tensor {name!r}")
    grid = image_size // spec.patch_size
    table = build_sincos2d_pos_embed([grid, grid], dim=spec.vision.width)  # (N, D), as the tower computes it
    out["visual.trunk.pos_embed"] = table.unsqueeze(0).float()  # (1, N, D)
    return out


def from_open_clip(weights: StateDict) -> StateDict:
    """Inverse of `to_open_clip` (the fixed position table is dropped: clipa-ds recomputes it)."""
    inverse = {v: k for k, v in _TEXT_BLOCK.items()}
    out: StateDict = {}
    for name, tensor in weights.items():
        if name == "visual.trunk.pos_embed":
            continue
        if name.startswith("visual.head.proj."):
            out["visual.proj." + name.removeprefix("visual.head.proj.")] = tensor
        elif name.startswith("visual.trunk."):
            out["visual." + name.removeprefix("visual.trunk.")] = tensor
        elif name.startswith("transformer.resblocks."):
            index, rest = name.removeprefix("transformer.resblocks.").split(".", 1)
            out[f"text.blocks.{index}.{_rename_text_block(rest, inverse)}"] = tensor
        elif name == "text_projection":
            out["text.proj.weight"] = tensor.t().contiguous()
        elif name == "logit_scale":
            out["logit_scale"] = tensor.reshape(1)
        elif name == "logit_bias":
            out["logit_bias.bias"] = tensor.reshape(1)
        else:
            out["text." + name] = tensor
    return out


def open_clip_config(variant: str, context_length: int, image_size: int, timm_dir: Path, logit_bias: float | None) -> dict[str, Any]:
    from clipa_ds.models.variants import get_variant
    from clipa_ds.task import IMAGE_MEAN, IMAGE_STD

    spec = get_variant(variant)
    model_cfg: dict[str, Any] = {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {
            "timm_model_name": f"local-dir:{timm_dir.resolve()}",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "timm_proj_bias": False,
            "image_size": image_size,
            "patch_size": spec.patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": spec.vocab_size,
            "hf_tokenizer_name": "bert-base-uncased",
            "tokenizer_kwargs": {"strip_sep_token": True},
            "width": spec.text.width,
            "heads": spec.text.heads,
            "layers": spec.text.depth,
            "mlp_ratio": spec.text.mlp_dim / spec.text.width,
            "pool_type": "last",
            "no_causal_mask": True,
            "act_kwargs": {"approximate": "tanh"},
            "norm_kwargs": {"eps": spec.vision_ln_eps},
        },
    }
    if logit_bias is not None:
        model_cfg["init_logit_bias"] = logit_bias
    return {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "interpolation": "bicubic", "resize_mode": "shortest"},
        "clipa_ds": {"variant": variant, "context_length": context_length, "image_size": image_size},
    }


def timm_vision_config(variant: str, image_size: int) -> dict[str, Any]:
    """timm `local-dir:` config.json building clipa-ds's image trunk at a fixed size."""
    from clipa_ds.models.variants import get_variant
    from clipa_ds.task import IMAGE_MEAN, IMAGE_STD

    spec = get_variant(variant)
    tower = spec.vision
    return {
        "architecture": "vit_base_patch16_224",  # any registered ViT: model_args override its shape
        "num_classes": 0,
        "model_args": {
            "img_size": image_size, "patch_size": spec.patch_size, "embed_dim": tower.width, "depth": tower.depth,
            "num_heads": tower.heads, "mlp_ratio": tower.mlp_dim / tower.width, "qkv_bias": True,
            "class_token": False, "pos_embed": "learn", "global_pool": "avg", "fc_norm": True, "pre_norm": False,
            "act_layer": "gelu_tanh", "num_classes": 0,
        },
        "pretrained_cfg": {
            "input_size": [3, image_size, image_size], "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
            "num_classes": 0, "interpolation": "bicubic", "crop_pct": 1.0,
        },
    }


def write_open_clip_export(out: Path, weights: StateDict, variant: str, context_length: int, image_size: int) -> Path:
    from safetensors.torch import save_file

    bias = float(weights["logit_bias.bias"].reshape(())) if "logit_bias.bias" in weights else None
    out.mkdir(parents=True, exist_ok=True)
    timm_dir = out / TIMM_DIR
    timm_dir.mkdir(exist_ok=True)
    (timm_dir / "config.json").write_text(json.dumps(timm_vision_config(variant, image_size), indent=1) + "\n")
    converted = {k: v.contiguous() for k, v in to_open_clip(weights, variant, image_size).items()}
    save_file(converted, str(out / WEIGHTS_NAME))
    config = open_clip_config(variant, context_length, image_size, timm_dir, bias)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    return out


def is_open_clip_export(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_open_clip_export(path: Path) -> tuple[StateDict, Any]:
    """(clipa-ds weights, WeightsInfo) from an export written by `write_open_clip_export`."""
    from safetensors.torch import load_file

    from clipa_ds.checkpoint_sources import WeightsInfo

    config = json.loads((path / CONFIG_NAME).read_text())
    meta = config.get("clipa_ds")
    if not meta:
        raise ConfigError(f"{path / CONFIG_NAME} was not written by clipa-ds (no 'clipa_ds' section)")
    weights = from_open_clip(load_file(str(path / WEIGHTS_NAME)))
    info = WeightsInfo(meta["variant"], int(meta["context_length"]), int(meta["image_size"]), str(path))
    return weights, info
