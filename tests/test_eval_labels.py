"""Shipped label set (1,000 ImageNet names, 80 templates) and label-file validation."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from clipa_ds.config import ConfigError
from clipa_ds.evaluate.labels import DuplicateClassNamesWarning, imagenet_label_set, load_label_set, make_label_set


def _data_file(name: str) -> list[str]:
    text = resources.files("clipa_ds.evaluate").joinpath("data", name).read_text(encoding="utf-8")
    return text.splitlines()


def test_shipped_files_have_exactly_1000_names_and_80_templates() -> None:
    names = _data_file("imagenet_classnames.txt")
    templates = _data_file("imagenet_templates.txt")
    assert len(names) == 1000 and all(n.strip() == n and n for n in names)
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert names[0] == "tench" and names[999] == "toilet paper"
    assert templates[0] == "a bad photo of a {}." and templates[79] == "a tattoo of the {}."
    assert len(set(templates)) == 80


def test_imagenet_label_set_warns_about_its_two_duplicate_pairs() -> None:
    with pytest.warns(DuplicateClassNamesWarning, match=r"'missile' at indices \[657, 744\].*kept as separate classes"):
        label_set = imagenet_label_set()
    assert label_set.num_classes == 1000 and len(label_set.templates) == 80
    assert label_set.prompts(0)[0] == "a bad photo of a tench."
    assert len(label_set.prompts(999)) == 80


def test_custom_label_files(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n\nbird\n")  # blank lines ignored
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    label_set = load_label_set(names, templates)
    assert label_set.classnames == ("cat", "dog", "bird")
    assert label_set.prompts(1) == ["a photo of a dog."]
    # Only the names given: templates default to the shipped 80.
    assert len(load_label_set(names, None).templates) == 80


def test_duplicate_names_are_kept_and_the_warning_says_so() -> None:
    with pytest.warns(DuplicateClassNamesWarning, match=r"'cat' at indices \[0, 2\].*kept as separate classes"):
        label_set = make_label_set(["cat", "dog", "cat"], ["{}"])
    assert label_set.num_classes == 3


def test_bad_label_inputs_have_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="placeholder '{}' exactly once"):
        make_label_set(["cat"], ["a photo of a cat"])
    with pytest.raises(ConfigError, match="no class names"):
        make_label_set([], ["{}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_label_set(tmp_path / "missing.txt", None)
