"""The pipeline's modes side by side (issue 15): accuracy, time and counted cost, one table.

    python bench/mode_table.py --bundle BUNDLE [--phantoms 4] [--seed 5000] [--repeats 2]
                               [--variants dense interp nearest largest published reliable fused
                                           interp:every=3 ...] [--out bench/out/mode_table]

Cases: fresh phantoms drawn with ``--seed`` (evaluation.phantom, the demo's 48 x 128 x 128
shape; the demo's own test phantoms use seed 4000) and the real CTs of ../shared/data, whose
labels are TotalSegmentator's output (a model's, not manual annotation). A variant is a mode
of app.predict.MODES, optionally with ``--propagation-option`` settings after a colon.

Time: every variant runs on every case in one process with one set of loaded backends
(ONNX Runtime, one thread), interleaved (the order rotates from case to case), ``--repeats``
times; a variant's time on a case is its fastest ``predict_volume`` call (read and write are
the same in every mode and left out), as wall and as process CPU seconds. Ratios to dense are
sums over a group's cases of the variant's time over dense's, so they do not depend on the
machine's speed. GMAC: counted, the export's multiply-adds per unit times the calls and
cells the run reports (evaluation.benchmark.cost_model); ``paper GMAC``: the paper
networks' per-unit counts (random weights, counted here with torch's FlopCounterMode) times
the same run's calls, its cells scaled x16 (tiny's 8 x 8 key grid -> the paper's 32 x 32):
the schedule the tiny trained model makes, priced at paper sizes (an upper bound for the
windows, whose one-cell margin is four times wider at tiny's size). JSON and markdown land
in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.argtypes import nonneg_int, positive_int  # noqa: E402
from app.backends import load_backends  # noqa: E402
from app.bundle import load_bundle  # noqa: E402
from app.ctio import read_ct, read_label_like  # noqa: E402
from app.predict import MODES, PredictOptions, Predictor, propagation_option  # noqa: E402
from evaluation.benchmark import COST_GRAPHS, cost_model  # noqa: E402
from evaluation.scoring import score_case  # noqa: E402

SHARED = Path(os.environ.get("FLARE22_SHARED_DATA", ROOT.parent / "shared" / "data"))
PHANTOM_SHAPE = (48, 128, 128)  # training.demo.SHAPE
PAPER_CELL_SCALE = 16.0  # (512 / 16) ** 2 / (128 / 16) ** 2


def variant(text: str) -> tuple[str, str, dict]:
    """``mode[:key=value,...]`` -> (label, mode, overrides)."""
    mode, _, opts = text.partition(":")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    overrides = dict(propagation_option(kv) for kv in opts.split(",") if kv)
    return text, mode, overrides


def paper_macs(cache: Path) -> dict[str, float]:
    """Multiply-adds per unit of the paper configuration's graphs (counted once, cached)."""
    if cache.exists():
        return json.loads(cache.read_text())
    import torch

    from export.graphs import GRAPHS, Dims, count_macs, modules, stcn_channels
    from training.models.reference import REFERENCE_CONFIGS, build_reference_pair
    from training.models.stcn import build_stcn

    torch.manual_seed(0)
    size = REFERENCE_CONFIGS["paper"].image_size
    a, b = build_reference_pair("paper")
    net = build_stcn("paper")
    mods = modules(a, b, net, names=COST_GRAPHS)
    dims = Dims((size, size), stcn_channels(net.cfg))
    macs = {name: count_macs(GRAPHS[name], mods[name], dims)["macs"] for name in COST_GRAPHS}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(macs, indent=1))
    return macs


def cases(args, tmp: Path):
    """(group, name, volume, labels, spacing_zyx) of every case."""
    from evaluation.phantom import write_dataset

    if args.phantoms:
        write_dataset(tmp / "phantoms", args.phantoms, seed=args.seed, shape_zyx=PHANTOM_SHAPE)
        for img in sorted((tmp / "phantoms" / "images").glob("*_0000.nii.gz")):
            yield "phantoms", img.name[:-12], img, tmp / "phantoms" / "labels" / img.name.replace("_0000", "")
    if args.real and (SHARED / "images").is_dir():
        for img in sorted((SHARED / "images").glob("*_0000.nii.gz")):
            yield "real CT", img.name[:-12], img, SHARED / "labels" / img.name.replace("_0000", "")
    elif args.real:
        print(f"real CTs not found at {SHARED}: skipped", file=sys.stderr)


def mean_scores(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float]:
    """Mean DSC and NSD over the organs present in the ground truth."""
    s = score_case(pred, gt, spacing)
    present = [o for o in s if (gt == o).any()]
    return float(np.mean([s[o][0] for o in present])), float(np.mean([s[o][1] for o in present]))


