"""`clipa-ds eval MODEL --task zeroshot|retrieval --data URL [...]`: prints a JSON summary last.

MODEL is an eval bundle directory (or a run directory holding one in `export/`), or anything
`clipa_ds.checkpoint.load_model_for_eval` accepts once that exists. An eval bundle is:

    DIR/model.safetensors   the CLIP weights (safetensors.torch.save_model)
    DIR/model_config.json   {"format": "clipa-ds-eval-bundle", "version": 1,
                             "variant": str, "context_length": int, "image_size": int}
    DIR/classnames.txt      optional: the label set the model is evaluated with; used when
    DIR/templates.txt       --classnames / --templates are not given

Runs on one process, or on every rank under torchrun (NCCL on GPU, gloo on CPU); rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clipa_ds.config import ConfigError
from clipa_ds.data.shards import ShardFailed
from clipa_ds.evaluate.datasets import EvalDataError
from clipa_ds.evaluate.labels import LabelSet
from clipa_ds.evaluate.metrics import PeerRankError

BUNDLE_FORMAT = "clipa-ds-eval-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"


def save_eval_bundle(
    model: nn.Module,
    variant: str,
    context_length: int,
    image_size: int,
    directory: str | Path,
    label_set: LabelSet | None = None,
) -> Path:
    """Write `model` (a CLIP from build_clip, full weights on this process) as an eval bundle.

    With `label_set`, its class names and templates are stored too and become the defaults of
    `clipa-ds eval DIR --task zeroshot`.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_FILE))
    config = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "variant": variant,
        "context_length": int(context_length),
        "image_size": int(image_size),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if label_set is not None:
        (directory / CLASSNAMES_FILE).write_text("\n".join(label_set.classnames) + "\n", encoding="utf-8")
        (directory / TEMPLATES_FILE).write_text("\n".join(label_set.templates) + "\n", encoding="utf-8")
    return directory


def find_bundle(path: str | Path) -> Path | None:
    """The bundle directory at PATH or PATH/export, if any."""
    for candidate in (Path(path), Path(path) / "export"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def load_eval_bundle(directory: str | Path) -> tuple[nn.Module, int, int]:
    """-> (model on CPU in eval mode, context_length, image_size)."""
    from safetensors.torch import load_model

    from clipa_ds.models.clip import build_clip

    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("format") != BUNDLE_FORMAT or config.get("version") != BUNDLE_VERSION:
        raise ConfigError(
            f"{directory / CONFIG_FILE}: format={config.get('format')!r} version={config.get('version')!r}; "
            f"expected format={BUNDLE_FORMAT!r} version={BUNDLE_VERSION}"
        )
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), "pt") as weights:
        has_bias = "logit_bias.bias" in weights.keys()  # a SigLIP-trained model
    model = build_clip(config["variant"], int(config["context_length"]), **({"logit_bias_init": 0.0} if has_bias else {}))
    load_model(model, str(directory / WEIGHTS_FILE))  # strict: every tensor must match
    return model.eval(), int(config["context_length"]), int(config["image_size"])


def load_model(path: str) -> tuple[nn.Module, int, int]:
    """(model, context_length, image_size) from a bundle, or via clipa_ds.checkpoint when available."""
    bundle = find_bundle(path)
    if bundle is not None:
        return load_eval_bundle(bundle)
    try:
        from clipa_ds.checkpoint import load_model_for_eval  # type: ignore[attr-defined]
    except ImportError:
        load_model_for_eval = None
    if load_model_for_eval is not None:
        return load_model_for_eval(path)
    raise ConfigError(
        f"{path!r} holds no eval bundle ({WEIGHTS_FILE} + {CONFIG_FILE} in PATH or PATH/export); "
        "write one with clipa_ds.evaluate.save_eval_bundle"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipa-ds eval", description="Zero-shot or retrieval evaluation.")
    parser.add_argument("model", help="eval bundle directory, run directory, or checkpoint")
    parser.add_argument("--task", choices=("zeroshot", "retrieval"), required=True)
    parser.add_argument(
        "--data", required=True, help="shard URL(s) ('a-{000..009}.tar', '::'-joined) or an ImageFolder root"
    )
    parser.add_argument(
        "--classnames", default=None, help="class names, one per line (default: the bundle's, else ImageNet-1k)"
    )
    parser.add_argument(
        "--templates", default=None, help="prompt templates with '{}', one per line (default: the bundle's, else OpenAI's 80)"
    )
    parser.add_argument("--image-size", type=int, default=0, help="eval resolution (default: the model's)")
    parser.add_argument("--context-length", type=int, default=0, help="prompt tokens (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader decode workers per rank")
    parser.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
    return parser


def _init_distributed(device_arg: str) -> tuple[torch.device, bool]:
    """Join the torchrun group if launched by torchrun -> (this rank's device, whether we joined)."""
    use_cuda = device_arg.startswith("cuda") or (not device_arg and torch.cuda.is_available())
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        joined = True
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), joined
    return torch.device("cpu"), joined


def _label_files(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """--classnames / --templates, else the bundle's own files, else None (ImageNet defaults)."""
    bundle = find_bundle(args.model)

    def pick(given: str | None, name: str) -> str | None:
        if given is not None or bundle is None or not (bundle / name).is_file():
            return given
        return str(bundle / name)

    return pick(args.classnames, CLASSNAMES_FILE), pick(args.templates, TEMPLATES_FILE)


def evaluate(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from clipa_ds.data.tokenizer import CaptionTokenizer
    from clipa_ds.evaluate.labels import load_label_set
    from clipa_ds.evaluate.retrieval import run_retrieval
    from clipa_ds.evaluate.zeroshot import run_zeroshot

    model, context_length, image_size = load_model(args.model)
    model = model.to(device)
    classnames, templates = _label_files(args)
    common: dict[str, Any] = {
        "tokenizer": CaptionTokenizer(),
        "image_size": args.image_size or image_size,
        "context_length": args.context_length or context_length,
        "device": device,
        "batch_size": args.batch_size,
        "workers": args.workers,
    }
    if args.task == "zeroshot":
        label_set = load_label_set(classnames, templates)
        summary = run_zeroshot(model, args.data, label_set=label_set, **common)
    else:
        summary = run_retrieval(model, args.data, **common)
    summary.update({"model": str(args.model), "data": args.data, "image_size": common["image_size"]})
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device, joined = _init_distributed(args.device)
    try:
        summary = evaluate(args, device)
    except (ConfigError, EvalDataError, FileNotFoundError, PeerRankError, ShardFailed) as exc:
        print(f"clipa-ds eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if joined:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
