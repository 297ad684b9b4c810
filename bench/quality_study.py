"""How well the per-case quality score (agreement of the two CPS members on the sampled
slices) ranks cases by their real DSC (issue 9):

    python bench/quality_study.py --bundle BUNDLE

Held-out phantoms, each clean and deliberately degraded (Gaussian noise, a contrast shift,
a crop of the field of view, the three together), predicted with the bundle; the Spearman
correlation between the quality score and the real mean DSC is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.argtypes import positive_int  # noqa: E402
from app.labels import ORGANS  # noqa: E402
from evaluation.phantom import generate  # noqa: E402
from app.predict import PredictOptions, predict_folder  # noqa: E402
from evaluation.scoring import dice  # noqa: E402


def degrade(img: np.ndarray, kind: str, rng) -> np.ndarray:
    x = img.astype(np.float32)
    if kind in ("noise", "all"):
        x = x + rng.normal(0, 80, x.shape)
    if kind in ("contrast", "all"):
        x = (x - 40) * 0.6 + 40 + 120
    if kind in ("crop", "all"):
        h = x.shape[1]
        c = int(0.22 * h)
        x[:, :c] = -1000
        x[:, :, : c // 2] = -1000
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--cases", type=positive_int, default=4)
    p.add_argument("--shape", type=positive_int, nargs=3, default=[48, 128, 128])
    p.add_argument("--out", default=str(ROOT / "bench/out/quality_study.json"))
    args = p.parse_args()
    rng = np.random.default_rng(0)
    kinds = ("clean", "noise", "contrast", "crop", "all")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        truth = {}
        for i in range(args.cases):
            case = generate(9000 + i, tuple(args.shape))
            img, _ = case.images()
            for kind in kinds:
                name = f"Q{i:02d}{kind}"
                arr = case.image if kind == "clean" else degrade(case.image, kind, rng)
                out = sitk.GetImageFromArray(arr)
                out.CopyInformation(img)
                sitk.WriteImage(out, str(tmp / "in" / f"{name}_0000.nii.gz"))
                truth[name] = case.labels
        results = predict_folder(tmp / "in", tmp / "out", args.bundle, PredictOptions(threads=None), quiet=True)
        rows = []
        for r in results:
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "out" / f"{r.case}.nii.gz")))
            gt = truth[r.case]
            d = [dice(gt == o, pred == o) for o in ORGANS if (gt == o).any()]
            rows.append({"case": r.case, "quality": r.report["member_agreement"]["overall"],
                         "dsc": float(np.mean(d))})
    q = [r["quality"] for r in rows]
    d = [r["dsc"] for r in rows]
    rho, pval = spearmanr(q, d)
    print("| case | quality | real mean DSC |\n|---|---|---|")
    for r in sorted(rows, key=lambda r: r["quality"]):
        print(f"| {r['case']} | {r['quality']:.3f} | {r['dsc']:.3f} |")
    print(f"\nSpearman rho = {rho:.3f} (p = {pval:.2g}) over {len(rows)} cases")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "spearman": rho, "p": pval}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
