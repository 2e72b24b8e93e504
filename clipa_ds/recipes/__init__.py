"""Named recipes (plain dicts built by small functions) and YAML recipe files.

A YAML file may name a `base:` recipe; its keys are then merged over that recipe, so a
fine-tune file only says what differs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from clipa_ds.config import ConfigError
from clipa_ds.recipes import clipa_v1, clipa_v2, tiny

RECIPES: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": tiny.recipe,
    "clipa-v1-b16-i50t16": clipa_v1.b16_i50t16,
    "clipa-v1-l16-i17t16": clipa_v1.l16_i17t16,
    "clipa-v1-l16-i37t8": clipa_v1.l16_i37t8,
    "clipa-v2-l14-84": clipa_v2.l14_84,
    "clipa-v2-l14-84-336": clipa_v2.l14_84_336,
    "clipa-v2-h14-70": clipa_v2.h14_70,
    "clipa-v2-h14-84": clipa_v2.h14_84,
    "clipa-v2-h14-84-336": clipa_v2.h14_84_336,
    "clipa-v2-g14-84": clipa_v2.g14_84,
    "clipa-v2-g14-84-336": clipa_v2.g14_84_336,
}


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Return a fresh recipe dict for a registered name or a YAML file path."""
    if name_or_path in RECIPES:
        return copy.deepcopy(RECIPES[name_or_path]())
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return _load_yaml(path)
    raise ConfigError(
        f"unknown recipe {name_or_path!r}; choose one of: {', '.join(recipe_names())}, or a .yaml file"
    )


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return merge(load_recipe(str(base)), data)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; lists are replaced, except `stages`, merged by stage name."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key == "stages" and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_stages(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_stages(base: list[dict[str, Any]], update: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {s["name"]: s for s in base}
    return [merge(by_name[s["name"]], s) if s.get("name") in by_name else copy.deepcopy(s) for s in update]
