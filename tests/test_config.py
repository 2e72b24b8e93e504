"""Config loading: overrides reach the right field, bad input stops with a message naming the key."""

from __future__ import annotations

import math

import pytest

from clipa_ds.config import ConfigError, OptimConfig, load_config
from clipa_ds.engine import batch_plan
from clipa_ds.schedule import lr_at


def test_tiny_recipe_loads_with_overrides(tmp_path) -> None:
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "engine.zero_stage=3", "stages.finetune.optim.lr=1e-4",
                               "stages.0.samples=4096", "engine.bf16=true"])
    assert cfg.run.dir == str(tmp_path)
    assert cfg.engine.zero_stage == 3 and cfg.engine.bf16 is True
    assert cfg.stages[1].optim.lr == pytest.approx(1e-4)
    assert cfg.stages[0].samples == 4096


def test_yaml_recipe_derives_from_base(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny\nrun: {seed: 7}\nstages:\n  - name: pretrain\n    samples: 2048\n")
    cfg = load_config(str(path))
    assert cfg.run.seed == 7
    assert [s.name for s in cfg.stages] == ["pretrain"]
    assert cfg.stages[0].samples == 2048 and cfg.stages[0].image.size == 32  # rest from the base


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("run.colour=red", "unknown key run.colour; allowed keys here: dir, log_every_steps"),
        ("engine.zero_stage=5", "engine.zero_stage=5; choose 0, 1, 2 or 3"),
        ("stages.0.samples=lots", "stages.0.samples='lots' must be an integer"),
        ("stages.0.image.size=36", "not a multiple of the patch size"),
        ("stages.0.image.mask_ratio=1.0", "must be in [0, 1)"),
        ("stages.0.text.context_length=1", "must be >= 2"),
        ("stages.0.text.strategy=nouns", "choose one of: truncate"),
        ("model.variant=huge", "choose one of:"),
        ("stages.0.optim.warmup_samples=99999999", "longer than the stage"),
        ("stages.nope.samples=1", "no stage named 'nope'"),
        ("run.dir", "not of the form key=value"),
    ],
)
def test_bad_input_names_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert fragment in str(err.value)


def test_unknown_recipe_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; choose one of: .*tiny"):
        load_config("nope")


def test_batch_plan_arithmetic() -> None:
    plan = batch_plan(256, 0, 2)
    assert (plan.micro_batch, plan.grad_accum) == (128, 1)
    plan = batch_plan(256, 32, 2)
    assert (plan.micro_batch, plan.grad_accum) == (32, 4)
    with pytest.raises(ConfigError, match="does not divide by the world size 3"):
        batch_plan(256, 0, 3)
    with pytest.raises(ConfigError, match="world_size x micro_batch = 2 x 48"):
        batch_plan(256, 48, 2)


def test_lr_warmup_then_cosine_to_min() -> None:
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_samples=100)
    assert lr_at(0, optim, 1100) == pytest.approx(0.01)
    assert lr_at(99, optim, 1100) == pytest.approx(1.0)
    assert lr_at(100, optim, 1100) == pytest.approx(1.0)
    assert lr_at(600, optim, 1100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1100, optim, 1100) == pytest.approx(0.1)
    values = [lr_at(s, optim, 1100) for s in range(100, 1101, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_fingerprint_tracks_sections() -> None:
    a = load_config("tiny")
    b = load_config("tiny", ["run.log_every_steps=3"])
    c = load_config("tiny", ["model.variant=B-16", "stages.0.image.size=32", "stages.1.image.size=48"])
    assert a.fingerprint(["model"]) == b.fingerprint(["model"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint(["model"]) != c.fingerprint(["model"])
