"""Data files shipped inside other installed packages, found without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def shipped_file(package: str, *parts: str, what: str) -> Path:
    """Path of PACKAGE/parts..., or FileNotFoundError naming the pip package to install.

    find_spec locates the package without running its __init__ (textblob's pulls in nltk: seconds).
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0] if locations else f"{package}-not-installed").joinpath(*parts)
    if not path.is_file():
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"{what} not found at {path}; install it with `pip install {pip_name}`")
    return path
