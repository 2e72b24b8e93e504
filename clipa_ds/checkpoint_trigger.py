"""When to save: every N samples, every M minutes, and on SIGTERM / SIGUSR1 (pre-emption notice).

A signal handler only sets a flag. At every step boundary all ranks agree, with one tiny
all_reduce(MAX) on a gloo group (so no GPU stream sync), on [signal seen, time due]: a signal on
any rank, or any rank's clock, makes every rank save at the same step, then stop on a signal.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from clipa_ds.config import CheckpointConfig

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the checkpoint that a SIGTERM/SIGUSR1 asked for is published."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving a checkpoint")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention for "terminated by signal N"


class StopSignals:
    """Installs flag-setting handlers for SIGTERM/SIGUSR1; `restore()` puts the old ones back."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def control_group() -> Any:
    """A gloo process group for tiny host-side agreements (None when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")  # a collective: every rank calls it once


@dataclass
class Decision:
    save: bool
    stop_signal: int  # 0 = keep going


class CheckpointTrigger:
    """One per stage; `poll` is a collective at every step boundary."""

    def __init__(self, cfg: CheckpointConfig, signals: StopSignals, group: Any, start_samples: int) -> None:
        self.cfg = cfg
        self.signals = signals
        self.group = group
        self.last_samples = start_samples
        self.last_time = time.monotonic()

    def _due(self, samples_seen: int) -> bool:
        every = self.cfg.every_samples
        if every > 0 and samples_seen // every > self.last_samples // every:
            return True
        minutes = self.cfg.every_minutes
        return minutes > 0 and time.monotonic() - self.last_time >= minutes * 60.0

    def poll(self, samples_seen: int, *, final_step: bool) -> Decision:
        """Should every rank save now (and stop)? The stage's final step saves no checkpoint:
        the stage's final weights are written right after it."""
        flags = torch.tensor([self.signals.received, int(self._due(samples_seen) and not final_step)], dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        signum, due = int(flags[0]), bool(flags[1])
        if signum and final_step:
            # The stage ends now anyway; saving its final weights is the checkpoint.
            return Decision(save=False, stop_signal=signum)
        return Decision(save=due or bool(signum), stop_signal=signum)

    def saved(self, samples_seen: int) -> None:
        self.last_samples = samples_seen
        self.last_time = time.monotonic()
