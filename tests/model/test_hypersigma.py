"""HyperSIGMA backbone: registry layouts, sparse sampling attention against an independent reference, spectral
tokens, the fusion gate, and full-size layouts pinned on the meta device. All weights are random-init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import create_model, feature_info, get_config, list_models
from model.hypersigma import HyperSigma, HyperSigmaConfig, SampleAttention
from model.hypersigma.vit import Attention

TINY = "hypersigma_tiny"


def tiny(**overrides: object) -> HyperSigma:
    torch.manual_seed(0)
    return create_model(TINY, **overrides).eval()


def cube(cfg: HyperSigmaConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))


def test_registry_holds_the_hypersigma_family() -> None:
    assert list_models(family="hypersigma") == ["hypersigma_b", "hypersigma_h", "hypersigma_l", "hypersigma_tiny"]
    assert get_config("hypersigma_l", img_size=128).img_size == 128
    with pytest.raises(ValueError, match="Unknown override.*valid"):
        get_config("hypersigma_b", window_size=7)


@pytest.mark.parametrize(("patch", "gate"), [(4, "before_reduction"), (2, "after_reduction"), (8, "before_reduction")])
def test_forward_features_match_feature_info(patch: int, gate: str) -> None:
    model = tiny(patch_size=patch, gate_position=gate)
    cfg = model.config
    maps = model.forward_features(cube(cfg))
    info = feature_info(TINY, patch_size=patch, gate_position=gate)
    assert [m.shape[1] for m in maps] == [i["num_chs"] for i in info] == [cfg.fused_dim] * 4
    assert [tuple(m.shape[-2:]) for m in maps] == [(cfg.img_size // i["reduction"],) * 2 for i in info]
    assert all(torch.isfinite(m).all() for m in maps)


def test_bad_inputs_and_configs_say_what_to_change() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"takes \(B, 18, 32, 32\)"):
        model.forward_features(torch.zeros(1, 17, 32, 32))
    with pytest.raises(ValueError, match="perfect square"):
        create_model(TINY, num_tokens=10)
    with pytest.raises(ValueError, match="patch_size=1"):
        get_config(TINY, patch_size=1)
    with pytest.raises(ValueError, match="do not exist"):
        get_config(TINY, out_indices=(0, 1, 2, 9))


def naive_sample(maps: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of (d, H, W) at normalised (x, y) in [-1, 1], zero padding, align_corners=False."""
    _, h, w = maps.shape
    px, py = ((x + 1) * w - 1) / 2, ((y + 1) * h - 1) / 2
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(maps.shape[0], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wx * wy * maps[:, yy, xx].double()
    return out


def test_sample_attention_equals_an_independent_loop_reference() -> None:
    torch.manual_seed(3)
    dim, heads, points, (h, w) = 8, 2, 3, (3, 4)
    attn = SampleAttention(dim, heads, True, points)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.sampling_offsets.bias.normal_(0, 1.0)
    x = torch.randn(1, h * w, dim)
    with torch.no_grad():
        got = attn(x, (h, w))
        q, k, v = attn.qkv(x)[0].reshape(h * w, 3, dim).unbind(1)
        offsets = attn.sampling_offsets(q).reshape(h * w, heads, points, 2)
    d = dim // heads
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for n in range(h * w):
        i, j = divmod(n, w)
        for hd in range(heads):
            kmap = k[:, hd * d:(hd + 1) * d].T.reshape(d, h, w)
            vmap = v[:, hd * d:(hd + 1) * d].T.reshape(d, h, w)
            ks, vs = [], []
            for p in range(points):
                gx = 2 * ((j + 0.5) / w + offsets[n, hd, p, 0].item() / w) - 1
                gy = 2 * ((i + 0.5) / h + offsets[n, hd, p, 1].item() / h) - 1
                ks.append(naive_sample(kmap, gx, gy))
                vs.append(naive_sample(vmap, gx, gy))
            logits = torch.stack([q[n, hd * d:(hd + 1) * d].double() @ kk for kk in ks]) * d ** -0.5
            weights = logits.softmax(0)
            out[n, hd * d:(hd + 1) * d] = sum(wt * vv for wt, vv in zip(weights, vs, strict=True))
    expected = attn.proj(out.float())
    assert torch.allclose(got[0], expected, atol=1e-5)


def test_sample_attention_with_zero_offsets_reads_each_tokens_own_value() -> None:
    torch.manual_seed(4)
    attn = SampleAttention(8, 2, True, 4)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        x = torch.randn(2, 12, 8)
        v = attn.qkv(x)[..., 16:]
        assert torch.allclose(attn(x, (3, 4)), attn.proj(v), atol=1e-6)


def test_full_attention_equals_softmax_qk_v() -> None:
    torch.manual_seed(5)
    attn = Attention(8, 2, True)
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
        ref = ((q * 4 ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        assert torch.allclose(attn(x, (2, 3)), attn.proj(ref.transpose(1, 2).reshape(2, 6, 8)), atol=1e-6)


def test_spectral_tokens_are_band_group_means_mapped_by_spat_map() -> None:
    model = tiny()
    cfg = model.config
    x = cube(cfg)
    group = cfg.in_chans // cfg.num_tokens
    means = x.reshape(2, cfg.num_tokens, group, -1).mean(2)  # contiguous band groups
    with torch.no_grad():
        assert torch.allclose(model.spec_encoder.tokens(x), model.spec_encoder.spat_map(means), atol=1e-5)


@pytest.mark.parametrize("gate", ["before_reduction", "after_reduction"])
def test_the_gate_scales_each_level_by_one_plus_its_spectral_weights(gate: str) -> None:
    model = tiny(gate_position=gate)
    with torch.no_grad():
        out = model.forward_intermediates(cube(model.config))
        s = model.spec_encoder(cube(model.config)).mean(-1)
        for k, level in enumerate(range(4, 0, -1)):  # finest map first, DR4 ... DR1
            w = getattr(model, f"fc_spec{level}")(s)
            dr = getattr(model, f"DR{level}")
            expected = (dr((1 + w[:, :, None, None]) * out.spatial[k]) if gate == "before_reduction"
                        else (1 + w[:, :, None, None]) * dr(out.spatial[k]))
            assert torch.allclose(out.gates[k], w)
            assert torch.allclose(out.fused[k], expected, atol=1e-6)
    assert out.spectral.shape == (2, model.config.num_tokens, model.config.spec_dim)


def test_spatial_pyramid_follows_the_released_fpn_ops() -> None:
    model = tiny(patch_size=2)
    x = cube(model.config)
    with torch.no_grad():
        maps = model.spat_encoder(x)
        tokens, grid = model.spat_encoder.patch_embed(x)
        last = model.spat_encoder.run_blocks(tokens, grid, (3,))[0].transpose(1, 2).reshape(2, -1, *grid)
    assert torch.allclose(maps[3], F.max_pool2d(last, 4), atol=1e-6)
    assert maps[0].shape[-1] == 2 * grid[1]  # fpn1 up-samples at patch 2


# Full-size layouts on the meta device: (parameters, spatial SSA blocks' full-attention indexes).
FULL = {
    "hypersigma_b": (181_598_720, (2, 5, 8, 11)),
    "hypersigma_l": (627_267_584, (5, 11, 17, 23)),
    "hypersigma_h": (1_292_898_816, (7, 15, 23, 31)),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_layouts_are_pinned(name: str) -> None:
    params, full_blocks = FULL[name]
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    for encoder in (model.spat_encoder, model.spec_encoder):
        assert tuple(i for i, b in enumerate(encoder.blocks) if not b.sample) == full_blocks
        offsets = [b.attn.sampling_offsets.out_features for b in encoder.blocks if b.sample]
        assert set(offsets) == {model.config.num_heads * 8 * 2}  # 8 points per head
    cfg = model.config
    assert model.spat_encoder.pos_embed.shape == (1, (cfg.img_size // cfg.patch_size) ** 2, cfg.embed_dim)
    assert model.spec_encoder.spat_map.weight.shape == (cfg.embed_dim, 64 * 64)
    assert model.spec_encoder.pos_embed.shape == (1, 100, cfg.embed_dim)


def test_heads_are_sized_from_the_registry_feature_info() -> None:
    from model.heads import build_head, layout_from_info

    model = tiny()
    layout = layout_from_info(feature_info(TINY))
    assert layout.channels == (16,) * 4 and layout.strides == (4, 4, 8, 16)
    head = build_head("runet", layout, num_classes=3)
    with torch.no_grad():
        logits = head(model.forward_features(cube(model.config)), output_size=(32, 32))
    assert logits.shape == (2, 3, 32, 32) and torch.isfinite(logits).all()


@pytest.mark.parametrize("bands", [7, 18, 36])
def test_a_cube_of_any_band_count_becomes_the_model_input(bands: int) -> None:
    from model.hypersigma.preprocess import describe_contract, extract_features, prepare_cube

    model = tiny()
    cfg = model.config
    rng = torch.Generator().manual_seed(bands)
    raw = 1000 + 3000 * torch.rand(20, 40, bands, generator=rng)  # (H, W, C), 12-bit-like counts with an offset
    prepared = prepare_cube(raw.numpy(), cfg)
    assert prepared.image.shape == (1, cfg.in_chans, cfg.img_size, cfg.img_size)
    assert prepared.input_size == (16, 32) and prepared.original_size == (20, 40)
    assert prepared.image[..., 16:, :].abs().sum() == 0  # zero padding below the resized image
    assert prepared.image.min() >= 0 and prepared.image.max() <= 1
    scaled = ((raw - raw.min()) / (raw.max() - raw.min())).permute(2, 0, 1)[None]
    if bands >= cfg.in_chans:  # the min-max, the means of contiguous band pairs (36 bands), then the resize
        grouped = scaled.reshape(1, cfg.in_chans, bands // cfg.in_chans, 20, 40).mean(2)
        expected = F.interpolate(grouped, (16, 32), mode="bilinear", antialias=True)
        assert torch.allclose(prepared.image[..., :16, :], expected, atol=1e-6)
    maps = extract_features(model, raw)
    assert [tuple(m.shape) for m in maps] == [(1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2)]
    assert describe_contract(cfg)["name"] == "hypersigma"
    with pytest.raises(ValueError, match="constant"):
        prepare_cube(torch.ones(4, 4, bands), cfg)


def test_activation_checkpointing_changes_no_gradient() -> None:
    grads: list[torch.Tensor] = []
    for ckpt in (False, True):
        model = tiny(grad_checkpointing=ckpt, drop_path_rate=0.0).train()
        torch.stack([m.square().mean() for m in model.forward_features(cube(model.config))]).sum().backward()
        grad = model.get_parameter("spat_encoder.blocks.0.attn.sampling_offsets.weight").grad
        assert grad is not None
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
