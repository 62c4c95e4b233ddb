"""Equivalence with the released HyperVision code, measured side by side in one run on identical random weights.

For each released layout (-B, -L): the released builder at the given image size, every parameter except the two
weight banks perturbed (so the zero-initialised relative-position tables and unit norms are exercised), its
state_dict loaded strictly into our registry layout. Then, per band count (16, 31, 128) and GSD, one 12-bit cube
with a dark offset goes through the released path (the released reader's per-image min-max to [0, 255],
`HyperVision_Predictor.set_image(..., test_mode=True)` then `predict` with one point) and through ours
(`model.preprocess.extract_features` and the material `HyperFreePredictor`, contract ``released``). The table
gives the max abs difference per multi-scale feature map, the neck, and the mask decoder's outputs. -H is
compared at the key/shape level (meta device). All weights are random-init.

Needs the released repository on disk (never part of this project):

    .venv/bin/python bench/released_equivalence.py --released /path/to/HyperVision [--layouts b,l] [--json]

With ``--hypersigma /path/to/HyperSIGMA [--sizes b,l]`` the HyperSIGMA section runs (alone, or after the
HyperVision one): fused features, masked autoencoders, checkpoint loading and keys against the released HyperSIGMA
code (bench/hypersigma_equivalence.py says what it compares and what it stubs).

Zero-shot tasks (``--hyperfree /path/to/HyperFree``, a checkout of the released HyperFree repository): the released
task functions (Fine-tuning-free-manner/*/prompt_mask_feature_interaction.py) with the released automatic mask
generator and model, beside ours (stages.zeroshot, behaviour ``released``) on identical perturbed random weights (a
reduced ViT through the released `_build_HyperFree`, so it runs on a CPU) and the same 12-bit cube: the class map,
one-class map, target map (before the demo's dilation), anomaly map and change map must be equal pixel for pixel.
Stand-ins let the released scripts import without their unused dependencies (cv2, seaborn, sklearn, osgeo).

Adjustments made to run the released code here, printed with the results: a stand-in for `osgeo` (GDAL, imported
but unused by the model), and the released prompt encoder's grid set to the neck's (the released builder sizes it
img_size / patch, which does not fit the mask decoder once patch merging has run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUILDERS = {"b": "build_HyperVision_b", "l": "build_HyperVision_l", "h": "build_HyperVision_h"}
WAVELENGTHS = {
    16: np.linspace(400, 1000, 16),  # ARAD-1K 16-band grid
    31: np.linspace(400, 700, 31),  # CAVE / ICVL / ARAD-1K 31-band grid
    128: np.linspace(450, 950, 128),  # Hyperspectral City v2
}
GSDS = (0.01, 0.5)
TARGET = 1e-4
"""Max abs difference accepted as equal (float32 reductions may reorder; exact equality is the expected case)."""


def import_released(path: str | Path) -> types.ModuleType:
    """The released `HyperVision` package from a checkout at `path` (a GDAL stand-in first: it is imported by
    the released spectral utilities but not used by the model)."""
    if "osgeo" not in sys.modules:
        stub = types.ModuleType("osgeo")
        stub.gdal = None  # type: ignore[attr-defined]
        sys.modules["osgeo"] = stub
    root = str(Path(path).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("HyperVision")


def released_model(pkg: types.ModuleType, layout: str, img_size: int, seed: int = 0) -> torch.nn.Module:
    """The released builder's model at `img_size`, every parameter but the weight banks perturbed (seeded)."""
    torch.manual_seed(seed)
    model = getattr(pkg, BUILDERS[layout])(image_size=img_size).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "weight_bank" not in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    grid = img_size // model.image_encoder.patch_size
    merges = [i for i in model.image_encoder.merge_indexs if i < model.image_encoder.depth]
    model.prompt_encoder.image_embedding_size = (grid >> len(merges),) * 2
    return model


def twelve_bit_cube(bands: int, height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, C) uint16 12-bit counts over a dark offset of 1000."""
    rng = np.random.default_rng(seed)
    return (1000 + rng.integers(0, 3096, (height, width, bands))).astype(np.uint16)


def reader_min_max(cube: np.ndarray) -> np.ndarray:
    """The released reader's per-image scaling: float32, 255 * (x - min) / (max - min)."""
    img = cube.astype(np.float32)
    low, high = img.min(), img.max()
    return 255.0 * (img - low) / (high - low)


