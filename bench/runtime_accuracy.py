"""Accuracy of each runtime and precision through the whole pipeline, in one run.

    python bench/runtime_accuracy.py --bundle BUNDLE --set phantoms=DIR --set real=DIR \
        [--runtimes ort:fp32 ort:int8 openvino:fp32 openvino:int8] [--threads 2] [--out DIR]

Each ``--set NAME=DIR`` is a folder with ``images/`` (``*_0000.nii.gz``) and ``labels/``. For
every runtime:precision the appliance predicts every set (``predict_folder``, the bundle's
default mode) and the predictions are scored (``evaluate_folders``: mean DSC and NSD over
organs and cases, FLARE rules). Against the first runtime:precision (the reference, fp32
ONNX Runtime by default): the difference in mean DSC and the fraction of voxels whose label
is the same. Seconds: the median of the per-case times the predictor reports (the model
already loaded; read and write included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.argtypes import positive_int  # noqa: E402
from app.predict import PredictOptions, predict_folder  # noqa: E402
from evaluation.benchmark import runtime_choice  # noqa: E402
from evaluation.scoring import evaluate_folders  # noqa: E402


def named_set(value: str) -> tuple[str, Path]:
    name, sep, folder = value.partition("=")
    if not sep or not (Path(folder) / "images").is_dir() or not (Path(folder) / "labels").is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=DIR with DIR/images and DIR/labels")
    return name, Path(folder)


def agreement(a: Path, b: Path) -> tuple[int, int]:
    """(voxels with the same label, voxels) of two prediction folders."""
    same = total = 0
    for p in sorted(a.glob("*.nii.gz")):
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in (p, b / p.name))
        same += int((x == y).sum())
        total += x.size
    return same, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--set", dest="sets", action="append", type=named_set, required=True, metavar="NAME=DIR")
    p.add_argument("--runtimes", nargs="+", type=runtime_choice, metavar="RUNTIME:PRECISION",
                   default=[("ort", "fp32"), ("ort", "int8"), ("openvino", "fp32"), ("openvino", "int8")])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--mode", default=None, help="pipeline mode (default: the bundle's)")
    p.add_argument("--out", type=Path, default=Path("bench/out/runtime_accuracy"))
    args = p.parse_args(argv)
    rows = []
    first = None
    for runtime, precision in args.runtimes:
        tag = f"{runtime}-{precision}"
        for name, folder in args.sets:
            out = args.out / tag / name
            t0 = time.perf_counter()
            res = predict_folder(folder / "images", out, args.bundle,
                                 PredictOptions(device="cpu", threads=args.threads, runtime=runtime,
                                                precision=precision, mode=args.mode), quiet=True)
            wall = time.perf_counter() - t0
            if not all(r.ok for r in res):
                raise SystemExit(f"runtime_accuracy: {tag} failed on {[r.case for r in res if not r.ok]}")
            summary = evaluate_folders(out, folder / "labels", args.out / tag / f"{name}.csv")
            row = {"runtime": runtime, "precision": precision, "set": name, "cases": len(res),
                   "mean_dsc": summary.mean_dsc, "mean_nsd": summary.mean_nsd,
                   "median_case_s": statistics.median(r.seconds for r in res), "wall_s": wall}
            if first is not None:
                ref = next(r for r in rows if r["set"] == name and f"{r['runtime']}-{r['precision']}" == first)
                same, total = agreement(args.out / first / name, out)
                row.update(delta_dsc=row["mean_dsc"] - ref["mean_dsc"], label_agreement=same / total)
            rows.append(row)
            print(f"{tag:<14} {name:<9} {len(res)} cases  DSC {row['mean_dsc']:.4f}  NSD {row['mean_nsd']:.4f}"
                  + (f"  dDSC {row['delta_dsc']:+.4f}  labels equal {100 * row['label_agreement']:.3f} %"
                     if "delta_dsc" in row else "  (reference)")
                  + f"  {row['median_case_s']:.2f} s/case (median)", flush=True)
        first = first or tag
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_accuracy.json").write_text(json.dumps({"bundle": args.bundle, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
