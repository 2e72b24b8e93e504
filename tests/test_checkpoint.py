"""Checkpoint components without training: store, resume choice, config changes, RNG, triggers, weights."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipa_ds.checkpoint import RunCheckpoints
from clipa_ds.checkpoint_state import capture_rng, config_changes, restore_rng
from clipa_ds.checkpoint_store import (
    Manifest,
    RunLayout,
    check_writable,
    checkpoint_tag,
    disk_problem,
    find_resumable,
    list_tags,
    problem_with,
    prune,
    publish_latest,
    read_latest,
    write_manifest,
)
from clipa_ds.checkpoint_trigger import CheckpointTrigger, StopSignals
from clipa_ds.checkpoint_weights import load_into, load_weights, save_weights, weights_only_torch_load
from clipa_ds.config import CheckpointConfig, Config, ConfigError, load_config
from clipa_ds.models.clip import build_clip


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    return load_config("tiny", [f"run.dir={run_dir}", "data.train_urls=/nonexistent/x.tar", *overrides])


def fake_checkpoint(layout: RunLayout, cfg: Config, stage_index: int, samples: int, *, publish: bool = True) -> str:
    """A checkpoint directory shaped like DeepSpeed's (two torch files) with its manifest."""
    tag = checkpoint_tag(stage_index, samples)
    directory = layout.tag_dir(tag)
    directory.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((64,), float(samples))}}, directory / "mp_rank_00_model_states.pt")
    torch.save({"state": torch.zeros(32)}, directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    manifest = Manifest(tag=tag, stage_index=stage_index, stage_name=cfg.stages[stage_index].name,
                        samples_seen=samples, world_size=2, zero_stage=1, config=cfg.to_dict())
    write_manifest(layout, manifest)
    if publish:
        publish_latest(layout, tag)
    return tag


# ----------------------------------------------------------------------------- store


def test_tags_sort_by_stage_then_samples(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    cfg = tiny_config(tmp_path)
    for stage, samples in [(1, 128), (0, 1024), (0, 256)]:
        fake_checkpoint(layout, cfg, stage, samples)
    assert list_tags(layout) == ["stage0-000000000256", "stage0-000000001024", "stage1-000000000128"]


def test_partial_and_corrupt_checkpoints_fall_back_to_the_previous_one_and_say_why(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    cfg = tiny_config(tmp_path)
    good = fake_checkpoint(layout, cfg, 0, 128)
    truncated = fake_checkpoint(layout, cfg, 0, 256)
    corrupt = fake_checkpoint(layout, cfg, 0, 384)
    partial = fake_checkpoint(layout, cfg, 0, 512)  # becomes `latest`
    (layout.tag_dir(partial) / "clipa_ds.json").unlink()  # killed before the manifest was written
    path = layout.tag_dir(truncated) / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:-100])
    path = layout.tag_dir(corrupt) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(path.read_bytes())
    data[-30:] = b"\0" * 30  # same size, broken zip directory
    path.write_bytes(bytes(data))

    choice = find_resumable(layout)
    assert choice.manifest is not None and choice.manifest.tag == good
    text = "\n".join(choice.notes)
    assert f"{partial} is not usable: it has no clipa_ds.json" in text
    assert f"{corrupt} is not usable: file zero_pp_rank_0_mp_rank_00_optim_states.pt is corrupt" in text
    assert f"{truncated} is not usable: file mp_rank_00_model_states.pt has" in text
    assert "falling back to the previous one" in text


def test_newer_unpublished_checkpoints_are_ignored(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    cfg = tiny_config(tmp_path)
    published = fake_checkpoint(layout, cfg, 0, 128)
    fake_checkpoint(layout, cfg, 0, 256, publish=False)  # complete files, but `latest` never moved
    assert read_latest(layout) == published
    assert find_resumable(layout).manifest.tag == published  # type: ignore[union-attr]


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    cfg = tiny_config(tmp_path)
    tags = [fake_checkpoint(layout, cfg, 0, s) for s in (128, 256, 384, 512)]
    (layout.checkpoints / f"{tags[0]}.universal").mkdir()
    prune(layout, 2, tags[-1])
    assert list_tags(layout) == tags[2:]
    assert not (layout.checkpoints / f"{tags[0]}.universal").exists()
    assert problem_with(layout, tags[-1]) is None


def test_unwritable_run_dir_and_full_disk_are_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"run.dir=.*a-file/run.* is not writable"):
        check_writable(blocker / "run")
    assert disk_problem(tmp_path, 1024) is None
    message = disk_problem(tmp_path / "not" / "yet", 2**62)
    assert message is not None and "not enough disk space" in message and "GiB are free" in message


def test_tiny_recipe_checkpoints_at_least_four_times_per_stage(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    every = cfg.checkpoint.every_samples
    for stage in cfg.stages:
        last = stage.steps * stage.global_batch
        saves = [s for s in range(stage.global_batch, last, stage.global_batch) if s // every > (s - stage.global_batch) // every]
        assert len(saves) >= 4, (stage.name, saves)


# ----------------------------------------------------------------------------- config changes


def test_unsafe_config_changes_are_named_and_safe_ones_pass(tmp_path: Path) -> None:
    saved = tiny_config(tmp_path).to_dict()
    changed = tiny_config(
        tmp_path, "model.variant=B-16", "stages.0.global_batch=64", "stages.0.samples=50000",
        "run.log_every_steps=3", "stages.1.global_batch=32",
    )
    unsafe, safe = config_changes(saved, changed, finished=0, resumed=True)
    assert any(line.startswith("model.variant: 'tiny' -> 'B-16'") for line in unsafe)
    assert any(line.startswith(f"stages.0.global_batch: {saved['stages'][0]['global_batch']} -> 64") for line in unsafe)
    assert not any("stages.1" in line for line in unsafe + safe)  # not started yet: free to change
    assert any(line.startswith("stages.0.samples") for line in safe)
    assert any(line.startswith("run.log_every_steps") for line in safe)


def test_finished_stages_cannot_change_their_length(tmp_path: Path) -> None:
    saved = tiny_config(tmp_path).to_dict()
    before = saved["stages"][0]["samples"]
    unsafe, _ = config_changes(saved, tiny_config(tmp_path, "stages.0.samples=50000"), finished=1, resumed=True)
    assert unsafe == [f"stages.0.samples: {before} -> 50000 (that stage is already finished)"]


def test_prepare_refuses_an_unsafe_change_and_resumes_a_safe_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path)
    layout = RunLayout(tmp_path)
    fake_checkpoint(layout, cfg, 0, 128)
    with pytest.raises(ConfigError, match=r"(?s)checkpoint stage0-000000000128.*stages.0.global_batch: \d+ -> 64"):
        RunCheckpoints(tiny_config(tmp_path, "stages.0.global_batch=64"), 0, 1, 0).prepare()
    ckpt = RunCheckpoints(tiny_config(tmp_path, "stages.0.samples=30000"), 0, 1, 0)
    try:
        ckpt.prepare()
    finally:
        ckpt.close()
    assert ckpt.resume is not None and ckpt.resume.tag == "stage0-000000000128"
    err = capsys.readouterr().err
    assert f"accepted config change stages.0.samples: {cfg.stages[0].samples} -> 30000" in err
    assert "resuming stage 'pretrain' from checkpoint stage0-000000000128" in err
    assert json.loads((tmp_path / "config.json").read_text())["stages"][0]["samples"] == 30000


def test_a_finished_stage_hands_over_to_the_next(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    layout = RunLayout(tmp_path)
    fake_checkpoint(layout, cfg, 0, 128)  # a checkpoint of the finished stage: not resumed
    weights = build_clip("tiny", 8).state_dict()
    save_weights(layout.final_weights(0, "pretrain"), weights, {"variant": "tiny"})
    layout.final_marker(0, "pretrain").write_text(json.dumps({"config": cfg.to_dict()}))
    ckpt = RunCheckpoints(cfg, 0, 1, 0)
    try:
        ckpt.prepare()
        start = ckpt.start_stage(1)
    finally:
        ckpt.close()
    assert ckpt.stage_done(0) and not ckpt.stage_done(1) and ckpt.resume is None
    assert start.resume is None and start.source == "stage 'pretrain' final weights"
    assert start.weights is not None and torch.equal(start.weights["logit_scale"], weights["logit_scale"])


# ----------------------------------------------------------------------------- RNG and triggers


def test_rng_states_round_trip_and_are_json_able() -> None:
    state = capture_rng()
    json.dumps(state)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(json.loads(json.dumps(state)))
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_trigger_saves_every_n_samples_and_on_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    signals = StopSignals().install()
    try:
        trigger = CheckpointTrigger(CheckpointConfig(every_samples=256), signals, None, start_samples=0)
        due = []
        for samples in range(96, 1025, 96):  # a batch of 96 does not divide 256: save on crossing
            if trigger.poll(samples, final_step=False).save:
                due.append(samples)
                trigger.saved(samples)
        assert due == [288, 576, 768]
        os.kill(os.getpid(), signal.SIGUSR1)
        decision = trigger.poll(1056, final_step=False)
        assert decision.save and decision.stop_signal == signal.SIGUSR1
        assert not trigger.poll(1152, final_step=True).save  # the stage's final weights are the save
    finally:
        signals.restore()


def test_trigger_every_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("clipa_ds.checkpoint_trigger.time.monotonic", lambda: clock[0])
    trigger = CheckpointTrigger(CheckpointConfig(every_minutes=2.0), StopSignals(), None, start_samples=0)
    clock[0] += 100
    assert not trigger.poll(64, final_step=False).save
    clock[0] += 30
    assert trigger.poll(128, final_step=False).save


# ----------------------------------------------------------------------------- weights


def test_weights_from_another_architecture_name_the_mismatched_tensors(tmp_path: Path) -> None:
    weights = build_clip("tiny", 8).state_dict()
    weights["visual.proj.weight"] = torch.zeros(64, 128)
    del weights["text.ln_final.bias"]
    weights["visual.extra"] = torch.zeros(1)
    with pytest.raises(ConfigError) as err:
        load_into(build_clip("tiny", 16), weights, "other.safetensors")
    message = str(err.value)
    assert "other.safetensors do not fit this model (3 mismatched tensors)" in message
    assert "shape of visual.proj.weight: checkpoint [64, 128], model [128, 128]" in message
    assert "missing text.ln_final.bias" in message and "unexpected visual.extra" in message


def test_text_positions_are_interpolated_to_the_new_length(tmp_path: Path) -> None:
    source = build_clip("tiny", 8)
    path = tmp_path / "w.safetensors"
    save_weights(path, source.state_dict(), {"variant": "tiny"})
    target = build_clip("tiny", 32)
    load_into(target, load_weights(path)[0], str(path))
    source.text.resize_positions(32)
    assert torch.equal(target.text.positional_embedding, source.text.positional_embedding)
    assert torch.equal(target.visual.proj.weight, source.visual.proj.weight)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("arbitrary code ran",))


def test_loading_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"x": _Payload()}, handle)
    with weights_only_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=False)  # forced to weights_only=True


