"""Zero-shot label sets: class names (one per line, line i = class index i) and prompt templates.

The shipped ImageNet-1k set (`data/imagenet_classnames.txt`, `data/imagenet_templates.txt`) is
the OpenAI CLIP list of 1,000 names and 80 templates, copied as plain text from open_clip's
`zero_shot_metadata.py` so nothing is downloaded or imported at run time.

Duplicate class names are KEPT as separate classes: labels are line indices, so merging would
renumber every later class and break the dataset's labels. Equal names get the same prompts and so
(near-)identical class embeddings: the two classes compete for the same images and both score
lower than distinct names would. The shipped ImageNet list has two such pairs ("missile",
"sunglasses"), exactly as in OpenAI's list, so its numbers stay comparable with published ones.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from clipa_ds.config import ConfigError

IMAGENET_CLASSNAMES = "imagenet_classnames.txt"
IMAGENET_TEMPLATES = "imagenet_templates.txt"
PLACEHOLDER = "{}"


class DuplicateClassNamesWarning(UserWarning):
    """A label set names the same class twice; the classes are kept separate (see module doc)."""


@dataclass(frozen=True)
class LabelSet:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: str = ""  # where it came from, for error messages

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, class_index: int) -> list[str]:
        """The len(templates) prompts of one class, template order."""
        name = self.classnames[class_index]
        return [template.replace(PLACEHOLDER, name) for template in self.templates]


def _read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist; pass a text file with one entry per line")
    # Blank lines are skipped (a trailing newline is common); the rest are stripped.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shipped(name: str) -> Path:
    return Path(str(resources.files("clipa_ds.evaluate").joinpath("data", name)))


def duplicate_names(classnames: tuple[str, ...] | list[str]) -> dict[str, list[int]]:
    """{name: [indices...]} for every name that occurs more than once (exact match)."""
    where: dict[str, list[int]] = defaultdict(list)
    for index, name in enumerate(classnames):
        where[name].append(index)
    return {name: idx for name, idx in where.items() if len(idx) > 1}


def make_label_set(classnames: list[str], templates: list[str], source: str = "") -> LabelSet:
    """Validate and build a label set; warn on duplicate class names (kept as separate classes)."""
    if not classnames:
        raise ConfigError(f"label set {source or '(given)'} has no class names; the file must list one class per line")
    if not templates:
        raise ConfigError(
            f"label set {source or '(given)'} has no templates; give at least one, e.g. 'a photo of a {{}}.'"
        )
    bad = [t for t in templates if t.count(PLACEHOLDER) != 1]
    if bad:
        raise ConfigError(
            f"template {bad[0]!r} must contain the class-name placeholder {PLACEHOLDER!r} exactly once "
            f"({len(bad)} bad templates in {source or 'the template list'})"
        )
    dups = duplicate_names(classnames)
    if dups:
        shown = ", ".join(f"{name!r} at indices {idx}" for name, idx in list(dups.items())[:5])
        warnings.warn(
            f"label set {source or '(given)'} has duplicate class names: {shown}. They are kept as "
            "separate classes (labels are line indices); they get the same prompts, so they compete "
            "for the same images and both score lower. Make the names distinct to tell them apart.",
            DuplicateClassNamesWarning,
            stacklevel=2,
        )
    return LabelSet(tuple(classnames), tuple(templates), source)


def load_label_set(classnames_path: str | Path | None = None, templates_path: str | Path | None = None) -> LabelSet:
    """Label set from files; a missing path falls back to the shipped ImageNet file."""
    names_file = Path(classnames_path) if classnames_path else _shipped(IMAGENET_CLASSNAMES)
    templates_file = Path(templates_path) if templates_path else _shipped(IMAGENET_TEMPLATES)
    return make_label_set(
        _read_lines(names_file, "class-names"),
        _read_lines(templates_file, "templates"),
        source=f"{names_file.name} + {templates_file.name}",
    )


def imagenet_label_set() -> LabelSet:
    """The shipped ImageNet-1k class names and OpenAI's 80 templates (warns: 2 duplicate names)."""
    return load_label_set(None, None)
