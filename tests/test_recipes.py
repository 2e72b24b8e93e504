"""Shipped recipes: they parse and validate, carry the published numbers, and size the right model."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from clipa_ds.config import load_config
from clipa_ds.engine import batch_plan
from clipa_ds.models.variants import analytic_param_count, get_variant
from clipa_ds.recipes import RECIPES, load_recipe, recipe_names
from clipa_ds.reduce.image import num_kept

CLIPA = [n for n in recipe_names() if n.startswith("clipa-")]
V2_BASE = ["clipa-v2-l14-84", "clipa-v2-h14-70", "clipa-v2-h14-84", "clipa-v2-g14-84"]
REQUIRED = {
    "clipa-v1-b16-i50t16", "clipa-v1-l16-i17t16", "clipa-v1-l16-i37t8",
    "clipa-v2-l14-84", "clipa-v2-h14-70", "clipa-v2-h14-84", "clipa-v2-g14-84",
}


def test_issue_recipes_are_registered() -> None:
    assert REQUIRED <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_parses_and_validates(name: str) -> None:
    cfg = load_config(name)
    assert cfg.recipe == name
    assert cfg.stages


@pytest.mark.parametrize("name", CLIPA)
def test_recipe_documents_its_source(name: str) -> None:
    fn = RECIPES[name]
    text = (inspect.getdoc(inspect.getmodule(fn)) or "") + (inspect.getdoc(fn) or "")
    assert "arXiv" in text and "UCSC-VLAA/CLIPA" in text


@pytest.mark.parametrize("name", CLIPA)
def test_recipe_names_no_cluster(name: str) -> None:
    raw = load_recipe(name)
    assert raw["engine"]["zero_stage"] in (1, 2, 3)  # set per recipe, not inherited
    cfg = load_config(name)
    for stage in cfg.stages:
        assert stage.micro_batch == 0, "micro-batch is derived from the world size"
        for world in (8, 16, 64, 256):
            plan = batch_plan(stage.global_batch, stage.micro_batch, world)
            assert plan.micro_batch * plan.grad_accum * world == stage.global_batch


@pytest.mark.parametrize("name", CLIPA)
def test_finetune_stages_derive_from_pretrain(name: str) -> None:
    cfg = load_config(name)
    first = cfg.stages[0]
    assert first.name == "pretrain"
    for stage in cfg.stages[1:]:
        for key in ("weight_decay", "beta1", "beta2", "eps", "grad_clip", "min_lr"):
            assert getattr(stage.optim, key) == getattr(first.optim, key), key
        assert stage.image.size > first.image.size
        assert stage.text.context_length >= first.text.context_length
        assert stage.optim.lr < first.optim.lr


@pytest.mark.parametrize("name", V2_BASE)
def test_v2_schedule_matches_published_config(name: str) -> None:
    cfg = load_config(name)
    bigg = "g14" in name
    pre, ft = cfg.stages
    assert (pre.name, ft.name) == ("pretrain", "finetune-224")
    assert pre.samples == 12_811_670_000 and pre.global_batch == 65_536
    assert pre.optim.lr == pytest.approx(1.024e-3 if bigg else 2.048e-3)
    assert (pre.optim.beta1, pre.optim.beta2, pre.optim.weight_decay, pre.optim.min_lr) == (0.9, 0.95, 0.2, 0.0)
    assert pre.optim.warmup_samples == 3_200 * 65_536
    assert pre.image.size == (70 if name.endswith("-70") else 84) and pre.image.mask == "none"
    assert (pre.text.context_length, pre.text.strategy) == (8, "syntax")
    assert ft.samples == 524_288_000 and ft.global_batch == (16_384 if bigg else 32_768)
    assert ft.optim.lr == pytest.approx(2.56e-5 if bigg else 5.12e-5)
    assert ft.optim.warmup_samples == 26_214_400
    assert (ft.image.size, ft.image.mask, ft.image.mask_ratio) == (224, "random", 0.4 if bigg else 0.3)
    assert (ft.text.context_length, ft.text.strategy) == (32, "truncate")


@pytest.mark.parametrize("name", [n for n in V2_BASE if f"{n}-336" in RECIPES])
def test_optional_336_stage_is_droppable(name: str) -> None:
    base, extended = load_recipe(name), load_recipe(f"{name}-336")
    assert extended["stages"][:2] == base["stages"]
    ft336 = load_config(f"{name}-336").stages[2]
    assert (ft336.name, ft336.image.size, ft336.image.mask, ft336.image.mask_ratio) == ("finetune-336", 336, "random", 0.4)
    assert (ft336.samples, ft336.global_batch, ft336.text.context_length) == (131_072_000, 16_384, 32)
    assert ft336.optim.lr == pytest.approx(6.4e-6)


@pytest.mark.parametrize("name", [n for n in CLIPA if n.startswith("clipa-v1-")])
def test_v1_name_encodes_its_tokens(name: str) -> None:
    """I<n>T<m>: n image tokens counting the class token CLIPA-v1's ViT had, m text tokens."""
    image_with_cls, text = map(int, re.search(r"i(\d+)t(\d+)$", name).groups())
    cfg = load_config(name)
    pre, ft = cfg.stages
    grid = pre.image.size // get_variant(cfg.model.variant).patch_size
    assert num_kept(grid * grid, pre.image.mask_ratio) + 1 == image_with_cls
    assert pre.text.context_length == text
    assert pre.samples == 2_000 * 1_281_167 and ft.samples == 131_072_000
    assert (ft.image.size, ft.image.mask, ft.text.context_length) == (224, "none", 32)
    assert pre.optim.lr == pytest.approx(8e-6 * pre.global_batch / 256)
    assert ft.optim.lr == pytest.approx(8e-7 * ft.global_batch / 256)


def _model_shapes() -> list[tuple[str, int]]:
    shapes = set()
    for name in CLIPA:
        raw = load_recipe(name)  # raw dicts: collection must not depend on validation
        shapes |= {(raw["model"]["variant"], s["text"]["context_length"]) for s in raw["stages"]}
    return sorted(shapes)


@pytest.mark.parametrize(("variant", "context_length"), _model_shapes())
def test_meta_model_matches_analytic_param_count(variant: str, context_length: int) -> None:
    from clipa_ds.models.clip import build_clip

    with torch.device("meta"):
        model = build_clip(variant, context_length)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert built == analytic_param_count(get_variant(variant), context_length)
