"""`clipa-ds export` and the weights it writes: open_clip round trip, safetensors, eval bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipa_ds.checkpoint_open_clip import from_open_clip, to_open_clip, write_open_clip_export
from clipa_ds.checkpoint_sources import load_model_for_eval, read_weights
from clipa_ds.checkpoint_store import RunLayout
from clipa_ds.checkpoint_weights import load_weights, save_weights
from clipa_ds.config import load_config
from clipa_ds.export import main as export_main
from clipa_ds.models.clip import build_clip
from clipa_ds.task import normalize_images


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every tensor (LayerNorms, biases, temperature included) so no mapping hides behind init values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def inputs(image_size: int, context_length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = normalize_images(torch.randint(0, 256, (3, 3, image_size, image_size), dtype=torch.uint8, generator=generator))
    tokens = torch.randint(1000, 30000, (3, context_length), generator=generator)
    tokens[:, 0] = 101  # [CLS]
    tokens[0, 5:] = 0  # padding, as the tokenizer writes it
    return images, tokens


def fake_run(root: Path, model: torch.nn.Module) -> Path:
    """A finished one-stage run directory as `clipa_ds.train` leaves it."""
    cfg = load_config("tiny", [f"run.dir={root}", "data.train_urls=/x.tar"])
    layout = RunLayout(root)
    (root / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    for index, stage in enumerate(cfg.stages):
        save_weights(layout.final_weights(index, stage.name), model.state_dict(), {"variant": "tiny"})
        layout.final_marker(index, stage.name).write_text(json.dumps({"stage": stage.name}))
    return root


@pytest.mark.parametrize("logit_bias", [None, -10.0])
def test_open_clip_export_gives_the_same_embeddings(tmp_path: Path, logit_bias: float | None) -> None:
    open_clip = pytest.importorskip("open_clip")
    kwargs = {} if logit_bias is None else {"logit_bias_init": logit_bias}
    model = trained_looking(build_clip("tiny", 16, **kwargs))
    out = write_open_clip_export(tmp_path / "oc", model.state_dict(), "tiny", 16, 48)

    # Builds the model only: the BERT tokenizer named in the config is never fetched.
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded.eval()
    images, tokens = inputs(48, 16)
    with torch.no_grad():
        image_ours, image_theirs = model.encode_image(images), loaded.encode_image(images, normalize=True)
        text_ours, text_theirs = model.encode_text(tokens), loaded.encode_text(tokens, normalize=True)
    assert (image_ours - image_theirs).abs().max() < 1e-5
    assert (text_ours - text_theirs).abs().max() < 1e-5
    assert torch.equal(loaded.logit_scale.reshape(1), model.logit_scale.detach())
    if logit_bias is not None:
        assert torch.equal(loaded.logit_bias.reshape(1), model.logit_bias.bias.detach())
    assert "Normalize" in repr(preprocess)


def test_open_clip_mapping_round_trips_exactly() -> None:
    weights = trained_looking(build_clip("tiny", 8)).state_dict()
    mapped = to_open_clip(weights, "tiny", 32)
    assert mapped["visual.trunk.pos_embed"].shape == (1, 16, 128)  # (32 / 8)^2 patches
    assert mapped["text_projection"].shape == (128, 128) and "transformer.resblocks.1.attn.in_proj_weight" in mapped
    back = from_open_clip(mapped)
    assert sorted(back) == sorted(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_export_cli_writes_every_format_and_eval_loads_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = trained_looking(build_clip("tiny", 16))
    run_dir = fake_run(tmp_path / "run", model)
    images, tokens = inputs(48, 16)
    with torch.no_grad():
        expected = model.encode_image(images), model.encode_text(tokens)

    targets = {
        "file": (["--format", "safetensors", "--out", str(tmp_path / "w.safetensors")], tmp_path / "w.safetensors"),
        "bundle": (["--format", "safetensors", "--out", str(tmp_path / "bundle")], tmp_path / "bundle"),
        "open_clip": (["--format", "open_clip", "--out", str(tmp_path / "oc")], tmp_path / "oc"),
    }
    for args, path in targets.values():
        assert export_main([str(run_dir), *args]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["source"].endswith("stage 'finetune' (final)") and summary["image_size"] == 48
        loaded, context_length, image_size = load_model_for_eval(str(path))
        assert (context_length, image_size) == (16, 48)
        with torch.no_grad():
            assert (loaded.encode_image(images) - expected[0]).abs().max() < 1e-5
            assert (loaded.encode_text(tokens) - expected[1]).abs().max() < 1e-5
    # A run directory itself is a valid eval model.
    assert load_model_for_eval(str(run_dir))[1:] == (16, 48)
    # The eval engineer's bundle loader reads the bundle export.
    from clipa_ds.evaluate.cli import load_eval_bundle

    assert load_eval_bundle(tmp_path / "bundle")[1:] == (16, 48)
    meta = load_weights(tmp_path / "w.safetensors")[1]
    assert meta["variant"] == "tiny" and meta["context_length"] == 16


def test_export_of_a_named_stage_and_bad_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = fake_run(tmp_path / "run", build_clip("tiny", 16))
    weights, info = read_weights(str(run_dir), stage="pretrain")
    assert info.context_length == 8 and info.image_size == 32 and "pretrain" in info.source
    assert export_main([str(run_dir), "--stage", "nope", "--format", "safetensors", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--stage 'nope': the run" in capsys.readouterr().err
    assert export_main([str(tmp_path), "--format", "open_clip", "--out", str(tmp_path / "y")]) == 2
    assert "is not a clipa-ds run directory" in capsys.readouterr().err