def max_diff(a: Any, b: Any) -> float:
    """Max abs difference of two arrays/tensors of the same shape."""
    ta, tb = torch.as_tensor(np.asarray(a.detach() if torch.is_tensor(a) else a)), torch.as_tensor(
        np.asarray(b.detach() if torch.is_tensor(b) else b))
    if ta.shape != tb.shape:
        raise AssertionError(f"shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    return float((ta.double() - tb.double()).abs().max())


def compare_layout(pkg: types.ModuleType, layout: str, img_size: int, bands: tuple[int, ...],
                   gsds: tuple[float, ...], size: tuple[int, int]) -> list[dict[str, Any]]:
    """Rows (layout, bands, gsd, output, shape, max_abs_diff) for one layout, released vs ours."""
    from model import create_model, load_checkpoint
    from model.preprocess import extract_features
    from stages.labelling.material import HyperFreePredictor

    released = released_model(pkg, layout, img_size)
    ours = create_model(f"hypervision_{layout}", img_size=img_size).eval()
    report = load_checkpoint(ours, released.state_dict(), strict=True)
    assert report.is_exact, report
    names = [f"block {i}" for i in ours.config.encoder.feature_indexes or ()] + ["neck"]
    rows: list[dict[str, Any]] = []
    point = np.array([[size[1] // 3, size[0] // 2]])
    for c in bands:
        wl = WAVELENGTHS[c]
        cube = twelve_bit_cube(c, *size, seed=c)
        for gsd in gsds:
            ref = pkg.HyperVision_Predictor(released)
            with torch.no_grad():
                ref.set_image(reader_min_max(cube), test_mode=True, spectral_lengths=wl.tolist(), GSD=[gsd])
                ref_masks, ref_iou, ref_low = ref.predict(point_coords=point, point_labels=np.array([1]),
                                                          return_logits=True)
            feats = extract_features(ours, cube, wl, gsd, "released")
            pred = HyperFreePredictor(ours, "released")
            pred.set_image(cube, wl, gsd)
            masks, iou, low = pred.predict(point_coords=point, point_labels=np.array([1]), return_logits=True)
            outputs = [*zip(names, feats, ref.multi_scale_features, strict=True),
                       ("decoder iou", iou, ref_iou[0]), ("decoder low-res logits", low, ref_low[0]),
                       ("decoder mask logits", masks, ref_masks[0])]
            # Control: today's crop_max contract on the same cube and weights does not give the released features.
            control = extract_features(ours, cube, wl, gsd, "crop_max")[-1]
            outputs.append(("control: crop_max neck", control, ref.multi_scale_features[-1]))
            for name, mine, theirs in outputs:
                rows.append({"layout": layout.upper(), "bands": c, "gsd": gsd, "output": name,
                             "shape": list(np.shape(mine)), "max_abs_diff": max_diff(mine, theirs)})
    return rows


def compare_keys(pkg: types.ModuleType, layout: str, img_size: int) -> dict[str, Any]:
    """Key/shape comparison of the released builder and our layout on the meta device."""
    from model import create_model

    with torch.device("meta"):
        theirs = getattr(pkg, BUILDERS[layout])(image_size=img_size).state_dict()
        mine = create_model(f"hypervision_{layout}", img_size=img_size).state_dict()
    differ = sorted(k for k in set(theirs) | set(mine)
                    if k not in theirs or k not in mine or theirs[k].shape != mine[k].shape)
    return {"layout": layout.upper(), "keys": len(mine), "released_keys": len(theirs), "differing": differ,
            "params_m": sum(v.numel() for v in mine.values()) / 1e6,
            "released_params_m": sum(v.numel() for v in theirs.values()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--released", help="checkout of the released HyperVision repository")
    ap.add_argument("--hypersigma", help="checkout of the released HyperSIGMA repository (its section runs)")
    ap.add_argument("--hyperfree", help="checkout of the released HyperFree repository (the zero-shot tasks)")
    ap.add_argument("--sizes", default="b,l", help="HyperSIGMA sizes compared numerically (b, l, h)")
    ap.add_argument("--layouts", default="b,l", help="layouts compared numerically (b, l); h is key/shape level")
    ap.add_argument("--img", type=int, default=512, help="image size (the released example's 512)")
    ap.add_argument("--height", type=int, default=300)
    ap.add_argument("--width", type=int, default=400)
    ap.add_argument("--json", action="store_true", help="also print every row as JSON")
    args = ap.parse_args()
    if not (args.released or args.hypersigma or args.hyperfree):
        ap.error("name a checkout: --released (HyperVision), --hypersigma (HyperSIGMA) and/or --hyperfree "
                 "(HyperFree)")
    torch.set_grad_enabled(False)
    figures: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    if args.released:
        hypervision_section(args, figures, rows)
    if args.hypersigma:
        hypersigma_section(args.hypersigma, tuple(args.sizes.split(",")), figures, rows)
    if args.hyperfree:
        hyperfree_section(args.hyperfree, figures, rows)
    if args.json:
        print(json.dumps({"rows": rows}))
    print(json.dumps({"figures": figures}))


def hypervision_section(args: argparse.Namespace, figures: list[dict[str, Any]], rows: list[dict[str, Any]]
                        ) -> None:
    """The HyperVision comparison: features and decoder outputs per layout, keys and shapes per layout."""
    pkg = import_released(args.released)
    print(f"released code: {args.released}; random-init weights (perturbed), image size {args.img}, "
          f"cube {args.height}x{args.width} uint16 12-bit + offset 1000, contract 'released', test_mode=True")
    print("adjustments to run the released code: osgeo stand-in; released prompt grid set to the neck's")
    for layout in args.layouts.split(","):
        t0 = time.perf_counter()
        part = compare_layout(pkg, layout, args.img, tuple(WAVELENGTHS), GSDS, (args.height, args.width))
        rows += part
        print(f"\n-{layout.upper()} ({time.perf_counter() - t0:.0f} s)")
        print(f"{'bands':>5s} {'gsd':>5s}  {'output':24s} {'shape':>18s} {'max abs diff':>13s}")
        for r in part:
            print(f"{r['bands']:5d} {r['gsd']:5g}  {r['output']:24s} {'x'.join(map(str, r['shape'])):>18s} "
                  f"{r['max_abs_diff']:13.3g}")
        for out in dict.fromkeys(r["output"] for r in part):
            values = [r["max_abs_diff"] for r in part if r["output"] == out]
            if out.startswith("control"):  # must differ: shows the comparison can fail
                figures.append({"name": f"-{layout.upper()} {out} min over inputs of max abs diff (must differ)",
                                "value": min(values), "target": TARGET, "met": min(values) > TARGET})
            else:
                figures.append({"name": f"-{layout.upper()} {out} max abs diff (3 band counts x 2 GSDs)",
                                "value": max(values), "target": TARGET, "met": max(values) <= TARGET})
    print("\nkey/shape level (meta device)")
    for layout in ("b", "l", "h"):
        k = compare_keys(pkg, layout, args.img)
        print(f"-{k['layout']}: {k['keys']} keys (released {k['released_keys']}), {k['params_m']:.2f} M parameters "
              f"(released {k['released_params_m']:.2f} M), {len(k['differing'])} keys differ in name or shape")
        figures.append({"name": f"-{k['layout']} keys differing in name or shape", "value": len(k["differing"]),
                        "target": 0, "met": not k["differing"]})



def hypersigma_section(path: str, sizes: tuple[str, ...], figures: list[dict[str, Any]], rows: list[dict[str, Any]]
                       ) -> None:
    """The HyperSIGMA comparison (bench/hypersigma_equivalence.py): fused features and MAEs per size, the
    release's checkpoint loading against ours, keys and shapes of -B/-L/-H."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hypersigma_equivalence as hs

    t0 = time.perf_counter()
    part, found = hs.run(path, sizes, img=64, bands=100)
    rows += part
    figures += found
    print(f"\nHyperSIGMA, released code: {path}; random-init weights (perturbed), 2 random cubes of 100 bands; "
          f"({time.perf_counter() - t0:.0f} s)")
    print("adjustments to run the released code: " + "; ".join(hs.STUBS))
    print(f"{'size':>4s} {'gate':17s} {'p':>2s} {'output':22s} {'shape':>16s} {'max abs diff':>13s} "
          f"{'|released|':>11s}")
    for r in part:
        if "output" in r:
            print(f"{r['size']:>4s} {r['gate']:17s} {r['patch']:2d} {r['output']:22s} "
                  f"{'x'.join(map(str, r['shape'])):>16s} {r['max_abs_diff']:13.3g} {r['released_max_abs']:11.3g}")
        else:
            print(f"{r['size']:>4s} {r['kind']} MAE: strict load into the released class {r['strict_load']}, "
                  f"{r['keys']} keys; loss diff {r['loss_diff']:.3g}, pred max abs diff {r['pred_max_abs_diff']:.3g}, "
                  f"same mask {r['mask_equal']}, fresh decoder positions diff {r['fresh_decoder_pos_embed_diff']:.3g}")
    with tempfile.TemporaryDirectory() as folder:
        for load in hs.compare_pretrained_load(hs.import_released(path), "b", 32, 2, Path(folder)):
            rows.append(load)
            print(f"-B {load['kind']} checkpoint into a 32 px / patch 2 encoder: release's init_weights vs ours: "
                  f"{load['loaded']} loaded, resized {load['resized']}, {load['reinitialised']} re-initialised, "
                  f"{load['ignored']} ignored; max abs diff of what both loaded {load['max_abs_diff']:.3g}")
            figures.append({"name": f"HyperSIGMA-B {load['kind']} checkpoint: loaded tensors vs the release's "
                                    "init_weights, max abs diff", "value": load["max_abs_diff"], "target": hs.TARGET,
                            "met": load["max_abs_diff"] <= hs.TARGET})
    for size in ("b", "l", "h"):
        k = hs.compare_keys(hs.import_released(path), size)
        print(f"HyperSIGMA-{k['size']}: {k['keys']} keys (released without heads {k['released_keys']}), "
              f"{k['params_m']:.2f} M parameters (released {k['released_params_m']:.2f} M), {len(k['differing'])} "
              f"differ; MAEs {k['spatial_mae_params_m']:.2f} M / {k['spectral_mae_params_m']:.2f} M, "
              f"{len(k['spatial_mae_differing']) + len(k['spectral_mae_differing'])} keys differ")
        differ = len(k["differing"]) + len(k["spatial_mae_differing"]) + len(k["spectral_mae_differing"])
        figures.append({"name": f"HyperSIGMA-{k['size']} keys differing in name or shape (fused model, two MAEs)",
                        "value": differ, "target": 0, "met": differ == 0})


def hyperfree_section(path: str, figures: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """The zero-shot comparison: each released task function's map against ours, pixels differing."""
    zs_rows = compare_zeroshot(path)
    print(f"\nreleased HyperFree task functions: {path}; random-init (perturbed) reduced layout {ZS_LAYOUT}, "
          "40x48 12-bit cube, behaviour 'released'")
    for r in zs_rows:
        print(f"{r['task']:32s} {'x'.join(map(str, r['shape'])):>10s} differing pixels {r['differing_pixels']:6d} "
              f"positives {r['positives']:6d} {'EQUAL' if r['equal'] else 'DIFFER'} {r['note']}")
        figures.append({"name": f"zero-shot {r['task']}: pixels differing from the released",
                        "value": r["differing_pixels"], "target": 0,
                        "met": r["equal"] != r["task"].startswith("control")})
    rows += [{"section": "zeroshot", **r} for r in zs_rows]


# ------------------------------------------------------------------------------------------------ zero-shot tasks
ZS_TASKS = {"classification": "hyperspectral_classification", "one_class": "hyperspectral_one_class_classification",
            "target": "hyperspectral_target_detection", "anomaly": "hyperspectral_anomaly_detection",
            "change": "hyperspectral_change_detection"}
ZS_PERTURB = 0.5
"""Perturbation of the random weights: large, so that mask features depend on the image (they are nearly
collinear with SAM's initialisation)."""
OPEN_SET = 0.99
"""Open-set threshold of the comparison: near 1, so that the released test on the last cosine bites."""
ZS_GLOBAL = (1, 3)
ZS_LAYOUT: dict[str, Any] = {"img_size": 256, "embed_dim": 64, "depth": 4, "num_heads": 2,
                             "global_attn_indexes": ZS_GLOBAL}
"""A reduced HyperFree layout (window 14, neck 256, SAM decoder as released) that both builders make."""


def import_released_hyperfree(path: str | Path) -> tuple[types.ModuleType, dict[str, types.ModuleType]]:
    """The released `HyperFree` package and its five task modules from a checkout (stand-ins for the modules the
    task scripts import but the compared functions do not use)."""
    for name in ("osgeo", "cv2", "seaborn", "sklearn", "sklearn.metrics"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            for attr in ("gdal", "precision_score", "recall_score", "f1_score", "roc_auc_score", "roc_curve"):
                setattr(stub, attr, None)
            sys.modules[name] = stub
    sys.modules["sklearn"].metrics = sys.modules["sklearn.metrics"]  # type: ignore[attr-defined]
    root = Path(path).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import matplotlib

    matplotlib.use("Agg")
    pkg = importlib.import_module("HyperFree")
    modules = {}
    for task, folder in ZS_TASKS.items():
        spec = importlib.util.spec_from_file_location(
            f"released_{task}", root / "Fine-tuning-free-manner" / folder / "prompt_mask_feature_interaction.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[task] = module
    return pkg, modules


def released_hyperfree(pkg: types.ModuleType, seed: int = 0) -> torch.nn.Module:
    """The released builder's reduced model, every parameter but the weight banks perturbed (seeded)."""
    torch.manual_seed(seed)
    model = pkg._build_HyperFree(ZS_LAYOUT["embed_dim"], ZS_LAYOUT["depth"], ZS_LAYOUT["num_heads"],
                                 list(ZS_GLOBAL), None, 16,
                                 image_size=ZS_LAYOUT["img_size"]).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "weight_bank" not in name:
                param.add_(torch.randn(param.shape, generator=gen) * ZS_PERTURB)
    return model


def zs_cube(seed: int, height: int = 40, width: int = 48, bands: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A 12-bit (H, W, C) scene of rectangles with distinct spectra (above 500: both sides feed it raw)."""
    from catalog.fixtures.synth import scene

    wl = np.linspace(427.0, 1017.0, bands)
    cube = scene(np.random.default_rng(seed), wl, height, width, objects=4, noise=0.01)
    return np.round(np.moveaxis(cube, 0, -1) * 4095).astype(np.uint16), wl


def compare_zeroshot(path: str | Path, pps: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Rows (task, output, shape, pixels differing, equal) of the released task functions against ours."""
    import random

    from model import create_model, load_checkpoint
    from stages.zeroshot import core
    from stages.zeroshot.core import MaskFeatures, Stack
    from stages.zeroshot.encode import ReleasedDraws, encode_features, generate_masks

    pkg, tasks = import_released_hyperfree(path)
    released = released_hyperfree(pkg, seed)
    ours = create_model("hyperfree_b", **ZS_LAYOUT).eval()
    report = load_checkpoint(ours, released.state_dict(), strict=True)
    assert report.is_exact, report
    cube, wl = zs_cube(seed)
    cube2, _ = zs_cube(seed + 7)
    h, w = cube.shape[:2]
    gsd = 0.5
    gsd_released = torch.tensor([gsd * max(h, w) / ZS_LAYOUT["img_size"]])  # the demos' GSD / (1024 / max side)
    rows: list[dict[str, Any]] = []

    def generator(iou: float, stab: float) -> Any:
        return pkg.SamAutomaticMaskGenerator(released, pred_iou_thresh=iou, stability_score_thresh=stab,
                                             points_per_side=pps, box_nms_thresh=nms)

    def ours_masks(img: np.ndarray, iou: float, stab: float) -> np.ndarray:
        amg = {"pred_iou_thresh": iou, "stability_score_thresh": stab, "points_per_side": pps, "box_nms_thresh": nms}
        return generate_masks(ours, img, wl, gsd, amg, "released")[0]

    def row(task: str, mine: np.ndarray, theirs: np.ndarray, extra: str = "") -> None:
        a, b = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
        differ = int((a != b).sum()) if a.shape == b.shape else -1
        rows.append({"task": task, "shape": list(a.shape), "differing_pixels": differ, "equal": differ == 0,
                     "positives": int((b > 0).sum()), "note": extra})

    # masks (the generators compared directly first: every task rests on them); random-init predicted IoUs are
    # meaningless, so every mask is kept and NMS is off: many distinct masks, overlapping, of every size
    iou, stab, nms = -100.0, -100.0, 1.0
    theirs_anns = generator(iou, stab).generate(cube, wl.tolist(), gsd_released)
    mine = ours_masks(cube, iou, stab)
    theirs_masks = np.stack([a["segmentation"] for a in theirs_anns]) if theirs_anns else np.zeros((0, h, w))
    row("automatic masks", mine, theirs_masks, f"{len(mine)} masks")
    stack = Stack.of(mine)
    covered = np.argwhere(stack.masks.any(0)) if len(stack) else np.zeros((0, 2), dtype=int)
    if len(covered) < 3:
        raise AssertionError("the random-init masks cover too few pixels to place prompts; try another seed")
    prompts = [covered[i * len(covered) // 3] for i in range(3)]

    maps = encode_features(ours, cube, wl, gsd, "released")
    fi = 1
    few_shots = []
    for y, x in prompts:
        m = np.zeros((h, w))
        m[y, x] = 1
        few_shots.append(m)
    _, ref_map = tasks["classification"].hyperspectral_classification(
        generator(iou, stab), cube, few_shots, wl.tolist(), fi, gsd_released, 0)
    mine_map = core.classify(stack, MaskFeatures(maps[fi], (h, w)), [[tuple(p)] for p in prompts], [0, 1, 2], 0.0,
                             "released", {})
    row("classification", mine_map, ref_map, f"{len(np.unique(ref_map))} labels painted")
    _, ref_open = tasks["classification"].hyperspectral_classification(
        generator(iou, stab), cube, few_shots, wl.tolist(), -1, gsd_released, OPEN_SET)
    mine_open = core.classify(stack, MaskFeatures(maps[-1], (h, w)), [[tuple(p)] for p in prompts], [0, 1, 2],
                              OPEN_SET, "released", {})
    row("classification, neck, open set", mine_open, ref_open, f"open_set_thresh {OPEN_SET}")

    ref_occ = tasks["one_class"].hyperspectral_OCC(generator(iou, stab), cube, few_shots[0], 0.3, wl.tolist(), fi,
                                                   gsd_released)
    mine_occ = core.one_class(stack, MaskFeatures(maps[fi], (h, w)), tuple(prompts[0]), 0.3, "released", {})
    row("one_class", mine_occ.map, ref_occ, f"threshold {mine_occ.threshold:.2f}")

    spectrum = cube[prompts[1][0], prompts[1][1]].astype(np.float64)
    draws = ReleasedDraws(seed).next(wl)
    td_feats = MaskFeatures(encode_features(ours, cube, wl, gsd, "released", band_draws=draws)[-1], (h, w))
    # the cosine threshold splitting the masks' similarities to the target in half (random features are nearly
    # collinear: a fixed threshold paints all or nothing), so the comparison decides on values near 1
    pixel = core.best_spectral_match(cube, spectrum)
    target = td_feats.mean(stack.masks[stack.smallest_holding(pixel, "target", {})]).numpy()
    td_thr = float(np.median([core.cosine_np(td_feats.mean(m).numpy(), target) for m in stack.masks]))
    random.seed(seed)
    ref_td = tasks["target"].Hyperspectral_TD(generator(iou, stab), cube, spectrum, td_thr, wl.tolist(), -1,
                                             gsd_released)
    mine_td, _ = core.target_detection(stack, td_feats, cube, spectrum, td_thr, 1, {})
    row("target (before dilation)", mine_td, ref_td, f"random band draw replayed; cosine threshold {td_thr:.6f}")

    share = float(np.median(mine.reshape(len(mine), -1).sum(axis=1))) / (h * w)  # half the masks are anomalies
    ref_ad = tasks["anomaly"].hyperspectral_anomaly_detection(theirs_anns, share)
    row("anomaly", core.anomaly_detection(mine, share), ref_ad, f"area share {share:.4f}")

    random.seed(seed)
    ref_cd, _, _ = tasks["change"].Hyperspectral_CD(generator(iou, stab), cube, cube2, wl.tolist(), gsd_released,
                                                   0.74)
    rd = ReleasedDraws(seed)
    f1 = encode_features(ours, cube, wl, 1.0, "released", rd.next(wl), gsd_as_given=True)[-1]
    m2 = ours_masks(cube2, iou, stab)
    f2 = encode_features(ours, cube2, wl, 1.0, "released", rd.next(wl), gsd_as_given=True)[-1]
    mine_cd, _ = core.change_detection(stack, Stack.of(m2), MaskFeatures(f1, (h, w), pad_aware=False),
                                       MaskFeatures(f2, (h, w), pad_aware=False), 0.74, "released")
    row("change", mine_cd, ref_cd, "random band draws replayed, GSD 1.0")
    g1 = encode_features(ours, cube, wl, gsd, "fixed")[-1]
    g2 = encode_features(ours, cube2, wl, gsd, "fixed")[-1]
    fixed_cd, _ = core.change_detection(stack, Stack.of(m2), MaskFeatures(g1, (h, w)), MaskFeatures(g2, (h, w)),
                                        0.74, "fixed")
    row("control: change, fixed", fixed_cd, ref_cd, "the fixed behaviour: must differ from the released map")
    return rows


if __name__ == "__main__":
    main()
