"""`clipa-ds export RUN_DIR [--stage NAME] --format safetensors|open_clip --out PATH`.

Writes consolidated fp32 weights from any ZeRO stage: a stage's final weights, or, for a stage
still running, its latest complete checkpoint (consolidated with DeepSpeed's zero_to_fp32 under
`weights_only` loading). Runs on one process, no GPU and no distributed setup needed.

Formats:
- safetensors, --out FILE.safetensors: one file; its metadata holds variant, context_length and
  image_size (`clipa-ds eval FILE` and `checkpoint.init_from=FILE` read it).
- safetensors, --out DIR: an eval bundle (DIR/model.safetensors + DIR/model_config.json).
- open_clip, --out DIR: `open_clip.create_model_and_transforms("local-dir:DIR")` loads it
  (see clipa_ds/checkpoint_open_clip.py for the mapping and the image-tower caveat).
Prints a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FORMATS = ("safetensors", "open_clip")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipa-ds export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="clipa-ds run directory (or any weights clipa-ds reads)")
    parser.add_argument("--stage", default=None, help="stage name (default: the newest weights of the run)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True, help="output file (.safetensors) or directory")
    parser.add_argument("--image-size", type=int, default=0, help="open_clip's fixed input size (default: the stage's eval size)")
    return parser


def export(run_dir: str, fmt: str, out: str, *, stage: str | None = None, image_size: int = 0) -> dict[str, Any]:
    from clipa_ds.checkpoint_open_clip import write_open_clip_export
    from clipa_ds.checkpoint_sources import build_model_for, read_weights
    from clipa_ds.checkpoint_weights import save_weights
    from clipa_ds.config import ConfigError
    from clipa_ds.models.variants import get_variant

    weights, info = read_weights(run_dir, stage)
    size = image_size or info.image_size
    if size % get_variant(info.variant).patch_size:
        raise ConfigError(f"--image-size {size} is not a multiple of the patch size of {info.variant!r}")
    target = Path(out)
    context_length = int(weights["text.positional_embedding"].shape[0])
    if fmt == "open_clip":
        write_open_clip_export(target, weights, info.variant, context_length, size)
    elif target.suffix == ".safetensors":
        meta = {"variant": info.variant, "context_length": context_length, "image_size": size, "source": info.source}
        save_weights(target, weights, meta)
    else:
        from clipa_ds.evaluate.cli import save_eval_bundle

        save_eval_bundle(build_model_for(weights, info), info.variant, context_length, size, target)
    return {
        "format": fmt, "out": str(target), "source": info.source, "variant": info.variant,
        "context_length": context_length, "image_size": size, "tensors": len(weights),
        "parameters": sum(int(t.numel()) for t in weights.values()),
    }


def main(argv: list[str] | None = None) -> int:
    from clipa_ds.config import ConfigError

    args = _parser().parse_args(argv)
    try:
        summary = export(args.run_dir, args.format, args.out, stage=args.stage, image_size=args.image_size)
    except (ConfigError, FileNotFoundError) as err:
        print(f"clipa-ds export: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
