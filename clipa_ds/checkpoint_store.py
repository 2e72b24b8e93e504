"""The run directory on disk: checkpoint tags, manifests, the atomic "latest" pointer, stage finals.

    RUN_DIR/
      config.json                       resolved config of the latest launch (rank 0)
      metrics.jsonl, tensorboard/
      checkpoints/
        latest                          tag of the newest COMPLETE checkpoint (moved last, atomically)
        stage0-000000001536/            DeepSpeed files (every rank wrote its own) + clipa_ds.json
        stage0-000000001536.universal/  the same, converted for another world size (made on demand)
      stages/
        0-pretrain/final.safetensors    consolidated fp32 weights at the end of the stage
        0-pretrain/final.json           written after the weights: the stage is done

A checkpoint is complete when its manifest (clipa_ds.json) exists and every file it lists has the
listed size and, for torch files, a readable zip directory. The manifest is written by rank 0
after a barrier that every rank reaches only once its own files are written; `latest` moves after
that. A crash at any point leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipa_ds.config import ConfigError

MANIFEST = "clipa_ds.json"
LATEST = "latest"
FORMAT = "clipa-ds-checkpoint"
VERSION = 1
_TAG = re.compile(r"^stage(\d+)-(\d{12})$")


def checkpoint_tag(stage_index: int, samples_seen: int) -> str:
    """Sortable tag: stage index, then samples seen inside the stage."""
    return f"stage{stage_index}-{samples_seen:012d}"


def parse_tag(tag: str) -> tuple[int, int] | None:
    match = _TAG.match(tag)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass
class Manifest:
    tag: str
    stage_index: int
    stage_name: str
    samples_seen: int  # inside the stage
    world_size: int
    zero_stage: int
    config: dict[str, Any]
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    created: float = 0.0
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} manifest (format={data.get('format')!r})")
        return cls(**data)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    def stage_dir(self, stage_index: int, name: str) -> Path:
        return self.root / "stages" / f"{stage_index}-{name}"

    def final_weights(self, stage_index: int, name: str) -> Path:
        return self.stage_dir(stage_index, name) / "final.safetensors"

    def final_marker(self, stage_index: int, name: str) -> Path:
        return self.stage_dir(stage_index, name) / "final.json"


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. network mounts) refuse fsync on directories
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- checkpoints


def write_manifest(layout: RunLayout, manifest: Manifest) -> None:
    """List the tag's files with their sizes, then write the manifest (rank 0, after the barrier)."""
    directory = layout.tag_dir(manifest.tag)
    manifest.files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    }
    manifest.created = time.time()
    atomic_write_text(directory / MANIFEST, json.dumps(asdict(manifest), indent=1, sort_keys=True) + "\n")


def read_manifest(layout: RunLayout, tag: str) -> Manifest:
    return Manifest.from_json((layout.tag_dir(tag) / MANIFEST).read_text())


def read_latest(layout: RunLayout) -> str | None:
    path = layout.checkpoints / LATEST
    return path.read_text().strip() if path.is_file() else None


def publish_latest(layout: RunLayout, tag: str) -> None:
    atomic_write_text(layout.checkpoints / LATEST, tag + "\n")


def problem_with(layout: RunLayout, tag: str) -> str | None:
    """Why checkpoint `tag` cannot be loaded, or None when it is complete."""
    directory = layout.tag_dir(tag)
    if not directory.is_dir():
        return "its directory is missing"
    try:
        manifest = read_manifest(layout, tag)
    except FileNotFoundError:
        return f"it has no {MANIFEST} (the save did not finish)"
    except (ValueError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    if not manifest.files:
        return f"its {MANIFEST} lists no files"
    for name, size in manifest.files.items():
        path = directory / name
        if not path.is_file():
            return f"file {name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"file {name} has {actual} bytes, the manifest says {size} (truncated or rewritten)"
        if name.endswith(".pt") and not _zip_readable(path):
            return f"file {name} is corrupt (unreadable zip directory)"
    return None


def _zip_readable(path: Path) -> bool:
    """torch.save files are zip archives: the central directory at the end must parse."""
    try:
        with zipfile.ZipFile(path) as archive:
            return len(archive.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def list_tags(layout: RunLayout) -> list[str]:
    """Checkpoint tags present on disk (complete or not), oldest first."""
    if not layout.checkpoints.is_dir():
        return []
    tags = [p.name for p in layout.checkpoints.iterdir() if p.is_dir() and parse_tag(p.name)]
    return sorted(tags, key=lambda t: parse_tag(t) or (0, 0))


@dataclass
class ResumeChoice:
    manifest: Manifest | None
    notes: list[str]  # what was skipped and why (printed by rank 0)


def find_resumable(layout: RunLayout) -> ResumeChoice:
    """The newest complete checkpoint, starting at `latest` and falling back to older ones."""
    notes: list[str] = []
    latest = read_latest(layout)
    candidates = list_tags(layout)
    if latest is not None and latest in candidates:
        # Never go past what `latest` says: newer tags are unfinished saves.
        candidates = candidates[: candidates.index(latest) + 1]
    elif latest is not None:
        notes.append(f"checkpoint {latest!r} named by {layout.checkpoints / LATEST} is missing")
    elif candidates:
        notes.append(f"{layout.checkpoints / LATEST} is missing; looking for complete checkpoints")
    for tag in reversed(candidates):
        problem = problem_with(layout, tag)
        if problem is None:
            return ResumeChoice(read_manifest(layout, tag), notes)
        notes.append(f"checkpoint {tag} is not usable: {problem}; falling back to the previous one")
    return ResumeChoice(None, notes)


def prune(layout: RunLayout, keep_last: int, newest: str) -> list[str]:
    """Delete all but the `keep_last` newest complete checkpoints, and unfinished ones older than `newest`."""
    if keep_last <= 0:
        return []
    tags = list_tags(layout)
    order = parse_tag(newest) or (0, 0)
    complete = [t for t in tags if problem_with(layout, t) is None]
    keep = set(complete[-keep_last:]) | {newest}
    removed = []
    for tag in tags:
        if tag in keep or (parse_tag(tag) or (0, 0)) > order:
            continue
        shutil.rmtree(layout.tag_dir(tag), ignore_errors=True)
        shutil.rmtree(layout.checkpoints / f"{tag}.universal", ignore_errors=True)
        removed.append(tag)
    return removed


# ----------------------------------------------------------------------------- preflight


def check_writable(root: Path) -> None:
    """Create `root` and write + delete a probe file, or raise ConfigError naming the problem."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"run.dir={str(root)!r} is not writable ({type(err).__name__}: {err.strerror or err}); "
            "choose a directory you can write to, or fix its permissions"
        ) from None


def estimate_checkpoint_bytes(num_params: int, weight_bytes: int) -> int:
    """DeepSpeed checkpoint size: module weights + fp32 master + two AdamW moments (+10% slack)."""
    per_param = weight_bytes + 4 + 8
    return int(num_params * per_param * 1.1) + (1 << 20)


def disk_problem(path: Path, need_bytes: int) -> str | None:
    """A message when the filesystem of `path` has less than `need_bytes` free, else None."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= need_bytes:
        return None
    return (
        f"not enough disk space for a checkpoint in {path}: it needs about {need_bytes / 2**30:.2f} GiB, "
        f"{free / 2**30:.2f} GiB are free. Free space, lower checkpoint.keep_last, or move run.dir"
    )
