"""Find host-device synchronisations in a training step, on any device (CPU included).

A host sync (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, a device-to-host copy, an op whose
output shape depends on the data) makes the CPU wait until the GPU has drained its queue; the
GPU then idles while the CPU launches the next kernels. `HostSyncCounter` is a dispatch mode:
it sees every aten op, forward and backward, and records each synchronising one with the code
that issued it, so the syncs a GPU run would make are found on a CPU-only machine as well.
(`torch.cuda.set_sync_debug_mode` does the same on CUDA only.)

    with HostSyncCounter() as syncs:
        train_step(...)
    syncs.sites  # Counter{"_local_scalar_dense @ deepspeed/runtime/utils.py:233": 1, ...}
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parent.parent

# aten ops that make the host wait for the device: a scalar read, or a data-dependent shape.
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
    "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
})
# Frames that are plumbing, never the culprit.
_SKIP = ("benchmarks/host_syncs.py", "torch/utils/_python_dispatch.py", "torch/_compile.py")
# torch.optim keeps non-fused step counters as CPU tensors on every device: reading them is not a
# device sync on a GPU, but on a CPU-only run it cannot be told apart by device. Named apart.
HOST_COUNTER_MARK = "torch/optim/"


def _short(path: str) -> str:
    for marker in ("/site-packages/", REPO_ROOT.as_posix() + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def call_site() -> str:
    """'innermost frame <- innermost frame outside torch' of the current Python stack."""
    frames = [
        (path, f.lineno)
        for f in traceback.extract_stack()
        if not (path := f.filename.replace(os.sep, "/")).endswith(_SKIP) and "/torch/_dynamo/" not in path
    ]
    inner = frames[-1:]
    outer = [fr for fr in frames if "/torch/" not in fr[0]][-1:]
    sites = [f"{_short(path)}:{line}" for path, line in inner + outer]
    return " <- ".join(dict.fromkeys(sites)) or "<unknown>"


class HostSyncCounter(TorchDispatchMode):
    """Counts synchronising ops by 'op @ call site'. On CUDA runs, reads of CPU tensors (not a
    sync there) are left out; on CPU runs every scalar read counts, see `device_syncs`."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        first = args[0] if args else None
        if name in SYNC_OPS:
            on_host = isinstance(first, torch.Tensor) and first.device.type == "cpu"
            if not (on_host and torch.cuda.is_available()):
                self.sites[f"{name.removeprefix('aten::')} @ {call_site()}"] += 1
        elif name in ("aten::_to_copy", "aten::copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            source = args[1] if name == "aten::copy_" else first
            if isinstance(source, torch.Tensor) and source.device.type != "cpu":
                self.sites[f"device_to_host @ {call_site()}"] += 1
        return out

    def __enter__(self) -> "HostSyncCounter":
        # tolist() and numpy() read memory without dispatching an aten op.
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(tensor: torch.Tensor, *a: Any, _m: str = method, _f: Any = original, **k: Any) -> Any:
                self.sites[f"{_m} @ {call_site()}"] += 1
                return _f(tensor, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def device_syncs(self) -> Counter[str]:
        """The sites that synchronise on a GPU too (torch.optim's host-side counters removed)."""
        return Counter({site: n for site, n in self.sites.items() if HOST_COUNTER_MARK not in site.split(" @ ", 1)[1].split(" <- ")[0]})

    def by_owner(self) -> dict[str, int]:
        """Device syncs per code base that issued them (the outermost non-torch frame)."""
        owners: Counter[str] = Counter()
        for site, n in self.device_syncs().items():
            caller = site.split(" <- ")[-1].split(" @ ")[-1]
            owners[caller.split("/", 1)[0] if "/" in caller else caller] += n
        return dict(owners)
