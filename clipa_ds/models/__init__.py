"""CLIPA model family (image tower, text tower, CLIP wrapper) and named variants."""

from __future__ import annotations

from clipa_ds.models.clip import CLIP, build_clip, no_weight_decay_names, param_groups
from clipa_ds.models.variants import VARIANTS, ModelSpec, TowerSpec, analytic_param_count, get_variant

__all__ = [
    "CLIP",
    "VARIANTS",
    "ModelSpec",
    "TowerSpec",
    "analytic_param_count",
    "build_clip",
    "get_variant",
    "no_weight_decay_names",
    "param_groups",
]
