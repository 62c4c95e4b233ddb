"""Equivalence with the released HyperSIGMA code, measured side by side in one run on identical random weights.

For -B and -L (and any size asked for): the released fused model (`ss_fusion_seg.SSFusionFramework`, the
segmentation copy: gate before the 1x1 reductions, spatial maps up-sampled to the input) and the classification
copy (`ss_fusion_cls`, gate after the reductions, patch 2) are built, every parameter perturbed (seeded), and their
state_dict loaded into our `hypersigma_*` layout. One random cube goes through both; the table gives the max abs
difference of the four spatial maps, the spectral descriptor and the four fused maps. Then the masked
autoencoders: our spatial / spectral MAE state_dicts load strictly into the released `SpatMAE` / `SpecMAE`, and
the loss, prediction and mask agree under the same seed. All weights are random-init.

Needs the released repository on disk (never part of this project):

    .venv/bin/python bench/released_equivalence.py --hypersigma /path/to/HyperSIGMA [--sizes b,l] [--json]

Adjustments made to run the released code here (printed with the results): stand-ins for `einops` (imported but
unused) and `mmengine.dist.get_dist_info` (rank 0 of 1); the released files are imported one by one from their
folders (ImageClassification/model, Pretrain) under private module names, with `model` briefly bound to the
released folder while `ss_fusion_*` import their encoders. Nothing in our model code changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.hypersigma.mae import MAEKind

SIZES = {"b": "base", "l": "large", "h": "huge"}
TARGET = 1e-4
"""Max abs difference accepted as equal: float32, our full attention uses scaled_dot_product_attention and the
released one an explicit softmax(q k^T) v, and reductions run in a different order (observed: about 1e-6)."""
STUBS = ("einops (rearrange, repeat: imported, unused)", "mmengine.dist.get_dist_info -> (0, 1)",
         "torch.linspace on the CPU while the released builders run on the meta device (key/shape check only)")


def _stub_modules() -> None:
    """Stand-ins for packages the released model files import but the model maths does not use."""
    if "einops" not in sys.modules:
        einops = types.ModuleType("einops")
        einops.rearrange = einops.repeat = None  # type: ignore[attr-defined]
        sys.modules["einops"] = einops
    if "mmengine" not in sys.modules:
        mmengine, dist = types.ModuleType("mmengine"), types.ModuleType("mmengine.dist")
        dist.get_dist_info = lambda: (0, 1)  # type: ignore[attr-defined]
        mmengine.dist = dist  # type: ignore[attr-defined]
        sys.modules["mmengine"], sys.modules["mmengine.dist"] = mmengine, dist


def _load(name: str, path: Path) -> types.ModuleType:
    """Import one released file under a private module name."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a Python file; pass the root of a HyperSIGMA checkout.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _cpu_linspace() -> Iterator[None]:
    """`torch.linspace` on the CPU unless told otherwise, so the released builders (which call `.item()` on their
    drop-path schedule) run under a meta device."""
    original = torch.linspace

    def linspace(*args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("device", "cpu")
        return original(*args, **kwargs)

    torch.linspace = linspace  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.linspace = original  # type: ignore[assignment]


@contextlib.contextmanager
def _bound(name: str, module: types.ModuleType) -> Iterator[None]:
    """Bind `sys.modules[name]` to `module` for the duration (the released fusion files import `model`)."""
    saved = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


def import_released(path: str | Path) -> types.SimpleNamespace:
    """The released HyperSIGMA model files from a checkout at `path`: SpatViT_fusion, SpatViT_fusion_patch,
    SpecViT_fusion, ss_fusion_seg, ss_fusion_cls (ImageClassification/model) and models_mae_Spat/Spec (Pretrain)."""
    root = Path(path).resolve()
    _stub_modules()
    cls_dir, pre_dir = root / "ImageClassification" / "model", root / "Pretrain"
    out = types.SimpleNamespace()
    folder = types.ModuleType("hs_released")
    for name in ("SpatViT_fusion", "SpatViT_fusion_patch", "SpecViT_fusion"):
        module = _load(f"hs_released.{name}", cls_dir / f"{name}.py")
        setattr(folder, name, module)
        setattr(out, name, module)
    with _bound("model", folder):
        out.ss_fusion_seg = _load("hs_released.ss_fusion_seg", cls_dir / "ss_fusion_seg.py")
        out.ss_fusion_cls = _load("hs_released.ss_fusion_cls", cls_dir / "ss_fusion_cls.py")
    util = types.ModuleType("util")
    util.pos_embed = _load("util.pos_embed", pre_dir / "util" / "pos_embed.py")  # type: ignore[attr-defined]
    with _bound("util", util):
        out.models_mae_Spat = _load("hs_released.models_mae_Spat", pre_dir / "models_mae_Spat.py")
        out.models_mae_Spec = _load("hs_released.models_mae_Spec", pre_dir / "models_mae_Spec.py")
    return out


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add seeded N(0, 0.02^2) noise to every parameter (so zero biases and unit norms are exercised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference of two tensors of the same shape."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def released_fusion(pkg: types.SimpleNamespace, size: str, gate: str, img: int, bands: int, patch: int,
                    seed: int) -> torch.nn.Module:
    """The released fused model (seg or cls copy), perturbed, in eval mode with activation checkpointing off."""
    module = pkg.ss_fusion_seg if gate == "before_reduction" else pkg.ss_fusion_cls
    torch.manual_seed(seed)
    model = module.SSFusionFramework(img_size=img, in_channels=bands, patch_size=patch, classes=5,
                                     model_size=SIZES[size]).eval()
    model.spat_encoder.use_checkpoint = False
    model.spec_encoder.use_checkpoint = False
    perturb(model, seed + 1)
    return model


def released_fused_levels(model: torch.nn.Module, x: torch.Tensor, gate: str) -> dict[str, Any]:
    """Spatial maps (finest first), spectral descriptor and fused maps as the released forward computes them
    (read with forward hooks on the released modules; the gate product is the released expression)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(f"DR{k}").register_forward_hook(
        lambda _m, _i, out, k=k: seen.__setitem__(f"DR{k}", out)) for k in range(1, 5)]
    hooks += [model.get_submodule(f"fc_spec{k}").register_forward_hook(
        lambda _m, _i, out, k=k: seen.__setitem__(f"w{k}", out)) for k in range(1, 5)]
    try:
        spatial = list(model.get_submodule("spat_encoder")(x))  # coarsest first (fpn4 .. fpn1)
        spectral = model.get_submodule("spec_encoder")(x)[0]
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    b = x.shape[0]
    if gate == "before_reduction":
        fused = [seen[f"DR{k}"] for k in range(1, 5)]
    else:
        fused = [(1 + seen[f"w{k}"].view(b, -1, 1, 1)) * seen[f"DR{k}"] for k in range(1, 5)]
    return {"spatial": spatial[::-1], "spectral": spectral, "fused": fused[::-1]}


def compare_fusion(pkg: types.SimpleNamespace, size: str, gate: str, img: int, bands: int, patch: int,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Rows (size, gate, output, shape, max_abs_diff): released fused model vs our layout on the same weights."""
    from model import create_model
    from model.hyperfree import load_checkpoint

    released = released_fusion(pkg, size, gate, img, bands, patch, seed)
    ours = create_model(f"hypersigma_{size}", img_size=img, in_chans=bands, patch_size=patch,
                        gate_position=gate).eval()
    report = load_checkpoint(ours, released.state_dict(), strict=False)
    if report.missing or report.mismatched:
        raise AssertionError(f"released fused state does not cover our model: {report}")
    x = torch.rand(2, bands, img, img, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        theirs = released_fused_levels(released, x, gate)
        mine = ours.forward_intermediates(x)
    rows: list[dict[str, Any]] = []
    upsample = gate == "before_reduction"  # the segmentation copy up-samples every spatial map to the input size

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=(img, img), mode="bilinear", align_corners=True) if upsample else t

    for k in range(4):
        rows.append({"output": f"spatial map {k + 1}", "mine": up(mine.spatial[k]), "theirs": theirs["spatial"][k]})
    rows.append({"output": "spectral descriptor", "mine": mine.spectral, "theirs": theirs["spectral"]})
    for k in range(4):
        rows.append({"output": f"fused map {k + 1}", "mine": up(mine.fused[k]), "theirs": theirs["fused"][k]})
    return [{"size": size.upper(), "gate": gate, "patch": patch, "output": r["output"],
             "shape": list(r["mine"].shape), "max_abs_diff": max_diff(r["mine"], r["theirs"]),
             "released_max_abs": float(r["theirs"].abs().max()),
             "ignored_keys": len(report.unexpected)} for r in rows]


def compare_mae(pkg: types.SimpleNamespace, size: str, kind: MAEKind, seed: int = 0) -> dict[str, Any]:
    """Our MAE's state_dict into the released MAE class strictly; loss, prediction and mask under one seed."""
    from model.hypersigma.mae import create_mae, released_state_dict

    ours = create_mae(f"hypersigma_{size}", kind).eval()
    args = types.SimpleNamespace(image_size=64, use_ckpt="False", num_tokens=ours.config.num_tokens)
    module = pkg.models_mae_Spat if kind == "spatial" else pkg.models_mae_Spec
    builder = getattr(module, f"{'spat' if kind == 'spatial' else 'spec'}_mae_{size}")
    theirs = builder(args, inchannels=ours.config.in_chans).eval()
    pos_diff = max_diff(ours.decoder_pos_embed, theirs.decoder_pos_embed)  # fresh tables: sin-cos / zeros
    perturb(ours, seed + 1)
    missing, unexpected = theirs.load_state_dict(released_state_dict(ours), strict=True)
    x = torch.rand(2, ours.config.in_chans, 64, 64, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        torch.manual_seed(seed + 3)
        loss_t, pred_t, mask_t = theirs(x, mask_ratio=ours.config.mask_ratio)
        torch.manual_seed(seed + 3)
        out = ours(x)
    return {"size": size.upper(), "kind": kind, "strict_load": not (missing or unexpected),
            "keys": len(released_state_dict(ours)), "loss_diff": abs(float(loss_t) - float(out.loss)),
            "pred_max_abs_diff": max_diff(out.pred, pred_t), "mask_equal": bool(torch.equal(out.mask, mask_t)),
            "fresh_decoder_pos_embed_diff": pos_diff}


def run(path: str, sizes: tuple[str, ...], img: int, bands: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All rows and the figures (name, value, target, met) for the sizes asked for."""
    torch.set_grad_enabled(False)
    pkg = import_released(path)
    rows: list[dict[str, Any]] = []
    figures: list[dict[str, Any]] = []
    for size in sizes:
        for gate, patch in (("before_reduction", 8), ("after_reduction", 2)):
            part = compare_fusion(pkg, size, gate, img, bands, patch)
            rows += part
            for group in ("spatial", "spectral", "fused"):
                values = [r["max_abs_diff"] for r in part if r["output"].startswith(group)]
                figures.append({"name": f"HyperSIGMA-{size.upper()} {gate} p={patch} {group} max abs diff",
                                "value": max(values), "target": TARGET, "met": max(values) <= TARGET})
        kinds: tuple[MAEKind, ...] = ("spatial", "spectral")
        for kind in kinds:
            mae = compare_mae(pkg, size, kind)
            rows.append(mae)
            worst = max(mae["loss_diff"], mae["pred_max_abs_diff"], mae["fresh_decoder_pos_embed_diff"])
            figures.append({"name": f"HyperSIGMA-{size.upper()} {kind} MAE: strict load into the released class, "
                                    "loss / pred / fresh decoder positions max abs diff, same mask",
                            "value": worst, "target": TARGET,
                            "met": mae["strict_load"] and mae["mask_equal"] and worst <= TARGET})
    return rows, figures


def compare_pretrained_load(pkg: types.SimpleNamespace, size: str, img: int, patch: int, folder: Path,
                            seed: int = 0) -> list[dict[str, Any]]:
    """Our MAE checkpoints (written as the release writes them) loaded by the release's `init_weights` and by
    `load_pretrained` into encoders of another image size and patch: the tensors each side loaded, compared."""
    from model import create_model
    from model.hypersigma.checkpoint import load_pretrained
    from model.hypersigma.mae import create_mae, save_released

    released = released_fusion(pkg, size, "before_reduction", img, 100, patch, seed)
    ours = create_model(f"hypersigma_{size}", img_size=img, patch_size=patch)
    rows: list[dict[str, Any]] = []
    for kind, attr in (("spatial", "spat_encoder"), ("spectral", "spec_encoder")):
        torch.manual_seed(seed + 4)
        mae = create_mae(f"hypersigma_{size}", kind)  # type: ignore[arg-type]
        perturb(mae, seed + 5)
        path = save_released(mae, folder / f"{kind}-{size}.pth", epoch=1599)
        with contextlib.redirect_stdout(None):  # the release prints its load message
            cast(Any, released.get_submodule(attr)).init_weights(str(path))
        report = load_pretrained(ours.get_submodule(attr), path)
        theirs, mine = released.get_submodule(attr).state_dict(), ours.get_submodule(attr).state_dict()
        taken = [*report.loaded, *report.resized]
        rows.append({"size": size.upper(), "kind": kind, "img": img, "patch": patch, "loaded": len(report.loaded),
                     "resized": sorted(report.resized), "reinitialised": len(report.reinitialised),
                     "ignored": len(report.ignored),
                     "max_abs_diff": max(max_diff(mine[k], theirs[k]) for k in taken)})
    return rows


def compare_keys(pkg: types.SimpleNamespace, size: str) -> dict[str, Any]:
    """Key/shape comparison on the meta device: the released fused model (segmentation copy, 64 px, 100 bands,
    patch 8) without its head and unused modules vs our layout; the released MAEs vs ours."""
    from model import create_model
    from model.hypersigma.checkpoint import _LEFTOVERS
    from model.hypersigma.mae import create_mae, released_state_dict

    head = ("conv_features.", "conv.", "cls.", "classifier", "pool")
    with torch.device("meta"), _cpu_linspace():
        theirs = {k: v for k, v in released_fusion_meta(pkg, size).state_dict().items()
                  if not k.startswith(head) and not k.split(".", 1)[1].startswith(_LEFTOVERS)}
        mine = create_model(f"hypersigma_{size}").state_dict()
        args = types.SimpleNamespace(image_size=64, use_ckpt="False", num_tokens=100)
        maes = {kind: (getattr(module, f"{prefix}_mae_{size}")(args, inchannels=100).state_dict(),
                       released_state_dict(create_mae(f"hypersigma_{size}", kind)))  # type: ignore[arg-type]
                for kind, module, prefix in (("spatial", pkg.models_mae_Spat, "spat"),
                                             ("spectral", pkg.models_mae_Spec, "spec"))}

    def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
        return sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k].shape != b[k].shape)

    out: dict[str, Any] = {"size": size.upper(), "keys": len(mine), "released_keys": len(theirs),
                           "differing": differing(theirs, mine),
                           "params_m": sum(v.numel() for v in mine.values()) / 1e6,
                           "released_params_m": sum(v.numel() for v in theirs.values()) / 1e6}
    for kind, (a, b) in maes.items():
        out[f"{kind}_mae_differing"] = differing(a, b)
        out[f"{kind}_mae_params_m"] = sum(v.numel() for v in b.values()) / 1e6
    return out


def released_fusion_meta(pkg: types.SimpleNamespace, size: str) -> torch.nn.Module:
    """The released segmentation-copy fused model at 64 px, 100 bands, patch 8 (build under a meta device)."""
    return pkg.ss_fusion_seg.SSFusionFramework(img_size=64, in_channels=100, patch_size=8, classes=5,
                                               model_size=SIZES[size])
