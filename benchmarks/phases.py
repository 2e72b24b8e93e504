"""Per-phase step timing (forward / backward / optimizer step) without host syncs.

CUDA events on GPU: recorded in stream order, read only after the caller's window-end
synchronise; an interval is GPU time from one mark to the next (idle gaps included). On CPU the
host clock.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PHASES = ("forward", "backward", "step")


class PhaseClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, Any]] = []

    def run(self, phase: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), timed as `phase`."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            end = time.perf_counter()
        self.marks.append((phase, start, end))
        return out

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call; call after a device synchronise."""
        totals = dict.fromkeys(PHASES, 0.0)
        for phase, start, end in self.marks:
            totals[phase] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        self.marks.clear()
        return totals


class EngineClock:
    """Stands in for the DeepSpeed engine in clipa_ds.step.train_step and times its calls:
    engine(...) as forward, backward(...), step(...). Other attribute reads and writes
    (skipped_steps, ...) go to the engine."""

    def __init__(self, engine: Any, clock: PhaseClock) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_clock", clock)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._clock.run("forward", self._engine, *args, **kwargs)

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        return self._clock.run("backward", self._engine.backward, *args, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self._clock.run("step", self._engine.step, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._engine, name, value)
