"""World-size change: convert a ZeRO checkpoint to DeepSpeed's universal format, load it at any size.

A ZeRO checkpoint holds one optimizer partition per data-parallel rank, so it only loads at the
world size it was saved with. `ds_to_universal` (with `inject_missing_state`: our engine does
not register the optional universal-checkpoint metadata) rewrites it as one file per parameter
(fp32 weights, AdamW moments); an engine built with `"checkpoint": {"load_universal": true}`
then re-partitions it for the new world size. The conversion runs once on rank 0 and is kept
next to the source as `TAG.universal/` (deleted with the source checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

from clipa_ds.checkpoint_store import RunLayout, atomic_write_text
from clipa_ds.checkpoint_weights import weights_only_torch_load

DONE_MARKER = "clipa_ds_universal.json"


def universal_tag(tag: str) -> str:
    return f"{tag}.universal"


def convert_to_universal(layout: RunLayout, tag: str, workers: int = 2) -> str:
    """Convert checkpoint `tag` (rank 0 only; idempotent); returns the tag to load."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target = layout.checkpoints / universal_tag(tag)
    if (target / DONE_MARKER).is_file():
        return target.name
    shutil.rmtree(target, ignore_errors=True)  # a conversion interrupted earlier
    args = argparse.Namespace(
        input_folder=str(layout.tag_dir(tag)),
        output_folder=str(target),
        num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    start = time.perf_counter()
    with weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(args)
    (layout.checkpoints / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer; we keep ours
    atomic_write_text(
        target / DONE_MARKER,
        json.dumps({"source": tag, "seconds": round(time.perf_counter() - start, 2)}) + "\n",
    )
    return target.name


def universal_overrides(user_overrides: str, out_path: Path) -> str:
    """Write the user's DeepSpeed overrides plus `load_universal` to `out_path`; return its path.

    build_ds_config (engine.py) merges `engine.ds_config_overrides` (a JSON file) over the base
    config, so the universal switch travels the same way as any user override.
    """
    data: dict[str, Any] = json.loads(Path(user_overrides).read_text()) if user_overrides else {}
    data.setdefault("checkpoint", {})["load_universal"] = True
    atomic_write_text(out_path, json.dumps(data, indent=1) + "\n")
    return str(out_path)
