"""Zero-shot classification and image-text retrieval, distributed, on full tokens.

Entry points (call on every rank; they run collectives when a process group is initialised):
- `run_zeroshot(model, data, *, tokenizer, image_size, device, ...)` -> {"top1", "top5", ...}
- `run_retrieval(model, data, *, tokenizer, image_size, device, ...)` -> {"image_to_text_R@1", ...}
- `load_label_set(classnames_path, templates_path)`; `imagenet_label_set()`
- `save_eval_bundle(model, variant, context_length, image_size, dir, label_set=None)` /
  `load_eval_bundle(dir)` -> (model, context_length, image_size)
The `clipa-ds eval` subcommand is `clipa_ds.evaluate.cli.main(argv)`.
"""

from __future__ import annotations

from clipa_ds.evaluate.cli import load_eval_bundle, save_eval_bundle
from clipa_ds.evaluate.datasets import EvalDataError
from clipa_ds.evaluate.labels import LabelSet, imagenet_label_set, load_label_set
from clipa_ds.evaluate.retrieval import run_retrieval
from clipa_ds.evaluate.zeroshot import run_zeroshot

__all__ = [
    "EvalDataError",
    "LabelSet",
    "imagenet_label_set",
    "load_eval_bundle",
    "load_label_set",
    "run_retrieval",
    "run_zeroshot",
    "save_eval_bundle",
]