def run(args) -> dict:
    bundle = load_bundle(args.bundle)
    backends = load_backends(bundle, backend="onnx", device="cpu", threads=args.threads)
    predictors = {label: Predictor(bundle, PredictOptions(mode=mode, device="cpu", threads=args.threads,
                                                          propagation=ov), backends=backends)
                  for label, mode, ov in args.variants}
    paper = paper_macs(args.out / "paper_macs.json") if args.paper else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (group, name, img, lab) in enumerate(cases(args, Path(tmp))):
            volume, props = read_ct(img)
            gt = read_label_like(lab, props)
            order = list(predictors)
            order = order[i % len(order):] + order[: i % len(order)]
            best: dict[str, dict] = {}
            for _ in range(args.repeats):
                for label in order:
                    c0, t0 = time.process_time(), time.perf_counter()
                    labels, report = predictors[label].predict_volume(volume)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    if label not in best or wall < best[label]["seconds"]:
                        best[label] = {"seconds": wall, "cpu_seconds": cpu, "labels": labels, "report": report}
                    best[label]["cpu_seconds"] = min(best[label]["cpu_seconds"], cpu)
            for label in predictors:
                b = best[label]
                dsc, nsd = mean_scores(b["labels"], gt, props.spacing_zyx)
                n = volume.shape[0]
                row = {"group": group, "case": name, "variant": label, "mode": b["report"]["mode"],
                       "num_slices": n, "dsc": dsc, "nsd": nsd, "seconds": b["seconds"],
                       "cpu_seconds": b["cpu_seconds"], "gmac": sum(cost_model(bundle, b["report"], n).values()),
                       "sampled": len(b["report"].get("sampled", [])) or n,
                       "engine": {k: b["report"].get("propagation", {}).get(k)
                                  for k in ("key_encodes", "decodes", "decoded_cells")}}
                if paper:
                    row["paper_gmac"] = sum(cost_model(paper, b["report"], n, PAPER_CELL_SCALE).values())
                rows.append(row)
                print(f"{group:8} {name:18} {label:22} DSC {dsc:.3f} NSD {nsd:.3f} {b['seconds']:6.2f} s "
                      f"{row['gmac']:7.2f} GMAC", flush=True)
    res = {"bundle": str(bundle.path), "sources": bundle.manifest.get("sources", {}),
           "sampling": bundle.manifest.get("sampling"), "phantom_seed": args.seed, "phantoms": args.phantoms,
           "phantom_shape": PHANTOM_SHAPE, "repeats": args.repeats, "threads": args.threads,
           "paper_macs": paper, "rows": rows, "summary": summarise(rows)}
    return res


def summarise(rows: list[dict]) -> dict:
    out = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        g = [r for r in rows if r["group"] == group]
        dense = [r for r in g if r["mode"] == "dense"]
        tot = lambda rs, k: sum(r[k] for r in rs if r.get(k) is not None)  # noqa: E731
        out[group] = {}
        for label in dict.fromkeys(r["variant"] for r in g):
            v = [r for r in g if r["variant"] == label]
            s = {"cases": len(v), "dsc": float(np.mean([r["dsc"] for r in v])),
                 "nsd": float(np.mean([r["nsd"] for r in v])),
                 "seconds_per_case": tot(v, "seconds") / len(v), "gmac_per_case": tot(v, "gmac") / len(v)}
            if dense:
                s["time_ratio"] = tot(v, "seconds") / tot(dense, "seconds")
                s["cpu_ratio"] = tot(v, "cpu_seconds") / tot(dense, "cpu_seconds")
                s["gmac_ratio"] = tot(v, "gmac") / tot(dense, "gmac")
                s["dsc_minus_dense"] = s["dsc"] - float(np.mean([r["dsc"] for r in dense]))
            if all("paper_gmac" in r for r in v):
                s["paper_gmac_per_case"] = tot(v, "paper_gmac") / len(v)
                if dense:
                    s["paper_gmac_ratio"] = tot(v, "paper_gmac") / tot(dense, "paper_gmac")
            out[group][label] = s
    return out


def markdown(res: dict) -> str:
    lines = []
    for group, variants in res["summary"].items():
        lines.append(f"\n**{group}** ({next(iter(variants.values()))['cases']} cases)\n")
        lines.append("| mode | mean DSC | mean NSD | DSC - dense | s / case (tiny) | time / dense | CPU / dense "
                     "| GMAC / case (tiny) | GMAC / dense | paper GMAC / case | paper GMAC / dense |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, s in variants.items():
            f = lambda k, fmt: format(s[k], fmt) if k in s else "-"  # noqa: E731
            lines.append(f"| {label} | {s['dsc']:.3f} | {s['nsd']:.3f} | {f('dsc_minus_dense', '+.3f')} | "
                         f"{s['seconds_per_case']:.2f} | {f('time_ratio', '.2f')} | {f('cpu_ratio', '.2f')} | "
                         f"{s['gmac_per_case']:.1f} | {f('gmac_ratio', '.2f')} | {f('paper_gmac_per_case', ',.0f')} | "
                         f"{f('paper_gmac_ratio', '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a trained bundle (make demo exports one)")
    p.add_argument("--variants", nargs="+", type=variant, default=[variant(m) for m in MODES],
                   help="modes, each optionally with settings: interp:every=3")
    p.add_argument("--phantoms", type=nonneg_int, default=4, help="fresh phantoms (0: none)")
    p.add_argument("--seed", type=nonneg_int, default=5000, help="phantom seed (the demo's test set: 4000)")
    p.add_argument("--no-real", dest="real", action="store_false", help="skip the real CTs of ../shared/data")
    p.add_argument("--no-paper", dest="paper", action="store_false", help="skip the paper-size GMAC")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed runs per case and variant (fastest kept)")
    p.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime threads")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mode_table")
    args = p.parse_args(argv)
    if not any(m == "dense" for _, m, _ in args.variants):
        p.error("include dense: every ratio is to it")
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    md = markdown(res)
    (args.out / "mode_table.json").write_text(json.dumps(res, indent=1, default=float))
    (args.out / "mode_table.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'mode_table.json'} and mode_table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
