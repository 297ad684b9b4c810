"""Propagation figures with a trained STCN checkpoint (issues 4 and 9):

    python bench/propagation_eval.py largest --stcn CKPT      # GT masks on each organ's largest slice
    python bench/propagation_eval.py every10 --stcn CKPT      # GT drawn on every 10th slice (annotation assist)
    python bench/propagation_eval.py assist [--stcn CKPT]     # the assist's modes, every 5th / 10th / 20th slice

Each runs on the 4 held-out learnability phantoms and on the real CTs of ../shared/data
(TotalSegEx_0001, _0002 and _0003; skipped with a message when absent), and prints per-organ DSC
of the filled volume against the full ground truth next to the nearest-slice copy baseline,
with the engine's seconds per filled slice. JSON under bench/out/propagation_eval/.

``assist`` is the annotation assist's table: ground truth drawn on every 5th, 10th and 20th
slice (from slice 0), each mode of ``flare22 propagate --mode`` (nearest, interp, and with
``--stcn`` also stcn and fused) scored by mean DSC over the organs in the ground truth, per
real CT (TotalSegEx_0001, _0002, _0003; their labels are TotalSegmentator's output, not
manual) and over the held-out phantoms (the demo's test set: seed 4000, 48 x 128 x 128,
written under bench/out/propagation_eval/phantoms unless ``--phantoms`` names a folder).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.assist import MODES, FusionConfig, fill_modes, largest_area_slices, nearest_copy, propagate_annotations  # noqa: E402
from app.ctio import read_ct, read_label_like  # noqa: E402
from app.labels import ORGANS  # noqa: E402
from app.resize import resize_labels_nearest  # noqa: E402
from app.propagation import PropagationConfig  # noqa: E402
from evaluation.scoring import dice  # noqa: E402
from training.torch_backend import TorchStcnBackend  # noqa: E402
from training.models.stcn import STCN_CONFIGS  # noqa: E402
from training.train_propagation import load_stcn  # noqa: E402

SHARED = Path(os.environ.get("FLARE22_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench" / "out" / "propagation_eval"


def cases(phantom_dir: Path):
    for img in sorted((phantom_dir / "images").glob("*_0000.nii.gz")):
        yield "phantoms", img, phantom_dir / "labels" / img.name.replace("_0000", "")
    if (SHARED / "images").is_dir():
        for name in REAL:
            yield name, SHARED / "images" / f"{name}_0000.nii.gz", SHARED / "labels" / f"{name}.nii.gz"
    else:
        print(f"real CTs not found at {SHARED}: skipped")


REAL = ("TotalSegEx_0001", "TotalSegEx_0002", "TotalSegEx_0003")


def assist_cases(phantom_dir: Path):
    """(group, case name, image, label): the held-out phantoms, then each real CT."""
    for img in sorted((phantom_dir / "images").glob("*_0000.nii.gz")):
        yield "phantoms", img.name.replace("_0000.nii.gz", ""), img, phantom_dir / "labels" / img.name.replace("_0000", "")
    if (SHARED / "images").is_dir():
        for name in REAL:
            yield name, name, SHARED / "images" / f"{name}_0000.nii.gz", SHARED / "labels" / f"{name}.nii.gz"
    else:
        print(f"real CTs not found at {SHARED}: skipped")


def mean_dsc(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean DSC over the organs present in the ground truth."""
    return float(np.mean([dice(gt == o, pred == o) for o in ORGANS if (gt == o).any()]))


