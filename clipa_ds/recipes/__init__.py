"""Named recipes (plain dicts built by small functions) and YAML recipe files.

A YAML file may name a `base:` recipe; its keys are then merged over that recipe, so a
fine-tune file only says what differs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from clipa_ds.config import ConfigError
from clipa_ds.recipes import tiny

RECIPES: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": tiny.recipe,
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
