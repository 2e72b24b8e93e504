"""CLIPA model family: tower behaviour on the tiny variant, big variants on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipa_ds.config import ConfigError
from clipa_ds.models import CLIP, VARIANTS, analytic_param_count, build_clip, get_variant, param_groups
from clipa_ds.models.clip import no_weight_decay_names
from clipa_ds.reduce.image import num_kept

TINY = get_variant("tiny")
CTX = 8


@pytest.fixture()
def model() -> CLIP:
    torch.manual_seed(0)
    return build_clip("tiny", CTX)


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def _tokens(batch: int = 2, length: int = CTX, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=g)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block_input_tokens(tower: torch.nn.Module, run) -> int:
    """Number of tokens entering blocks[0] during `run()`."""
    seen: list[int] = []
    handle = tower.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def test_two_resolutions_same_weights(model: CLIP) -> None:
    model.eval()
    with torch.no_grad():
        for size in (32, 48, 64):
            grid = size // TINY.patch_size
            n = _block_input_tokens(model.visual, lambda: model.encode_image(_images(3, size)))
            assert n == grid * grid
            assert model.encode_image(_images(3, size)).shape == (3, TINY.embed_dim)
        with pytest.raises(Exception):
            model.encode_image(_images(1, 36))  # not a multiple of the patch size


def test_sincos_positions_recomputed_not_parameters(model: CLIP) -> None:
    visual_keys = list(model.visual.state_dict())
    assert not [k for k in visual_keys if "pos" in k], visual_keys
    d = TINY.vision.width
    small = model.visual.pos_embed(4, 4, torch.device("cpu"), torch.float32).view(4, 4, d)
    large = model.visual.pos_embed(6, 7, torch.device("cpu"), torch.float32).view(6, 7, d)
    # A fixed function of the (row, col) coordinate: the 4x4 table is the corner of the 6x7 one.
    torch.testing.assert_close(small, large[:4, :4])
    assert not torch.allclose(large[0, 1], large[1, 0])  # rows and columns are distinguished
    assert small.requires_grad is False


def test_outputs_normalised_and_logit_scale(model: CLIP) -> None:
    img, txt, scale = model(_images(), _tokens())
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert scale.shape == ()
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    _, _, scale = model(_images(), _tokens())
    assert math.isclose(scale.item(), 100.0, rel_tol=1e-5)


def test_masking_only_in_train_mode(model: CLIP) -> None:
    images = _images(2, 64)  # 8x8 = 64 patches
    model.eval()
    with torch.no_grad():
        plain = model.encode_image(images)
        model.visual.set_token_masking("random", 0.5)
        masked_eval = model.encode_image(images, generator=_gen(1))
        n_eval = _block_input_tokens(model.visual, lambda: model.encode_image(images))
    torch.testing.assert_close(plain, masked_eval)
    assert n_eval == 64
    model.train()
    with torch.no_grad():
        n_train = _block_input_tokens(model.visual, lambda: model.encode_image(images, _gen(1)))
        model.visual.set_token_masking("none", 0.0)
        n_off = _block_input_tokens(model.visual, lambda: model.encode_image(images))
    assert n_train == num_kept(64, 0.5) == 32
    assert n_off == 64


def test_positions_added_before_drop_and_generator_replay(model: CLIP) -> None:
    # A constant image makes every patch token identical before positions are added, so the
    # output can only depend on WHICH tokens were kept through their positions.
    images = torch.full((2, 3, 64, 64), 0.3)
    model.visual.set_token_masking("random", 0.5)
    model.train()
    with torch.no_grad():
        a = model.encode_image(images, generator=_gen(1))
        a_again = model.encode_image(images, generator=_gen(1))
        b = model.encode_image(images, generator=_gen(2))
        model.eval()
        e1 = model.encode_image(images, generator=_gen(1))
        e2 = model.encode_image(images, generator=_gen(2))
    torch.testing.assert_close(a, a_again)
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(e1, e2)


def test_every_parameter_gets_gradient(model: CLIP) -> None:
    model.train()
    model.visual.set_token_masking("random", 0.3)
    img, txt, scale = model(_images(4, 32), _tokens(4), generator=_gen(0))
    _contrastive_loss(img, txt, scale).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_grad_checkpointing_matches(model: CLIP) -> None:
    model.train()
    model.visual.set_token_masking("random", 0.5)
    images, tokens = _images(4, 64), _tokens(4)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.visual.set_grad_checkpointing(checkpointing)
        model.text.set_grad_checkpointing(checkpointing)
        img, txt, scale = model(images, tokens, generator=_gen(3))
        _contrastive_loss(img, txt, scale).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)

    ckpt_model = build_clip("tiny", CTX, grad_checkpointing_vision=True, grad_checkpointing_text=True)
    assert ckpt_model.visual.grad_checkpointing and ckpt_model.text.grad_checkpointing


def test_attention_is_fused_sdpa(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = list(model.visual.blocks) + list(model.text.blocks)
    assert all(b.attn.fused_attn for b in blocks)
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003
        calls.append(1)
        assert kwargs.get("attn_mask") is None and not kwargs.get("is_causal", False)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(_images(), _tokens())
    assert len(calls) == TINY.vision.depth + TINY.text.depth


def test_text_is_bidirectional(model: CLIP) -> None:
    model.eval()
    hidden: list[torch.Tensor] = []
    handle = model.text.blocks[-1].register_forward_hook(lambda _m, _a, out: hidden.append(out))
    tokens = _tokens(1)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % TINY.vocab_size
    with torch.no_grad():
        model.text(tokens)
        model.text(changed)
    handle.remove()
    # The first position sees the last token only without a causal mask.
    assert not torch.allclose(hidden[0][:, 0], hidden[1][:, 0], atol=1e-5)


def test_text_lengths_and_resize_positions(model: CLIP) -> None:
    with torch.no_grad():
        assert model.encode_text(_tokens(2, 5)).shape == (2, TINY.embed_dim)
        with pytest.raises(ValueError, match="resize_positions"):
            model.encode_text(_tokens(2, CTX + 1))
    old = model.text.positional_embedding.detach().clone()  # (8, D)
    model.text.resize_positions(32)
    new = model.text.positional_embedding
    assert isinstance(new, torch.nn.Parameter) and new.shape == (32, old.shape[1])
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[-1], old[-1])
    # Linear interpolation stays inside the range spanned by the old rows, per channel.
    assert (new >= old.min(0).values - 1e-6).all() and (new <= old.max(0).values + 1e-6).all()
    # Between row 3 and 4 of the old table (centres at new rows 13.5 and 17.5).
    torch.testing.assert_close(new[15], old[3] * 0.625 + old[4] * 0.375)
    with torch.no_grad():
        assert model.encode_text(_tokens(2, 32)).shape == (2, TINY.embed_dim)
    model.text.resize_positions(32)
    assert model.text.positional_embedding is new  # same length: untouched


def test_param_groups(model: CLIP) -> None:
    skip = no_weight_decay_names(model)
    for name, p in model.named_parameters():
        expect_skip = (
            name.endswith(".bias")
            or ".norm" in name
            or "fc_norm" in name
            or "ln_final" in name
            or name == "logit_scale"
            or name == "text.positional_embedding"
        )
        assert (name in skip) == expect_skip, name
    groups = param_groups(model, 0.2)
    decay_ids = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    assert "visual.blocks.0.attn.qkv.weight" in {names[i] for i in decay_ids}
    assert "text.token_embedding.weight" in {names[i] for i in decay_ids}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_unknown_variant_lists_names() -> None:
    with pytest.raises(ConfigError, match="G-14"):
        get_variant("XL-99")


@pytest.mark.parametrize("variant", ["tiny", "B-16", "L-16", "H-14", "G-14"])
def test_param_count_matches_analytic(variant: str) -> None:
    with torch.device("meta"):
        model = build_clip(variant, 32)
    built = sum(p.numel() for p in model.parameters())
    assert built == analytic_param_count(VARIANTS[variant], 32)
    assert next(model.parameters()).device.type == "meta"