def assist_table(args) -> int:
    phantoms = Path(args.phantoms) if args.phantoms else OUT / "phantoms"
    if not (phantoms / "images").is_dir():
        from evaluation.phantom import write_dataset

        print(f"writing the 4 held-out phantoms (demo test set, seed 4000) to {phantoms}")
        write_dataset(phantoms, 4, seed=4000, shape_zyx=(48, 128, 128))
    modes = [m for m in args.modes.split(",") if m]
    backend, size = None, 128
    if args.stcn:
        net, state = load_stcn(args.stcn)
        size = propagation_size(state)
        backend = TorchStcnBackend(net, "cpu")
    else:
        modes = [m for m in modes if m in ("nearest", "interp")]
    fusion = FusionConfig(**json.loads(args.fusion)) if args.fusion else FusionConfig()
    variants = {k: FusionConfig(**v) for k, v in json.loads(args.variants).items()} if (args.variants and backend) else {}
    steps = [int(s) for s in args.steps.split(",")]
    rows: dict = {}
    for group, name, img, lab in assist_cases(phantoms):
        vol, props = read_ct(img)
        gt = read_label_like(lab, props)
        for step in steps:
            slices = list(range(0, gt.shape[0], step))
            ann = np.zeros_like(gt)
            ann[slices] = gt[slices]
            filled, stats = fill_modes(backend, vol, ann, slices, (size, size), modes, fusion=fusion, variants=variants,
                                       absent_votes=not args.no_absent_votes)
            for mode, pred in filled.items():
                r = rows.setdefault(group, {}).setdefault(f"every{step}", {}).setdefault(mode, {"dsc": [], "ms": []})
                r["dsc"].append(mean_dsc(gt, pred))
                r["ms"].append(1000 * stats["seconds"][mode] / max(1, gt.shape[0] - len(slices)))
            print(f"  {name} every{step}: " + " ".join(f"{m} {rows[group][f'every{step}'][m]['dsc'][-1]:.3f}"
                                                      for m in filled), flush=True)
    modes = modes + list(variants)
    res = {"stcn": args.stcn or None, "absent_votes": not args.no_absent_votes, "fusion": fusion.__dict__,
           "variants": {k: v.__dict__ for k, v in variants.items()},
           "groups": {}}
    for group, by_step in rows.items():
        res["groups"][group] = {}
        for step, by_mode in by_step.items():
            res["groups"][group][step] = {m: {"mean_dsc": float(np.mean(v["dsc"])), "cases": len(v["dsc"]),
                                              "ms_per_filled_slice": float(np.mean(v["ms"]))} for m, v in by_mode.items()}
    print("\nannotation assist, mean DSC over organs (real CT labels are TotalSegmentator output)")
    print("| case | drawn | " + " | ".join(modes) + " |\n|---|---|" + "---|" * len(modes))
    for group, by_step in res["groups"].items():
        for step, by_mode in by_step.items():
            print(f"| {group} | {step} | " + " | ".join(f"{by_mode[m]['mean_dsc']:.3f}" for m in modes) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    out = Path(args.json) if args.json else OUT / "assist.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


def propagation_size(state: dict) -> int:
    """The slice size a checkpoint propagates at: its config's, or its training view (``--view``)."""
    return max(STCN_CONFIGS[state["config"]["model"]].image_size, int(state["config"].get("view", 0)))


def copy_at(ann: np.ndarray, slices: list[int], hw: tuple[int, int]) -> np.ndarray:
    """The nearest copy made through the model's resolution (drawn slices resized to ``hw``,
    copied, resized back; drawn slices kept): the copy under the same loss of in-plane
    detail as the propagation's output, which is composed at the model's size."""
    n, h, w = ann.shape
    small = np.zeros((n,) + tuple(hw), ann.dtype)
    small[slices] = np.stack([resize_labels_nearest(ann[t], hw) for t in slices])
    copied = nearest_copy(small, slices)
    out = np.stack([resize_labels_nearest(copied[t], (h, w)) for t in range(n)])
    out[slices] = ann[slices]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("largest", "every10", "assist"))
    p.add_argument("--stcn", help="STCN checkpoint (required for largest / every10)")
    p.add_argument("--phantoms", default="", help="labelled phantom folder (default: see the module docstring)")
    p.add_argument("--modes", default=",".join(MODES), help="assist: modes to score")
    p.add_argument("--steps", default="5,10,20", help="assist: draw every k-th slice, for each k")
    p.add_argument("--fusion", default="", help='assist: FusionConfig fields as JSON, e.g. {"stcn_weight": 0.3}')
    p.add_argument("--variants", default="", help='assist: more fused fillings to score, JSON {name: FusionConfig fields}')
    p.add_argument("--config", default="", help='largest / every10: PropagationConfig fields as JSON, e.g. {"crop": false}')
    p.add_argument("--no-absent-votes", action="store_true",
                   help="organs missing from a drawn slice do not vote 0 (the engine finds their ends alone)")
    p.add_argument("--json", default="", help="where to write the JSON (default bench/out/propagation_eval/WHAT.json)")
    args = p.parse_args()
    if args.what == "assist":
        return assist_table(args)
    if not args.stcn:
        p.error(f"{args.what} needs --stcn")
    if not args.phantoms:
        args.phantoms = str(OUT / "phantoms")
    net, state = load_stcn(args.stcn)
    size = propagation_size(state)
    backend = TorchStcnBackend(net, "cpu")
    config = PropagationConfig().with_overrides(json.loads(args.config)) if args.config else PropagationConfig()
    groups: dict[str, dict] = {}
    for group, img, lab in cases(Path(args.phantoms)):
        vol, props = read_ct(img)
        gt = read_label_like(lab, props)
        if args.what == "largest":
            slices = largest_area_slices(gt)
        else:
            slices = list(range(0, gt.shape[0], 10))
        ann = np.zeros_like(gt)
        ann[slices] = gt[slices]
        pred, stats = propagate_annotations(backend, vol, ann, slices, (size, size), config=config,
                                            absent_votes=not args.no_absent_votes)
        copy = nearest_copy(ann, slices)
        coarse = copy_at(ann, slices, (size, size))
        g = groups.setdefault(group, {"prop": {}, "copy": {}, "copy_model_res": {}, "seconds_per_slice": []})
        g["seconds_per_slice"].append(stats["seconds_per_slice"])
        for o in ORGANS:
            if (gt == o).any():
                g["prop"].setdefault(o, []).append(dice(gt == o, pred == o))
                g["copy"].setdefault(o, []).append(dice(gt == o, copy == o))
                g["copy_model_res"].setdefault(o, []).append(dice(gt == o, coarse == o))
    res = {"config": config.to_json(), "absent_votes": not args.no_absent_votes}
    for group, g in groups.items():
        prop, copy, coarse = ({o: float(np.mean(v)) for o, v in sorted(g[k].items())}
                              for k in ("prop", "copy", "copy_model_res"))
        res[group] = {"per_organ": prop, "nearest_copy": copy, "mean": float(np.mean(list(prop.values()))),
                      "nearest_copy_mean": float(np.mean(list(copy.values()))),
                      "nearest_copy_model_res_mean": float(np.mean(list(coarse.values()))),
                      "ms_per_filled_slice": 1000 * float(np.mean(g["seconds_per_slice"]))}
        print(f"\n{group} ({args.what}): mean DSC {res[group]['mean']:.3f}  nearest copy "
              f"{res[group]['nearest_copy_mean']:.3f} (through the model's {size} x {size}: "
              f"{res[group]['nearest_copy_model_res_mean']:.3f})  ({res[group]['ms_per_filled_slice']:.0f} ms per filled slice)")
        print("| organ | propagated | nearest copy | copy at model res |\n|---|---|---|---|")
        for o in prop:
            print(f"| {o} {ORGANS[o]} | {prop[o]:.3f} | {copy[o]:.3f} | {coarse[o]:.3f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    out = Path(args.json) if args.json else OUT / f"{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
