"""Task heads: sizes at the released -B layout, shapes on the tiny layout, the correlation maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.heads import (
    FeatureLayout,
    SaliencyHead,
    SegmentationHead,
    TrackingHead,
    build_head,
    count_trainable_parameters,
    feature_layout,
    head_from_hparams,
)
from model.heads.tracking import depthwise_xcorr
from model.registry import create_model, get_config

# The released HyperVision-B layout at 512 px: global attention at 5, 8, 11, patch merge after block 3.
TARGETS = {"runet": 15.7e6, "basam": 4.1e6, "siamhyper": 25.9e6}  # the paper's head sizes (HEADS names)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_feature_layout_of_the_released_b_layout() -> None:
    layout = feature_layout(get_config("hypervision_b").encoder)
    assert layout == FeatureLayout(channels=(768, 768, 768, 256), strides=(16, 32, 32, 32))
    assert layout.levels == (32, 16)
    assert layout.channels_at(32) == 1792


def test_feature_layout_matches_what_the_tiny_encoder_returns() -> None:
    model = create_model("tiny").eval()
    layout = feature_layout(model.config.encoder)
    size = model.config.encoder.img_size
    with torch.no_grad():
        feats = model.image_encoder.forward_intermediates(torch.rand(1, 6, size, size),
                                                          [450 + 40 * i for i in range(6)])
    assert [f.shape[1] for f in feats] == list(layout.channels)
    assert [size // f.shape[-1] for f in feats] == list(layout.strides)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_head_sizes_at_b_match_the_paper_within_3_percent(name: str) -> None:
    layout = feature_layout(get_config("hypervision_b").encoder)
    head = build_head(name, layout, **({"num_classes": 11} if name == "runet" else {}))
    count = count_trainable_parameters(head)
    print(f"{name} head at -B: {count:,} trainable parameters (paper: {TARGETS[name]:,.0f})")
    assert abs(count - TARGETS[name]) / TARGETS[name] < 0.03


def _tiny_features(batch: int = 2) -> tuple[FeatureLayout, list[torch.Tensor]]:
    layout = feature_layout(get_config("tiny").encoder)
    side = get_config("tiny").encoder.img_size
    return layout, [torch.randn(batch, c, side // s, side // s) for c, s in zip(layout.channels, layout.strides,
                                                                               strict=True)]


def test_segmentation_head_shapes_and_gradients() -> None:
    layout, feats = _tiny_features()
    head = SegmentationHead(layout.channels, 5, layout.strides, widths=(32, 16))
    logits = head(feats)
    assert logits.shape == (2, 5, 16, 16)  # stride 8 features -> out_stride 4 on a 64 px frame
    assert head(feats, (30, 50)).shape == (2, 5, 30, 50)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_segmentation_head_merges_a_finer_level_like_the_b_layout() -> None:
    head = SegmentationHead([24, 24, 8], 3, [8, 16, 16], widths=(32, 16, 8, 8), out_stride=2)
    feats = [torch.randn(1, 24, 8, 8), torch.randn(1, 24, 4, 4), torch.randn(1, 8, 4, 4)]
    assert head(feats).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="decoder widths"):
        SegmentationHead([24, 24, 8], 3, [8, 16, 16], widths=(32, 16), out_stride=2)


def test_saliency_head_shapes() -> None:
    layout, feats = _tiny_features()
    head = SaliencyHead(layout.channels, layout.strides, dim=32, num_heads=2, mlp_dim=64)
    assert head(feats).shape == (2, 1, 32, 32)
    assert head(feats, (20, 24)).shape == (2, 1, 20, 24)
    fine = SaliencyHead([16, 16, 8], [4, 8, 8], dim=32, num_heads=2, mlp_dim=64)
    assert fine.skip is not None
    assert fine([torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 8, 4, 4)]).shape == (1, 1, 16, 16)


def test_depthwise_xcorr_equals_a_direct_sum() -> None:
    torch.manual_seed(0)
    search, kernel = torch.randn(2, 3, 7, 6), torch.randn(2, 3, 3, 5)
    padded = F.pad(search, (2, 2, 1, 1))
    want = torch.zeros_like(search)
    for b in range(2):
        for c in range(3):
            for i in range(7):
                for j in range(6):
                    want[b, c, i, j] = (padded[b, c, i:i + 3, j:j + 5] * kernel[b, c]).sum()
    assert torch.allclose(depthwise_xcorr(search, kernel), want, atol=1e-5)


def test_tracking_head_shapes_and_template_window() -> None:
    layout, feats = _tiny_features()
    head = TrackingHead(layout.channels, layout.strides, hidden=16, tower_depth=1, groups=4)
    kernels = head.kernels(feats)
    assert [k.shape[-1] for k in kernels] == [3, 3]  # central half of an 8-cell map, made odd
    cls, box = head(feats, feats)
    assert cls.shape == (2, 1, 8, 8) and box.shape == (2, 4, 8, 8)
    assert bool((box >= 0).all())


@pytest.mark.parametrize("name", ["runet", "basam", "siamhyper"])
def test_head_rebuilds_from_its_hparams(name: str) -> None:
    layout, feats = _tiny_features(1)
    small = {"runet": {"num_classes": 4, "widths": (16, 8)}, "basam": {"dim": 16, "num_heads": 2, "mlp_dim": 32},
             "siamhyper": {"hidden": 8, "tower_depth": 1, "groups": 4}}[name]
    head = build_head(name, layout, **small).eval()
    copy = head_from_hparams(name, head.hparams).eval()
    copy.load_state_dict(head.state_dict())
    out = head(feats) if name != "siamhyper" else head(feats, feats)[0]
    again = copy(feats) if name != "siamhyper" else copy(feats, feats)[0]
    assert torch.equal(out, again)


@pytest.mark.integration
def test_heads_run_on_real_b_layout_features() -> None:
    """The -B layout the heads are sized for is what the encoder returns at 512 px."""
    model = create_model("hypervision_b").eval()
    layout = feature_layout(model.config.encoder)
    with torch.no_grad():
        feats = model.image_encoder.forward_intermediates(torch.rand(1, 8, 512, 512), [500 + 50 * i for i in range(8)])
        assert [tuple(f.shape[1:]) for f in feats] == [(768, 32, 32), (768, 16, 16), (768, 16, 16), (256, 16, 16)]
        assert build_head("runet", layout, num_classes=11).eval()(feats, (216, 409)).shape == (1, 11, 216, 409)
        assert build_head("basam", layout).eval()(feats).shape == (1, 1, 64, 64)
        cls, box = build_head("siamhyper", layout).eval()(feats, feats)
        assert cls.shape == (1, 1, 32, 32) and box.shape == (1, 4, 32, 32)
