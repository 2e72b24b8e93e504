"""`clipa-ds index`: samples per shard -> sizes.json, damaged shards reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipa_ds.data.index import main
from clipa_ds.data.synthetic import write_synthetic_shards


def test_index_matches_the_writer_and_reports_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_synthetic_shards(tmp_path, num_samples=50, samples_per_shard=20, image_size=32, seed=0)
    expected = json.loads((tmp_path / "sizes.json").read_text())
    broken = Path(paths[1])
    broken.write_bytes(broken.read_bytes()[:-5000])  # truncated: the last samples are lost
    out = tmp_path / "index.json"
    assert main([f"{tmp_path}/train-{{000000..000002}}.tar", "--out", str(out), "--threads", "2"]) == 0
    sizes = json.loads(out.read_text())
    assert sizes["train-000000.tar"] == expected["train-000000.tar"] == 20
    assert sizes["train-000002.tar"] == expected["train-000002.tar"] == 10
    assert 0 < sizes["train-000001.tar"] < 20
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["samples"] == sum(sizes.values())
    assert summary["damaged"] == [str(broken)]


def test_index_of_nothing_fails(tmp_path: Path) -> None:
    assert main([f"{tmp_path}/missing-{{0..1}}.tar", "--out", str(tmp_path / "x.json")]) == 1
