"""`clipa-ds demo [--out DIR]`: the whole CLIPA recipe in miniature, on CPU, in a few minutes.

1. writes synthetic webdataset shards (coloured shapes with captions) and a held-out labelled set;
2. trains the tiny model through DeepSpeed in two stages (low-res/short-text pre-training, then a
   higher-res/longer-text fine-tune with patch masking), handing the weights over;
3. evaluates zero-shot classification on the held-out images with prompts built from class names;
4. writes DIR/summary.json and prints it as the last line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

TRAIN_SAMPLES = 16_384  # unique training images; the schedule loops over them
EVAL_SAMPLES = 1_024
SOURCE_SIZE = 64  # pixels of the generated images; stages decode and resize from these
PROMPTS = ["a photo of a {}.", "a {}.", "a picture of a {}."]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipa-ds demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output directory (data, run, summary.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides for the tiny recipe, key=value")
    return parser


def _write_data(data_dir: Path) -> tuple[str, str]:
    from clipa_ds.data.synthetic import write_synthetic_eval, write_synthetic_shards

    train = write_synthetic_shards(
        data_dir, num_samples=TRAIN_SAMPLES, samples_per_shard=1024, image_size=SOURCE_SIZE, seed=0, prefix="train"
    )
    held_out = write_synthetic_eval(data_dir, num_samples=EVAL_SAMPLES, image_size=SOURCE_SIZE, seed=1)
    train_pattern = f"{data_dir}/train-{{000000..{len(train) - 1:06d}}}.tar"
    eval_pattern = f"{data_dir}/eval-{{000000..{len(held_out) - 1:06d}}}.tar"
    return train_pattern, eval_pattern


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    start = time.perf_counter()
    print(f"clipa-ds demo: writing synthetic shards to {out / 'data'}", flush=True)
    train_urls, eval_urls = _write_data(out / "data")

    from clipa_ds.config import load_config
    from clipa_ds.data.synthetic import CLASS_NAMES
    from clipa_ds.data.tokenizer import CaptionTokenizer
    from clipa_ds.evaluate.cli import save_eval_bundle
    from clipa_ds.evaluate.labels import make_label_set
    from clipa_ds.evaluate.zeroshot import run_zeroshot
    from clipa_ds.models.clip import build_clip
    from clipa_ds.siglip import siglip_model_kwargs
    from clipa_ds.train import run

    # The demo is not a pre-emptible job: one checkpoint per 4,096 samples keeps it quick.
    demo_overrides = [f"run.dir={out / 'run'}", f"data.train_urls={train_urls}", "checkpoint.every_samples=4096"]
    cfg = load_config("tiny", [*demo_overrides, *args.overrides])
    results = run(cfg)

    last = cfg.stages[-1]
    eval_size = last.image.eval_size or last.image.size
    model = build_clip(cfg.model.variant, last.text.context_length, **siglip_model_kwargs(cfg.loss))
    model.load_state_dict(results[-1].weights)
    label_set = make_label_set(CLASS_NAMES, PROMPTS, source="synthetic shapes")
    # The bundle carries the label set, so `clipa-ds eval demo_out/run` reproduces this top-1.
    save_eval_bundle(model, cfg.model.variant, last.text.context_length, eval_size, out / "run" / "export", label_set=label_set)
    zeroshot = run_zeroshot(
        model, eval_urls, tokenizer=CaptionTokenizer(), image_size=eval_size, device="cpu",
        batch_size=256, label_set=label_set,
    )
    summary: dict[str, Any] = {
        "zeroshot_top1": round(zeroshot["top1"] / 100.0, 4),
        "chance": round(1.0 / len(CLASS_NAMES), 4),
        "eval_samples": zeroshot["samples"],
        "stages": [{"name": r.name, "samples": r.samples, "wall_s": round(r.wall_s, 1), "final_loss": round(r.final_loss, 4)} for r in results],
        "wall_s": round(time.perf_counter() - start, 1),
        "export": str(out / "run" / "export"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return 0
