"""Propagation figures with a trained STCN checkpoint (issues 4 and 9):

    python bench/propagation_eval.py largest --stcn CKPT      # GT masks on each organ's largest slice
    python bench/propagation_eval.py every10 --stcn CKPT      # GT drawn on every 10th slice (annotation assist)

Each runs on the 4 held-out learnability phantoms and on the real CTs of ../shared/data
(TotalSegEx_0001 and _0003; skipped with a message when absent), and prints per-organ DSC
of the filled volume against the full ground truth next to the nearest-slice copy baseline,
with the engine's seconds per filled slice. JSON under bench/out/propagation_eval/.
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

from app.assist import largest_area_slices, nearest_copy, propagate_annotations  # noqa: E402
from app.ctio import read_ct, read_label_like  # noqa: E402
from app.labels import ORGANS  # noqa: E402
from app.propagation import PropagationConfig  # noqa: E402
from evaluation.scoring import dice  # noqa: E402
from training.torch_backend import TorchStcnBackend  # noqa: E402
from training.train_propagation import load_stcn  # noqa: E402

SHARED = Path(os.environ.get("FLARE22_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench" / "out" / "propagation_eval"


def cases(phantom_dir: Path):
    for img in sorted((phantom_dir / "images").glob("*_0000.nii.gz")):
        yield "phantoms", img, phantom_dir / "labels" / img.name.replace("_0000", "")
    if (SHARED / "images").is_dir():
        for name in ("TotalSegEx_0001", "TotalSegEx_0003"):
            yield name, SHARED / "images" / f"{name}_0000.nii.gz", SHARED / "labels" / f"{name}.nii.gz"
    else:
        print(f"real CTs not found at {SHARED}: skipped")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("largest", "every10"))
    p.add_argument("--stcn", required=True)
    p.add_argument("--phantoms", default=str(ROOT / "bench/out/learnability/data/val"))
    args = p.parse_args()
    net, state = load_stcn(args.stcn)
    size = 128 if state["config"]["model"] == "tiny" else 512
    backend = TorchStcnBackend(net, "cpu")
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
        pred, stats = propagate_annotations(backend, vol, ann, slices, (size, size), config=PropagationConfig())
        copy = nearest_copy(ann, slices)
        g = groups.setdefault(group, {"prop": {}, "copy": {}, "seconds_per_slice": []})
        g["seconds_per_slice"].append(stats["seconds_per_slice"])
        for o in ORGANS:
            if (gt == o).any():
                g["prop"].setdefault(o, []).append(dice(gt == o, pred == o))
                g["copy"].setdefault(o, []).append(dice(gt == o, copy == o))
    res = {}
    for group, g in groups.items():
        prop = {o: float(np.mean(v)) for o, v in sorted(g["prop"].items())}
        copy = {o: float(np.mean(v)) for o, v in sorted(g["copy"].items())}
        res[group] = {"per_organ": prop, "nearest_copy": copy, "mean": float(np.mean(list(prop.values()))),
                      "nearest_copy_mean": float(np.mean(list(copy.values()))),
                      "ms_per_filled_slice": 1000 * float(np.mean(g["seconds_per_slice"]))}
        print(f"\n{group} ({args.what}): mean DSC {res[group]['mean']:.3f}  nearest copy "
              f"{res[group]['nearest_copy_mean']:.3f}  ({res[group]['ms_per_filled_slice']:.0f} ms per filled slice)")
        print("| organ | propagated | nearest copy |\n|---|---|---|")
        for o in prop:
            print(f"| {o} {ORGANS[o]} | {prop[o]:.3f} | {copy[o]:.3f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.what}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