class _FakeEngine:
    def __init__(self) -> None:
        self.saved: list[str] = []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        self.saved.append(tag)


class _FakeLoader:
    def state_dict(self) -> dict:
        return {"version": 1, "seed": 0, "stage_index": 0, "num_readers": 1, "readers": {}, "next_worker": {}}


def test_a_checkpoint_that_does_not_fit_on_disk_stops_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipa_ds.checkpoint import CheckpointError

    ckpt = RunCheckpoints(tiny_config(tmp_path), 0, 1, 0)
    monkeypatch.setattr("clipa_ds.checkpoint.disk_problem", lambda path, need: f"need {need} bytes")
    engine = _FakeEngine()
    try:
        with pytest.raises(CheckpointError, match=r"need 1\d{7} bytes"):  # ~12 bytes x 1M params
            ckpt.save(engine, _FakeLoader(), 0, 768, lr=1e-3, nonfinite={}, num_params=1_000_000)
    finally:
        ckpt.close()
    assert engine.saved == [] and read_latest(RunLayout(tmp_path)) is None


def test_init_from_a_run_dir_or_a_file_is_copied_into_the_run(tmp_path: Path) -> None:
    source = tmp_path / "source"
    weights = build_clip("tiny", 16).state_dict()
    layout = RunLayout(source)
    (source / "config.json").parent.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps(tiny_config(source).to_dict()))
    save_weights(layout.final_weights(1, "finetune"), weights, {"variant": "tiny"})
    layout.final_marker(1, "finetune").write_text("{}")
    for init in (str(source), str(layout.final_weights(1, "finetune"))):
        run = tmp_path / f"run{len(init)}"
        ckpt = RunCheckpoints(tiny_config(run, f"checkpoint.init_from={init}"), 0, 1, 0)
        try:
            ckpt.prepare()
            start = ckpt.start_stage(0)
        finally:
            ckpt.close()
        assert start.source == f"init_from {init}" and start.weights is not None
        assert torch.equal(start.weights["visual.proj.weight"], weights["visual.proj.weight"])
        assert (run / "init_from.safetensors").is_file()
    with pytest.raises(ConfigError, match="only .safetensors files are accepted"):
        bad = tmp_path / "weights.pt"
        torch.save(weights, bad)
        ckpt = RunCheckpoints(tiny_config(tmp_path / "run3", f"checkpoint.init_from={bad}"), 0, 1, 0)
        try:
            ckpt.start_stage(0)
        finally:
            ckpt.close()


def _worker_like_torch() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # DataLoader workers die on SIGTERM
    time.sleep(60)


def test_loader_workers_survive_a_stop_signal_to_the_whole_group() -> None:
    from clipa_ds.data.workers import worker_context

    signals = StopSignals().install()
    child = worker_context().Process(target=_worker_like_torch)  # how loader workers start
    child.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # a pre-emption signal to the whole group...
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=1.0)
        assert signals.received == signal.SIGTERM  # ...is noted by the training process
        assert child.is_alive()  # and leaves the worker serving until the checkpoint is saved
    finally:
        child.kill()
        child.join()
        signals.restore()
