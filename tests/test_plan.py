"""`clipa-ds plan`: token counts, FLOPs, cost, memory and the bad-input messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipa_ds.config import ConfigError
from clipa_ds.memory import ZeroSetup, estimate_memory, tower_activation_bytes
from clipa_ds.models.variants import analytic_param_count, get_variant
from clipa_ds.plan import GPUS, build_plan, main

REPO = Path(__file__).resolve().parent.parent


def test_cli_json_h14_84_done_when() -> None:
    """The issue's check, through the real command line (the lead's `clipa-ds plan` calls main)."""
    out = subprocess.run(
        [sys.executable, "-m", "clipa_ds.plan", "clipa-v2-h14-84", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    report = json.loads(out)
    by_name = {s["name"]: s for s in report["stages"]}
    pre, ft = by_name["pretrain"], by_name["finetune-224"]
    for stage in report["stages"]:
        assert {"name", "samples", "image_tokens", "text_tokens", "train_gflops_per_sample"} <= set(stage)
    assert (pre["image_tokens"], pre["text_tokens"]) == (36, 8)
    assert pre["train_gflops_per_sample"] == pytest.approx(151, rel=0.03)
    assert (ft["image_mask"], ft["image_mask_ratio"], ft["text_tokens"]) == ("random", 0.3, 32)
    assert (ft["patch_tokens"], ft["image_tokens"]) == (256, 179)  # floor(256 x 0.7)
    assert report["params"] == analytic_param_count(get_variant("H-14"), 32)


def test_totals_and_cost_scale() -> None:
    base = build_plan("clipa-v2-h14-84", gpu="a100", mfu=0.25, world_size=64)
    fast = build_plan("clipa-v2-h14-84", gpu="a100", mfu=0.5, world_size=64, price_per_gpu_hour=3.15)
    total = base["total"]
    assert total["samples"] == sum(s["samples"] for s in base["stages"])
    assert total["exaflops"] == pytest.approx(sum(s["samples"] * s["train_gflops_per_sample"] / 1e9 for s in base["stages"]))
    assert fast["total"]["gpu_hours"] == pytest.approx(total["gpu_hours"] / 2)
    assert fast["total"]["cost"] == pytest.approx(total["cost"])  # half the hours at twice the price
    assert total["wall_hours"] == pytest.approx(total["gpu_hours"] / 64)
    for s in base["stages"]:  # image + text split adds up, training = 3 x forward
        assert s["train_gflops_per_sample_image"] + s["train_gflops_per_sample_text"] == pytest.approx(s["train_gflops_per_sample"])
        assert s["train_gflops_per_sample"] == pytest.approx(3 * s["forward_gflops_per_sample"]["total"])
    # The README's own prices an A100 hour at $12,247 / 7,776 h.
    assert base["price_per_gpu_hour"] == pytest.approx(12_247 / 7_776, rel=1e-3)


def test_masking_and_short_text_cut_flops() -> None:
    report = build_plan("clipa-v2-h14-84", ["stages.finetune-224.image.mask_ratio=0.0"])
    unmasked = report["stages"][1]
    masked = build_plan("clipa-v2-h14-84")["stages"][1]
    assert unmasked["image_tokens"] == 256
    assert masked["forward_gflops_per_sample"]["image"] < 0.75 * unmasked["forward_gflops_per_sample"]["image"]
    assert masked["forward_gflops_per_sample"]["text"] == unmasked["forward_gflops_per_sample"]["text"]


def test_memory_warning_and_suggested_micro_batch_fits() -> None:
    report = build_plan("clipa-v2-h14-84", world_size=8, gpu="h100")
    ft = report["stages"][1]
    assert not ft["fits"] and ft["memory_gib"]["total"] > GPUS["h100"].memory_gib
    assert any("finetune-224" in w and "micro_batch" in w for w in report["warnings"])
    micro = ft["suggested_micro_batch"]
    assert micro and (32_768 // 8) % micro == 0
    fixed = build_plan("clipa-v2-h14-84", [f"stages.finetune-224.micro_batch={micro}"], world_size=8, gpu="h100")
    ft_fixed = fixed["stages"][1]
    assert ft_fixed["fits"] and ft_fixed["grad_accum"] == 4_096 // micro and not fixed["warnings"]
    assert ft_fixed["negatives_per_loss"] == micro * 8


def test_zero_stage_partitions_memory() -> None:
    by_stage = {
        z: build_plan("clipa-v2-g14-84", [f"engine.zero_stage={z}"], world_size=64)["stages"][0]["memory_gib"]
        for z in (1, 2, 3)
    }
    assert by_stage[2]["gradients"] < by_stage[1]["gradients"]
    assert by_stage[3]["weights"] < by_stage[2]["weights"]
    assert by_stage[1]["optimizer"] == pytest.approx(by_stage[3]["optimizer"])
    params = analytic_param_count(get_variant("G-14"), 8)
    assert by_stage[1]["weights"] == pytest.approx(params * 2 / 2**30, rel=0.01)  # bf16, replicated
    offload = build_plan(
        "clipa-v2-g14-84", [f"engine.ds_config_overrides={REPO / 'ds_configs' / 'offload_optimizer.json'}"], world_size=64
    )
    assert offload["stages"][0]["memory_gib"]["optimizer"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "world", "needle"),
    [
        (["stages.pretrain.global_batch=65000"], 64, "global_batch=65000"),
        (["stages.pretrain.micro_batch=3"], 8, "micro_batch"),
        (["stages.pretrain.image.size=85"], 8, "patch size 14"),
        (["stages.pretrain.optim.warmup_samples=20000000000"], 8, "warm-up"),
        (["stages.finetune-224.image.mask=grid"], 8, "grid"),
    ],
)
def test_bad_input_is_rejected_before_work(overrides: list[str], world: int, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_plan("clipa-v2-h14-84", overrides, world_size=world)
    assert main(["clipa-v2-h14-84", *overrides, "--world-size", str(world), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in captured.err


@pytest.mark.parametrize("args", [["--gpu", "tpu"], ["--mfu", "1.5"], ["--world-size", "0"]])
def test_bad_flags_are_rejected(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clipa-v2-h14-84", *args]) == 2
    assert "error" in capsys.readouterr().err


def test_text_table_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clipa-v2-g14-84-336", "--gpu", "a100", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    for needle in ("pretrain", "finetune-224", "finetune-336", "total", "GPU-h", "weights"):
        assert needle in out


# ----------------------------------------------------------------------------- memory model


def _saved_activation_bytes(module: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after a forward pass (unique storages, no parameters)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module.forward_tokens(images)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_model_matches_autograd(checkpointing: bool) -> None:
    """The per-layer activation formula against what autograd really saves (fp32, CPU)."""
    from clipa_ds.models.clip import build_clip

    spec = get_variant("tiny")
    model = build_clip("tiny", 16, grad_checkpointing_vision=checkpointing).train()
    batch, size = 8, 64
    tokens = (size // spec.patch_size) ** 2
    measured = _saved_activation_bytes(model.visual, torch.randn(batch, 3, size, size))
    if checkpointing:
        # After forward only the layer inputs remain; the estimate adds one recomputed layer.
        kept_inputs = batch * spec.vision.depth * tokens * spec.vision.width * 4
        assert kept_inputs <= measured <= 1.5 * kept_inputs
        assert measured < batch * tower_activation_bytes(spec.vision, tokens, checkpointing=True, bytes_per_value=4)
    else:
        estimate = batch * tower_activation_bytes(spec.vision, tokens, checkpointing=False, bytes_per_value=4)
        assert measured == pytest.approx(estimate, rel=0.15)


def test_memory_terms_follow_zero_partitioning() -> None:
    spec = get_variant("H-14")
    params = analytic_param_count(spec, 32)
    common = dict(params=params, micro_batch=64, image_tokens=36, patch_tokens=36, text_tokens=8,
                  negatives=64 * 16, checkpoint_vision=True, checkpoint_text=True)
    z1 = estimate_memory(spec, zero=ZeroSetup(stage=1, world_size=16), **common)
    z3 = estimate_memory(spec, zero=ZeroSetup(stage=3, world_size=16), **common)
    assert z1.weights == params * 2 and z3.weights == pytest.approx(params * 2 / 16)
    assert z1.optimizer == pytest.approx(params * 12 / 16) == z3.optimizer
    assert z1.gradients == params * 4 and z3.gradients == pytest.approx(params * 4 / 16)
    assert z1.activations == z3.activations
    no_ckpt = estimate_memory(spec, zero=ZeroSetup(stage=1, world_size=16), **{**common, "checkpoint_vision": False})
    assert no_ckpt.activations > 3 * z1.activations
