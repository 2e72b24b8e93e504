"""Evaluation inside the training loop: when it is due, and what it reports (on every rank)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipa_ds.config import DataConfig, EvalConfig


class InLoopEvaluator:
    """Zero-shot and retrieval on full tokens, every `eval.every_samples` and at stage ends."""

    def __init__(self, eval_cfg: EvalConfig, data_cfg: DataConfig, run_dir: str, local_rank: int) -> None:
        from clipa_ds.data.storage import StorageSettings
        from clipa_ds.data.synthetic_source import PROMPTS, SYNTHETIC, materialize_eval_urls
        from clipa_ds.data.tokenizer import CaptionTokenizer
        from clipa_ds.evaluate.labels import LabelSet, load_label_set, make_label_set

        self.cfg = eval_cfg
        self.workers = min(data_cfg.workers, 2)
        self.settings = StorageSettings.from_config(data_cfg)
        self.tokenizer = CaptionTokenizer()
        self.zeroshot_data = eval_cfg.zeroshot_data
        self.label_set: LabelSet | None = None
        if self.zeroshot_data == SYNTHETIC:
            from clipa_ds.data.synthetic import CLASS_NAMES

            self.zeroshot_data = materialize_eval_urls(run_dir, local_rank)
            self.label_set = make_label_set(CLASS_NAMES, list(PROMPTS), source="synthetic shapes")
        elif eval_cfg.classnames or eval_cfg.templates:
            self.label_set = load_label_set(eval_cfg.classnames or None, eval_cfg.templates or None)

    @property
    def enabled(self) -> bool:
        return bool(self.zeroshot_data or self.cfg.retrieval_data)

    def due(self, samples_before: int, samples_after: int) -> bool:
        """True when this step crossed a multiple of eval.every_samples."""
        every = self.cfg.every_samples
        return self.enabled and every > 0 and samples_before // every != samples_after // every

    def run(self, model: nn.Module, image_size: int, device: torch.device) -> dict[str, Any]:
        """Collective: call on every rank. Returns flat metrics (percent)."""
        from clipa_ds.evaluate.retrieval import run_retrieval
        from clipa_ds.evaluate.zeroshot import run_zeroshot

        common = dict(tokenizer=self.tokenizer, image_size=image_size, device=device,
                      batch_size=self.cfg.batch_size, workers=self.workers, storage_settings=self.settings)
        out: dict[str, Any] = {}
        if self.zeroshot_data:
            result = run_zeroshot(model, self.zeroshot_data, label_set=self.label_set, **common)
            out.update({f"zeroshot/{k}": v for k, v in result.items() if k.startswith("top")})
        if self.cfg.retrieval_data:
            result = run_retrieval(model, self.cfg.retrieval_data, **common)
            out.update({f"retrieval/{k}": v for k, v in result.items() if "R@" in k})
        return out
