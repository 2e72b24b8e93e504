"""ds_configs/*.json hold engine knobs only and pass DeepSpeed's own config parsing.

DeepSpeed validates its sub-sections (zero_optimization, bf16, offload) with pydantic models that
forbid extra keys, but it silently ignores unknown top-level keys and unknown `data_types` keys.
`strict_validate` closes those two gaps by checking names against DeepSpeed's own constants, so a
typo anywhere in the merged config fails here instead of being ignored at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clipa_ds.config import EngineConfig, OptimConfig
from clipa_ds.engine import batch_plan, build_ds_config

DS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
STAGES = (1, 2, 3)
# What the recipe / engine own; a ds_configs file that sets one of these would silently fight
# the run config.
RUN_OWNED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "data_types",
}


def _deepspeed_top_level_keys() -> set[str]:
    """Every config key name DeepSpeed's runtime declares as a constant."""
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    names = {
        value for name, value in vars(constants).items()
        if name.isupper() and isinstance(value, str) and value.isidentifier()
    }
    return names | {ZERO_OPTIMIZATION}


def _data_types_keys() -> set[str]:
    import deepspeed.runtime.constants as c

    return {c.GRAD_ACCUM_DTYPE, c.PARAM_DTYPE, c.BUFFER_DTYPE, c.KEEP_IN_FP32_MODULES}


def strict_validate(config: dict[str, Any]) -> Any:
    """Parse `config` with DeepSpeedConfig after checking the keys DeepSpeed itself does not."""
    from deepspeed.runtime.config import DeepSpeedConfig

    unknown = sorted(set(config) - _deepspeed_top_level_keys())
    if unknown:
        raise ValueError(f"unknown top-level DeepSpeed key(s): {unknown}")
    unknown = sorted(set(config.get("data_types", {})) - _data_types_keys())
    if unknown:
        raise ValueError(f"unknown data_types key(s): {unknown}")
    return DeepSpeedConfig(config)  # pydantic, extra="forbid", for zero_optimization / bf16


def _engine_config(stage: int, overrides: str = "") -> dict[str, Any]:
    """The merged config exactly as the engine builds it (world size 1 outside a process group)."""
    plan = batch_plan(global_batch=64, micro_batch=16, world_size=1)
    engine = EngineConfig(zero_stage=stage, bf16=True, ds_config_overrides=overrides)
    return build_ds_config(engine, plan, OptimConfig(grad_clip=1.0))


@pytest.mark.parametrize("stage", STAGES)
def test_file_holds_engine_knobs_only(stage: int) -> None:
    data = json.loads((DS_DIR / f"zero{stage}.json").read_text())
    assert data["zero_optimization"]["stage"] == stage
    assert not RUN_OWNED_KEYS & set(data), f"zero{stage}.json sets run-owned keys"


@pytest.mark.parametrize("stage", STAGES)
def test_merged_config_passes_deepspeed_parsing(stage: int) -> None:
    parsed = strict_validate(_engine_config(stage))
    assert parsed.zero_config.stage == stage
    assert parsed.zero_enabled
    assert parsed.bfloat16_config.enabled
    assert parsed.grad_accum_dtype == "fp32"
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (64, 16, 4)
    if stage == 3:
        # Export needs full 16-bit weights gathered on save.
        assert parsed.zero_config.gather_16bit_weights_on_model_save
        assert parsed.zero_config.param_persistence_threshold > 0


@pytest.mark.parametrize("stage", STAGES)
def test_offload_overlay_merges_and_parses(stage: int) -> None:
    parsed = strict_validate(_engine_config(stage, str(DS_DIR / "offload_optimizer.json")))
    assert parsed.zero_config.stage == stage  # the overlay does not change the stage
    assert parsed.zero_config.offload_optimizer is not None
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.zero_config.overlap_comm  # knobs of the base file survive the merge


@pytest.mark.parametrize(
    ("where", "mutate"),
    [
        ("zero_optimization", lambda c: c["zero_optimization"].update(overlap_comms=True)),
        ("zero_optimization", lambda c: c["zero_optimization"].update(stage3_prefetch_bucket=1)),
        ("top level", lambda c: c.update(zero_optimisation={"stage": 1})),
        ("data_types", lambda c: c["data_types"].update(grad_acum_dtype="fp32")),
        ("bf16", lambda c: c["bf16"].update(enable=True)),
    ],
)
def test_misspelled_key_is_rejected(where: str, mutate: Any) -> None:
    from pydantic import ValidationError

    config = _engine_config(3)
    mutate(config)
    with pytest.raises((ValueError, ValidationError)):
        strict_validate(config)


def test_wrong_value_type_is_rejected() -> None:
    from pydantic import ValidationError

    config = _engine_config(2)
    config["zero_optimization"]["reduce_bucket_size"] = -1
    with pytest.raises(ValidationError):
        strict_validate(config)
