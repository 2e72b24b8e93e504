"""Find host-device synchronisations in a training step, on any device (CPU included).

A host sync (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, a device-to-host copy, an op whose
output shape depends on the data, `torch.tensor(data, device=gpu)`) makes the CPU wait until the
GPU has drained its queue; the GPU then idles while the CPU launches the next kernels.
`HostSyncCounter` is a dispatch mode: it sees every aten op, forward and backward, and records
each synchronising one with the code that issued it, so the syncs a GPU run would make are found
on a CPU-only machine as well. (`torch.cuda.set_sync_debug_mode` does the same on CUDA only.)

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


def _places_on_device(*args: Any, device: Any = None, **kwargs: Any) -> bool:
    if device is None:
        return False
    return torch.device(device).type != "cpu" if torch.cuda.is_available() else True


class HostSyncCounter(TorchDispatchMode):
    """Counts synchronising ops by 'op @ call site', and all non-view ops. On CUDA runs, reads of
    CPU tensors (not a sync there) are left out; on CPU runs every scalar read counts, see
    `device_syncs`."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()
        # aten ops that are not views: an eager kernel-launch count (a compiled region shows up
        # only through the aten ops it calls out to, e.g. matmuls on CPU).
        self.compute_ops = 0
        self._saved: dict[tuple[Any, str], Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if not func.is_view:
            self.compute_ops += 1
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
        # Host reads that dispatch no aten op: tolist() and numpy().
        for name in ("tolist", "numpy"):
            self._wrap(torch.Tensor, name, lambda *a, **k: True, name)
        # Python data placed straight on the device: torch.tensor(data, device=d) is a blocking
        # copy there (memcpy_and_sync, a full stream sync: pytorch issue #120996). On CPU runs
        # every explicit device= counts, as the same line puts its tensor on the GPU in a GPU run;
        # building on the host and `.to(device, non_blocking=True)` does not wait.
        for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")):
            self._wrap(owner, name, _places_on_device, "host_data_to_device")
        return super().__enter__()

    def _wrap(self, owner: Any, name: str, counts: Any, label: str) -> None:
        original = getattr(owner, name)
        self._saved[(owner, name)] = original

        def wrapped(*a: Any, **k: Any) -> Any:
            if counts(*a, **k):
                self.sites[f"{label} @ {call_site()}"] += 1
            return original(*a, **k)

        setattr(owner, name, wrapped)

    def __exit__(self, *exc: Any) -> None:
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def device_syncs(self) -> Counter[str]:
        """The sites that synchronise on a GPU too (torch.optim's host-side counters removed)."""
        return Counter({
            site: n for site, n in self.sites.items()
            if not site.split(" @ ", 1)[1].startswith(HOST_COUNTER_MARK)
        })

    def by_owner(self) -> dict[str, int]:
        """Device syncs per code base that issued them (the outermost non-torch frame)."""
        owners: Counter[str] = Counter()
        for site, n in self.device_syncs().items():
            caller = site.split(" <- ")[-1].split(" @ ")[-1]
            owners[caller.split("/", 1)[0] if "/" in caller else caller] += n
        return dict(owners)
