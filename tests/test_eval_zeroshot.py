"""Zero-shot / retrieval entry points: bad input, eval mode, full tokens, bundle + CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipa_ds.data.synthetic import CLASS_NAMES, write_synthetic_eval
from clipa_ds.data.tario import END_OF_ARCHIVE
from clipa_ds.data.tokenizer import CaptionTokenizer
from clipa_ds.evaluate import load_eval_bundle, run_retrieval, run_zeroshot, save_eval_bundle
from clipa_ds.evaluate.cli import main as cli_main
from clipa_ds.evaluate.datasets import EvalDataError
from clipa_ds.evaluate.labels import make_label_set
from clipa_ds.models.clip import build_clip
from tests.test_eval_fixtures import IdTokenizer, TableModel, shard_pattern, write_id_shards, zeroshot_problem

REPO_ROOT = Path(__file__).resolve().parent.parent


def _table_setup(tmp_path: Path, labels: list[int] | None = None):
    default_labels, images, texts, classnames, templates, vocab = zeroshot_problem(9, 7, 3)
    labels = default_labels.tolist() if labels is None else labels
    source = shard_pattern(write_id_shards(tmp_path / "shards", [5, 4], labels=labels))
    return TableModel(images, texts), source, make_label_set(classnames, templates), IdTokenizer(vocab)


def _zeroshot(model, source, label_set, tokenizer):
    return run_zeroshot(
        model, source, tokenizer=tokenizer, image_size=8, device="cpu", batch_size=4,
        label_set=label_set, context_length=4,
    )


def test_empty_eval_set_fails_clearly(tmp_path: Path) -> None:
    model, _, label_set, tokenizer = _table_setup(tmp_path)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(END_OF_ARCHIVE)
    with pytest.raises(EvalDataError, match=r"is empty \(0 samples on all ranks\)"):
        _zeroshot(model, str(empty), label_set, tokenizer)
    with pytest.raises(EvalDataError, match="is empty"):
        run_retrieval(model, str(empty), tokenizer=tokenizer, image_size=8, device="cpu", context_length=4)


def test_labels_beyond_the_label_set_fail_clearly(tmp_path: Path) -> None:
    model, source, label_set, tokenizer = _table_setup(tmp_path, labels=[0, 1, 2, 3, 4, 5, 6, 9, 0])
    with pytest.raises(EvalDataError, match=r"has class label 9, but the label set .* has 7 classes \(valid labels 0\.\.6\)"):
        _zeroshot(model, source, label_set, tokenizer)


def test_image_folder_class_count_must_match_label_set(tmp_path: Path) -> None:
    from PIL import Image

    model, _, label_set, tokenizer = _table_setup(tmp_path)
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / name / "0.png")
    with pytest.raises(EvalDataError, match="has 2 class directories but the label set .* has 7 class names"):
        _zeroshot(model, str(tmp_path / "folder"), label_set, tokenizer)


def test_shards_without_labels_fail_in_zeroshot(tmp_path: Path) -> None:
    model, _, label_set, tokenizer = _table_setup(tmp_path)
    source = shard_pattern(write_id_shards(tmp_path / "caps", [2], captions=[["x"], ["y"]]))
    with pytest.raises(EvalDataError, match="has no class label"):
        _zeroshot(model, source, label_set, tokenizer)


def test_eval_runs_in_eval_mode_and_restores_each_module_flag(tmp_path: Path) -> None:
    model, source, label_set, tokenizer = _table_setup(tmp_path)
    model.train()
    model.dummy.eval()  # mixed flags must come back exactly
    result = _zeroshot(model, source, label_set, tokenizer)
    assert result["samples"] == 9 and result["classes"] == 7
    assert model.modes and not any(model.modes)  # every forward saw eval mode
    assert model.training and not model.dummy.training


def _tiny_clip(context_length: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_clip("tiny", context_length)


def _record_image_features(model: torch.nn.Module) -> list[torch.Tensor]:
    features: list[torch.Tensor] = []
    encode_image = model.encode_image
    model.encode_image = lambda images: (features.append(encode_image(images)), features[-1])[1]  # type: ignore[method-assign]
    return features


def test_evaluation_uses_full_tokens_while_training_masks(tmp_path: Path) -> None:
    context_length = 8
    source = write_synthetic_eval(tmp_path, num_samples=19, image_size=40, seed=0)[0]
    templates = ["a blurry low resolution photo of the big {} in the middle.", "a {}."]
    label_set = make_label_set(CLASS_NAMES, templates)
    tokenizer = CaptionTokenizer()

    # Text: the prompts reach the model exactly as encode_batch's full (truncated) tokens,
    # which differ from what the training text reduction would make of them.
    masked = _tiny_clip(context_length)
    masked.visual.set_token_masking("random", 0.5)
    seen: list[torch.Tensor] = []
    encode_text = masked.encode_text
    masked.encode_text = lambda tokens: (seen.append(tokens.clone()), encode_text(tokens))[1]  # type: ignore[method-assign]
    masked_features = _record_image_features(masked)
    masked.train()
    with_masking = run_zeroshot(
        masked, source, tokenizer=tokenizer, image_size=32, device="cpu", batch_size=8, label_set=label_set
    )
    prompts = [p for c in range(len(CLASS_NAMES)) for p in label_set.prompts(c)]
    assert torch.equal(torch.cat(seen), tokenizer.encode_batch(prompts, context_length))
    syntax = torch.tensor([tokenizer.encode(p, context_length, "syntax") for p in prompts])
    assert not torch.equal(torch.cat(seen), syntax)

    # Image: the same weights without masking give identical results, because eval mode
    # switches the tower's masking off ...
    plain = _tiny_clip(context_length)
    plain.load_state_dict(masked.state_dict())
    plain_features = _record_image_features(plain)
    without_masking = run_zeroshot(
        plain, source, tokenizer=tokenizer, image_size=32, device="cpu", batch_size=8, label_set=label_set
    )
    assert with_masking == without_masking
    assert torch.equal(torch.cat(masked_features), torch.cat(plain_features))
    assert masked.training and masked.visual.training  # mode restored for training
    # ... while in training mode the masked tower does drop tokens (the check above has teeth).
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(masked.encode_image(images), plain.eval().encode_image(images), atol=1e-4)


def test_eval_bundle_round_trip(tmp_path: Path) -> None:
    model = _tiny_clip(16)
    save_eval_bundle(model, "tiny", 16, 48, tmp_path / "run" / "export")
    loaded, context_length, image_size = load_eval_bundle(tmp_path / "run" / "export")
    assert (context_length, image_size) == (16, 48)
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clipa_ds.evaluate.cli", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_cli_reports_the_same_numbers_as_the_in_process_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_synthetic_eval(tmp_path / "data", num_samples=21, image_size=40, seed=1)[0]
    label_set = make_label_set(CLASS_NAMES, ["a photo of a {}.", "a {} shape."])
    model = _tiny_clip(16)
    # The bundle carries the label set, so `clipa-ds eval RUN_DIR` needs no label files.
    save_eval_bundle(model, "tiny", 16, 32, tmp_path / "run" / "export", label_set=label_set)
    tokenizer = CaptionTokenizer()
    expected_z = run_zeroshot(
        model, source, tokenizer=tokenizer, image_size=32, device="cpu", batch_size=16, label_set=label_set
    )
    expected_r = run_retrieval(model, source, tokenizer=tokenizer, image_size=32, device="cpu", batch_size=16)

    done = _cli(str(tmp_path / "run"), "--task", "zeroshot", "--data", source, "--batch-size", "16", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["top1"] == expected_z["top1"] and summary["top5"] == expected_z["top5"]
    assert summary["samples"] == 21 and summary["classes"] == 8 and summary["image_size"] == 32

    # The same entry point in-process (saves interpreter start-ups): explicit label files ...
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    templates.write_text("a photo of a {}.\n")
    args = [str(tmp_path / "run" / "export"), "--task", "zeroshot", "--data", source, "--device", "cpu"]
    assert cli_main([*args, "--classnames", str(names), "--templates", str(templates)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    one_template = run_zeroshot(
        model, source, tokenizer=tokenizer, image_size=32, device="cpu",
        label_set=make_label_set(CLASS_NAMES, ["a photo of a {}."]),
    )
    assert summary["top1"] == one_template["top1"] and summary["top5"] == one_template["top5"]

    # ... retrieval ...
    assert cli_main([str(tmp_path / "run"), "--task", "retrieval", "--data", source, "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: summary[k] for k in expected_r if "R@" in k} == {k: v for k, v in expected_r.items() if "R@" in k}
    assert summary["images"] == 21 and summary["captions"] == 21

    # ... and bad input: a clear message and exit code 2, no traceback.
    assert cli_main([str(tmp_path / "run"), "--task", "zeroshot", "--data", str(tmp_path / "nowhere")]) == 2
    assert "neither .tar shards nor a directory" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "nothing"), "--task", "zeroshot", "--data", source]) == 2
    assert "is not a clipa-ds run directory, a .safetensors file, an eval bundle" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "run"), "--task", "zeroshot", "--data", str(tmp_path / "missing-{0..1}.tar")]) == 2
    assert "missing-0.tar" in capsys.readouterr().err
