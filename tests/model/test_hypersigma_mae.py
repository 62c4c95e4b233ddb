"""HyperSIGMA's masked autoencoders: settings, masking, target layout, loss and the training step. Random-init."""

from __future__ import annotations

import pytest
import torch

from model.hypersigma.mae import (
    MaskedAutoencoder,
    create_mae,
    describe_input,
    mae_config,
    mae_step,
    released_state_dict,
    sincos_2d,
)

TINY = "hypersigma_tiny"


def batch(mae: MaskedAutoencoder, seed: int = 0) -> torch.Tensor:
    cfg = mae.config
    return torch.rand(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))


def test_defaults_are_the_released_pretraining_settings() -> None:
    spat, spec = mae_config("hypersigma_b", "spatial"), mae_config("hypersigma_b", "spectral")
    for cfg in (spat, spec):
        assert (cfg.img_size, cfg.in_chans, cfg.mask_ratio, cfg.norm_pix_loss) == (64, 100, 0.75, False)
        assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert (spat.patch_size, spat.num_patches, spat.target_dim) == (8, 64, 8 * 8 * 100)
    assert (spec.num_patches, spec.target_dim) == (100, 64 * 64)
    with torch.device("meta"):
        model = create_mae("hypersigma_b", "spectral")
    assert model.decoder_pred.weight.shape == (4096, 512)
    assert describe_input(spat)["scale"] == "raw values / 4000 (the release's maxNum)"
    with pytest.raises(ValueError, match="multiple of num_tokens"):
        mae_config(TINY, "spectral", in_chans=20)
    with pytest.raises(ValueError, match="Unknown MAE override"):
        mae_config(TINY, "spatial", n_points=4)


@pytest.mark.parametrize("kind", ["spatial", "spectral"])
def test_masking_keeps_a_quarter_and_the_loss_is_mse_on_masked_tokens(kind: str) -> None:
    torch.manual_seed(0)
    mae = create_mae(TINY, kind).eval()  # type: ignore[arg-type]  # eval: no stochastic depth
    x = batch(mae)
    out = mae(x, torch.Generator().manual_seed(5))
    n = mae.config.num_patches
    assert out.pred.shape == (2, n, mae.config.target_dim)
    assert out.mask.sum(1).tolist() == [n - int(n * 0.25)] * 2
    target = mae.patchify(x)
    per_token = ((out.pred - target) ** 2).mean(-1)
    assert torch.allclose(out.loss, per_token[out.mask.bool()].mean())
    again = mae(x, torch.Generator().manual_seed(5))
    assert torch.equal(again.mask, out.mask) and torch.allclose(again.loss, out.loss)


def test_norm_pix_loss_normalises_each_target_token() -> None:
    torch.manual_seed(0)
    mae = create_mae(TINY, "spatial", norm_pix_loss=True)
    x = batch(mae)
    out = mae(x, torch.Generator().manual_seed(1))
    t = mae.patchify(x)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.allclose(out.loss, ((out.pred - t) ** 2).mean(-1)[out.mask.bool()].mean())


def test_targets_are_patches_and_band_images_in_token_order() -> None:
    spatial, spectral = create_mae(TINY, "spatial"), create_mae(TINY, "spectral")
    x = batch(spatial)
    p, c = spatial.config.patch_size, spatial.config.in_chans
    side = spatial.config.img_size // p
    token = 1 * side + 2  # row 1, column 2
    patch = x[0, :, p:2 * p, 2 * p:3 * p]  # (C, p, p)
    assert torch.equal(spatial.patchify(x)[0, token], patch.permute(1, 2, 0).reshape(p * p * c))
    group = c // spectral.config.num_tokens
    assert torch.equal(spectral.patchify(x)[0, 3], x[0, 3 * group:4 * group].reshape(-1))


def test_the_encoder_adds_no_position_embedding_unless_asked() -> None:
    torch.manual_seed(0)
    mae = create_mae(TINY, "spatial").eval()
    x = batch(mae)
    with torch.no_grad():
        base = mae.forward_encoder(x, torch.Generator().manual_seed(0))[0]
        mae.pos_embed.add_(1.0)
        assert torch.equal(mae.forward_encoder(x, torch.Generator().manual_seed(0))[0], base)
        on = create_mae(TINY, "spatial", encoder_pos_embed=True).eval()
        on.load_state_dict(mae.state_dict())
        assert not torch.allclose(on.forward_encoder(x, torch.Generator().manual_seed(0))[0], base)


def test_mae_step_trains_encoder_and_decoder() -> None:
    torch.manual_seed(0)
    mae = create_mae(TINY, "spectral")
    loss = mae_step(mae, batch(mae), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert mae.get_parameter("blocks.0.attn.qkv.weight").grad is not None and mae.decoder_pred.weight.grad is not None
    assert mae.spat_map.weight.grad is not None and mae.decoder_pos_embed.grad is None


def test_released_state_dict_has_the_release_keys_only() -> None:
    keys = set(released_state_dict(create_mae(TINY, "spatial")))
    top = {k.split(".")[0] for k in keys}
    assert top == {"patch_embed", "pos_embed", "blocks", "norm", "decoder_embed", "mask_token", "decoder_pos_embed",
                   "decoder_blocks", "decoder_norm", "decoder_pred"}
    assert not any("sampling_offsets" in k for k in keys)


def test_decoder_positions_are_the_2d_sincos_table() -> None:
    table = sincos_2d(8, 3)
    assert table.shape == (9, 8)
    # first half encodes the column: tokens in one column share it, tokens in one row share the second half
    assert torch.equal(table[0, :4], table[3, :4]) and torch.equal(table[0, 4:], table[1, 4:])
    assert torch.allclose(table[1, :2], torch.sin(torch.tensor([1.0, 0.01])))
