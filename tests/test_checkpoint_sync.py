"""Checkpoints mirrored to a real S3 server (SeaweedFS, SigV4) and pulled back on a fresh machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipa_ds.checkpoint import RunCheckpoints
from clipa_ds.checkpoint_store import RunLayout, find_resumable, read_manifest
from clipa_ds.checkpoint_sync import RemoteMirror
from clipa_ds.checkpoint_weights import save_weights
from clipa_ds.data.storage import StorageSettings
from clipa_ds.models.clip import build_clip
from tests.s3_server import SeaweedS3
from tests.test_checkpoint import fake_checkpoint, tiny_config

BUCKET = "clipa-ckpt"


@pytest.fixture
def bucket(s3_env: SeaweedS3) -> str:
    fs = s3_env.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return BUCKET


def test_published_checkpoints_and_stages_are_pulled_by_a_fresh_machine(bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/run-a"
    cfg = tiny_config(tmp_path / "local")
    layout = RunLayout(tmp_path / "local")
    mirror = RemoteMirror(url, StorageSettings.from_config(cfg.data))
    first = fake_checkpoint(layout, cfg, 0, 768)
    mirror.upload_tag_files(layout, first)
    mirror.publish_tag(read_manifest(layout, first))
    save_weights(layout.final_weights(0, "pretrain"), build_clip("tiny", 8).state_dict(), {"variant": "tiny"})
    layout.final_marker(0, "pretrain").write_text("{}")
    mirror.upload_stage(layout, 0, "pretrain")
    # A second checkpoint whose upload "crashed" before its manifest and pointer: never visible.
    second = fake_checkpoint(layout, cfg, 1, 768)
    mirror.upload_tag_files(layout, second)

    fresh = RunLayout(tmp_path / "fresh")
    assert RemoteMirror(url, StorageSettings.from_config(cfg.data)).pull(fresh) == first
    choice = find_resumable(fresh)
    assert choice.manifest is not None and choice.manifest.tag == first and not choice.notes
    for name in read_manifest(layout, first).files:
        assert (fresh.tag_dir(first) / name).read_bytes() == (layout.tag_dir(first) / name).read_bytes()
    assert (fresh.final_weights(0, "pretrain")).read_bytes() == layout.final_weights(0, "pretrain").read_bytes()
    assert not fresh.tag_dir(second).exists()


def test_an_object_store_run_dir_resumes_from_the_store(bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{bucket}/run-b"
    seed = RunLayout(tmp_path / "first-machine")
    cfg = tiny_config(tmp_path / "unused", f"run.dir={url}", f"checkpoint.local_dir={seed.root}")
    tag = fake_checkpoint(seed, cfg, 0, 1536)
    mirror = RemoteMirror(url, StorageSettings.from_config(cfg.data))
    mirror.upload_tag_files(seed, tag)
    mirror.publish_tag(read_manifest(seed, tag))

    second = tiny_config(tmp_path / "unused", f"run.dir={url}", f"checkpoint.local_dir={tmp_path / 'second-machine'}")
    ckpt = RunCheckpoints(second, 0, 1, 0)
    try:
        ckpt.prepare()
    finally:
        ckpt.close()
    assert ckpt.resume is not None and ckpt.resume.tag == tag
    assert f"pulled checkpoint {tag} from {url}" in capsys.readouterr().err
    assert mirror.read_text("config.json") is not None  # the resolved config is mirrored too
