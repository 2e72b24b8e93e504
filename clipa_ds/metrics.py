"""Run metrics: metrics.jsonl, TensorBoard events and a progress line, all from rank 0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _format_eta(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsLogger:
    """Writes one JSON object per log interval; only rank 0 writes anything."""

    def __init__(self, run_dir: Path, rank: int, tensorboard: bool) -> None:
        self.enabled = rank == 0
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("samples_seen", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "time":
                    self._tb.add_scalar(f"{record.get('stage', 'run')}/{key}", value, step)

    def progress(self, stage: str, step: int, steps: int, loss: float, samples_per_s: float, eta_s: float) -> None:
        if self.enabled:
            print(
                f"[{stage}] step {step}/{steps} loss {loss:.4f} {samples_per_s:,.0f} samples/s "
                f"ETA {_format_eta(eta_s)}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
