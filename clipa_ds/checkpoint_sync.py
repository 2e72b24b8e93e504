"""Mirror finished checkpoints and stages to an object store (s3://, gs://, ... via fsspec).

The remote layout is the local one (see checkpoint_store). Publishing order gives the same
guarantee as on disk: the data files first, then the manifest, then `checkpoints/latest` (a
single-object PUT, atomic on S3). A crash mid-upload leaves the remote `latest` on the previous
checkpoint. A machine whose run.dir is empty pulls `latest`'s checkpoint and the finished stages
before resuming.

Credentials and endpoint come from `data.s3` / the AWS environment, as for shards.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TypeVar

from clipa_ds.checkpoint_store import LATEST, MANIFEST, Manifest, RunLayout, atomic_write_text, parse_tag

T = TypeVar("T")
ATTEMPTS = 4


def _retry(what: str, action: Callable[[], T]) -> T:
    """Our own bounded retries (the shared s3fs client has its retry loop switched off)."""
    delay = 0.5
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return action()
        except (OSError, TimeoutError) as err:
            if attempt == ATTEMPTS:
                raise OSError(f"{what} failed after {ATTEMPTS} attempts: {type(err).__name__}: {err}") from err
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class RemoteMirror:
    def __init__(self, url: str, settings: Any) -> None:
        from clipa_ds.data import storage

        self.url = url.rstrip("/")
        self.fs = storage.filesystem(self.url, settings)

    def _remote(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    def put(self, local: Path, relative: str) -> None:
        _retry(f"upload of {relative}", lambda: self.fs.put_file(str(local), self._remote(relative)))

    def put_text(self, relative: str, text: str) -> None:
        _retry(f"upload of {relative}", lambda: self.fs.pipe_file(self._remote(relative), text.encode()))

    def read_text(self, relative: str) -> str | None:
        try:
            return _retry(f"read of {relative}", lambda: self.fs.cat_file(self._remote(relative)).decode())
        except (FileNotFoundError, OSError):
            return None

    # ------------------------------------------------------------------ upload

    def upload_tag_files(self, layout: RunLayout, tag: str) -> None:
        """Every data file of the tag visible here (call on each node's local rank 0)."""
        directory = layout.tag_dir(tag)
        for path in sorted(directory.rglob("*")):
            if path.is_file() and path.name != MANIFEST and not path.name.endswith(".tmp"):
                self.put(path, f"checkpoints/{tag}/{path.relative_to(directory)}")

    def publish_tag(self, manifest: Manifest) -> None:
        """Manifest, then the pointer (rank 0, after every node uploaded its files).

        The remote manifest lists what is in the store, so with node-local run dirs it names
        every node's files, not only rank 0's.
        """
        prefix = self._remote(f"checkpoints/{manifest.tag}")
        found = _retry("listing", lambda: self.fs.find(prefix, detail=True))
        base = prefix.split("://", 1)[-1]  # fsspec lists paths without the protocol
        remote = Manifest(**{**asdict(manifest), "files": {}})
        for path, info in found.items():
            relative = path.rstrip("/")[len(base) + 1 :]
            if relative and relative != MANIFEST:
                remote.files[relative] = int(info.get("size") or 0)
        text = json.dumps(asdict(remote), indent=1, sort_keys=True) + "\n"
        self.put_text(f"checkpoints/{manifest.tag}/{MANIFEST}", text)
        self.put_text(f"checkpoints/{LATEST}", manifest.tag + "\n")

    def upload_stage(self, layout: RunLayout, stage_index: int, name: str) -> None:
        stage_dir = layout.stage_dir(stage_index, name)
        # The marker last: a remote stage is done only when its weights are all there.
        for file_name in ("final.safetensors", "final.json"):
            self.put(stage_dir / file_name, f"stages/{stage_dir.name}/{file_name}")

    def upload_file(self, layout: RunLayout, relative: str) -> None:
        path = layout.root / relative
        if path.is_file():
            self.put(path, relative)

    def prune(self, keep: set[str]) -> None:
        try:
            entries = self.fs.ls(self._remote("checkpoints"), detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if parse_tag(name) and name not in keep:
                try:
                    self.fs.rm(entry, recursive=True)
                except OSError:
                    pass  # pruning is best-effort; a leftover costs space, not correctness

    # ------------------------------------------------------------------ download

    def pull(self, layout: RunLayout) -> str | None:
        """Fetch the finished stages and `latest`'s checkpoint into `layout`; returns the tag."""
        try:
            stage_dirs = self.fs.ls(self._remote("stages"), detail=False)
        except FileNotFoundError:
            stage_dirs = []
        for entry in stage_dirs:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if self.read_text(f"stages/{name}/final.json") is None:
                continue
            local = layout.root / "stages" / name
            if not (local / "final.json").is_file():
                for file_name in ("final.safetensors", "final.json"):
                    self._get(f"stages/{name}/{file_name}", local / file_name)
        text = self.read_text(f"checkpoints/{LATEST}")
        if text is None:
            return None
        tag = text.strip()
        manifest_text = self.read_text(f"checkpoints/{tag}/{MANIFEST}")
        if manifest_text is None:
            return None
        manifest = Manifest.from_json(manifest_text)
        directory = layout.tag_dir(tag)
        for relative in manifest.files:
            target = directory / relative
            if not target.is_file() or target.stat().st_size != manifest.files[relative]:
                self._get(f"checkpoints/{tag}/{relative}", target)
        atomic_write_text(directory / MANIFEST, manifest_text)
        atomic_write_text(layout.checkpoints / LATEST, tag + "\n")
        return tag

    def _get(self, relative: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # nodes may share the directory
        _retry(f"download of {relative}", lambda: self.fs.get_file(self._remote(relative), str(partial)))
        partial.replace(target)
